"""Checks of the run-level config, done once before any data is loaded or any output is written.

Group options are checked by Hydra itself (an unknown option lists the available ones); models,
datasets and regularizers check their own arguments when instantiated. This module checks the
top-level keys that nothing else owns.
"""
import torch
from omegaconf import DictConfig

MODES = ("train", "evaluate", "summary")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("offline", "online", "disabled")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _require(condition: bool, key: str, value, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first invalid top-level key."""
    _require(cfg.mode in MODES, "mode", cfg.mode, " | ".join(MODES))
    if cfg.mode != "train":
        _require(cfg.run_dir is not None, "run_dir", cfg.run_dir, f"a run folder for mode={cfg.mode}")
    for key in ("epochs", "batch_size", "test_batch_size"):
        _require(_is_int(cfg[key]) and cfg[key] >= 1, key, cfg[key], "an integer >= 1")
    _require(_is_int(cfg.seed), "seed", cfg.seed, "an integer")
    # Optimizers and schedules check their own arguments when built; these are the ones a sweep over
    # optim=/scheduler= options shares, checked here so a bad value fails before any output.
    optim, scheduler = cfg.optim, cfg.scheduler
    _require(_is_number(optim.lr) and optim.lr > 0, "optim.lr", optim.lr, "a number > 0")
    if "momentum" in optim:
        _require(_is_number(optim.momentum) and 0 <= optim.momentum < 1, "optim.momentum",
                 optim.momentum, "a number in [0, 1)")
        _require(not optim.get("nesterov") or optim.momentum > 0, "optim.nesterov", optim.get("nesterov"),
                 "false when optim.momentum=0 (Nesterov needs momentum)")
    if "gamma" in scheduler:
        _require(_is_number(scheduler.gamma) and scheduler.gamma > 0, "scheduler.gamma", scheduler.gamma,
                 "a number > 0")
    if "milestones" in scheduler:
        _require(all(_is_int(m) and m >= 1 for m in scheduler.milestones), "scheduler.milestones",
                 list(scheduler.milestones), "a list of epochs >= 1")
    _require(cfg.device in DEVICES, "device", cfg.device, " | ".join(DEVICES))
    _require(cfg.wandb.mode in WANDB_MODES, "wandb.mode", cfg.wandb.mode, " | ".join(WANDB_MODES))


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without CUDA is an error, not a silent CPU run."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is invalid: CUDA is not available on this machine "
                          "(use device=cpu or device=auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
