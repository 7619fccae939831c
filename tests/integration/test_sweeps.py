"""Sweeps without SLURM: the shipped sweep files, the launcher configs, and real multiruns of run.py
through Hydra's basic launcher, submitit_local and Tulip's local launcher (W&B offline runs grouped per
sweep, a failing job that does not stop the others, the end-of-sweep report of tulip.launch.callbacks, at most
`array_parallelism` local jobs at once).

The SLURM versions of these runs are in tests/system/test_slurm.py.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from conftest import CONF_DIR as CONF, ROOT, compose_with_hydra
from support.wandb_records import history, records

SWEEPS = ROOT / "sweeps"
RUN_PY = ROOT / "run.py"

# A job that trains for real but in a few seconds: 1 epoch on 512 training / 200 test images.
TINY = ["epochs=1", "dataset=mnist5k", "dataset.train_subset=512", "dataset.test_subset=200",
        "attack=none"]


# --- helpers shared with tests/system/test_slurm.py ------------------------------------------------------

def run_tulip(args: list[str], cwd: Path, timeout: float, env: dict | None = None,
              ) -> subprocess.CompletedProcess:
    """`python run.py ARGS` in `cwd`; a run that outlives `timeout` fails the test (never hangs it)."""
    try:
        return subprocess.run([sys.executable, str(RUN_PY), *args], cwd=cwd, text=True,
                              capture_output=True, timeout=timeout, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or "") + (expired.stderr or "")
        output = output.decode() if isinstance(output, bytes) else output
        pytest.fail(f"run.py {' '.join(args)} still running after {timeout} s:\n{output[-4000:]}")


def output_of(result: subprocess.CompletedProcess) -> str:
    return f"exit {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"


def job_folders(sweep_dir: Path) -> list[Path]:
    return sorted((f for f in sweep_dir.iterdir() if f.name.isdigit()), key=lambda f: int(f.name))


def read_summary(job_dir: Path) -> dict:
    path = job_dir / "summary.json"
    assert path.is_file(), f"{job_dir} has no summary.json: {sorted(p.name for p in job_dir.iterdir())}"
    return json.loads(path.read_text())


def wandb_runs(job_dir: Path) -> list[dict]:
    """One dict per offline W&B run in a job folder, oldest first: name, group, tags and config of
    its `run` record (absent when the attempt was killed before W&B flushed anything) and the
    `epoch`s it logged, read from the run-<id>.wandb log (tests/support/wandb_records.py)."""
    runs = []
    for run_file in sorted((job_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run = {"file": run_file, "epochs": [row["epoch"] for row in history(run_file) if "epoch" in row]}
        for record in records(run_file):
            if record.WhichOneof("record_type") == "run":
                run.update(name=record.run.display_name, group=record.run.run_group,
                           tags=list(record.run.tags),
                           config={item.key: json.loads(item.value_json) for item in record.run.config.update})
        runs.append(run)
    return runs


# --- the shipped sweep files ----------------------------------------------------------------------

def expand_sweep(name: str) -> tuple[OmegaConf, list[list[str]]]:
    """Compose sweeps/NAME.yaml with conf/ on the search path (what `run.py --config-dir sweeps
    --config-name NAME` does) and list every job's overrides the way Hydra's basic sweeper expands
    hydra.sweeper.params."""
    cfg = compose_with_hydra(config_dir=SWEEPS, config_name=name)
    params = [f"{key}={value}" for key, value in cfg.hydra.sweeper.params.items()]
    parsed = OverridesParser.create().parse_overrides(params)
    return cfg, BasicSweeper.split_arguments(parsed, max_batch_size=None)[0]


@pytest.mark.parametrize("name", ["lagrange_grid", "regularizers", "paper_cifar10", "certified"])
def test_every_job_of_every_sweep_file_composes(name):
    cfg, jobs = expand_sweep(name)
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert len(jobs) >= 2
    parser = OverridesParser.create()
    composed = [compose_with_hydra(*job, config_dir=SWEEPS, config_name=name) for job in jobs]
    for overrides, job in zip(jobs, composed):
        for override in parser.parse_overrides(overrides):
            key, value = override.key_or_group, override.value()
            if key in job.hydra.runtime.choices:  # a config group option
                assert job.hydra.runtime.choices[key] == value
            else:  # the grid value reached the job's config
                assert OmegaConf.select(job, key) == value, (key, value)


def test_lagrange_grid_sweeps_both_multipliers_of_lip_J2():
    cfg, jobs = expand_sweep("lagrange_grid")
    assert cfg.hydra.runtime.choices["regularizer"] == "lip+J2"
    lips = {o for job in jobs for o in job if o.startswith("reg.lip=")}
    j2s = {o for job in jobs for o in job if o.startswith("reg.J2=")}
    assert len(lips) >= 3 and len(j2s) >= 3 and len(jobs) == len(lips) * len(j2s)


def test_regularizers_sweep_covers_every_regularizer_times_three_seeds_with_l2_attack():
    cfg, jobs = expand_sweep("regularizers")
    # certified training needs a certifiable network: sweeps/certified.yaml compares it (tested below)
    shipped = {p.stem for p in (CONF / "regularizer").glob("*.yaml") if not p.stem.startswith("_")} - {"gloro"}
    swept = {o.split("=", 1)[1] for job in jobs for o in job if o.startswith("regularizer=")}
    assert swept == shipped, f"missing from the sweep: {shipped - swept}; unknown: {swept - shipped}"
    assert {o for job in jobs for o in job if o.startswith("seed=")} == {"seed=0", "seed=1", "seed=2"}
    assert len(jobs) == 3 * len(shipped)
    assert cfg.hydra.runtime.choices["attack"] == "ddn"  # a minimisation attack (smallest L2 distance)
    assert len(cfg.attack.epsilons.l2) >= 4  # the L2 robust error curve


def test_paper_cifar10_is_the_papers_recipe_on_slurm_gpu():
    cfg, jobs = expand_sweep("paper_cifar10")
    choices = cfg.hydra.runtime.choices
    assert (choices["model"], choices["dataset"], choices["regularizer"]) == ("resnext34_2x32", "cifar10", "lip+J2")
    assert choices["hydra/launcher"] == "slurm_gpu"
    assert cfg.epochs == 200 and cfg.model.tanh is True and cfg.reg.decay == 5e-4
    assert cfg.hydra.launcher.gpus_per_node == 1
    swept = {o.split("=")[0] for job in jobs for o in job}
    assert swept == {"reg.lip", "reg.J2"}


def test_slurm_gpu_launcher_keys_are_overridable():
    overrides = ["hydra/launcher=slurm_gpu", "hydra.launcher.partition=a100", "hydra.launcher.account=proj",
                 "hydra.launcher.qos=high", "hydra.launcher.constraint=h100", "hydra.launcher.cpus_per_task=4",
                 "hydra.launcher.mem_gb=16", "hydra.launcher.timeout_min=30",
                 "hydra.launcher.array_parallelism=3", "hydra.launcher.setup=[module load cuda]"]
    default = compose_with_hydra(*overrides[:1])
    custom = compose_with_hydra(*overrides)
    launcher = default.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.gpus_per_node == 1 and launcher.max_num_timeout > 0  # timeouts requeue
    assert launcher.partition and launcher.cpus_per_task and launcher.mem_gb and launcher.timeout_min
    launcher = custom.hydra.launcher
    assert (launcher.partition, launcher.account, launcher.qos, launcher.constraint) == ("a100", "proj", "high", "h100")
    assert (launcher.cpus_per_task, launcher.mem_gb, launcher.timeout_min, launcher.array_parallelism) == (4, 16, 30, 3)
    assert list(launcher.setup) == ["module load cuda"]


def test_config_enables_the_sweep_report_callback():
    cfg = compose_with_hydra()
    targets = [c._target_ for c in cfg.hydra.callbacks.values()]
    assert "tulip.launch.callbacks.SweepReport" in targets


def test_sweep_report_names_jobs_that_did_not_finish(tmp_path, capsys):
    from tulip.launch.callbacks import SweepReport
    outcomes = {"0": {"status": "finished", "test/error_pct": 3.25}, "1": {"status": "diverged"},
                "2": None, "3": {"status": "failed", "error": "ValueError: reg.lip=-1 must be >= 0"}}
    for job, summary in outcomes.items():
        (tmp_path / job / ".hydra").mkdir(parents=True)
        OmegaConf.save(OmegaConf.create([f"seed={job}"]), tmp_path / job / ".hydra" / "overrides.yaml")
        if summary is not None:  # job 2 was killed before writing one
            (tmp_path / job / "summary.json").write_text(json.dumps(summary))
    report = SweepReport()
    report.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    report.on_multirun_end(OmegaConf.create({}))
    report.report()  # at exit: already reported, prints nothing more
    out = capsys.readouterr().out
    assert out.count("Sweep ") == 1
    assert "4 jobs" in out and "3.25" in out and "seed=2" in out and "reg.lip=-1 must be" in out
    assert "NOT FINISHED: job 1 (diverged), job 2 (missing), job 3 (failed)" in out


def test_sweep_report_of_a_sweep_that_started_no_job_says_so(tmp_path):
    from tulip.launch.callbacks import format_report
    assert format_report(tmp_path, []) == f"Sweep {tmp_path}: no job started."


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
def test_a_raising_job_does_not_stop_the_others_and_is_reported(tmp_path):
    """Basic launcher (one job after another): job 0 raises (invalid value), job 1 diverges (huge
    learning rate), job 2 must still run and finish; the end-of-sweep report names 0 and 1."""
    sweep_dir = tmp_path / "sweep"
    result = run_tulip(["-m", "optim.lr=-1,1e12,0.05", *TINY, "wandb.mode=disabled",
                        f"hydra.sweep.dir={sweep_dir}"], cwd=tmp_path, timeout=240)
    assert result.returncode == 1, output_of(result)  # a job raised: the multirun says so
    failed, diverged, finished = (read_summary(job) for job in job_folders(sweep_dir))
    assert failed["status"] == "failed" and "optim.lr" in failed.get("error", ""), failed
    assert diverged["status"] == "diverged", diverged
    assert finished["status"] == "finished", finished
    assert "job 0 (failed), job 1 (diverged)" in result.stdout, output_of(result)


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
    assert "hydra.launcher.array_parallelism must be a positive integer or auto, got 0" in result.stderr, \
        output_of(result)
    assert not sweep_dir.exists() or not job_folders(sweep_dir)


def test_certified_sweep_compares_gloro_with_the_others_on_one_certifiable_network():
    cfg, jobs = expand_sweep("certified")
    choices = cfg.hydra.runtime.choices
    assert (choices["model"], choices["optim"], choices["attack"]) == ("cnn_4c3f", "adam", "autoattack_l2")
    swept = {o.split("=", 1)[1] for job in jobs for o in job if o.startswith("regularizer=")}
    assert swept == {"gloro", "none", "lip", "lip+J2", "pgd_l2", "trades"} and len(jobs) == 18
    assert list(cfg.attack.epsilons.l2) == [0.3, 1.0, 1.58]  # GloRo's MNIST radii
    assert cfg.attack.methods.apgd_ce_l2.n_iter == 100  # the standard ensemble
