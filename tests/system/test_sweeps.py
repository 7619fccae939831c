"""Real multiruns of `python run.py -m` without SLURM, through Hydra's basic launcher, submitit_local and
Tulip's local launcher: W&B offline runs grouped per sweep, a failing job that does not stop the others,
the end-of-sweep report of tulip.launch.callbacks, at most `array_parallelism` local jobs at once.

The SLURM versions of these runs are in tests/system/test_slurm.py.
"""
import os
import signal
import subprocess
import sys
import time

import pytest
from omegaconf import OmegaConf

from support.jobs import RUN_PY, TINY_JOB as TINY, job_folders, output_of, read_summary, run_tulip, wandb_runs


# --- real multiruns -------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_two_job_sweep_gives_two_summaries_and_two_wandb_runs_in_one_group(tmp_path, launcher):
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "reg.lip=0,0.1", *TINY, "wandb.mode=offline", f"hydra.sweep.dir={sweep_dir}"]
    if launcher == "submitit_local":
        args.append("hydra/launcher=submitit_local")
    # Up to 4 threads if the machine has the cores; submitit_local runs both jobs at once, so each
    # takes half of them (tulip.launch.callbacks.ShareCpus), the basic launcher one job at a time.
    given = min(len(os.sched_getaffinity(0)), 4)
    threads = max(1, given // 2) if launcher == "submitit_local" else given
    result = run_tulip(args, cwd=tmp_path, timeout=240, env={"OMP_NUM_THREADS": "4"})
    assert result.returncode == 0, output_of(result)

    jobs = job_folders(sweep_dir)
    assert [j.name for j in jobs] == ["0", "1"]  # short folders: the job number
    groups = set()
    for job, lip in zip(jobs, ["0", "0.1"]):
        summary = read_summary(job)
        assert summary["status"] == "finished" and summary["epoch"] == 1
        assert summary["threads"] == threads
        assert f"reg.lip={lip}" in summary["overrides"]
        assert OmegaConf.load(job / ".hydra" / "config.yaml").reg.lip == float(lip)
        runs = wandb_runs(job)
        assert len(runs) == 1, f"{job}: {len(runs)} W&B runs"
        run = runs[0]
        assert f"reg.lip={lip}" in run["name"]
        assert f"reg.lip={lip}" in run["config"]["overrides"]
        assert {"model=cnn_small", "dataset=mnist5k"} <= set(run["tags"])  # the chosen group options
        assert run["epochs"] == [1]
        groups.add(run.get("group"))
    (group,) = groups  # one W&B group: this sweep
    assert group and tmp_path.name in group, group
    assert "All jobs finished." in result.stdout  # tulip.launch.callbacks.SweepReport
    if launcher == "submitit_local":
        assert list((sweep_dir / ".submitit").glob("*/*_result.pkl"))  # really went through submitit


@pytest.mark.slow
def test_the_local_launcher_runs_at_most_array_parallelism_jobs_at_once(tmp_path):
    """hydra/launcher=local with 2 slots and 4 jobs: job 0 fails at once (bad value), so job 2 starts
    while job 1 runs (side by side: two processes), and job 3 only once job 1 or 2 has ended. Each
    job's measured interval (`time/job_start` to its end) lies inside its process's life, so three that
    overlap would mean three processes at once."""
    sweep_dir = tmp_path / "sweep"
    result = run_tulip(["-m", "optim.lr=-1,0.05,0.1,0.2", *TINY, "wandb.mode=disabled", "hydra/launcher=local",
                        "hydra.launcher.array_parallelism=2", f"hydra.sweep.dir={sweep_dir}"],
                       cwd=tmp_path, timeout=300, env={"OMP_NUM_THREADS": "2"})
    assert result.returncode == 1, output_of(result)  # a job raised: the multirun says so, at the end
    failed, *finished = (read_summary(job) for job in job_folders(sweep_dir))
    assert failed["status"] == "failed" and "optim.lr" in failed["error"], failed
    assert [s["status"] for s in finished] == ["finished"] * 3, finished
    assert {s["threads"] for s in finished} == {1}  # 2 CPUs (OMP_NUM_THREADS) shared by 2 jobs at once
    (start1, end1), (start2, end2), (start3, _) = (
        (s["time/job_start"], s["time/job_start"] + s["time/total_s"]) for s in finished)
    assert start2 < end1  # side by side
    assert start3 >= min(end1, end2)  # never three at once
    assert "job 0 (failed)" in result.stdout, output_of(result)


@pytest.mark.slow
def test_a_killed_local_job_does_not_stop_the_next_and_is_named_at_the_end(tmp_path):
    """One job at a time; job 0's process is killed (SIGKILL: no result, no summary) as soon as Hydra
    has started it. Job 1 must still run to the end, and the sweep must then fail naming job 0."""
    sweep_dir = tmp_path / "sweep"
    args = ["-m", "seed=0,1", *[a for a in TINY if not a.startswith("epochs=")], "epochs=3",
            "wandb.mode=disabled", "hydra/launcher=local", "hydra.launcher.array_parallelism=1",
            f"hydra.sweep.dir={sweep_dir}"]
    sweep = subprocess.Popen([sys.executable, str(RUN_PY), *args], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        hydra_yaml = sweep_dir / "0" / ".hydra" / "hydra.yaml"  # written as the job starts
        deadline = time.monotonic() + 120
        while not hydra_yaml.is_file() and time.monotonic() < deadline and sweep.poll() is None:
            time.sleep(0.05)
        time.sleep(0.2)  # the file is complete
        os.kill(int(OmegaConf.load(hydra_yaml).hydra.job.id), signal.SIGKILL)  # the job's own process
        stdout, stderr = sweep.communicate(timeout=240)
    finally:
        sweep.kill()
    assert sweep.returncode != 0
    assert "job 0" in stderr and "ended without a result, exit code -9 (signal 9)" in stderr, stderr[-3000:]
    assert not (sweep_dir / "0" / "summary.json").exists()  # killed before it could write one
    assert read_summary(sweep_dir / "1")["status"] == "finished"


def test_a_bad_array_parallelism_stops_the_sweep_before_any_job(tmp_path):
    sweep_dir = tmp_path / "sweep"
    result = run_tulip(["-m", "seed=0,1", *TINY, "hydra/launcher=local", "hydra.launcher.array_parallelism=0",
                        f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "hydra.launcher.array_parallelism=0 is invalid: expected auto or an integer >= 1" in result.stderr, \
        output_of(result)
    assert not sweep_dir.exists() or not job_folders(sweep_dir)


def test_failed_jobs_do_not_stop_the_sweep_and_its_report_names_them(tiny_multirun):
    """The session's multirun (conftest.TINY_MULTIRUN, basic launcher: one job after another): jobs 0 and 1
    (reg.lip=-1) fail before training, the four after them still run and finish, the multirun exits 1,
    and the end-of-sweep report (tulip.launch.callbacks.SweepReport) names exactly the two."""
    result = tiny_multirun.command
    assert result.returncode == 1, output_of(result)
    statuses = [read_summary(job)["status"] for job in job_folders(tiny_multirun.folder)]
    assert statuses == ["failed"] * 2 + ["finished"] * 4
    assert f"Sweep {tiny_multirun.folder}: 6 jobs" in result.stdout, output_of(result)
    assert "NOT FINISHED: job 0 (failed), job 1 (failed)" in result.stdout, output_of(result)
