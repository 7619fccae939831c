"""``python -m tulip.bench startup``: where the default run's wall time goes.

Runs ``python -m tulip.run`` (run.py's app, so it works from any install: the default run, cnn_small
on mnist5k, 8 epochs, DDN on 200 images, W&B offline; ``--set`` adds overrides) ``--rounds`` times, one after another, each in a fresh process and
folder, and splits each wall time with the phase times the run writes into summary.json:

- Python, imports, config: from the process's start to the start of training (`time/job_start`): the
  interpreter, torch/Hydra/W&B imports, composing and checking the config, building the evaluation.
  Its imports are also timed alone, in a process that only imports the entry point.
- data and model (`time/setup_s`), W&B start (`time/wandb_init_s`), training with its per-epoch
  measurements and checkpoints (`time/train_s`), the final whole-test-set measurements
  (`time/final_measure_s`), the attacks (`time/attacks_s`) and the bounds with the certificate
  (`time/bounds_s`);
- W&B finish and exit: the rest, after summary.json is written.

Medians over the rounds. Speed is never asserted here.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from tulip.runs import metric_keys
from tulip.bench.attacks import cpu_name

TULIP = [sys.executable, "-m", "tulip.run"]
# The entry point's imports alone, timed inside the process (no interpreter start or exit)
IMPORTS = "import time; start = time.perf_counter(); import tulip.run; print(time.perf_counter() - start)"
# row label -> summary.json key (None: computed from the wall time)
PHASES = {
    "data and model": metric_keys.SETUP_TIME,
    "W&B start": metric_keys.WANDB_INIT_TIME,
    "training (epochs, per-epoch measurements, checkpoints)": metric_keys.TRAIN_TIME,
    "final measurements (whole test set, guaranteed bound)": metric_keys.FINAL_MEASURE_TIME,
    "attacks": metric_keys.ATTACK_TIME,
    "bounds and certificate": metric_keys.BOUNDS_TIME,
}


def timed_process(command: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, the epoch time it started at) of one process; a failure stops the benchmark."""
    started = time.time()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return time.time() - started, started


def one_round(workdir: Path, index: int, overrides: list[str], env: dict) -> dict[str, float]:
    folder = workdir / f"run{index}"
    wall, started = timed_process([*TULIP, f"hydra.run.dir={folder}", *overrides],
                                  workdir, env)
    summary = json.loads((folder / "summary.json").read_text())
    row = {"Python, imports, config": summary["time/job_start"] - started}
    row.update({label: summary.get(key, 0.0) for label, key in PHASES.items()})
    row["W&B finish and exit"] = wall - row["Python, imports, config"] - summary["time/total_s"]
    row["wall"] = wall
    done = subprocess.run([sys.executable, "-c", IMPORTS], cwd=workdir, env=env, capture_output=True, text=True)
    row["of which `import tulip.run` (torch, Hydra, W&B, Tulip)"] = float(done.stdout.split()[-1])
    return row


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tulip.bench startup", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], help="run overrides, e.g. wandb.mode=disabled")
    args = parser.parse_args(argv)
    env = {**os.environ, "TQDM_DISABLE": "1"}
    with tempfile.TemporaryDirectory(prefix="tulip-bench-startup-") as workdir:
        rows = [one_round(Path(workdir), i, args.set, env) for i in range(args.rounds)]
    print(f"Default run's wall time: python -m tulip.run {' '.join(args.set)}; {cpu_name()}, "
          f"{len(os.sched_getaffinity(0))} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
          f"torch {torch.__version__}, Python {platform.python_version()}; medians of {args.rounds} rounds")
    print("\n| phase | s | share of wall |\n|---|---:|---:|")
    wall = statistics.median(row["wall"] for row in rows)
    for label in rows[0]:
        value = statistics.median(row[label] for row in rows)
        print(f"| {'**wall**' if label == 'wall' else label} | {value:.2f} | {100 * value / wall:.0f} % |")
