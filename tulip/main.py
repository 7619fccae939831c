"""`run(cfg)`: what `python run.py` does, callable from tests, sweeps and notebooks.

It checks the config and builds the final evaluation (so a bad `attack.*` fails before training), then
trains (mode=train) or works on an existing run folder (mode=evaluate, mode=summary), and returns the
metrics as a dict. A diverged run returns NaN metrics instead of raising, so a sweep goes on with its
other jobs. A training job that cannot start (a bad value) still leaves a summary.json saying `failed`
and why, so that a sweep's report lists it. Every job's last log line is its result
(tulip.runs.result): status, test error at the selected epoch, the run folder and how to look at it.
"""
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tulip.config import validate
from tulip.launch.cpus import cpus_given, jobs_at_once, use_threads
from tulip.evaluate.final import build_evaluation
from tulip.evaluate.modes import evaluate_run, summarize_run
from tulip.runs.folder import RunFolder, RunFolderError
from tulip.runs.result import counted, result_line
from tulip.runs.status import STATUS, Status
from tulip.runs.tracking import RunContext
from tulip.train.loop import train

log = logging.getLogger(__name__)


def hydra_context() -> tuple[Path | None, RunContext]:
    """The job's output folder and overrides, when running under Hydra."""
    if not HydraConfig.initialized():
        return None, RunContext()
    hydra_cfg = HydraConfig.get()
    choices = {group: str(option) for group, option in hydra_cfg.runtime.choices.items()
               if option is not None}
    multirun = hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN"
    context = RunContext(overrides=list(hydra_cfg.overrides.task), choices=choices,
                         sweep_dir=str(hydra_cfg.sweep.dir) if multirun else None)
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir")
    return (Path(output_dir) if output_dir else None), context


def run(cfg: DictConfig, run_dir: Path | str | None = None,
        context: RunContext | None = None) -> dict:
    """Run one job. `run_dir` and `context` default to what Hydra provides."""
    hydra_dir, hydra_context_ = hydra_context()
    context = context or hydra_context_
    run_dir = Path(run_dir) if run_dir is not None else hydra_dir
    try:
        validate(cfg)
        log.info("%s (%s given, %s at once on them)", counted(use_threads(cfg.threads), "CPU thread"),
                 counted(cpus_given(), "CPU"), counted(jobs_at_once(), "job"))
        evaluation = build_evaluation(cfg)
        if cfg.mode in ("evaluate", "summary"):
            folder = RunFolder(cfg.run_dir)
            with folder.writer_lock(create=False):
                metrics = (evaluate_run(cfg, evaluation, context) if cfg.mode == "evaluate"
                           else summarize_run(cfg, context))
        else:
            if run_dir is None:
                raise ValueError("run(cfg) outside Hydra needs run_dir")
            with RunFolder(run_dir).writer_lock() as folder:
                metrics = train(cfg, folder, context, evaluation)
    except RunFolderError:
        raise  # the folder is another process's, damaged or not writable: leave it as it is
    except Exception as error:
        # A job that could not start (or failed before its first summary) says so in its folder;
        # an existing summary.json (another run's, or this job's last attempt) is never overwritten.
        folder = RunFolder(run_dir) if run_dir is not None else None
        if cfg.get("mode") == "train" and folder is not None:
            if not folder.summary_file.exists():
                folder.write_summary({STATUS: Status.FAILED, "epoch": 0,
                                      "error": f"{type(error).__name__}: {error}",
                                      "overrides": list(context.overrides)})
            log.error("%s", result_line(cfg.mode, folder))
        raise
    log.info("%s", result_line(cfg.mode, folder))
    return metrics
