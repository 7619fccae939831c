"""Hydra callback that ends every multirun with one line per job: did it finish, fail or diverge?

Enabled in conf/config.yaml:

    hydra:
      callbacks:
        sweep_report:
          _target_: tulip.callbacks.SweepReport

Each job of a sweep writes `summary.json` (with `status` finished | failed | diverged) into its own folder
under `hydra.sweep.dir`; the report reads those files, so it works the same for the basic launcher,
submitit_local and SLURM (where the jobs ran in other processes or on other machines).
"""
import atexit
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from tulip.metric_keys import TEST_ERROR
from tulip.run_folder import RunFolder, RunFolderError


def collect_jobs(sweep_dir: Path) -> list[dict]:
    """One dict per job folder of a sweep (a folder holding `.hydra/`), in job-number order:
    {"job", "folder", "status", "overrides", "summary"}. A job without summary.json has status
    "missing" (still running, or killed before it could write one)."""
    folders = [f for f in Path(sweep_dir).iterdir() if (f / ".hydra").is_dir()]
    folders.sort(key=lambda f: (not f.name.isdigit(), int(f.name) if f.name.isdigit() else 0, f.name))
    jobs = []
    for folder in folders:
        try:
            summary = RunFolder(folder).read_summary()
        except RunFolderError as error:  # listed as unreadable, never a crash of the sweep's last step
            summary = {"status": "unreadable", "error": str(error)}
        overrides = summary.get("overrides")
        if overrides is None and (folder / ".hydra" / "overrides.yaml").is_file():
            overrides = list(OmegaConf.load(folder / ".hydra" / "overrides.yaml"))
        jobs.append({"job": folder.name, "folder": folder, "status": summary.get("status", "missing"),
                     "overrides": list(overrides or []), "summary": summary})
    return jobs


def format_report(sweep_dir: Path, jobs: list[dict], metric: str = TEST_ERROR) -> str:
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
    not_finished = [job for job in jobs if job["status"] != "finished"]
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
