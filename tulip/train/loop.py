"""Training one run: build everything from the config, train, measure every epoch, checkpoint.

`train` is three steps. `_start_or_resume` builds the data, model, training loss, optimizer and schedule,
and resumes from `checkpoints/last.pt` when the folder holds one (its config must agree on
`TRAINING_STATE`). `_train_epochs` loops over the epochs left: each a flat loop of steps (the step's
device setup decided once by tulip.train.step: precision, channels_last, compile) followed by the
measurements of tulip.evaluate.measures and the checkpoints. `_finish` puts the best checkpoint through
the final evaluation it was handed (tulip.evaluate.final, built before training). summary.json is
written, whatever happened.

The best checkpoint is the epoch with the lowest validation error (or the figure `select` names: a certified
model's validation certified error at a radius of `eval.certify`). The test set is measured every epoch
for the curves, and decides nothing: with `dataset.val_size=0` (no validation split) the choice falls
back to the test set, as the original protocol did, and the run says so (a warning, `selection: test`).
"""
import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from tulip.runs import metric_keys
from tulip.config import TRAINING_STATE, ConfigError, resolve_device
from tulip.data import Data, check_batch_fits, class_balanced_subset, load_dataset
from tulip.nn.lipschitz import layer_norm_bound
from tulip.evaluate.measures import certified_errors, error_and_loss, error_intervals, measure
from tulip.train.loss import TrainingLoss, build_loss
from tulip.build import build_model
from tulip.runs.folder import RunFolder, RunFolderError
from tulip.runs.status import STATUS, Status
from tulip.seeding import rng_state, seed_everything, set_rng_state
from tulip.train.step import StepSetup, prepare_step
from tulip.runs.tracking import RunContext, Tracker

# The final evaluation: (model, data, folder, tracker) -> metrics (tulip.evaluate.final.Evaluation).
FinalEvaluation = Callable[[torch.nn.Module, Data, RunFolder, Tracker], dict]

log = logging.getLogger(__name__)

# What a rerun in a finished run's folder must match, besides the training state, to be skipped: the
# final evaluation's settings (a changed attack or eval section re-runs the final evaluation).
FINAL_EVALUATION_SETTINGS = ("attack", "eval", "test_batch_size")


class Diverged(Exception):
    def __init__(self, epoch: int, step: int):
        super().__init__(f"loss became NaN/Inf at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    best_error: float = math.inf  # the selection split's error at best_epoch
    best_epoch: int = 0
    history: list = field(default_factory=list)  # one metrics dict per completed epoch


def _selected(config: dict, keys: tuple[str, ...]) -> dict:
    return {key: config.get(key) for key in keys}


def _checkpoint_to_resume(folder: RunFolder, device: torch.device) -> dict:
    """checkpoints/last.pt, once best.pt (which the final evaluation loads) has been read too. A file that
    cannot be read stops the run with what to do; neither is touched."""
    for which in ("best", "last"):
        try:
            saved = folder.load_checkpoint(which, device)
        except (RunFolderError, FileNotFoundError) as error:
            raise RunFolderError(
                f"{error}. To resume from the other checkpoint, copy it over this one (the epochs after it "
                f"are recomputed identically); to start over, use another output folder (hydra.run.dir)"
            ) from error
    return saved


def _differing_keys(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [key for k in sorted(set(old) | set(new))
                for key in _differing_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def train_one_epoch(model, loss_fn, optimizer, data: Data, batch_size: int, epoch: int,
                    progress: bool, autocast: Callable[[], ContextManager] = contextlib.nullcontext,
                    memory_format: torch.memory_format = torch.contiguous_format) -> dict:
    """One pass over the shuffled training set; returns the epoch's training averages.

    Nothing here waits for the device: losses go into a preallocated per-step buffer and are
    checked for NaN/Inf once, at the end of the epoch, which also names the first bad step.
    `autocast` and `memory_format` come from the run's StepSetup (`prepare_step`).
    """
    model.train()
    # Backpropagate into the weights only: a regularizer's input x may require grad, and its
    # gradient (a costly first-layer input gradient) is never used by the optimizer step.
    weights = [p for p in model.parameters() if p.requires_grad]
    n = len(data.train_y)
    steps = n // batch_size  # the incomplete last batch is dropped; reshuffling covers it
    order = torch.randperm(n).to(data.train_x.device)
    step_losses = torch.zeros(steps, device=data.train_x.device)
    correct = torch.zeros((), device=data.train_x.device)
    penalty_sums: dict[str, torch.Tensor] = {}
    batches = range(steps)
    if progress:
        batches = tqdm(batches, desc=f"epoch {epoch}", leave=False, file=sys.stderr)
    for step in batches:
        idx = order[step * batch_size:(step + 1) * batch_size]
        x, y = data.augment(data.train_x[idx]).contiguous(memory_format=memory_format), data.train_y[idx]
        with autocast():
            out = loss_fn(model, x, y)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward(inputs=weights)
        optimizer.step()
        step_losses[step] = out.loss.detach()
        correct += (out.logits.detach().argmax(1) == y).sum()
        for name, value in out.logs.items():
            penalty_sums[name] = penalty_sums.get(name, 0.0) + value
    bad = (~torch.isfinite(step_losses)).nonzero()
    if len(bad):
        raise Diverged(epoch, int(bad[0]))
    metrics = {metric_keys.TRAIN_LOSS: step_losses.mean().item(),
               metric_keys.TRAIN_ERROR: 100.0 * (1.0 - correct.item() / (steps * batch_size))}
    metrics.update({name: float(total) / steps for name, total in penalty_sums.items()})
    return metrics


def _build(node: DictConfig, key: str, *args):
    """instantiate(node)(*args) for a `_partial_` node. Its values passed the schema (tulip.schema.TORCH_SCHEMAS);
    an argument torch still rejects (a misspelt one, a combination) becomes a ConfigError naming `key`."""
    try:
        return instantiate(node)(*args)
    except (TypeError, ValueError) as error:
        target = node.get("_target_")
        raise ConfigError(key, target, f"arguments that {target} accepts ({error})") from None


@dataclass
class Training:
    """A run's parts, built from its config (and its last checkpoint, resuming), that the epochs train."""
    cfg: DictConfig
    config: dict  # cfg resolved, as every checkpoint saves it
    device: torch.device
    data: Data
    model: torch.nn.Module
    loss_fn: TrainingLoss
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    state: TrainState = field(default_factory=TrainState)
    finished: dict | None = None  # the metrics of this very run, when the folder holds it finished

    @property
    def selection(self) -> str:
        """The split that chooses the best epoch: "val", or "test" without a validation split."""
        return "val" if len(self.data.val_y) else "test"

    @property
    def lipschitz_images(self) -> torch.Tensor | None:
        """The per-epoch Lipschitz figures' test images: fixed (seed 0, its own generator), so runs of
        every seed measure the same ones."""
        return class_balanced_subset(self.data.test_y, self.cfg.eval.n, seed=0)


def _start_or_resume(cfg: DictConfig, folder: RunFolder) -> Training:
    """Everything training needs, seeded; resumed from checkpoints/last.pt when the folder holds one."""
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_dataset(cfg.dataset, device)
    check_batch_fits(data, cfg.batch_size, cfg.dataset._target_)
    model = build_model(cfg, data, device)
    loss_fn = build_loss(cfg.reg, model)  # its ConfigError names the reg.* key
    optimizer = _build(cfg.optim, "optim", model.parameters())
    scheduler = _build(cfg.scheduler, "scheduler", optimizer)
    run = Training(cfg, OmegaConf.to_container(cfg, resolve=True), device, data, model, loss_fn, optimizer,
                   scheduler)
    if run.selection == "test":
        log.warning("dataset.val_size=0: no validation split, so the best epoch is chosen on the test set "
                    "(the original protocol); its test error is then an optimistic estimate")
    folder.path.mkdir(parents=True, exist_ok=True)
    if folder.checkpoint("last").exists():
        _resume(run, folder)
    return run


def _resume(run: Training, folder: RunFolder) -> None:
    """Load the last checkpoint into `run` (its config must agree on the training state); mark the run
    finished when the folder already holds it finished with the same final-evaluation settings."""
    saved = _checkpoint_to_resume(folder, run.device)
    saved_config = saved["config"]  # keys added since are filled in (tulip.runs.targets)
    changed = _differing_keys(_selected(saved_config, TRAINING_STATE), _selected(run.config, TRAINING_STATE))
    if changed:
        raise ConfigError(f"{folder.path} holds a checkpoint of a run with a different config "
                          f"(differs in: {', '.join(changed)}); refusing to overwrite it. "
                          f"Use another hydra.run.dir or the same config to resume.")
    run.model.load_state_dict(saved["model"])
    run.optimizer.load_state_dict(saved["optimizer"])
    run.scheduler.load_state_dict(saved["scheduler"])
    run.loss_fn.load_state_dict(saved["loss"])
    set_rng_state(saved["rng"])
    run.state = TrainState(saved["epoch"], saved["best_error"], saved["best_epoch"], list(saved["history"]))
    log.info("resuming %s from epoch %d", folder.path, run.state.epoch)
    summary = folder.read_summary()
    requested = TRAINING_STATE + FINAL_EVALUATION_SETTINGS
    if (run.state.epoch == run.cfg.epochs and summary.get(STATUS) == Status.FINISHED
            and not _differing_keys(_selected(saved_config, requested), _selected(run.config, requested))):
        log.info("%s already holds this finished run: nothing to do (mode=evaluate run_dir=%s "
                 "re-evaluates it)", folder.path, folder.path)
        run.finished = {k: v for k, v in summary.items()
                        if k not in (STATUS, "overrides", "error") and not k.startswith(metric_keys.WANDB_PREFIX)}


def _train_epochs(run: Training, setup: StepSetup, folder: RunFolder, tracker: Tracker) -> None:
    """The epochs after the last completed one: each trains, measures on the validation and test sets,
    saves last.pt (and best.pt at a new lowest error of the selection split), appends its row to
    metrics.jsonl and logs it. Raises Diverged at a NaN/Inf loss."""
    cfg, state = run.cfg, run.state
    progress = sys.stderr.isatty()
    lipschitz_images = run.lipschitz_images
    criterion = cfg.select if run.selection == "val" else metric_keys.error_key("test")
    val_x, val_y = run.data.split("val")
    for epoch in range(state.epoch + 1, cfg.epochs + 1):
        started = time.perf_counter()
        metrics = {metric_keys.EPOCH: epoch, metric_keys.LR: run.optimizer.param_groups[0]["lr"]}
        run.loss_fn.start_epoch(epoch, cfg.epochs)
        metrics.update(train_one_epoch(setup.model, run.loss_fn, run.optimizer, run.data, cfg.batch_size,
                                       epoch, progress, setup.autocast, setup.memory_format))
        run.scheduler.step()
        # The plain model, outside autocast, from here on: the measurements, the checkpoints and the
        # final evaluation are float32 whatever `precision` is (a certificate or Lipschitz bound
        # computed in bf16 would not be sound), and the checkpoint holds the model's own state_dict
        # (torch.compile's wrapper would prefix every key with `_orig_mod.`).
        metrics.update(measure(run.model, run.data.test_x, run.data.test_y, cfg.test_batch_size, lipschitz_images,
                               lipschitz=epoch % cfg.eval.every == 0 or epoch == cfg.epochs,
                               guaranteed_bound=False))
        if len(val_y):
            metrics.update(error_and_loss(run.model, val_x, val_y, cfg.test_batch_size, "val"))
            if cfg.eval.certify:
                metrics.update(certified_errors(run.model, val_x, val_y, cfg.test_batch_size, cfg.eval.certify))
        metrics[metric_keys.EPOCH_TIME] = time.perf_counter() - started
        state.epoch = epoch
        state.history.append(metrics)
        if metrics[criterion] < state.best_error:
            state.best_error, state.best_epoch = metrics[criterion], epoch
        _save_checkpoints(run, folder)
        folder.append_metrics(metrics)
        tracker.log(metrics)
        grad_max = metrics.get(metric_keys.LOSS_GRAD_MAX)  # absent between eval.every epochs
        val_error = metrics.get(metric_keys.VAL_ERROR)
        log.info("epoch %d/%d  train err %.2f%%  val err %s  test err %.2f%%  loss grad max %s  %.1fs",
                 epoch, cfg.epochs, metrics[metric_keys.TRAIN_ERROR],
                 "-" if val_error is None else f"{val_error:.2f}%", metrics[metric_keys.TEST_ERROR],
                 "-" if grad_max is None else f"{grad_max:.3g}", metrics[metric_keys.EPOCH_TIME])


def _save_checkpoints(run: Training, folder: RunFolder) -> None:
    """last.pt after every epoch, best.pt too when this epoch is the best so far."""
    state = run.state
    saved = {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
             "scheduler": run.scheduler.state_dict(), "loss": run.loss_fn.state_dict(),
             "epoch": state.epoch, "rng": rng_state(),
             "config": run.config, "best_error": state.best_error,
             "best_epoch": state.best_epoch, "history": state.history}
    if state.best_epoch == state.epoch:
        folder.save_checkpoint(saved, "best")
    folder.save_checkpoint(saved, "last")


def _finish(run: Training, folder: RunFolder, tracker: Tracker, evaluate: FinalEvaluation,
            summary: dict) -> dict:
    """After the last epoch: the summary's figures on the whole test set, then the final evaluation of
    the best checkpoint. Returns the final metrics; `summary` gets them, their timings and `finished`."""
    summary[metric_keys.TRAIN_TIME] = (final_start := time.time()) - summary["time/first_step"]
    summary[metric_keys.EPOCHS_TIME] = metric_keys.epochs_time(run.state.history)
    # The summary's figures: all of them on the whole test set, the guaranteed bound included. With
    # eval.n covering the test set the last epoch measured everything else already.
    final = dict(run.state.history[-1])
    if run.lipschitz_images is None:
        final[metric_keys.LAYER_NORM_PRODUCT] = layer_norm_bound(run.model, run.data.test_x.shape[1:])
    else:
        final.update(measure(run.model, run.data.test_x, run.data.test_y, run.cfg.test_batch_size))
    summary[metric_keys.FINAL_MEASURE_TIME] = time.time() - final_start
    run.model.load_state_dict(folder.load_checkpoint("best", run.device)["model"])
    run.model.eval()
    final.update(evaluate(run.model, run.data, folder, tracker))
    final.update(_selected_epoch(run))
    for split in ("val", "test"):
        rates = [key for key in final if metric_keys.is_error_rate(key)
                 and (key.startswith(f"{split}/") or key == f"best/{split}_error_pct")]
        final.update(error_intervals(final, len(run.data.split(split)[1]), rates))
    summary.update(final)
    summary.update({STATUS: Status.FINISHED, "epoch": run.state.epoch, metric_keys.SELECTION: run.selection})
    return final


def _selected_epoch(run: Training) -> dict[str, float]:
    """The best epoch, its errors, and the lowest test error of any epoch (optimistic: for comparison with
    papers that select on the test set, never for a choice)."""
    state = run.state
    chosen = state.history[state.best_epoch - 1]
    figures = {metric_keys.BEST_EPOCH: state.best_epoch, metric_keys.BEST_TEST_ERROR: chosen[metric_keys.TEST_ERROR],
               metric_keys.LOWEST_TEST_ERROR: min(row[metric_keys.TEST_ERROR] for row in state.history)}
    if metric_keys.VAL_ERROR in chosen:
        figures[metric_keys.BEST_VAL_ERROR] = chosen[metric_keys.VAL_ERROR]
    return figures


def train(cfg: DictConfig, folder: RunFolder, context: RunContext, evaluate: FinalEvaluation) -> dict:
    """Train the configured model in `folder`; return the final metrics (NaN on divergence).

    `_start_or_resume`, `_train_epochs`, `_finish`. summary.json is written however the epochs end:
    finished, diverged (NaN metrics returned, so a sweep goes on) or failed (the exception goes on up).
    A folder that already holds this run finished is left as it is.
    """
    job_start = time.time()
    run = _start_or_resume(cfg, folder)
    if run.finished is not None:
        return run.finished
    folder.write_metrics_history(run.state.history)
    setup = prepare_step(cfg, run.model, run.loss_fn, run.data, run.device)  # torch.compile compiles here
    tracker_start = time.time()
    tracker = Tracker(cfg, folder, context)
    for row in run.state.history:  # a new attempt's W&B run also shows the epochs before it
        tracker.log(row)
    # tracker.identity: this attempt's W&B run, which mode=evaluate and mode=summary log next to
    summary = {STATUS: Status.FAILED, "epoch": run.state.epoch, "overrides": list(context.overrides),
               "time/job_start": job_start, "threads": torch.get_num_threads(),
               metric_keys.SETUP_TIME: tracker_start - job_start,
               metric_keys.WANDB_INIT_TIME: time.time() - tracker_start, **tracker.identity}
    ending_error = None
    try:
        summary["time/first_step"] = time.time()
        _train_epochs(run, setup, folder, tracker)
        return _finish(run, folder, tracker, evaluate, summary)
    except Diverged as diverged:
        log.error("run diverged: %s", diverged)
        summary.update({STATUS: Status.DIVERGED, "epoch": diverged.epoch, "step": diverged.step,
                        "error": str(diverged)})
        return {STATUS: Status.DIVERGED, metric_keys.TEST_ERROR: math.nan, metric_keys.TRAIN_LOSS: math.nan}
    except BaseException as error:
        summary.update({"epoch": run.state.epoch, "error": f"{type(error).__name__}: {error}"})
        ending_error = error
        raise
    finally:
        summary["time/total_s"] = time.time() - job_start
        try:
            folder.write_summary(summary)
        except RunFolderError as error:
            if ending_error is None:
                raise
            log.error("%s", error)  # the disk may be full: the error that ended the run stays the one raised
        tracker.finish(summary, failed=summary[STATUS] != Status.FINISHED)
