"""The training loop's start-or-resume, its finish, and what `python run.py` says at its end.

Each test trains the real composed config, shrunk to two tiny epochs (conftest.TINY).
"""
import json
import logging
import re

import pytest

from conftest import compose_config, run_interrupted_in_second_epoch
from tulip.config import ConfigError
from tulip.launch.cpus import jobs_at_once
from tulip.main import run
from tulip.runs.folder import RunFolderError
from tulip.config import TRAINING_STATE
from tulip.train.loop import FINAL_EVALUATION_SETTINGS

TWO_EPOCHS = ["epochs=2", "dataset.train_subset=256", "dataset.test_subset=100"]
# Top-level keys that neither change what training computes nor what the final evaluation measures:
# where the run goes, how it is shown, and how the device runs the same math.
HOW_IT_RUNS = {"mode", "run_dir", "objectives", "device", "threads", "channels_last", "compile", "wandb"}


def summary(folder) -> dict:
    return json.loads((folder / "summary.json").read_text())


def test_every_config_key_is_classified_for_resuming():
    """A new top-level key must be put in TRAINING_STATE (resume refuses a change), in
    FINAL_EVALUATION_SETTINGS (a rerun of a finished run re-evaluates it) or in HOW_IT_RUNS above."""
    keys = set(compose_config(tiny=False))
    classified = set(TRAINING_STATE) | set(FINAL_EVALUATION_SETTINGS) | HOW_IT_RUNS
    assert keys == classified, f"unclassified: {keys - classified}; gone: {classified - keys}"
    assert not set(TRAINING_STATE) & (set(FINAL_EVALUATION_SETTINGS) | HOW_IT_RUNS)


@pytest.mark.parametrize("changed", [["test_batch_size=7"], ["eval.n=20", "eval.every=1"], ["attack=ddn", "attack.n=5",
                                                                                          "attack.methods.ddn.steps=3"]])
def test_resume_accepts_changed_measurement_settings(changed, tmp_path, monkeypatch, caplog):
    """Lowering test_batch_size after a measurement ran out of memory (or changing eval.*, attack.*)
    resumes the run from its last checkpoint instead of refusing."""
    run_interrupted_in_second_epoch(compose_config(*TWO_EPOCHS), tmp_path, monkeypatch)
    assert summary(tmp_path)["status"] == "failed"
    with caplog.at_level(logging.INFO, logger="tulip"):
        run(compose_config(*TWO_EPOCHS, *changed), tmp_path)
    assert f"resuming {tmp_path} from epoch 1" in caplog.text
    assert summary(tmp_path)["status"] == "finished"
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2]


@pytest.mark.parametrize("changed, key", [("seed=1", "seed"), ("batch_size=32", "batch_size"),
                                          ("optim.lr=0.5", "optim.lr"), ("reg.lip=0.1", "reg.lip"),
                                          ("dataset.test_subset=50", "dataset.test_subset")])
def test_resume_refuses_a_changed_training_state_key_naming_it(changed, key, tmp_path, monkeypatch):
    run_interrupted_in_second_epoch(compose_config(*TWO_EPOCHS), tmp_path, monkeypatch)
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    with pytest.raises(ConfigError, match=rf"differs in: ([^)]*, )?{re.escape(key)}[,)]"):
        run(compose_config(*TWO_EPOCHS, changed), tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before


def test_a_finished_run_is_skipped_unless_its_final_evaluation_settings_change(tmp_path, caplog):
    cfg = compose_config()
    run(cfg, tmp_path)
    first = summary(tmp_path)
    with caplog.at_level(logging.INFO, logger="tulip"):
        again = run(compose_config("threads=1"), tmp_path)
    assert "already holds this finished run" in caplog.text
    assert summary(tmp_path) == first
    assert again["test/error_pct"] == first["test/error_pct"] and "status" not in again
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tulip"):
        run(compose_config("test_batch_size=50"), tmp_path)  # re-runs the final evaluation only
    assert "already holds this finished run" not in caplog.text
    assert summary(tmp_path)["status"] == "finished"
    assert summary(tmp_path)["time/job_start"] > first["time/job_start"]


def test_evaluate_refuses_a_run_without_summary_and_says_how_to_finish_it(tmp_path, monkeypatch):
    """A run killed during its final evaluation has checkpoints but no summary.json: mode=evaluate
    would merge its keys into a summary with no status and no best epoch. It refuses, naming the
    command that finishes the run; that command does, and mode=evaluate then works."""
    run(compose_config(), tmp_path)
    (tmp_path / "summary.json").unlink()
    evaluate = compose_config("mode=evaluate", f"run_dir={tmp_path}", "attack=ddn", "attack.n=5",
                              "attack.methods.ddn.steps=3", "eval.bounds=false")
    with pytest.raises(RunFolderError, match="has no summary.json") as refused:
        run(evaluate)
    assert f"hydra.run.dir={tmp_path}" in str(refused.value) and "last.pt" in str(refused.value)
    assert not (tmp_path / "summary.json").exists()
    run(compose_config(), tmp_path)  # the training command, in the same folder, finishes the run
    assert summary(tmp_path)["status"] == "finished"
    run(evaluate)
    merged = summary(tmp_path)
    assert merged["status"] == "finished" and "best/epoch" in merged and "attack/ddn/median_l2" in merged


def test_the_last_line_says_the_result_where_it_is_and_how_to_look_at_it(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="tulip"):
        run(compose_config(), tmp_path)
    first, last = caplog.records[0].getMessage(), caplog.records[-1].getMessage()
    saved = summary(tmp_path)
    assert last.startswith(f"run finished: test error {saved['best/test_error_pct']:.2f}% at epoch 1 of 1")
    assert f"run folder {tmp_path}" in last and f"`tulip-report {tmp_path}`" in last
    assert "wandb sync" not in last  # wandb.mode=disabled: nothing to upload
    jobs = jobs_at_once()
    assert f"{jobs} job{'s' if jobs != 1 else ''} at once" in first and "1 jobs" not in first

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="tulip"):
        run(compose_config("mode=summary", f"run_dir={tmp_path}"))
    last = caplog.records[-1].getMessage()
    assert last.startswith("summarized run finished: test error") and f"`tulip-report {tmp_path}`" in last


def test_a_failed_run_ends_with_its_status_and_error(tmp_path, monkeypatch, caplog):
    import tulip.train.loop

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory in the measurements")

    monkeypatch.setattr(tulip.train.loop, "measure", out_of_memory)
    with caplog.at_level(logging.INFO, logger="tulip"), pytest.raises(RuntimeError):
        run(compose_config(), tmp_path)
    last = caplog.records[-1]
    assert last.levelno == logging.ERROR
    assert last.getMessage().startswith("run failed at epoch 0: RuntimeError: out of memory in the measurements")
    assert f"`tulip-report {tmp_path}`" in last.getMessage()
