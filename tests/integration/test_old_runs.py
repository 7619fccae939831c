"""Run folders saved before the package moved into layers still resume, evaluate, summarize and report.

tests/fixtures/runs_before_layers/ was written by the flat package (`_target_: tulip.models.CNNSmall` in
its checkpoints): `finished` trained its 2 epochs and was evaluated with FGSM on 20 images; `interrupted`
was killed during epoch 2, leaving epoch 1's checkpoint. Each test works on a copy.
"""
import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import ROOT, compose_config
from tulip import report
from tulip.build import load_run
from tulip.main import run
from tulip.runs import metric_keys
from tulip.runs.folder import RunFolder

FIXTURE = ROOT / "tests" / "fixtures" / "runs_before_layers"
# The command line the fixture's runs were made with (on top of conftest's TINY)
MADE_WITH = ["epochs=2", "dataset.train_subset=256", "dataset.test_subset=100", "model.channels=[4,8]",
             "model.hidden=16", "attack=fgsm", "attack.n=20", "eval.bounds=true", "threads=1"]


def copy_of(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(FIXTURE / name, tmp_path / name))


def test_the_fixture_predates_the_layers():
    """What the other tests rely on: the checkpoints hold the old flat paths, which load mapped."""
    raw = torch.load(FIXTURE / "finished" / "checkpoints" / "best.pt", weights_only=True)
    assert raw["config"]["model"]["_target_"] == "tulip.models.CNNSmall"
    loaded = load_run(FIXTURE / "finished", torch.device("cpu"))
    assert loaded.cfg.model._target_ == "tulip.nn.models.CNNSmall"
    assert type(loaded.model).__module__ == "tulip.nn.models"


def test_an_interrupted_old_run_resumes_to_its_end(tmp_path):
    folder = RunFolder(copy_of("interrupted", tmp_path))
    assert [row["epoch"] for row in folder.read_metrics()] == [1]
    epoch_one = folder.read_metrics()[0]

    # the old run trained on all 4,000 digits and chose on the test set: resumed as it was made
    metrics = run(compose_config(*MADE_WITH, "dataset.val_size=0"), folder.path)

    summary = folder.read_summary()
    assert summary["status"] == "finished" and summary["epoch"] == 2
    rows = folder.read_metrics()
    assert [row["epoch"] for row in rows] == [1, 2]
    assert rows[0] == epoch_one  # epoch 1 was resumed, not trained again
    assert folder.load_checkpoint("last")["epoch"] == 2
    assert metrics["attack/n"] == 20 and "attack/fgsm/median_linf" in summary


def test_mode_evaluate_on_an_old_run(tmp_path):
    folder = RunFolder(copy_of("finished", tmp_path))
    before = folder.read_summary()
    assert before["attack/n"] == 20

    metrics = run(compose_config("mode=evaluate", f"run_dir={folder.path}", "attack=fgsm", "attack.n=10"))

    summary = folder.read_summary()
    assert metrics["attack/n"] == 10 and summary["attack/n"] == 10  # evaluated again, on 10 images
    assert summary["status"] == "finished" and summary["epoch"] == 2
    assert {"attack/fgsm/median_linf", "attack/best/error_pct_linf@0.1", "cert/median_l2"} <= summary.keys()
    assert summary["best/test_error_pct"] == before["best/test_error_pct"]  # training's record is kept
    with folder.csv_file("attacks").open() as f:
        assert len(list(csv.DictReader(f))) == 10


def test_mode_summary_on_an_old_run(tmp_path):
    folder = RunFolder(copy_of("finished", tmp_path))

    metrics = run(compose_config("mode=summary", f"run_dir={folder.path}"))

    summary = folder.read_summary()
    written = {key for key in summary if key.startswith("summary/")}
    assert written and written <= metrics.keys()
    assert all(summary[key] == pytest.approx(metrics[key]) for key in written if summary[key] is not None)
    assert summary["status"] == "finished" and summary["attack/n"] == 20  # the rest is left as it was


def test_tulip_report_lists_old_runs(tmp_path):
    finished, interrupted = copy_of("finished", tmp_path / "runs"), copy_of("interrupted", tmp_path / "runs")

    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0

    with (tmp_path / "report" / "runs.csv").open() as f:
        rows = {Path(row["run"]).name: row for row in csv.DictReader(f)}
    assert rows.keys() == {"finished", "interrupted"}
    for name, folder in (("finished", finished), ("interrupted", interrupted)):
        saved = json.loads((folder / "summary.json").read_text())
        assert rows[name]["status"] == saved["status"]
        assert rows[name]["model.channels"] == "[4,8]" and rows[name]["epochs"] == "2"  # its overrides
    saved = json.loads((finished / "summary.json").read_text())
    assert rows["finished"]["status"] == "finished"
    assert float(rows["finished"][metric_keys.TEST_ERROR]) == pytest.approx(saved[metric_keys.TEST_ERROR])
    assert float(rows["finished"]["attack/fgsm/error_pct_linf@0.1"]) == saved["attack/fgsm/error_pct_linf@0.1"]
