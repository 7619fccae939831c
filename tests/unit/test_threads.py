"""The CPU threads a job computes with (tulip.launch.cpus) and how a sweep's local launcher shares the cores
(tulip.launch.callbacks.ShareCpus). The real multiruns that check the thread count each job used are in
tests/system/test_sweeps.py."""
import os

import pytest

from conftest import ROOT, compose_with_hydra
from tulip.launch.callbacks import ShareCpus, largest_batch
from tulip.launch.cpus import JOBS_AT_ONCE, cpus_given, threads_for_job
from tulip.launch.launcher import parallel_jobs
from tulip.schema import ConfigError

AFFINITY = len(os.sched_getaffinity(0))


@pytest.fixture
def env(monkeypatch):
    for name in ("SLURM_CPUS_PER_TASK", "OMP_NUM_THREADS", JOBS_AT_ONCE):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_auto_uses_the_affinity_mask(env):
    assert cpus_given() == AFFINITY and threads_for_job("auto") == AFFINITY


def test_slurm_and_omp_num_threads_cap_the_cpus(env):
    env.setenv("SLURM_CPUS_PER_TASK", "1")
    assert threads_for_job("auto") == 1
    env.delenv("SLURM_CPUS_PER_TASK")
    env.setenv("OMP_NUM_THREADS", "1")
    assert threads_for_job("auto") == 1
    env.setenv("OMP_NUM_THREADS", str(AFFINITY + 100))  # more than the mask: the mask wins
    assert threads_for_job("auto") == AFFINITY


def test_jobs_at_once_share_the_cpus_and_never_get_zero(env):
    env.setenv(JOBS_AT_ONCE, "2")
    assert threads_for_job("auto") == max(1, AFFINITY // 2)
    env.setenv(JOBS_AT_ONCE, str(AFFINITY * 10))
    assert threads_for_job("auto") == 1


def test_an_explicit_thread_count_is_used_as_given(env):
    env.setenv(JOBS_AT_ONCE, "8")
    assert threads_for_job(3) == 3


@pytest.mark.parametrize("launcher, sweep, expected", [
    ("submitit_local", ["seed=0,1,2", "reg.lip=0,0.1"], "6"),  # all six start at once
    ("submitit_local", ["seed=0,1,2", "hydra.sweeper.max_batch_size=2"], "2"),  # two at a time
    ("local", ["seed=0,1,2", "hydra.launcher.array_parallelism=2"], "2"),  # two at a time
    ("local", ["seed=0", "hydra.launcher.array_parallelism=2"], "1"),  # a one-job sweep runs alone
    ("basic", ["seed=0,1,2"], None),  # one job at a time: no sharing
    ("slurm_local", ["seed=0,1,2"], None),  # SLURM gives each job its CPUs
])
def test_share_cpus_tells_the_jobs_of_a_local_launcher_how_many_run_at_once(env, launcher, sweep, expected):
    env.setenv(JOBS_AT_ONCE, "99")  # a previous sweep's value in this process is replaced or cleared
    settings = [o for o in sweep if o.startswith("hydra.")]
    cfg = compose_with_hydra(*settings, *([] if launcher == "basic" else [f"hydra/launcher={launcher}"]))
    # what `python run.py -m <sweep>` leaves in the config the callback gets (compose() takes no sweeps)
    cfg.hydra.overrides.task = [o for o in sweep if not o.startswith("hydra.")]
    ShareCpus().on_multirun_start(cfg)
    assert os.environ.get(JOBS_AT_ONCE) == expected


def test_the_local_launcher_runs_one_job_per_cpu_unless_told(env):
    assert parallel_jobs("auto") == parallel_jobs(None) == cpus_given()
    assert parallel_jobs(3) == 3
    for bad in (0, -1, 2.5, True, "two"):
        with pytest.raises(ConfigError, match=r"^hydra\.launcher\.array_parallelism=.* is invalid: expected auto or"):
            parallel_jobs(bad)
    cfg = compose_with_hydra("hydra/launcher=local")
    cfg.hydra.overrides.task = [f"seed={','.join(map(str, range(cpus_given() + 3)))}"]
    ShareCpus().on_multirun_start(cfg)
    assert os.environ[JOBS_AT_ONCE] == str(cpus_given())  # auto: as many jobs at once as CPUs


def test_a_sweep_files_params_count_too():
    cfg = compose_with_hydra(config_name="certified", config_dir=ROOT / "sweeps")
    assert largest_batch(cfg) == 18  # 6 regularizers x 3 seeds from hydra.sweeper.params
