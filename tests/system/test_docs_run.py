"""The README's everyday `python run.py` commands train for real with the tests' tiny settings."""
import pytest

from conftest import compose_config
from support.docs import first_value, readme_run_commands
from tulip import report
from tulip.main import run


@pytest.mark.slow
def test_the_readme_everyday_commands_run_with_tiny_settings(tmp_path):
    """Each README `python run.py` command trains for real with the tests' tiny settings (a grid at its
    first point), its `mode=evaluate` command evaluates the first of those runs (on 20 images), and
    `tulip-report` reads them all."""
    trained, evaluated = [], 0
    for number, args in enumerate(readme_run_commands()):
        overrides = [first_value(a) for a in args if a != "-m"]
        if any(o.startswith("run_dir=") for o in overrides):
            overrides = [f"run_dir={trained[0]}" if o.startswith("run_dir=") else o for o in overrides]
            metrics = run(compose_config(*overrides, "attack.n=20"))
            assert any(key.startswith("attack/") for key in metrics), (args, metrics)
            evaluated += 1
        else:
            folder = tmp_path / "runs" / str(number)
            metrics = run(compose_config(*overrides), folder)
            assert 0 <= metrics["test/error_pct"] < 90, (args, metrics)
            trained.append(folder)
    assert len(trained) >= 3 and evaluated == 1
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "runs.csv").read_text().count("\n") == len(trained) + 1
