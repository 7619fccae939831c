"""The Weights & Biases run of a job: a mirror of the run folder's files, for comparing runs.

The files (metrics.jsonl, summary.json: tulip.run_folder) are the record of truth. W&B is offline by
default (no account, no network) and `wandb.mode=disabled` turns it into a no-op run, so the code
below never branches on whether W&B is on.
"""
import logging
import os
from dataclasses import dataclass, field

import wandb
from omegaconf import DictConfig, OmegaConf

from tulip import metric_keys
from tulip.run_folder import RunFolder, finite_or_none

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What Hydra knows about this job that the config itself does not hold."""
    overrides: list[str] = field(default_factory=list)  # the job's command-line overrides
    choices: dict[str, str] = field(default_factory=dict)  # config group -> chosen option
    sweep_dir: str | None = None  # the multirun folder, None for a single run


class Tracker:
    """The W&B run of one attempt of one job.

    A requeued job is a new attempt in the same folder; offline W&B runs cannot be resumed, so each
    attempt is its own run in the same group, named with an `-attempt<k>` suffix, and logs `epoch`
    as its x-axis so the attempts line up.
    """

    def __init__(self, cfg: DictConfig, folder: RunFolder, context: RunContext):
        wandb_dir = folder.wandb_dir
        previous_attempts = len(list(wandb_dir.glob("*run-*"))) if wandb_dir.is_dir() else 0
        wandb_dir.mkdir(parents=True, exist_ok=True)
        name = cfg.wandb.name or ",".join(context.overrides) or "defaults"
        if previous_attempts:
            name = f"{name}-attempt{previous_attempts + 1}"
        group = cfg.wandb.group or (context.sweep_dir.replace(os.sep, "_") if context.sweep_dir else None)
        tags = [f"{group_name}={option}" for group_name, option in sorted(context.choices.items())
                if not group_name.startswith("hydra/")] + list(cfg.wandb.tags)
        config = OmegaConf.to_container(cfg, resolve=True)
        config["overrides"] = list(context.overrides)
        config["choices"] = dict(context.choices)
        self.broken = False
        self.run = wandb.init(mode=cfg.wandb.mode, project=cfg.wandb.project, entity=cfg.wandb.entity,
                              group=group, name=name, tags=[t[:64] for t in tags], config=config,
                              dir=str(folder.path), reinit="finish_previous")
        self.run.define_metric(metric_keys.EPOCH)
        for prefix in metric_keys.EPOCH_PREFIXES:
            self.run.define_metric(f"{prefix}*", step_metric=metric_keys.EPOCH)
        self.run.define_metric(metric_keys.LR, step_metric=metric_keys.EPOCH)
        # The W&B summary of test error keeps its best (min) and its final value.
        self.run.define_metric(metric_keys.TEST_ERROR, step_metric=metric_keys.EPOCH, summary="min,last")

    def _mirror(self, call, *args, **kwargs) -> None:
        """W&B only mirrors the files. If its service dies (SLURM sends SIGTERM to every process of
        a requeued or preempted job, wandb-core included), warn once and stop mirroring instead of
        failing the training or masking the exception that is already ending it."""
        if self.broken:
            return
        try:
            call(*args, **kwargs)
        except Exception as error:
            self.broken = True
            log.warning("W&B stopped (%s: %s); metrics.jsonl and summary.json go on",
                        type(error).__name__, error)

    def log(self, metrics: dict) -> None:
        self._mirror(self.run.log, finite_or_none(metrics))

    def log_table(self, key: str, columns: list[str], rows: list[list],
                  line: tuple[str, str, str] | None = None) -> None:
        """Log a table; with line=(x, y, title) also a W&B line plot of column y against x."""
        table = wandb.Table(columns=columns, data=rows)
        entries = {key: table}
        if line is not None:
            x, y, title = line
            entries[f"{key}_plot"] = wandb.plot.line(table, x, y, title=title)
        self._mirror(self.run.log, entries)

    def finish(self, summary: dict, failed: bool) -> None:
        epoch_keys = {metric_keys.TEST_ERROR}  # their W&B summary is set by define_metric above
        self._mirror(self.run.summary.update, {k: v for k, v in finite_or_none(summary).items()
                                               if k not in epoch_keys})
        self.broken = False  # finish() even after a failed log: it closes the run's files
        self._mirror(self.run.finish, exit_code=1 if failed else 0)
