"""`python run.py` as a user runs it, and what its jobs leave (the keys every run writes, summaries, W&B
runs): the helpers of the tests that start run.py in a subprocess (sweeps, the study, SLURM, the CUDA
sweep) and of those that check a run's keys."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support.wandb_records import history, records

ROOT = Path(__file__).resolve().parents[2]
RUN_PY = ROOT / "run.py"
SWEEPS = ROOT / "sweeps"

# The keys of every epoch's record (metrics.jsonl) and of every finished run's summary.json.
EPOCH_KEYS = ["epoch", "lr", "time/epoch_s", "train/loss", "train/error_pct", "val/loss", "val/error_pct",
              "test/loss", "test/error_pct", "lipschitz/loss_grad_max", "lipschitz/loss_grad_mean",
              "lipschitz/jacobian_2inf", "weights/product_2inf", "weights/product_spectral",
              "weights/layer_norm_estimate"]
SUMMARY_KEYS = EPOCH_KEYS + ["weights/layer_norm_product", "status", "best/test_error_pct", "best/epoch",
                             "best/val_error_pct", "test/lowest_error_pct", "selection", "overrides"]

# The Lipschitz lower-bound search of the final evaluation, shortened: at its default (64 images x 30
# steps) it is most of a tiny run's time, and any search gives a valid lower bound.
SHORT_LOWER_BOUND = ["eval.lower_bound.images=16", "eval.lower_bound.steps=5"]
# A job that trains for real but in a few seconds: 1 epoch on 512 training / 200 test images.
TINY_JOB = ["epochs=1", "dataset=mnist5k", "dataset.train_subset=512", "dataset.test_subset=200",
            "attack=none", *SHORT_LOWER_BOUND]


def run_tulip(args: list[str], cwd: Path, timeout: float, env: dict | None = None, script: Path = RUN_PY,
              ) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in `cwd` (or another `script` that starts Tulip's app); a run that outlives
    `timeout` fails the test (never hangs it)."""
    try:
        return subprocess.run([sys.executable, str(script), *args], cwd=cwd, text=True,
                              capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or "") + (expired.stderr or "")
        output = output.decode() if isinstance(output, bytes) else output
        pytest.fail(f"run.py {' '.join(args)} still running after {timeout} s:\n{output[-4000:]}")


def output_of(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"


def job_folders(sweep_dir: Path) -> list[Path]:
    return sorted((f for f in sweep_dir.iterdir() if f.name.isdigit()), key=lambda f: int(f.name))


def read_summary(job_dir: Path) -> dict:
    path = job_dir / "summary.json"
    assert path.is_file(), f"{job_dir} has no summary.json: {sorted(p.name for p in job_dir.iterdir())}"
    return json.loads(path.read_text())


def wandb_runs(job_dir: Path) -> list[dict]:
    """One dict per offline W&B run in a job folder, oldest first: name, group, tags and config of
    its `run` record (absent when the attempt was killed before W&B flushed anything) and the
    `epoch`s it logged, read from the run-<id>.wandb log (tests/support/wandb_records.py)."""
    runs = []
    for run_file in sorted((job_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run = {"file": run_file, "epochs": [row["epoch"] for row in history(run_file) if "epoch" in row]}
        for record in records(run_file):
            if record.WhichOneof("record_type") == "run":
                run.update(name=record.run.display_name, group=record.run.run_group,
                           tags=list(record.run.tags),
                           config={item.key: json.loads(item.value_json) for item in record.run.config.update})
        runs.append(run)
    return runs
