"""End to end in this process: `run(cfg)` trains, measures, checkpoints, resumes and logs. `python run.py`
itself is tests/system/test_command_line.py."""
import json
import math

import pytest
import torch

from conftest import SHRINK, TRAINED_RUN, compose_config, copy_run, run_interrupted_in_second_epoch
from tulip.config import ConfigError
from tulip.data import load_dataset
from tulip.evaluate.measures import measure
from tulip.main import run
from tulip.build import build_model, load_run
from tulip.runs import metric_keys
from tulip.runs.folder import RunFolder
from tulip.seeding import set_rng_state
from support.jobs import EPOCH_KEYS, SUMMARY_KEYS
from support.wandb_records import history, inspect_summary, run_file, run_record


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_times(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith("time/")}


def test_run_writes_metrics_summary_and_checkpoints(tmp_path):
    metrics = run(compose_config("epochs=2"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["epoch"] == 2
    assert set(SUMMARY_KEYS) <= set(summary)
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2]
    # the Lipschitz figures every eval.every=2 epochs (and always the last), the rest every epoch
    assert set(EPOCH_KEYS) <= set(rows[1]) and "lipschitz/loss_grad_max" not in rows[0]
    assert {"epoch", "lr", "time/epoch_s", "train/loss", "train/error_pct", "test/loss", "test/error_pct"} <= set(rows[0])
    assert summary["test/lowest_error_pct"] == min(row["test/error_pct"] for row in rows)
    assert summary["best/val_error_pct"] == min(row["val/error_pct"] for row in rows)
    assert summary["best/test_error_pct"] == rows[summary["best/epoch"] - 1]["test/error_pct"]
    assert metrics["test/error_pct"] == rows[-1]["test/error_pct"] == summary["test/error_pct"]
    for name in ("last.pt", "best.pt"):
        saved = torch.load(tmp_path / "checkpoints" / name, weights_only=True)
        assert {"model", "optimizer", "scheduler", "epoch", "rng", "config"} <= set(saved)
    assert not list((tmp_path / "checkpoints").glob("*.tmp")), "temporary files left behind"
    # the model's outputs are finite, the loss is below chance after two epochs
    assert summary["test/loss"] < math.log(10)


def test_seeded_runs_repeat_exactly(tmp_path):
    first = run(compose_config("seed=3"), tmp_path / "a")
    second = run(compose_config("seed=3"), tmp_path / "b")
    other = run(compose_config("seed=4"), tmp_path / "c")
    assert without_times(first) == without_times(second)
    assert without_times(first) != without_times(other)


def test_checkpoint_round_trip(trained_run):
    loaded = load_run(trained_run.folder, torch.device("cpu"))
    x = loaded.data.test_x[:50]
    saved = torch.load(trained_run.folder / "checkpoints" / "best.pt", weights_only=True)
    reference = build_model(loaded.cfg, loaded.data, torch.device("cpu")).eval()
    reference.load_state_dict(saved["model"])
    assert torch.equal(loaded.model(x), reference(x))
    assert loaded.cfg.seed == 0 and loaded.checkpoint["epoch"] == 1
    # rng states survive the weights_only round trip and restore the generators exactly
    set_rng_state(saved["rng"])
    a = torch.rand(3)
    set_rng_state(saved["rng"])
    assert torch.equal(a, torch.rand(3))


def test_load_run_errors_name_the_folder(tmp_path, trained_run):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_run(tmp_path, torch.device("cpu"))
    copy_run(trained_run.folder, tmp_path / "run")
    saved = torch.load(tmp_path / "run" / "checkpoints" / "best.pt", weights_only=True)
    saved["model"] = {k: v[..., :1] if v.ndim else v for k, v in saved["model"].items()}
    torch.save(saved, tmp_path / "run" / "checkpoints" / "best.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        load_run(tmp_path / "run", torch.device("cpu"))


# Every optimizer and schedule resumes exactly: their state (moments, step counts) is in the checkpoint.
@pytest.mark.slow
@pytest.mark.parametrize("optimization, learning_rates", [
    (("scheduler.milestones=[2]",), 2), (("optim=adam", "scheduler=cosine"), 3),
    (("optim=adamw", "scheduler=onecycle"), 3), (("scheduler=constant",), 1)])
def test_interrupted_run_resumes_to_the_same_metrics(tmp_path, monkeypatch, optimization, learning_rates):
    def compose():
        return compose_config("epochs=3", "dataset.train_subset=256", "dataset.test_subset=100", *optimization)

    uninterrupted = run(compose(), tmp_path / "whole")
    run_interrupted_in_second_epoch(compose(), tmp_path / "split", monkeypatch)
    summary = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["epoch"] == 1

    resumed = run(compose(), tmp_path / "split")
    assert without_times(resumed) == without_times(uninterrupted)
    rows = read_jsonl(tmp_path / "split" / "metrics.jsonl")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [without_times(r) for r in rows] == [without_times(r) for r in
                                                 read_jsonl(tmp_path / "whole" / "metrics.jsonl")]
    assert len({r["lr"] for r in rows}) == learning_rates  # the schedule really moved (or really did not)


def test_resume_with_a_different_config_refuses_and_keeps_the_checkpoint(tmp_path, trained_run):
    copy_run(trained_run.folder, tmp_path)
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    summary_before = (tmp_path / "summary.json").read_text()
    with pytest.raises(ConfigError, match="optim.lr"):
        run(compose_config(*TRAINED_RUN, "optim.lr=0.05"), tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before
    assert (tmp_path / "summary.json").read_text() == summary_before
    # W&B settings do not change what is trained: the same run resumes (nothing left to train)
    again = run(compose_config(*TRAINED_RUN, "wandb.project=other"), tmp_path)
    assert again["test/error_pct"] == json.loads((tmp_path / "summary.json").read_text())["test/error_pct"]


def test_divergence_stops_the_run_and_returns_nan(tmp_path):
    metrics = run(compose_config("optim.lr=1e30", "wandb.mode=offline"), tmp_path)
    assert math.isnan(metrics["test/error_pct"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["epoch"] == 1 and summary["step"] >= 0
    assert not (tmp_path / "checkpoints" / "last.pt").exists()
    state = inspect_summary(run_file(tmp_path))
    assert state["exit_code"] == 1  # the W&B run is finished and marked failed


def test_wandb_offline_run_holds_epochs_config_and_summary(tmp_path):
    cfg = compose_config("epochs=2", "wandb.mode=offline", "regularizer=none")
    run(cfg, tmp_path)
    path = run_file(tmp_path)
    rows = [row for row in history(path) if "test/error_pct" in row]
    local = read_jsonl(tmp_path / "metrics.jsonl")
    assert [row["epoch"] for row in rows] == [1, 2]
    for logged, written in zip(rows, local):
        assert set(logged) >= set(written)
        for key in written:
            assert logged[key] == pytest.approx(written[key]), key
    assert set(EPOCH_KEYS) <= set(local[-1])
    state = inspect_summary(path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert state["exit_code"] == 0 and state["state"] == "finished"
    assert state["config"]["epochs"] == 2 and state["config"]["optim"]["lr"] == 0.1
    assert state["summary"]["best/test_error_pct"] == pytest.approx(summary["best/test_error_pct"])
    assert state["summary"]["test/error_pct"]["min"] == pytest.approx(summary["test/lowest_error_pct"])
    assert state["summary"]["val/error_pct"]["min"] == pytest.approx(summary["best/val_error_pct"])
    assert state["summary"]["selection"] == "val"
    assert state["summary"]["weights/layer_norm_product"] == pytest.approx(
        summary["weights/layer_norm_product"])
    record = run_record(path)
    assert "epochs=2" in record.display_name
    assert "model=cnn_small" in record.tags and "regularizer=none" in record.tags


@pytest.mark.slow
def test_gloro_power_iteration_vectors_resume_exactly(tmp_path, monkeypatch):
    """The power-iteration vectors are training state: a run killed after epoch 1 and resumed ends with
    exactly the metrics of an uninterrupted run."""
    overrides = ["model=cnn_4c3f", *SHRINK["cnn_4c3f"], "regularizer=gloro", "optim=adam", "epochs=2"]
    whole = run(compose_config(*overrides), tmp_path / "whole")
    run_interrupted_in_second_epoch(compose_config(*overrides), tmp_path / "split", monkeypatch)
    saved = torch.load(tmp_path / "split" / "checkpoints" / "last.pt", weights_only=True)
    assert len(saved["loss"]["penalties.gloro"]["vectors"]) == 6
    resumed = run(compose_config(*overrides), tmp_path / "split")
    strip = lambda metrics: {k: v for k, v in metrics.items() if not k.startswith(("time/", "attack/"))}
    assert strip(resumed) == strip(whole) and resumed["train/penalty_gloro"] > 0


@pytest.mark.slow
def test_a_warming_radius_and_a_certified_selection_resume_exactly(tmp_path, monkeypatch):
    """GloRo's recipe (TRADES-style loss, radius from 1 % over half of 4 epochs) on MinMax 4C3F, best.pt on
    the validation certified error: killed in epoch 2 and resumed, it ends as the uninterrupted run."""
    overrides = ["model=cnn_4c3f", *SHRINK["cnn_4c3f"], "model/activation=minmax", "regularizer=gloro_trades",
                 "optim=adam", "epochs=4", "eval.certify=[0.3]", "select=val/cert_error_pct_l2@0.3"]
    whole = run(compose_config(*overrides), tmp_path / "whole")
    run_interrupted_in_second_epoch(compose_config(*overrides), tmp_path / "split", monkeypatch)
    resumed = run(compose_config(*overrides), tmp_path / "split")
    strip = lambda metrics: {k: v for k, v in metrics.items() if not k.startswith(("time/", "attack/"))}
    assert strip(resumed) == strip(whole) and resumed["train/penalty_gloro"] > 0
    rows = RunFolder(tmp_path / "whole").read_metrics()
    assert resumed[metric_keys.BEST_EPOCH] == 1 + min(range(4), key=lambda i: rows[i]["val/cert_error_pct_l2@0.3"])


def test_per_epoch_figures_on_a_subset_every_k_epochs_and_the_summary_on_the_whole_set(tmp_path):
    """eval.every=2, eval.n=50 over 3 epochs: test error every epoch, Lipschitz figures in epochs 2 and 3
    (the last) from 50 images; the summary's figures are a full measurement of the last model."""
    cfg = compose_config("epochs=3", "eval.every=2", "eval.n=50", "scheduler.milestones=[2]")
    final = run(cfg, tmp_path)
    rows = RunFolder(tmp_path).read_metrics()
    assert [metric_keys.TEST_ERROR in r for r in rows] == [True, True, True]
    assert [metric_keys.LOSS_GRAD_MAX in r for r in rows] == [False, True, True]
    data = load_dataset(cfg.dataset, torch.device("cpu"))
    last = build_model(cfg, data, torch.device("cpu"))
    last.load_state_dict(RunFolder(tmp_path).load_checkpoint("last")["model"])
    whole = measure(last, data.test_x, data.test_y, cfg.test_batch_size)
    summary = json.loads((tmp_path / "summary.json").read_text())
    for key, value in whole.items():  # identical to a full measurement
        assert final[key] == value and summary[key] == value, key
    assert rows[-1][metric_keys.TEST_ERROR] == whole[metric_keys.TEST_ERROR]  # the error is on all images
    assert rows[-1][metric_keys.LOSS_GRAD_MEAN] != whole[metric_keys.LOSS_GRAD_MEAN]  # the epoch's: 50 images
    # the guaranteed bound only in the summary, its estimate every measured epoch
    assert metric_keys.LAYER_NORM_PRODUCT not in rows[-1] and metric_keys.LAYER_NORM_ESTIMATE in rows[-1]
    assert summary[metric_keys.LAYER_NORM_ESTIMATE] <= 1.1 * summary[metric_keys.LAYER_NORM_PRODUCT]
