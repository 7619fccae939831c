"""Sweeps on a real single-node SLURM cluster (tests/slurm/start.sh), through hydra-submitit-launcher.

    bash tests/slurm/start.sh && python -m pytest -m slurm tests/system/test_slurm.py

The tests use a cluster that is already running and never install or start one: .ci/run starts it
before the suite (as root; start.sh installs SLURM with apt-get where it is missing). Without a cluster
the tests skip saying why, unless TULIP_REQUIRE_SLURM=1 (CI), where that is a failure. The cluster has no
accounting, so submitit cannot see a job that died without a result: every run here is bounded by a
timeout and cancelled after. Each test uses a fresh sweep folder, hence a fresh submitit folder (job ids
restart with the cluster).
"""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from support.jobs import (ROOT, RUN_PY, SHORT_LOWER_BOUND, TINY_JOB as TINY, job_folders, output_of, read_summary,
                          run_tulip, wandb_runs)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

STATE = Path(os.environ.get("TULIP_SLURM_DIR", "/tmp/tulip-slurm"))
START = ROOT / "tests" / "slurm" / "start.sh"
# The local cluster's launcher: slurm_gpu without GPUs, one CPU per job (OMP_NUM_THREADS=1).
SLURM = ["hydra/launcher=slurm_local"]


def cluster_answers(env: dict) -> bool:
    try:
        return subprocess.run(["scontrol", "ping"], env={**os.environ, **env}, capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def slurm_env():
    """The environment that points SLURM's commands at the running test cluster."""
    env = {"SLURM_CONF": str(STATE / "slurm.conf")}
    if not cluster_answers(env):
        reason = (f"no SLURM cluster answers with SLURM_CONF={env['SLURM_CONF']}; "
                  "start one first: bash tests/slurm/start.sh (as root)")
        if os.environ.get("TULIP_REQUIRE_SLURM") == "1":
            pytest.fail(f"TULIP_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    return env


def slurm(args: list[str], env: dict, timeout: float = 30) -> str:
    done = subprocess.run(args, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)}: {done.stderr}"
    return done.stdout


def array_ids(sweep_dir: Path) -> list[str]:
    """SLURM ids (ARRAY_TASK form, e.g. 12_1) of a sweep's jobs, from submitit's folders."""
    folders = (sweep_dir / ".submitit").glob("*_*")
    return sorted({f.name for f in folders if re.fullmatch(r"\d+_\d+", f.name)})


def cancel(sweep_dir: Path, env: dict) -> None:
    """Leave nothing queued or running on the cluster, whatever the test did."""
    ids = array_ids(sweep_dir) if (sweep_dir / ".submitit").is_dir() else []
    if ids:
        subprocess.run(["scancel", *ids], env={**os.environ, **env}, capture_output=True, timeout=30)


def test_start_is_idempotent(slurm_env):
    pids = {p.name: p.read_text() for p in STATE.glob("slurm*.pid")}
    again = subprocess.run(["bash", str(START)], capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert {p.name: p.read_text() for p in STATE.glob("slurm*.pid")} == pids  # nothing restarted
    # The node is up: idle, or still busy with (or releasing) the jobs of the test before this one.
    state = slurm(["sinfo", "-h", "-o", "%T"], slurm_env).strip()
    assert state.rstrip("*~#!%$@^-") in {"idle", "mixed", "allocated", "completing"}, state


def sweep_on_cluster(args: list[str], sweep_dir: Path, tmp_path: Path, env: dict,
                     timeout: float = 300) -> subprocess.CompletedProcess:
    """`python run.py -m ARGS` into `sweep_dir` on the test cluster; nothing is left queued after."""
    try:
        return run_tulip(["-m", *args, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path,
                         timeout=timeout, env=env)
    finally:
        cancel(sweep_dir, env)


def test_three_job_multirun_through_submitit_slurm(tmp_path, slurm_env):
    sweep_dir = tmp_path / "sweep"
    result = sweep_on_cluster(["reg.lip=0,0.01,0.1", *SLURM, *TINY, "wandb.mode=offline"],
                              sweep_dir, tmp_path, slurm_env)
    assert result.returncode == 0, output_of(result)
    jobs = job_folders(sweep_dir)
    assert [j.name for j in jobs] == ["0", "1", "2"]
    slurm_ids, groups = set(), set()
    for job, lip in zip(jobs, ["0", "0.01", "0.1"]):
        summary = read_summary(job)
        assert summary["status"] == "finished" and summary["epoch"] == 1, summary
        assert f"reg.lip={lip}" in summary["overrides"]
        assert all(isinstance(summary[k], float) for k in ("test/error_pct", "lipschitz/loss_grad_max"))
        # hydra.job.id is what submitit's JobEnvironment saw: a SLURM array task id, 12_0 ...
        slurm_ids.add(OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.job.id)
        (run,) = wandb_runs(job)
        groups.add(run.get("group"))
    assert all(re.fullmatch(r"\d+_[0-2]", i) for i in slurm_ids) and len(slurm_ids) == 3, slurm_ids
    assert len(groups) == 1 and None not in groups
    script = next((sweep_dir / ".submitit").glob("*/*_submission.sh")).read_text()
    assert "#SBATCH --cpus-per-task=1" in script and "export OMP_NUM_THREADS=1" in script
    assert "All jobs finished." in result.stdout


def test_slurm_gpu_launcher_is_accepted_by_a_real_slurm(tmp_path, slurm_env):
    """slurm_gpu as a user points it at a cluster: partition, account, qos, constraint. The test
    cluster has one placeholder GPU (gres, no device) and the feature tulip_test for this."""
    sweep_dir = tmp_path / "sweep"
    cluster = ["hydra/launcher=slurm_gpu", "hydra.launcher.partition=debug",
               "hydra.launcher.account=tulip", "hydra.launcher.qos=normal",
               "hydra.launcher.constraint=tulip_test", "hydra.launcher.cpus_per_task=1",
               "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=5"]
    result = sweep_on_cluster(["seed=0", *cluster, *TINY, "wandb.mode=disabled"],
                              sweep_dir, tmp_path, slurm_env, timeout=240)
    assert result.returncode == 0, output_of(result)
    assert read_summary(sweep_dir / "0")["status"] == "finished"
    script = next((sweep_dir / ".submitit").glob("*/*_submission.sh")).read_text()
    for line in ("--gpus-per-node=1", "--partition=debug", "--account=tulip", "--qos=normal",
                 "--constraint=tulip_test", "--mem=1GB", "--time=5"):
        assert f"#SBATCH {line}" in script, f"{line} missing from\n{script}"


def test_a_job_that_raises_does_not_stop_the_others(tmp_path, slurm_env):
    sweep_dir = tmp_path / "sweep"
    result = sweep_on_cluster(["optim.lr=-1,0.05,0.1", *SLURM, *TINY, "wandb.mode=disabled"],
                              sweep_dir, tmp_path, slurm_env)
    assert result.returncode == 1, output_of(result)  # the multirun reports the failure ...
    failed, *others = (read_summary(job) for job in job_folders(sweep_dir))
    assert failed["status"] == "failed" and "optim.lr" in failed.get("error", ""), failed
    assert [s["status"] for s in others] == ["finished", "finished"]  # ... the others still finished
    assert "job 0 (failed)" in result.stdout, output_of(result)


def test_interrupted_jobs_resume_and_match_an_uninterrupted_run(tmp_path, slurm_env):
    """Three identical trainings (they differ only in their W&B name): job 0 runs through, job 1 is
    requeued by `scontrol requeue` (killed, as an admin or a preempting job would), job 2 gets USR2
    (SLURM's preemption/time-limit signal: submitit checkpoints and requeues it). Both resume from
    checkpoints/last.pt in the same folder and must end with exactly job 0's metrics."""
    sweep_dir = tmp_path / "sweep"
    # Long enough after its first epoch (when it is interrupted) to outlive SLURM's KillWait (5 s): a
    # requeued job's SIGTERM is ignored by submitit, so the job dies only at the SIGKILL that follows,
    # and a job that finished first would leave nothing to resume.
    epochs = 8
    args = ["-m", "wandb.name=reference,requeued,preempted", *SLURM, "wandb.mode=offline",
            "dataset=mnist5k", "dataset.train_subset=2048", "dataset.test_subset=500",
            f"epochs={epochs}", "attack=none", *SHORT_LOWER_BOUND, f"hydra.sweep.dir={sweep_dir}"]
    interruptions = {1: ["scontrol", "requeue"], 2: ["scancel", "--signal=USR2"]}
    interrupted_at = {}
    sweep = subprocess.Popen([sys.executable, str(RUN_PY), *args], cwd=tmp_path, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             env={**os.environ, **slurm_env})
    deadline = time.time() + 400
    try:
        while sweep.poll() is None and time.time() < deadline:
            for job, command in interruptions.items():
                folder = sweep_dir / str(job)
                trained = folder / "metrics.jsonl"
                if job in interrupted_at or not trained.is_file() or not trained.read_text().strip():
                    continue
                assert not (folder / "summary.json").exists(), f"job {job} ended before it was interrupted"
                task = next(i for i in array_ids(sweep_dir) if i.endswith(f"_{job}"))
                slurm([*command, task], slurm_env)
                interrupted_at[job] = len(trained.read_text().splitlines())  # epochs done by then
            time.sleep(0.2)
        output = sweep.communicate(timeout=max(1.0, deadline - time.time()))[0]
    except subprocess.TimeoutExpired:
        sweep.kill()
        pytest.fail(f"sweep still running after 400 s:\n{sweep.communicate()[0][-4000:]}")
    finally:
        if sweep.poll() is None:
            sweep.kill()
        cancel(sweep_dir, slurm_env)
    assert sweep.returncode == 0, output[-6000:]
    assert set(interrupted_at) == {1, 2} and all(0 < e < epochs for e in interrupted_at.values()), interrupted_at

    def metrics(job: int) -> tuple[dict, list[dict]]:
        summary = read_summary(sweep_dir / str(job))
        rows = [json.loads(line) for line in (sweep_dir / str(job) / "metrics.jsonl").read_text().splitlines()]
        # timings and each job's own W&B run identity differ between jobs that computed the same thing
        untimed = lambda d: {k: v for k, v in d.items()
                             if not k.startswith(("time/", "wandb/")) and k != "overrides"}
        return untimed(summary), [untimed(r) for r in rows]

    reference = metrics(0)
    assert reference[0]["status"] == "finished" and len(reference[1]) == epochs
    runs = {job: wandb_runs(sweep_dir / str(job)) for job in range(3)}
    for job, name in ((1, "requeued"), (2, "preempted")):
        assert metrics(job) == reference, f"job {job} ({name}) after resuming differs from job 0"
        log = (sweep_dir / str(job) / "run.log").read_text()
        assert "resuming" in log, log[-2000:]
        # One W&B run per attempt. The killed attempt's offline file may hold nothing (wandb-core got
        # SIGTERM before flushing), so the resumed attempt re-logs the earlier epochs: its run, in
        # the sweep's group and named with an attempt suffix, shows the whole curve.
        assert len(runs[job]) == 2, [r["file"] for r in runs[job]]
        resumed = runs[job][-1]
        assert resumed.get("name") == f"{name}-attempt2", resumed.get("name")
        assert resumed.get("group") == runs[0][0]["group"] != ""
        assert resumed["epochs"] == list(range(1, epochs + 1)), resumed["epochs"]


def test_multi_objective_study_through_slurm(tmp_path, slurm_env):
    """hydra/sweeper=optuna on the cluster: 4 trials in batches of 2 SLURM jobs, each told to the study."""
    import optuna
    from support.study import MO_TINY, OBJECTIVES, assert_report_draws_the_front
    sweep_dir = tmp_path / "study"
    args = [*MO_TINY, *SLURM, "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
            "hydra.sweeper.sampler.population_size=2"]
    result = sweep_on_cluster(args, sweep_dir, tmp_path, slurm_env, timeout=400)
    assert result.returncode == 0, output_of(result)
    trials = optuna.load_study(study_name="tulip", storage=f"sqlite:///{sweep_dir / 'optuna.db'}").get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    for trial in trials:
        job = sweep_dir / str(trial.user_attrs["job"])
        assert trial.values == [read_summary(job)[k] for k in OBJECTIVES]
        assert re.fullmatch(r"\d+_[0-1]", OmegaConf.load(job / ".hydra" / "hydra.yaml").hydra.job.id)
    assert len(array_ids(sweep_dir)) == 4  # two arrays of two SLURM jobs
    assert_report_draws_the_front(sweep_dir, tmp_path / "report")
