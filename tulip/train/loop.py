"""Training one run: build everything from the config, train, measure every epoch, checkpoint.

Read top to bottom: `train` builds the data, model, objective, optimizer and schedule, resumes from
`checkpoints/last.pt` when the folder holds one, decides once how the step runs on the device
(tulip.train.step: precision, channels_last, compile), then loops over epochs. Each epoch is a flat loop of
steps followed by the test-set measurements of tulip.evaluate.measures. After the last epoch the best
checkpoint goes through the final evaluation it was handed (tulip.evaluate.final, built before training)
and summary.json is written, whatever happened.
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
from tulip.config import ConfigError, resolve_device
from tulip.data import Data, load_dataset
from tulip.nn.lipschitz import layer_norm_bound
from tulip.evaluate.measures import class_balanced_subset, measure
from tulip.train.objective import build_objective
from tulip.runs.folder import RunFolder, RunFolderError, build_model
from tulip.seeding import rng_state, seed_everything, set_rng_state
from tulip.train.step import prepare_step
from tulip.runs.tracking import RunContext, Tracker

# The final evaluation: (model, data, folder, tracker) -> metrics (tulip.evaluate.final.Evaluation).
FinalEvaluation = Callable[[torch.nn.Module, Data, RunFolder, Tracker], dict]

log = logging.getLogger(__name__)

# Config sections that do not change what training computes: a run may be resumed (or re-evaluated)
# with different values of these.
# The device and the thread count change rounding, not the math: a GPU job may go on on the CPU and back.
# So do channels_last and compile (memory layout, fused kernels); precision=bf16 changes what each step
# computes, so it is training state.
NOT_TRAINING_STATE = ("wandb", "attack", "eval", "mode", "run_dir", "device", "threads", "channels_last",
                      "compile")
# Training-state keys added after runs had been saved without them, with the value those runs trained with.
SAVED_BEFORE_THE_KEY = {"precision": "fp32"}


class Diverged(Exception):
    def __init__(self, epoch: int, step: int):
        super().__init__(f"loss became NaN/Inf at epoch {epoch}, step {step}")
        self.epoch, self.step = epoch, step


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    best_error: float = math.inf
    best_epoch: int = 0
    history: list = field(default_factory=list)  # one metrics dict per completed epoch


def _training_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_TRAINING_STATE}


# What a rerun in a finished run's folder must match to be skipped: everything but where and how it
# is shown (a changed attack or eval section re-runs the final evaluation).
NOT_REQUESTED = ("wandb", "mode", "run_dir", "device", "threads", "channels_last", "compile")


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


def train_one_epoch(model, objective, optimizer, data: Data, batch_size: int, epoch: int,
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
            out = objective(model, x, y)
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
    """instantiate(node)(*args) for a `_partial_` node; a bad argument becomes a ConfigError naming `key`."""
    try:
        return instantiate(node)(*args)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{key} ({node.get('_target_')}) is invalid: {error}") from error


def train(cfg: DictConfig, folder: RunFolder, context: RunContext, evaluate: FinalEvaluation) -> dict:
    """Train the configured model in `folder`; return the final metrics (NaN on divergence)."""
    job_start = time.time()
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_dataset(cfg.dataset, device)
    if len(data.train_y) < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is invalid: the training set of dataset "
                          f"{cfg.dataset._target_} has only {len(data.train_y)} images")
    model = build_model(cfg, data, device)
    objective = build_objective(cfg.reg, model)  # its ValueError names the reg.* key
    optimizer = _build(cfg.optim, "optim", model.parameters())
    scheduler = _build(cfg.scheduler, "scheduler", optimizer)
    config = OmegaConf.to_container(cfg, resolve=True)

    folder.path.mkdir(parents=True, exist_ok=True)
    state = TrainState()
    if folder.checkpoint("last").exists():
        saved = _checkpoint_to_resume(folder, device)
        saved_config = {**SAVED_BEFORE_THE_KEY, **saved["config"]}
        changed = _differing_keys(_training_config(saved_config), _training_config(config))
        if changed:
            raise ConfigError(f"{folder.path} holds a checkpoint of a run with a different config "
                              f"(differs in: {', '.join(changed)}); refusing to overwrite it. "
                              f"Use another hydra.run.dir or the same config to resume.")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        objective.load_state_dict(saved["objective"])
        set_rng_state(saved["rng"])
        state = TrainState(saved["epoch"], saved["best_error"], saved["best_epoch"], list(saved["history"]))
        log.info("resuming %s from epoch %d", folder.path, state.epoch)
        finished = folder.read_summary()
        if (state.epoch == cfg.epochs and finished.get("status") == "finished"
                and not _differing_keys(*({k: v for k, v in c.items() if k not in NOT_REQUESTED}
                                          for c in (saved_config, config)))):
            log.info("%s already holds this finished run: nothing to do (mode=evaluate run_dir=%s "
                     "re-evaluates it)", folder.path, folder.path)
            return {k: v for k, v in finished.items()
                    if k not in ("status", "overrides", "error") and not k.startswith(metric_keys.WANDB_PREFIX)}
    folder.write_metrics_history(state.history)
    setup = prepare_step(cfg, model, objective, data, device)  # torch.compile compiles here

    tracker_start = time.time()
    tracker = Tracker(cfg, folder, context)
    for row in state.history:  # a new attempt's W&B run also shows the epochs before it
        tracker.log(row)
    phase_times = {metric_keys.SETUP_TIME: tracker_start - job_start,
                   metric_keys.WANDB_INIT_TIME: time.time() - tracker_start}
    progress = sys.stderr.isatty()
    # The per-epoch Lipschitz figures' images: fixed (seed 0), so runs of every seed measure the same ones.
    lipschitz_images = class_balanced_subset(data.test_y, cfg.eval.n, seed=0)
    # tracker.identity: this attempt's W&B run, which mode=evaluate and mode=summary log next to
    summary = {"status": "failed", "epoch": state.epoch, "overrides": list(context.overrides),
               "time/job_start": job_start, "threads": torch.get_num_threads(), **phase_times,
               **tracker.identity}
    final: dict = {}
    ending_error = None
    try:
        summary["time/first_step"] = first_step = time.time()
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            started = time.perf_counter()
            metrics = {metric_keys.EPOCH: epoch, metric_keys.LR: optimizer.param_groups[0]["lr"]}
            metrics.update(train_one_epoch(setup.model, objective, optimizer, data, cfg.batch_size,
                                           epoch, progress, setup.autocast, setup.memory_format))
            scheduler.step()
            # The plain model, outside autocast, from here on: the measurements, the checkpoints and the
            # final evaluation are float32 whatever `precision` is (a certificate or Lipschitz bound
            # computed in bf16 would not be sound), and the checkpoint holds the model's own state_dict
            # (torch.compile's wrapper would prefix every key with `_orig_mod.`).
            metrics.update(measure(model, data.test_x, data.test_y, cfg.test_batch_size, lipschitz_images,
                                   lipschitz=epoch % cfg.eval.every == 0 or epoch == cfg.epochs,
                                   guaranteed_bound=False))
            metrics[metric_keys.EPOCH_TIME] = time.perf_counter() - started
            state.epoch = epoch
            state.history.append(metrics)
            if metrics[metric_keys.TEST_ERROR] < state.best_error:
                state.best_error, state.best_epoch = metrics[metric_keys.TEST_ERROR], epoch
            saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "objective": objective.state_dict(),
                     "epoch": epoch, "rng": rng_state(),
                     "config": config, "best_error": state.best_error,
                     "best_epoch": state.best_epoch, "history": state.history}
            if state.best_epoch == epoch:
                folder.save_checkpoint(saved, "best")
            folder.save_checkpoint(saved, "last")
            folder.append_metrics(metrics)
            tracker.log(metrics)
            grad_max = metrics.get(metric_keys.LOSS_GRAD_MAX)  # absent between eval.every epochs
            log.info("epoch %d/%d  train err %.2f%%  test err %.2f%%  loss grad max %s  %.1fs",
                     epoch, cfg.epochs, metrics[metric_keys.TRAIN_ERROR], metrics[metric_keys.TEST_ERROR],
                     "-" if grad_max is None else f"{grad_max:.3g}", metrics[metric_keys.EPOCH_TIME])

        summary[metric_keys.TRAIN_TIME] = (final_start := time.time()) - first_step
        # The summary's figures: all of them on the whole test set, the guaranteed bound included. With
        # eval.n covering the test set the last epoch measured everything else already.
        final = dict(state.history[-1])
        if lipschitz_images is None:
            final[metric_keys.LAYER_NORM_PRODUCT] = layer_norm_bound(model, data.test_x.shape[1:])
        else:
            final.update(measure(model, data.test_x, data.test_y, cfg.test_batch_size))
        summary[metric_keys.FINAL_MEASURE_TIME] = time.time() - final_start
        model.load_state_dict(folder.load_checkpoint("best", device)["model"])
        model.eval()
        final.update(evaluate(model, data, folder, tracker))
        summary.update(final)
        summary.update({"status": "finished", "epoch": state.epoch,
                        metric_keys.BEST_TEST_ERROR: state.best_error, metric_keys.BEST_EPOCH: state.best_epoch})
        return final
    except Diverged as diverged:
        log.error("run diverged: %s", diverged)
        summary.update({"status": "diverged", "epoch": diverged.epoch, "step": diverged.step,
                        "error": str(diverged)})
        final = {"status": "diverged", metric_keys.TEST_ERROR: math.nan, metric_keys.TRAIN_LOSS: math.nan}
        return final
    except BaseException as error:
        summary.update({"epoch": state.epoch, "error": f"{type(error).__name__}: {error}"})
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
        tracker.finish(summary, failed=summary["status"] != "finished")
