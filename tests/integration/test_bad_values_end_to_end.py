"""Bad values through `run()` and `python run.py`: one error naming the key, before training, a summary.json
saying `failed` and no checkpoint; and the extreme values the checks accept, trained for real.
(tests/unit/test_fuzz.py draws many more values against the same checks, called directly.)"""
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import ROOT, SHRINK, compose_config
from tulip.config import LARGEST, SMALLEST, ConfigError
from tulip.main import run

GLORO = ("model=cnn_4c3f", *SHRINK["cnn_4c3f"])


@pytest.mark.parametrize("overrides, key", [
    (["optim.lr=inf"], "optim.lr"),  # the schema, before anything is loaded
    (["reg.pgd.steps=0"], "reg.pgd.steps"),  # a part's argument, through its interpolation
    (["attack=ddn", "attack.methods.ddn.gamma=nan"], "attack.methods.ddn.gamma"),
    (["dataset.train_subset=4001"], "dataset.train_subset"),  # needs the data: once it is loaded
    (["dataset.train_per_class=6", "dataset.train_subset=null", "dataset.val_size=0"], "batch_size"),  # 60 images, batches of 64
    (["regularizer=gloro"], "reg.gloro"),  # needs the model: cnn_small has BatchNorm
])
def test_a_bad_value_stops_the_run_before_training(overrides, key, tmp_path):
    with pytest.raises(ConfigError) as error:
        run(compose_config(*overrides), tmp_path)
    assert error.value.key == key and error.value.__cause__ is None
    assert not (tmp_path / "checkpoints").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "failed" and str(error.value) in summary["error"]


# The largest (and smallest positive) accepted values, trained for real: whatever the checks let through
# must give a run that finishes or diverges (NaN metrics), never an overflow inside a training step.
REAL_RUN = ("dataset.train_subset=128", "dataset.test_subset=20", "eval.bounds=false")


@pytest.mark.parametrize("overrides", [
    [f"optim.lr={LARGEST!r}"], ["optim=adam", f"optim.lr={LARGEST!r}"], [f"optim.lr={SMALLEST!r}"],
    ["scheduler.milestones=[1]", f"scheduler.gamma={LARGEST / 10!r}", "epochs=2"],
    *([f"reg.{key}={LARGEST!r}"] for key in ("lip", "J1", "gradnorm_fd", "decay", "gradnorm")),
    ["reg.gradnorm_fd=1", f"reg.h={LARGEST!r}"], ["reg.gradnorm_fd=1", f"reg.h={SMALLEST!r}"],
    [f"reg.pgd.eps={LARGEST!r}", "reg.pgd.steps=2"], [f"reg.pgd.eps={LARGEST!r}", "reg.pgd.norm=2", "reg.pgd.steps=2"],
    ["reg.pgd.eps=0.1", f"reg.pgd.step_size={LARGEST!r}", "reg.pgd.steps=2"],
    [f"reg.trades.beta={LARGEST!r}", f"reg.trades.eps={LARGEST!r}", f"reg.trades.step_size={LARGEST!r}",
     "reg.trades.steps=2"],
    [*GLORO, f"reg.gloro={LARGEST!r}"],
    ["attack=fgsm", "attack.n=5", f"attack.epsilons.linf=[{LARGEST!r},0]"],
], ids=lambda overrides: " ".join(o for o in overrides if not o.startswith("model.")))
def test_extreme_accepted_values_finish_or_diverge(overrides, tmp_path):
    metrics = run(compose_config(*REAL_RUN, *overrides), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] in ("finished", "diverged"), summary
    assert (summary["status"] == "diverged") == math.isnan(metrics["test/error_pct"])


@pytest.mark.parametrize("override, message", [
    ("optim.lr=inf", "optim.lr=inf is invalid"),  # the schema, before anything is loaded
    ("reg.pgd.eps=inf", "reg.pgd.eps=inf is invalid"),  # it used to crash PGD's first step
])
def test_run_py_exits_non_zero_with_the_message_and_no_training_traceback(override, message, tmp_path):
    out_dir = tmp_path / "job"
    result = subprocess.run([sys.executable, "run.py", override, "dataset.train_subset=128", "attack=none",
                             "wandb.mode=disabled", f"hydra.run.dir={out_dir}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert result.stderr.count(message) == 1 and "direct cause" not in result.stderr  # one error, once
    assert "train_one_epoch" not in result.stderr and "epoch 1/" not in result.stdout + result.stderr
    assert not (out_dir / "checkpoints").exists()
    assert json.loads((out_dir / "summary.json").read_text())["status"] == "failed"
