"""Tulip's Hydra callbacks, enabled in conf/config.yaml (`hydra.callbacks`):

- `ShareCpus`: before a multirun's jobs start, tells them how many of them a local launcher runs at
  once, so that each takes its share of the cores (tulip.launch.cpus).
- `SweepReport`: ends every multirun with one line per job: did it finish, fail or diverge?

Each job of a sweep writes `summary.json` (with `status` finished | failed | diverged) into its own folder
under `hydra.sweep.dir`; the report reads those files, so it works the same for the basic launcher,
submitit_local and SLURM (where the jobs ran in other processes or on other machines).
"""
import atexit
import os
from pathlib import Path

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from tulip.launch.cpus import JOBS_AT_ONCE, cpus_given
from tulip.launch.launcher import parallel_jobs
from tulip.runs.jobs import NO_SUMMARY, job_folders, read_overrides, summary_or_problem
from tulip.runs.metric_keys import TEST_ERROR
from tulip.runs.status import STATUS, UNREADABLE, Status


def collect_jobs(sweep_dir: Path) -> list[dict]:
    """One dict per job folder of a sweep (a folder holding `.hydra/`), in job-number order:
    {"job", "folder", "status", "overrides", "summary"}. A job without summary.json has status
    "missing" (still running, or killed before it could write one). Read as tulip-report reads them
    (tulip.runs.jobs), so both name a job by the same overrides."""
    jobs = []
    for folder in job_folders(sweep_dir):
        summary, problem = summary_or_problem(folder)
        if problem and problem != NO_SUMMARY:  # listed as unreadable, never a crash of the sweep's last step
            summary = {STATUS: UNREADABLE, "error": problem}
        jobs.append({"job": folder.name, "folder": folder, "status": summary.get("status", "missing"),
                     "overrides": read_overrides(folder, summary), "summary": summary})
    return jobs


def format_report(sweep_dir: Path, jobs: list[dict], metric: str = TEST_ERROR) -> str:
    if not jobs:  # the sweep stopped before its first job (Hydra says why above)
        return f"Sweep {sweep_dir}: no job started."
    counts = {}
    for job in jobs:
        counts[job["status"]] = counts.get(job["status"], 0) + 1
    lines = [f"Sweep {sweep_dir}: {len(jobs)} jobs, "
             + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())),
             f"  {'job':>4}  {'status':<9} {metric:>15}  overrides"]
    for job in jobs:
        value = job["summary"].get(metric)
        shown = f"{value:.4g}" if isinstance(value, (int, float)) else "-"
        error = job["summary"].get("error")
        lines.append(f"  {job['job']:>4}  {job['status']:<9} {shown:>15}  {' '.join(job['overrides'])}"
                     + (f"   [{error}]" if error else ""))
    not_finished = [job for job in jobs if job[STATUS] != Status.FINISHED]
    if not_finished:
        lines.append("NOT FINISHED: " + ", ".join(f"job {j['job']} ({j['status']})" for j in not_finished)
                     + f" - see summary.json (and .submitit/ logs) under {sweep_dir}")
    else:
        lines.append("All jobs finished.")
    return "\n".join(lines)


class SweepReport(Callback):
    """Prints the table of `format_report` once, at the end of a multirun."""

    def __init__(self, metric: str = TEST_ERROR) -> None:
        self.metric = metric
        self.sweep_dir: Path | None = None
        self.reported = False

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir)
        self.reported = False
        # When a job raised, Hydra's sweeper re-raises its exception after all jobs have returned and
        # never calls on_multirun_end - exactly when the report matters. Report at exit in that case.
        atexit.register(self.report)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        self.report()

    def report(self) -> None:
        if self.reported or self.sweep_dir is None or not self.sweep_dir.is_dir():
            return
        self.reported = True
        print(format_report(self.sweep_dir, collect_jobs(self.sweep_dir), self.metric), flush=True)


def _joblib_cap(launcher: DictConfig) -> int | None:
    n_jobs = launcher.get("n_jobs")
    return None if n_jobs is None else cpus_given() if n_jobs < 0 else n_jobs  # -1: one per CPU


# Launchers that run a sweep's jobs side by side on this machine, and how many of a batch they run at
# once (None: all of them), from the launcher's config. SLURM's jobs get their own CPUs
# (SLURM_CPUS_PER_TASK); the basic launcher runs one job at a time.
LOCAL_PARALLEL_LAUNCHERS = {
    "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher": lambda launcher: None,
    "hydra_plugins.tulip_launcher.LocalLauncher": lambda launcher: parallel_jobs(launcher.array_parallelism),
    "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher": _joblib_cap,
}


def largest_batch(config: DictConfig) -> int:
    """The most jobs the sweeper hands the launcher in one batch: the sweep file's `hydra.sweeper.params`
    and the command line's sweep overrides, expanded and split as Hydra's basic sweeper does; a sweeper
    that asks for trials in batches says how many (`n_jobs`)."""
    sweeper = config.hydra.sweeper
    if sweeper.get("n_jobs") is not None:
        return int(sweeper.n_jobs)
    arguments = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    arguments += list(config.hydra.overrides.task)
    overrides = OverridesParser.create().parse_overrides(arguments)
    return max(len(batch) for batch in BasicSweeper.split_arguments(overrides, sweeper.get("max_batch_size")))


class ShareCpus(Callback):
    """Sets JOBS_AT_ONCE for the jobs a local parallel launcher is about to start (they inherit this
    process's environment); clears it for any other launcher, so a SLURM sweep started from the same
    Python process later is not divided."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        os.environ.pop(JOBS_AT_ONCE, None)
        launcher = config.hydra.launcher
        target = launcher.get("_target_", "")
        if target not in LOCAL_PARALLEL_LAUNCHERS:
            return
        try:
            jobs = largest_batch(config)
        except Exception:  # a sweep syntax this count does not follow (glob over groups): one core each
            jobs = cpus_given()
        cap = LOCAL_PARALLEL_LAUNCHERS[target](launcher)
        if cap is not None:
            jobs = min(jobs, cap)
        os.environ[JOBS_AT_ONCE] = str(max(1, jobs))
