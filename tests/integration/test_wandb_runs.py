"""The W&B runs of one run folder: training (job type train), then mode=evaluate and mode=summary on it,
each its own run in the training run's group, linked to it. Real offline runs, read back from their
run-<id>.wandb files (tests/support/wandb_records.py).
"""
import csv
import json
import logging
import math
import time
from pathlib import Path

import pytest
import wandb
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from conftest import compose_config, copy_run
from tulip.main import hydra_context, run
from tulip.runs.folder import RunFolder
from tulip.runs.tracking import Tracker
from support.wandb_records import records


# A few seconds per run: a small MLP, fewer images, no bounds; DDN on 20 images.
FAST = ["model=mlp", "model.hidden=[32,16]", "dataset.train_subset=256", "dataset.test_subset=100",
        "eval.bounds=false"]
ATTACK = ["attack=ddn", "attack.n=20", "attack.methods.ddn.steps=10"]
OFFLINE = "wandb.mode=offline"


def offline_runs(run_dir: Path, timeout: float = 60.0) -> dict[str, dict]:
    """job type -> {"file", "folder_id", "run" (its run record), "config", "summary", "logged"}, for each
    offline W&B run in run_dir/wandb, once its exit record is written (W&B's writer may lag behind)."""
    found = {}
    deadline = time.monotonic() + timeout
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        while not any(r.WhichOneof("record_type") == "exit" for r in records(path)):
            assert time.monotonic() < deadline, f"{path} has no exit record after {timeout} s"
            time.sleep(0.2)
        entry = {"file": path, "folder_id": path.parent.name.rsplit("-", 1)[-1], "summary": {}, "logged": set()}
        for record in records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                entry["run"] = record.run
                entry["config"] = {item.key: json.loads(item.value_json) for item in record.run.config.update}
            elif kind == "summary":
                entry["summary"].update({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                                         for item in record.summary.update})
            elif kind == "history":
                entry["logged"] |= {item.nested_key[0] if item.nested_key else item.key
                                    for item in record.history.item}
        assert entry["run"].job_type not in found, f"two {entry['run'].job_type} runs in {run_dir}"
        found[entry["run"].job_type] = entry
    return found


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, str]:
    """A tiny training job of a sweep, as Hydra runs it (its .hydra/hydra.yaml records its group
    choices), then mode=evaluate and mode=summary on its folder. Returns (folder, its W&B group)."""
    root = tmp_path_factory.mktemp("sweep")
    run_dir = root / "0"
    cfg = compose_config(*FAST, *ATTACK, OFFLINE)
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create({"hydra": HydraConfig.get()}), run_dir / ".hydra" / "hydra.yaml")
    _, context = hydra_context()
    context.sweep_dir = str(root)  # grouped as a multirun's job: group = the sweep folder
    run(cfg, run_dir, context)
    # The commands' own defaults differ from the trained run's (model=cnn_small, no wandb.group).
    run(compose_config("mode=evaluate", f"run_dir={run_dir}", *ATTACK, "eval.bounds=false", OFFLINE))
    run(compose_config("mode=summary", f"run_dir={run_dir}", OFFLINE))
    return run_dir, str(root).replace("/", "_")


def test_training_run_has_job_type_train_and_summary_json_names_it(job):
    run_dir, group = job
    summary = json.loads((run_dir / "summary.json").read_text())
    training = offline_runs(run_dir)["train"]
    assert training["run"].run_id == training["folder_id"] == summary["wandb/run_id"]
    assert summary["wandb/run_path"].endswith("/" + summary["wandb/run_id"])
    assert summary["wandb/group"] == training["run"].run_group == group
    assert summary["wandb/run_name"] == training["run"].display_name


@pytest.mark.parametrize("job_type, key", [("evaluate", "attack/ddn/mean_l2"),
                                           ("summary", "summary/test/error_pct")])
def test_mode_run_joins_the_training_runs_group_and_links_to_it(job, job_type, key):
    run_dir, group = job
    summary = json.loads((run_dir / "summary.json").read_text())
    runs = offline_runs(run_dir)
    assert set(runs) == {"train", "evaluate", "summary"}
    mode, training = runs[job_type], runs["train"]
    assert mode["run"].run_group == training["run"].run_group == group
    assert mode["run"].display_name == f"{training['run'].display_name}-{job_type}"
    assert mode["config"]["training_run_id"] == training["run"].run_id
    assert mode["config"]["training_run_path"] == summary["wandb/run_path"]
    assert mode["config"]["run_dir"] == str(run_dir)
    # Filed with its training run: the trained model's config and group choices, not the command's defaults.
    assert mode["config"]["model"]["_target_"] == training["config"]["model"]["_target_"] == "tulip.nn.models.MLP"
    assert "model=mlp" in mode["run"].tags and mode["config"]["choices"]["model"] == "mlp"
    assert mode["summary"][key] == pytest.approx(summary[key])  # the mode's metric, as in summary.json
    # summary.json still names the training run: the modes' runs link to it, they do not replace it
    assert summary["wandb/run_id"] == training["run"].run_id


def test_evaluation_logs_its_per_image_table(job):
    run_dir, _ = job
    runs = offline_runs(run_dir)
    for job_type in ("train", "evaluate"):
        assert "attack/per_image" in runs[job_type]["logged"], job_type
        (table,) = runs[job_type]["file"].parent.glob("files/media/table/attack/per_image_*.table.json")
        logged = json.loads(table.read_text())
        if job_type == "evaluate":  # the table of the last evaluation is the attacks.csv now in the folder
            with (run_dir / "attacks.csv").open() as f:
                header, *rows = csv.reader(f)
            rows = [[float(v) for v in row] for row in rows]
            assert logged["columns"] == header and len(logged["data"]) == len(rows) == 20
            # an attack's failure (+inf) is an empty cell: W&B's table file is JSON
            assert logged["data"] == [[None if math.isinf(v) else v for v in row] for row in rows]
    assert "attack/per_image" not in runs["summary"]["logged"]


def test_mode_runs_are_not_training_attempts(job):
    """A training attempt in the folder after the modes' runs is the second attempt, not the fourth."""
    run_dir, _ = job
    cfg = compose_config(*FAST, OFFLINE)
    _, context = hydra_context()
    tracker = Tracker(cfg, RunFolder(run_dir), context)
    tracker.finish({}, failed=False)
    assert tracker.run.name.endswith("-attempt2")


def test_disabled_wandb_creates_no_run_and_a_failing_one_does_not_fail_the_mode(tmp_path, trained_run, monkeypatch,
                                                                              caplog):
    copy_run(trained_run.folder, tmp_path)  # trained with wandb.mode=disabled
    run(compose_config("mode=summary", f"run_dir={tmp_path}"))
    assert not list((tmp_path / "wandb").glob("*run-*"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "summary/test/error_pct" in summary and not [key for key in summary if key.startswith("wandb/")]

    def failing_init(*args, **kwargs):
        raise wandb.Error("simulated W&B failure at init")
    monkeypatch.setattr(wandb, "init", failing_init)
    metrics = run(compose_config("mode=summary", f"run_dir={tmp_path}", OFFLINE))
    assert metrics["summary/test/error_pct"] == summary["summary/test/error_pct"]
    (warning,) = [r.getMessage() for r in caplog.records if r.name == "tulip.runs.tracking" and r.levelno == logging.WARNING]
    assert "simulated W&B failure at init" in warning
