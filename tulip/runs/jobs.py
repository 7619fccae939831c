"""The job folders of a sweep, read as records: which folders are jobs, each job's summary (or why it
cannot be read), and the overrides it ran with.

Three readers share these: tulip-report (tulip.report.runs), the end-of-sweep table
(tulip.launch.callbacks) and the Optuna sweeper that reads back its trials (tulip.launch.sweeper). One
reader means they name a job by the same overrides and agree on which jobs finished.
"""
import re
from pathlib import Path

import yaml

from tulip.runs.folder import RunFolder, RunFolderError

NO_SUMMARY = "no summary.json (crashed before writing it, or still running)"


def natural_order(path: Path) -> list:
    """Job 2 before job 10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def job_folders(sweep_dir: Path) -> list[Path]:
    """The job folders directly inside a sweep folder (those holding `.hydra/`), numbered jobs first
    in number order, then any others by name."""
    folders = [f for f in Path(sweep_dir).iterdir() if (f / ".hydra").is_dir()]
    return sorted(folders, key=lambda f: (not f.name.isdigit(), natural_order(f)))


def read_yaml(path: Path):
    """A YAML record of a job (Hydra's .hydra/*.yaml, multirun.yaml); None when missing or damaged."""
    try:
        return yaml.safe_load(path.read_text()) if path.exists() else None
    except yaml.YAMLError:
        return None


def summary_or_problem(path: Path) -> tuple[dict, str]:
    """(summary.json, "") or ({}, why it cannot be read): NO_SUMMARY when there is none yet. A run killed
    while writing, or still running, is reported rather than raising (unlike `RunFolder.read_summary`,
    which a run reading its own folder wants to fail loudly)."""
    folder = RunFolder(path)
    if not folder.summary_file.exists():
        return {}, NO_SUMMARY
    try:
        return folder.read_summary(), ""
    except RunFolderError as error:
        return {}, str(error)


def read_overrides(path: Path, summary: dict) -> list[str]:
    """The overrides a job ran with, as written: summary.json's own record, else .hydra/overrides.yaml.
    summary.json first because it holds them next to the numbers they produced: a sweep relaunched into
    the same folder rewrites .hydra/ for a job it then skips as finished, leaving the old summary."""
    overrides = summary.get("overrides")
    if overrides is None:
        overrides = read_yaml(path / ".hydra" / "overrides.yaml")
    return [str(o) for o in overrides] if isinstance(overrides, list) else []
