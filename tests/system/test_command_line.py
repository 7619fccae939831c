"""`python run.py` itself, as a user runs it: Hydra's job folder, the per-epoch lines, a bad value refused
before training, and the README's default job end to end."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from support.jobs import SUMMARY_KEYS
from support.wandb_records import history, inspect_summary, run_file


@pytest.mark.slow
def test_run_py_command_line(tmp_path):
    """`python run.py` itself: Hydra's folder, plain per-epoch lines (no terminal), the summary."""
    out_dir = tmp_path / "job"
    result = subprocess.run(
        [sys.executable, "run.py", "epochs=2", "dataset.train_subset=512", "dataset.test_subset=200",
         "attack.n=20", "wandb.mode=disabled", f"hydra.run.dir={out_dir}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "TQDM_DISABLE": "1"})
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert "epoch 1/2" in output and "epoch 2/2" in output
    assert (out_dir / ".hydra" / "config.yaml").is_file()
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and "epochs=2" in summary["overrides"]


def test_run_py_rejects_bad_values_before_training(tmp_path):
    out_dir = tmp_path / "job"
    result = subprocess.run([sys.executable, "run.py", "optim.lr=-1", f"hydra.run.dir={out_dir}",
                             "wandb.mode=disabled"], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode != 0
    assert "optim.lr=-1" in result.stderr
    assert not (out_dir / "checkpoints").exists()
    assert json.loads((out_dir / "summary.json").read_text())["status"] == "failed"


@pytest.mark.slow
def test_default_run_acceptance(tmp_path):
    """The README's main job, unchanged: `python run.py` on mnist5k, W&B offline, default attack."""
    out_dir = tmp_path / "job"
    result = subprocess.run([sys.executable, "run.py", f"hydra.run.dir={out_dir}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epoch"] == 8
    assert summary["test/error_pct"] <= 4.0
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["attack/ddn/median_l2"] > 0 and summary["attack/n"] == 200
    path = run_file(out_dir)
    logged = [row for row in history(path) if "test/error_pct" in row]
    assert [row["epoch"] for row in logged] == list(range(1, 9))
    assert inspect_summary(path)["summary"]["attack/ddn/median_l2"] == pytest.approx(
        summary["attack/ddn/median_l2"])
