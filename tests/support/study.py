"""The tiny multi-objective study of hydra/sweeper=optuna that tests/system/test_study.py and
tests/system/test_slurm.py run, and the check that tulip-report draws its front."""
import csv
from pathlib import Path

import pytest

from support.jobs import TINY_JOB, read_summary

OBJECTIVES = ["val/error_pct", "attack/best/error_pct_l2@1"]
# A trial: 1 epoch on 512 images, DDN (10 steps) on 50 validation images for the robust error at L2 1.
MO_TINY = [*TINY_JOB, "wandb.mode=disabled", "attack=ddn", "attack.split=val", "attack.n=50",
           "attack.methods.ddn.steps=10",
           "eval.bounds=false", f"objectives=[{','.join(OBJECTIVES)}]", "hydra/sweeper=optuna",
           "regularizer=lip", "reg.lip=tag(log,interval(1e-3,1))"]


def assert_report_draws_the_front(sweep_dir: Path, out: Path):
    """`tulip-report <sweep> --front` draws the study's front; each row is the mean of its runs."""
    from tulip import report
    assert report.main([str(sweep_dir), "--front", "--out", str(out)]) == 0
    assert (out / "front.png").stat().st_size > 0 and (out / "front.pdf").is_file()
    rows = list(csv.DictReader((out / "front.csv").open()))
    assert rows
    for row in rows:
        runs = [read_summary(Path(folder)) for folder in row["runs"].split("; ")]
        assert int(row["seeds"]) == len(runs)
        for key in OBJECTIVES:
            assert float(row[key]) == pytest.approx(sum(r[key] for r in runs) / len(runs))
