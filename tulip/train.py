"""Training one run: build everything from the config, train, measure every epoch, checkpoint.

Read top to bottom: `train` builds the data, model, objective and optimizer, resumes from
`checkpoints/last.pt` when the folder holds one, then loops over epochs. Each epoch is a flat loop of
steps followed by the test-set measurements of tulip.measures. After the last epoch the best
checkpoint is evaluated (attacks, bounds, nearest neighbours: tulip.evaluate) and summary.json is
written, whatever happened.
"""
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from tulip import checkpoint
from tulip.config import ConfigError, resolve_device
from tulip.data import Data, load_dataset
from tulip.measures import measure
from tulip.tracking import (RunContext, Tracker, append_metrics, finite_or_none,
                            write_json_atomic, write_metrics_history)

log = logging.getLogger(__name__)

# Config sections that do not change what training computes: a run may be resumed (or re-evaluated)
# with different values of these.
NOT_TRAINING_STATE = ("wandb", "attack", "eval", "mode", "run_dir")


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


def build_model(cfg: DictConfig, data: Data, device: torch.device) -> torch.nn.Module:
    # called through a partial so that the model's own ValueError reaches the user unwrapped
    model = instantiate(cfg.model, _partial_=True)(
        in_channels=data.in_channels, num_classes=data.num_classes, image_size=data.image_size)
    return model.to(device)


@dataclass
class LoadedRun:
    cfg: DictConfig  # the config the run was trained with
    model: torch.nn.Module  # best checkpoint's weights, eval mode, on the device
    data: Data
    checkpoint: dict


def load_run(run_dir: Path | str, device: torch.device, which: str = "best") -> LoadedRun:
    """Rebuild a finished (or running) run's data and model from its checkpoint, for evaluation."""
    path = Path(run_dir) / "checkpoints" / f"{which}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"run_dir={run_dir}: no checkpoint {path.name} in {path.parent} "
                                f"(is this a Tulip run folder that trained at least one epoch?)")
    state = checkpoint.load(path, device)
    cfg = OmegaConf.create(state["config"])
    data = load_dataset(cfg.dataset, device)
    model = build_model(cfg, data, device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ConfigError(f"checkpoint {path} does not fit the model it was saved with "
                          f"(model={cfg.model.get('_target_')}): {error}") from error
    return LoadedRun(cfg, model.eval(), data, state)


def _training_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in NOT_TRAINING_STATE}


def _differing_keys(old, new, prefix="") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [key for k in sorted(set(old) | set(new))
                for key in _differing_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".")]


def train_one_epoch(model, objective, optimizer, data: Data, batch_size: int, epoch: int,
                    progress: bool) -> dict:
    """One pass over the shuffled training set; returns the epoch's training averages.

    Nothing here waits for the device: losses go into a preallocated per-step buffer and are
    checked for NaN/Inf once, at the end of the epoch, which also names the first bad step.
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
        x, y = data.augment(data.train_x[idx]), data.train_y[idx]
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
    metrics = {"train/loss": step_losses.mean().item(),
               "train/error_pct": 100.0 * (1.0 - correct.item() / (steps * batch_size))}
    metrics.update({name: float(total) / steps for name, total in penalty_sums.items()})
    return metrics


def train(cfg: DictConfig, run_dir: Path, context: RunContext) -> dict:
    """Train the configured model in `run_dir`; return the final metrics (NaN on divergence)."""
    job_start = time.time()
    device = resolve_device(cfg.device)
    checkpoint.seed_everything(cfg.seed)
    data = load_dataset(cfg.dataset, device)
    if len(data.train_y) < cfg.batch_size:
        raise ConfigError(f"batch_size={cfg.batch_size} is invalid: the training set has only "
                          f"{len(data.train_y)} images")
    model = build_model(cfg, data, device)
    objective = instantiate(cfg.reg, _partial_=True)()  # its ValueError names the reg.* key
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                nesterov=cfg.optim.nesterov)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(cfg.optim.milestones),
                                                     cfg.optim.gamma)
    config = OmegaConf.to_container(cfg, resolve=True)

    run_dir.mkdir(parents=True, exist_ok=True)
    last_path = run_dir / "checkpoints" / "last.pt"
    best_path = run_dir / "checkpoints" / "best.pt"
    metrics_path = run_dir / "metrics.jsonl"
    state = TrainState()
    if last_path.exists():
        saved = checkpoint.load(last_path, device)
        changed = _differing_keys(_training_config(saved["config"]), _training_config(config))
        if changed:
            raise ConfigError(f"{run_dir} holds a checkpoint of a run with a different config "
                              f"(differs in: {', '.join(changed)}); refusing to overwrite it. "
                              f"Use another hydra.run.dir or the same config to resume.")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        checkpoint.set_rng_state(saved["rng"])
        state = TrainState(saved["epoch"], saved["best_error"], saved["best_epoch"],
                           list(saved["history"]))
        log.info("resuming %s from epoch %d", run_dir, state.epoch)
    write_metrics_history(state.history, metrics_path)

    tracker = Tracker(cfg, run_dir, context)
    for row in state.history:  # a new attempt's W&B run also shows the epochs before it
        tracker.log(row)
    progress = sys.stderr.isatty()
    summary = {"status": "failed", "epoch": state.epoch, "overrides": list(context.overrides),
               "time/job_start": job_start}
    final: dict = {}
    try:
        summary["time/first_step"] = time.time()
        for epoch in range(state.epoch + 1, cfg.epochs + 1):
            started = time.perf_counter()
            metrics = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"]}
            metrics.update(train_one_epoch(model, objective, optimizer, data, cfg.batch_size,
                                           epoch, progress))
            scheduler.step()
            metrics.update(measure(model, data.test_x, data.test_y, cfg.test_batch_size))
            metrics["time/epoch_s"] = time.perf_counter() - started
            state.epoch = epoch
            state.history.append(metrics)
            if metrics["test/error_pct"] < state.best_error:
                state.best_error, state.best_epoch = metrics["test/error_pct"], epoch
            saved = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "epoch": epoch, "rng": checkpoint.rng_state(),
                     "config": config, "best_error": state.best_error,
                     "best_epoch": state.best_epoch, "history": state.history}
            if state.best_epoch == epoch:
                checkpoint.save_atomic(saved, best_path)
            checkpoint.save_atomic(saved, last_path)
            append_metrics(metrics, metrics_path)
            tracker.log(metrics)
            log.info("epoch %d/%d  train err %.2f%%  test err %.2f%%  loss grad max %.3g  %.1fs",
                     epoch, cfg.epochs, metrics["train/error_pct"], metrics["test/error_pct"],
                     metrics["lipschitz/loss_grad_max"], metrics["time/epoch_s"])

        final = dict(state.history[-1])
        best = checkpoint.load(best_path, device)
        model.load_state_dict(best["model"])
        model.eval()
        from tulip.evaluate import evaluate_trained  # imported late: pulls in Foolbox

        final.update(evaluate_trained(cfg, model, data, run_dir, tracker))
        summary.update(final)
        summary.update({"status": "finished", "epoch": state.epoch,
                        "best/test_error_pct": state.best_error, "best/epoch": state.best_epoch})
        return final
    except Diverged as diverged:
        log.error("run diverged: %s", diverged)
        summary.update({"status": "diverged", "epoch": diverged.epoch, "step": diverged.step,
                        "error": str(diverged)})
        final = {"status": "diverged", "test/error_pct": math.nan, "train/loss": math.nan}
        return final
    except BaseException as error:
        summary.update({"epoch": state.epoch, "error": f"{type(error).__name__}: {error}"})
        raise
    finally:
        summary["time/total_s"] = time.time() - job_start
        write_json_atomic(finite_or_none(summary), run_dir / "summary.json")
        tracker.finish(summary, failed=summary["status"] != "finished")
