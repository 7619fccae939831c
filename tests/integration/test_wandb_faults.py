"""W&B never fails a job, falls back to offline without a network, and never writes the API key.

The runs are real (tiny) training runs and real W&B runs; "no network" is a local W&B server address
that refuses connections or accepts them and never answers, so no test needs or touches the internet.
"""
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest
import wandb

from conftest import compose_config
from tulip.main import run
from tulip.runs.folder import RunFolder
from tulip.runs.tracking import RunContext, Tracker
from support.api_key import API_KEY, BASIC_AUTH_TOKEN, assert_no_file_holds_the_key
from support.wandb_records import history, run_file

# A few seconds per run: no bounds, a small MLP, fewer images.
FAST = ["eval.bounds=false", "model=mlp", "model.hidden=[32,16]", "dataset.train_subset=256",
        "dataset.test_subset=100"]
INIT_TIMEOUT_S = 2
# Over INIT_TIMEOUT_S, a fallback run spends about 2 s here: the tiny run, W&B's service start and
# the offline run. 8 s leaves room for a loaded machine but fails if W&B's own 90 s default
# applies or if the login's account lookup (2 x 5 s against an unreachable server) comes back.
FALLBACK_SLACK_S = 8


@pytest.fixture(autouse=True)
def fresh_wandb():
    """W&B reads its environment once per session (wandb.setup): each test starts and ends a fresh
    one, so the settings below apply and do not leak into other tests. Set up before (so torn down
    after) the test's monkeypatches: the last teardown finishes a run with the real W&B."""
    wandb.teardown()
    yield
    wandb.teardown()


@pytest.fixture
def unreachable(request, monkeypatch):
    """A W&B server address that refuses connections ("refused") or accepts and never answers
    ("silent", the nastier case: every request waits for its timeout). Yields the bytes the silent
    server received (None for "refused")."""
    received = bytearray()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    connections = []
    if request.param == "refused":
        server.close()  # nothing listens on the port any more
    else:
        server.listen(16)

        def accept():
            while True:
                try:
                    connection, _ = server.accept()
                except OSError:  # the server closed at the end of the test
                    return
                connections.append(connection)
                threading.Thread(target=read, args=(connection,), daemon=True).start()

        def read(connection):
            while chunk := connection.recv(65536):
                received.extend(chunk)

        threading.Thread(target=accept, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    yield None if request.param == "refused" else received
    server.close()
    for connection in connections:
        connection.close()


def tracker_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "tulip.runs.tracking" and r.levelno == logging.WARNING]


def assert_finished_with_metrics(run_dir: Path, metrics: dict) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert summary["status"] == "finished" and summary["epoch"] == 1
    assert [row["epoch"] for row in rows] == [1]
    assert metrics["test/error_pct"] == summary["test/error_pct"] == rows[0]["test/error_pct"]


def fail(point: str):
    def failing(*args, **kwargs):
        raise wandb.Error(f"simulated W&B failure at {point}")
    return failing


@pytest.mark.parametrize("point", ["init", "log", "finish"])
def test_wandb_failure_is_one_warning_and_the_run_finishes(tmp_path, monkeypatch, caplog, point):
    target = {"init": (wandb, "init"), "log": (wandb.Run, "log"), "finish": (wandb.Run, "finish")}[point]
    monkeypatch.setattr(*target, fail(point))
    metrics = run(compose_config(*FAST, "wandb.mode=offline"), tmp_path)
    assert_finished_with_metrics(tmp_path, metrics)
    (warning,) = tracker_warnings(caplog)
    assert f"simulated W&B failure at {point}" in warning
    if point == "init":
        assert not list((tmp_path / "wandb").glob("*run-*"))
    if point == "log":  # no epoch reached W&B, but the run was still finished (its exit record)
        assert not [row for row in history(run_file(tmp_path)) if "epoch" in row]


@pytest.mark.parametrize("unreachable", ["refused", "silent"], indirect=True)
def test_online_without_network_falls_back_to_offline(tmp_path, caplog, unreachable):
    started = time.monotonic()
    metrics = run(compose_config(*FAST, "wandb.mode=online", f"wandb.init_timeout_s={INIT_TIMEOUT_S}"),
                  tmp_path)
    elapsed = time.monotonic() - started
    assert_finished_with_metrics(tmp_path, metrics)
    assert elapsed < INIT_TIMEOUT_S + FALLBACK_SLACK_S, f"the fallback took {elapsed:.1f} s"
    path = run_file(tmp_path)  # an offline run, finished (exit record)
    assert [row["epoch"] for row in history(path) if "test/error_pct" in row] == [1]
    (warning,) = tracker_warnings(caplog)
    assert f"wandb sync {path.parent}" in warning
    assert len([r for r in caplog.records if "wandb sync" in r.getMessage()]) == 1
    (online,) = (tmp_path / "wandb").glob("run-*")  # the online run that did not start
    assert path.parent.name.endswith(online.name.rsplit("-", 1)[-1] + "offline")
    if unreachable is not None:  # the key was in use: W&B sent it to the silent server
        assert BASIC_AUTH_TOKEN in bytes(unreachable)
    assert_no_file_holds_the_key(tmp_path)


@pytest.mark.parametrize("unreachable", ["refused"], indirect=True)
def test_fallback_and_its_online_run_are_one_attempt(tmp_path, unreachable):
    """A requeued job names its W&B run after the attempts its folder holds: the online run that did
    not start and its offline fallback are one attempt, not two."""
    folder, context = RunFolder(tmp_path), RunContext(overrides=["seed=1"])
    first = Tracker(compose_config(*FAST, "wandb.mode=online", f"wandb.init_timeout_s={INIT_TIMEOUT_S}"),
                    folder, context)
    first.finish({}, failed=True)
    assert first.run.settings.mode == "offline" and first.run.name == "seed=1"
    assert len(list(folder.wandb_dir.glob("*run-*"))) == 2  # run-<time>-<id>, offline-run-<time>-<id>offline
    second = Tracker(compose_config(*FAST, "wandb.mode=offline"), folder, context)
    second.finish({}, failed=False)
    assert second.run.name == "seed=1-attempt2"
