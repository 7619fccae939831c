"""Run one small training job in a folder and SIGKILL it at a chosen moment, as a preemption would.

    python tests/support/fault_driver.py RUN_DIR POINT [TIMES]

POINT says where the process dies, the TIMES-th time (default 1) it gets there:
    none              run to the end
    checkpoint_write  half-way through writing a checkpoint's temporary file
    metrics_append    half-way through appending a line to metrics.jsonl
    measure           during an epoch's test-set measurements
    evaluation        during the final evaluation (after the attacks, before bounds.csv is written)
    summary_write     with summary.json's temporary file complete but not yet renamed
    hold              never dies: sleeps in the first measurements, holding the folder's lock
The job is conftest.FAULT_JOB; every process that runs it computes the same thing (CPU, one thread, seed 0).
"""
import io
import os
import signal
import sys
import time
from pathlib import Path

os.environ["OMP_NUM_THREADS"] = "1"
sys.path[:0] = [str(Path(__file__).parents[1]), str(Path(__file__).parents[2])]  # conftest, tulip

import torch  # noqa: E402

import tulip.runs.folder  # noqa: E402
import tulip.train.loop  # noqa: E402
from conftest import FAULT_JOB as JOB, compose_config  # noqa: E402
from tulip.main import run  # noqa: E402

def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def at_the(times: int, action, real):
    """A stand-in for `real` that calls action(*args) instead on the `times`-th call."""
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == times:
            return action(*args, **kwargs)
        return real(*args, **kwargs)
    return wrapper


def main(run_dir: str, point: str, times: int) -> None:
    real_save, real_replace = torch.save, os.replace

    def half_a_checkpoint(state, f):
        buffer = io.BytesIO()
        real_save(state, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        die()

    def half_a_line(folder, row):
        with folder.metrics_file.open("a") as f:
            f.write('{"epoch": ')
            f.flush()
        die()

    def summary_not_renamed(source, target):
        if Path(target).name == "summary.json":
            die()
        return real_replace(source, target)

    if point == "checkpoint_write":
        torch.save = at_the(times, half_a_checkpoint, real_save)
    elif point == "metrics_append":
        tulip.runs.folder.RunFolder.append_metrics = at_the(
            times, half_a_line, tulip.runs.folder.RunFolder.append_metrics)
    elif point == "measure":
        tulip.train.loop.measure = at_the(times, lambda *a, **k: die(), tulip.train.loop.measure)
    elif point == "evaluation":
        real_write_csv = tulip.runs.folder.RunFolder.write_csv
        tulip.runs.folder.RunFolder.write_csv = at_the(times, lambda *a, **k: die(), real_write_csv)
    elif point == "summary_write":
        os.replace = summary_not_renamed
    elif point == "hold":
        tulip.train.loop.measure = at_the(1, lambda *a, **k: time.sleep(600), tulip.train.loop.measure)
    elif point != "none":
        raise SystemExit(f"unknown POINT {point!r}")
    run(compose_config(*JOB), run_dir)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1)
