"""A plain (non-editable) install carries the config: the wheel holds every file of conf/ as package
data, and Tulip unpacked from it, with no checkout around, composes its config from that copy.

The full `pip install .` into a fresh virtual environment takes minutes (docs/benchmarks.md says how
to check it by hand); building the wheel without dependencies takes seconds.
"""
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import CONF_DIR, ROOT


# Built from a copy: setuptools builds in the source tree's build/ and never removes files from it, so
# a module deleted since an earlier build would ship again (and the checkout stays clean).
NOT_SOURCE = shutil.ignore_patterns(".git", "build", "*.egg-info", "__pycache__", "outputs", "multirun", "wandb",
                                    ".venv", "fixtures")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    source, out = tmp_path_factory.mktemp("source") / "tulip", tmp_path_factory.mktemp("wheel")
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(source)], check=True, capture_output=True, text=True)
    (built,) = out.glob("tulip-*.whl")
    return built


def test_the_wheel_holds_every_config_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"tulip/conf/{path.relative_to(CONF_DIR).as_posix()}" for path in CONF_DIR.rglob("*.yaml")}
    assert len(expected) > 50 and expected <= names
    assert {"tulip/config_files.py", "tulip/run.py", "hydra_plugins/tulip_sweeper/__init__.py"} <= names
    assert not [name for name in names if name.startswith("conf/")]  # only inside the package
    modules = {f"tulip/{path.relative_to(ROOT / 'tulip').as_posix()}" for path in (ROOT / "tulip").rglob("*.py")}
    assert {name for name in names if name.startswith("tulip/") and name.endswith(".py")} == modules


def test_an_installed_tulip_composes_its_packaged_config(wheel, tmp_path):
    """Unpacked away from the checkout (first on sys.path, run from another folder), the finder returns
    the packaged copy and Hydra composes the same config as from the checkout."""
    site = tmp_path / "site-packages"
    zipfile.ZipFile(wheel).extractall(site)
    script = ("from hydra import compose, initialize_config_dir\n"
              "from tulip.config_files import config_dir\n"
              "import tulip\n"
              "with initialize_config_dir(str(config_dir()), version_base='1.3'):\n"
              "    cfg = compose('config', overrides=['regularizer=lip', 'attack=pgd_l2'])\n"
              "print(tulip.__file__, config_dir(), cfg.model._target_, cfg.reg.lip, sorted(cfg.attack.methods), sep='\\n')\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    module, conf, model, lip, attacks = done.stdout.splitlines()
    assert module == str(site / "tulip" / "__init__.py") and conf == str(site / "tulip" / "conf")
    assert model == "tulip.nn.models.CNNSmall" and float(lip) > 0 and attacks == "['pgd_l2']"
