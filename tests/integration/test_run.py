"""End to end: `run(cfg)` and `python run.py` train, measure, checkpoint, resume and log."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, compose_config, run_interrupted_in_second_epoch
from tulip.config import ConfigError
from tulip.main import run
from tulip.runs.folder import build_model, load_run
from tulip.seeding import set_rng_state
from support.wandb_records import history, inspect_summary, run_file, run_record

EPOCH_KEYS = ["epoch", "lr", "time/epoch_s", "train/loss", "train/error_pct", "test/loss",
              "test/error_pct", "lipschitz/loss_grad_max", "lipschitz/loss_grad_mean",
              "lipschitz/jacobian_2inf", "weights/product_2inf", "weights/product_spectral",
              "weights/layer_norm_estimate"]
SUMMARY_KEYS = EPOCH_KEYS + ["weights/layer_norm_product", "status", "best/test_error_pct", "best/epoch",
                             "overrides"]


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
    assert summary["best/test_error_pct"] == min(row["test/error_pct"] for row in rows)
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


def test_checkpoint_round_trip(tmp_path):
    run(compose_config(), tmp_path)
    loaded = load_run(tmp_path, torch.device("cpu"))
    x = loaded.data.test_x[:50]
    saved = torch.load(tmp_path / "checkpoints" / "best.pt", weights_only=True)
    reference = build_model(loaded.cfg, loaded.data, torch.device("cpu")).eval()
    reference.load_state_dict(saved["model"])
    assert torch.equal(loaded.model(x), reference(x))
    assert loaded.cfg.seed == 0 and loaded.checkpoint["epoch"] == 1
    # rng states survive the weights_only round trip and restore the generators exactly
    set_rng_state(saved["rng"])
    a = torch.rand(3)
    set_rng_state(saved["rng"])
    assert torch.equal(a, torch.rand(3))


def test_load_run_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_run(tmp_path, torch.device("cpu"))
    run(compose_config(), tmp_path / "run")
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
        return compose_config("epochs=3", *optimization)

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


def test_resume_with_a_different_config_refuses_and_keeps_the_checkpoint(tmp_path):
    run(compose_config(), tmp_path)
    before = (tmp_path / "checkpoints" / "last.pt").read_bytes()
    summary_before = (tmp_path / "summary.json").read_text()
    with pytest.raises(ConfigError, match="optim.lr"):
        run(compose_config("optim.lr=0.05"), tmp_path)
    assert (tmp_path / "checkpoints" / "last.pt").read_bytes() == before
    assert (tmp_path / "summary.json").read_text() == summary_before
    # W&B settings do not change what is trained: the same run resumes (nothing left to train)
    again = run(compose_config("wandb.project=other"), tmp_path)
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
    assert state["summary"]["test/error_pct"]["min"] == pytest.approx(summary["best/test_error_pct"])
    assert state["summary"]["weights/layer_norm_product"] == pytest.approx(
        summary["weights/layer_norm_product"])
    record = run_record(path)
    assert "epochs=2" in record.display_name
    assert "model=cnn_small" in record.tags and "regularizer=none" in record.tags


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
