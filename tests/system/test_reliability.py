"""Faults lose nothing: a run killed anywhere resumes to the uninterrupted result, a damaged checkpoint
fails the command line and a damaged metrics file is rebuilt, one process writes a folder, and a sweep
with failures reports exactly them and resumes the rest. Kills are real SIGKILLs of separate processes
(tests/support/fault_driver.py). The damaged and hostile folders in this process are
tests/integration/test_damaged_runs.py."""
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import FAULT_JOB, ROOT, compose_config, copy_run
from support.damage import truncate
from tulip.main import run
from tulip.runs.folder import RunFolder, RunFolderError

DRIVER = Path(__file__).parents[1] / "support" / "fault_driver.py"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def drive(run_dir: Path, point: str = "none", times: int = 1, **popen) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DRIVER), str(run_dir), point, str(times)], cwd=ROOT,
                          env=ENV, capture_output=True, text=True, timeout=300, **popen)


def without_times(record: dict) -> dict:
    """Everything but wall-clock durations (time/*, attack/<name>/time_s)."""
    return {k: v for k, v in record.items() if not (k.startswith("time/") or k.endswith("/time_s"))}


def outcome(folder: Path) -> dict:
    """What a finished run leaves: its epochs, summary and per-image tables (times excluded)."""
    rows = (folder / "metrics.jsonl").read_text().splitlines()
    return {"metrics": [without_times(json.loads(line)) for line in rows],
            "summary": without_times(json.loads((folder / "summary.json").read_text())),
            **{name: (folder / f"{name}.csv").read_text() for name in ("attacks", "bounds")}}


def assert_never_half_written(folder: Path) -> None:
    last = RunFolder(folder).checkpoint("last")
    if last.exists():
        torch.load(last, weights_only=True)  # raises on a partial file


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> tuple[dict, float]:
    """The outcome of FAULT_JOB run once without faults, and how long its process took."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    started = time.time()
    assert drive(folder).returncode == 0
    return outcome(folder), time.time() - started


@pytest.fixture
def uninterrupted(uninterrupted_run) -> dict:
    return uninterrupted_run[0]


def test_a_run_killed_at_chosen_moments_ends_as_if_never_killed(tmp_path, uninterrupted):
    """Six kills in one folder, each at a moment where a half-done write could hurt, each followed by
    a restart in the same folder."""
    kills = [("checkpoint_write", 1), ("metrics_append", 1), ("measure", 1), ("checkpoint_write", 2),
             ("evaluation", 1), ("summary_write", 1)]
    for point, times in kills:
        result = drive(tmp_path, point, times)
        assert result.returncode == -9, (point, result.stderr[-2000:])  # really killed there
        assert_never_half_written(tmp_path)
    assert drive(tmp_path).returncode == 0
    assert outcome(tmp_path) == uninterrupted
    assert not list(tmp_path.rglob("*.tmp"))  # the killed writers' temporary files were cleaned up


def test_a_run_killed_at_random_moments_ends_as_if_never_killed(tmp_path, uninterrupted_run):
    """Four SIGKILLs at random moments of the whole job (start-up, training, evaluation, writes), drawn
    as fractions of the uninterrupted process's duration so they land inside the job on a busy machine
    too. Each restart resumes from what the last one saved, so later kills land later in the job."""
    uninterrupted, duration = uninterrupted_run
    draw = random.Random(0)
    for _ in range(4):
        process = subprocess.Popen([sys.executable, str(DRIVER), str(tmp_path), "none"], cwd=ROOT, env=ENV,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(draw.uniform(0.3, 0.9) * duration)
        process.kill()
        process.wait()
        assert_never_half_written(tmp_path)
    assert drive(tmp_path).returncode == 0
    assert outcome(tmp_path) == uninterrupted
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3]  # no duplicated or partial line


def test_one_writer_per_folder_and_a_dead_writers_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, str(DRIVER), str(tmp_path), "hold"], cwd=ROOT, env=ENV,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = RunFolder(tmp_path).lock_file
        deadline = time.time() + 120
        while f"pid {holder.pid}" not in (lock.read_text() if lock.exists() else ""):
            assert time.time() < deadline and holder.poll() is None, "the first run never took the lock"
            time.sleep(0.2)
        started = time.time()
        for second in (compose_config(*FAULT_JOB), compose_config("mode=summary", f"run_dir={tmp_path}")):
            with pytest.raises(RunFolderError, match=f"{tmp_path}.*pid {holder.pid}"):
                run(second, tmp_path)
        assert time.time() - started < 10  # refused at once, not after waiting
        assert not (tmp_path / "summary.json").exists()  # the refused runs wrote nothing there
    finally:
        holder.kill()
        holder.wait()
    metrics = run(compose_config(*FAULT_JOB), tmp_path)  # the dead holder's lock is taken over
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"
    assert metrics["test/error_pct"] < 100


@pytest.fixture
def interrupted(interrupted_fault_job, tmp_path) -> Path:
    """A copy of the session's folder holding epoch 1 of FAULT_JOB, as after a preemption in epoch 2."""
    return copy_run(interrupted_fault_job, tmp_path / "run")


def test_the_command_line_exits_non_zero_on_a_damaged_checkpoint(interrupted):
    truncate(RunFolder(interrupted).checkpoint("last"))
    result = subprocess.run([sys.executable, "run.py", *FAULT_JOB, "wandb.mode=disabled",
                             "dataset.train_subset=512", "dataset.test_subset=200", "batch_size=64", "device=cpu",
                             f"hydra.run.dir={interrupted}"], cwd=ROOT, env=ENV, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and "last.pt" in result.stderr and "copy it over" in result.stderr


def test_a_damaged_metrics_file_is_rebuilt_from_the_checkpoint(interrupted, uninterrupted):
    """metrics.jsonl is a copy of the checkpoint's history, so resuming rewrites it: nothing is lost."""
    (interrupted / "metrics.jsonl").write_text('{"epoch": 1, "test/err\n\x00garbage\n')
    run(compose_config(*FAULT_JOB), interrupted)
    assert outcome(interrupted)["metrics"] == uninterrupted["metrics"]


def test_a_sweep_with_failures_reports_them_and_a_rerun_finishes_the_rest(tmp_path):
    """12 jobs: 6 cannot start (a training set smaller than a batch), 3 diverge, 3 train; the whole
    sweep is killed in the middle of a training job. The same command with the same sweep folder skips
    the finished jobs, resumes the killed one, runs the rest, and both reports name exactly the 9 bad
    jobs."""
    sweep = tmp_path / "sweep"
    command = [sys.executable, "run.py", "-m", "epochs=2", "batch_size=64", "dataset.train_subset=512,1",
               "dataset.test_subset=100", "optim.lr=0.05,1e12", "seed=0,1,2", "attack=none", "eval.bounds=false",
               "wandb.mode=disabled", "device=cpu", f"hydra.sweep.dir={sweep}"]
    first = subprocess.Popen(command, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 200
    while not any((job / "checkpoints" / "last.pt").exists() and not (job / "summary.json").exists()
                  for job in sweep.glob("*") if job.name != "0"):  # a training job other than the first
        assert first.poll() is None and time.time() < deadline, "the sweep ended before it could be killed"
        time.sleep(0.05)
    first.kill()
    first.wait()
    killed = [job for job in sweep.glob("*") if (job / "checkpoints").exists() and not (job / "summary.json").exists()]
    finished_before = {job.name: json.loads((job / "summary.json").read_text())["time/job_start"]
                       for job in sweep.glob("*") if (job / "summary.json").exists()
                       and json.loads((job / "summary.json").read_text())["status"] == "finished"}
    assert len(killed) == 1

    second = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    statuses = {job.name: json.loads((job / "summary.json").read_text())["status"]
                for job in sweep.iterdir() if job.name.isdigit()}
    assert len(statuses) == 12
    assert sorted(statuses.values()) == ["diverged"] * 3 + ["failed"] * 6 + ["finished"] * 3
    for name, started in finished_before.items():  # skipped: not run again
        assert json.loads((sweep / name / "summary.json").read_text())["time/job_start"] == started
    assert "resuming" in (killed[0] / "run.log").read_text() and statuses[killed[0].name] == "finished"
    bad = sorted(int(name) for name, status in statuses.items() if status != "finished")
    listed = second.stdout + second.stderr
    assert f"NOT FINISHED: {', '.join(f'job {n} ({statuses[str(n)]})' for n in bad)}" in listed
    report = subprocess.run([sys.executable, "-m", "tulip.report", str(sweep), "--out", str(tmp_path / "report")],
                            cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert report.returncode == 0, report.stderr
    problems = (tmp_path / "report" / "report.md").read_text().split("## Failed, diverged and unreadable runs")[1]
    listed_by_report = {name for name in statuses if f"`{sweep / name}` | {statuses[name]} |" in problems}
    assert listed_by_report == {str(n) for n in bad}
    assert not any(f"`{sweep / name}` |" in problems for name in statuses if statuses[name] == "finished")
