"""The Weights & Biases run of a job: a mirror of the run folder's files, for comparing runs.

The files (metrics.jsonl, summary.json: tulip.runs.folder) are the record of truth. W&B is offline by
default (no account, no network); `wandb.mode=disabled` starts no run and does not even import wandb
(0.4 s of each job's start-up), every call below then being a no-op. W&B never fails a job: an
online run that cannot reach its server within `wandb.init_timeout_s` becomes an offline run, and
any other W&B error (at start, log or finish) is one warning, after which the job goes on without W&B.

Every run has a W&B job type: `train` for a training attempt, `evaluate` and `summary` for the modes that
work on an existing run folder. Those join the training run's group, which training records in
summary.json (`wandb/*`: `Tracker.identity`), and their runs live in the same `<run folder>/wandb/`.
"""
import logging
import math
import os
import secrets
import string
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from tulip.runs import metric_keys
from tulip.runs.folder import RunFolder, finite_or_none

log = logging.getLogger(__name__)


@dataclass
class RunContext:
    """What Hydra knows about this job that the config itself does not hold."""
    overrides: list[str] = field(default_factory=list)  # the job's command-line overrides
    choices: dict[str, str] = field(default_factory=dict)  # config group -> chosen option
    sweep_dir: str | None = None  # the multirun folder, None for a single run


RUN_ID_LENGTH = 8
OFFLINE_SUFFIX = "offline"  # the id of an online run's offline fallback: <id>offline
JOB_TRAIN, JOB_EVALUATE, JOB_SUMMARY = "train", "evaluate", "summary"


def _new_run_id() -> str:
    """An id like W&B's own (8 of [a-z0-9]); `secrets` leaves the seeded random generators alone."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(RUN_ID_LENGTH))


def _job_type(run_id: str) -> str:
    """The job type of a W&B run in a run folder, read from its id: <8 characters>[<job type>][offline]."""
    return run_id[RUN_ID_LENGTH:].removesuffix(OFFLINE_SUFFIX) or JOB_TRAIN


class Tracker:
    """The W&B run of one attempt of one job.

    A requeued job is a new attempt in the same folder; offline W&B runs cannot be resumed, so each
    attempt is its own run in the same group, named with an `-attempt<k>` suffix, and logs `epoch`
    as its x-axis so the attempts line up.

    A `job_type` other than train is a mode working on the trained run in `folder`: its run is named
    after the training run (`<name>-evaluate`), joins its group and holds its id and path in its config
    (`training_run_id`, `training_run_path`) along with `run_dir`; `wandb.name` and `wandb.group`, when
    set, still win. Its id ends with the job type, so that it never counts as a training attempt.
    """

    def __init__(self, cfg: DictConfig, folder: RunFolder, context: RunContext, job_type: str = JOB_TRAIN):
        wandb_dir = folder.wandb_dir
        # Folders [offline-]run-<time>-<id>; an attempt that fell back to offline left two, with
        # ids <id> and <id>offline (W&B refuses to reuse the id of the run that failed to start).
        run_ids = [p.name.rsplit("-", 1)[-1] for p in wandb_dir.glob("*run-*")]
        previous_attempts = len({i[:RUN_ID_LENGTH] for i in run_ids if _job_type(i) == JOB_TRAIN})
        wandb_dir.mkdir(parents=True, exist_ok=True)
        tags = [f"{group_name}={option}" for group_name, option in sorted(context.choices.items())
                if not group_name.startswith("hydra/")] + list(cfg.wandb.tags)
        config = OmegaConf.to_container(cfg, resolve=True)
        config["overrides"] = list(context.overrides)
        config["choices"] = dict(context.choices)
        if job_type == JOB_TRAIN:
            name = cfg.wandb.name or ",".join(context.overrides) or "defaults"
            if previous_attempts:
                name = f"{name}-attempt{previous_attempts + 1}"
            group = cfg.wandb.group or (context.sweep_dir.replace(os.sep, "_") if context.sweep_dir else None)
            run_id = _new_run_id()
        else:
            # A training run without W&B (disabled, or W&B failed) recorded no identity: the name falls
            # back to what training would have called it, and the run has no group and no link.
            trained = folder.read_summary()
            trained_name = (trained.get(metric_keys.WANDB_RUN_NAME)
                            or ",".join(trained.get("overrides") or []) or "defaults")
            name = cfg.wandb.name or f"{trained_name}-{job_type}"
            group = cfg.wandb.group or trained.get(metric_keys.WANDB_GROUP)
            config.update(run_dir=str(folder.path), training_run_id=trained.get(metric_keys.WANDB_RUN_ID),
                          training_run_path=trained.get(metric_keys.WANDB_RUN_PATH))
            run_id = _new_run_id() + job_type
        self.broken = cfg.wandb.mode == "disabled"  # no run: every mirrored call below does nothing
        self.run = self._mirror(lambda: self._start(
            cfg.wandb.mode, float(cfg.wandb.init_timeout_s), float(cfg.wandb.finish_timeout_s),
            project=cfg.wandb.project, entity=cfg.wandb.entity, group=group, name=name, job_type=job_type,
            tags=[t[:64] for t in tags], config=config, dir=str(folder.path), reinit="finish_previous",
            id=run_id))
        # What summary.json records of this run (metric_keys.WANDB_*), read once while the run is live.
        self.identity: dict[str, str] = self._mirror(self._identity) or {}

    @staticmethod
    def _start(mode: str, timeout: float, finish_timeout: float, **init):
        # quiet also skips the login's account lookup (for its "logged in as" line), which
        # init_timeout does not bound: 10 s more against an unreachable server. finish_timeout bounds
        # the upload at the end of an online run whose network went away (unsent data stays on disk).
        import wandb  # here, not at the top: a job with wandb.mode=disabled never pays its import
        settings = wandb.Settings(init_timeout=timeout, finish_timeout=finish_timeout, quiet=True)
        try:
            run = wandb.init(mode=mode, settings=settings, **init)
        except Exception as error:
            if mode != "online":
                raise
            run = wandb.init(mode="offline", settings=settings, **{**init, "id": init["id"] + OFFLINE_SUFFIX})
            log.warning("W&B could not start an online run (%s: %s; wandb.init_timeout_s=%g); this run "
                        "logs offline instead: upload it later with `wandb sync %s`", type(error).__name__,
                        str(error).partition("\n")[0], timeout, run.settings.sync_dir)
        run.define_metric(metric_keys.EPOCH)
        for prefix in metric_keys.EPOCH_PREFIXES:
            run.define_metric(f"{prefix}*", step_metric=metric_keys.EPOCH)
        run.define_metric(metric_keys.LR, step_metric=metric_keys.EPOCH)
        # The W&B summary of the validation and test errors keeps their lowest and their final value.
        for key in (metric_keys.VAL_ERROR, metric_keys.TEST_ERROR):
            run.define_metric(key, step_metric=metric_keys.EPOCH, summary="min,last")
        return run

    def _identity(self) -> dict[str, str]:
        """The run's id, path, name and group; {} without a run (wandb.mode=disabled)."""
        if self.run is None:
            return {}
        identity = {metric_keys.WANDB_RUN_ID: self.run.id, metric_keys.WANDB_RUN_PATH: self.run.path,
                    metric_keys.WANDB_RUN_NAME: self.run.name, metric_keys.WANDB_GROUP: self.run.group}
        return {key: value for key, value in identity.items() if value}  # a single run has no group

    def _mirror(self, call):
        """W&B only mirrors the files. If it cannot start or its service dies (SLURM sends SIGTERM to
        every process of a requeued or preempted job, wandb-core included), warn once and stop
        mirroring instead of failing the training or masking the exception that is already ending it."""
        if self.broken:
            return None
        try:
            return call()
        except Exception as error:
            self.broken = True
            log.warning("W&B stopped (%s: %s); metrics.jsonl and summary.json go on",
                        type(error).__name__, error)
            return None

    def log(self, metrics: dict) -> None:
        self._mirror(lambda: self.run.log(finite_or_none(metrics)))

    def log_table(self, key: str, columns: list[str], rows: list[list],
                  line: tuple[str, str, str] | None = None) -> None:
        """Log a table; with line=(x, y, title) also a W&B line plot of column y against x. A non-finite
        float is an empty cell, as in the summary: W&B writes the table as JSON, which has no inf."""
        def log_entries():
            import wandb
            table = wandb.Table(columns=columns, data=[[None if isinstance(v, float) and not math.isfinite(v)
                                                        else v for v in row] for row in rows])
            entries = {key: table}
            if line is not None:
                x, y, title = line
                entries[f"{key}_plot"] = wandb.plot.line(table, x, y, title=title)
            self.run.log(entries)
        self._mirror(log_entries)

    def finish(self, summary: dict, failed: bool) -> None:
        epoch_keys = {metric_keys.VAL_ERROR, metric_keys.TEST_ERROR}  # their W&B summary: define_metric above
        self._mirror(lambda: self.run.summary.update(
            {k: v for k, v in finite_or_none(summary).items() if k not in epoch_keys}))
        # finish() even after a failed log, as it closes the run's files; not when there is no run
        self.broken = self.run is None
        self._mirror(lambda: self.run.finish(exit_code=1 if failed else 0))
