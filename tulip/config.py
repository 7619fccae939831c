"""Checks of the run-level config, done once before any data is loaded or any output is written.

Group options are checked by Hydra itself (an unknown option lists the available ones); models,
datasets and regularizers check their own arguments when instantiated. This module checks the
top-level keys that nothing else owns, and holds the bounds all these checks share (LARGEST, SMALLEST).

Every check is a whole range, not just a sign: NaN, ±inf and absurd magnitudes (10**12 epochs, a
learning rate of 1e300) fail here, naming the key, instead of as an overflow deep inside training.
"""
import math

import torch
from omegaconf import DictConfig, ListConfig

from tulip.runs.metric_keys import BEST_ATTACK, canonical, is_scalar_key, parse_robust_error

MODES = ("train", "evaluate", "summary")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("offline", "online", "disabled")
PRECISIONS = ("fp32", "bf16")

# The largest real-valued hyper-parameter accepted anywhere (learning rates, multipliers, radii). Far
# above any meaningful value, yet well inside float32's 3.4e38, so that what training derives from it
# (Adam's lr/(1-β₁), PGD's random start in [-ε, ε], lr·gamma^k) stays representable and a too-large
# value diverges (a NaN loss, status "diverged") instead of crashing an optimizer step.
LARGEST = 1e30
# The smallest accepted for a quantity that must be > 0 (a learning rate, a step size): float32 rounds
# values far below its smallest normal (1.2e-38) to 0, and a step of 0 divides by 0 (finite differences).
SMALLEST = 1e-30
POSITIVE = f"a finite number > 0, in [{SMALLEST:g}, {LARGEST:g}]"
NONNEGATIVE = f"a finite number >= 0, at most {LARGEST:g}"
# More epochs than any schedule runs: a larger value is a typo that would never finish.
MAX_EPOCHS = 100_000
# Python's, NumPy's and torch's generators all accept seeds in this range (NumPy's is the narrowest).
MAX_SEED = 2**32 - 1
# More CPU threads than any machine has cores.
MAX_THREADS = 4096


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key."""


def _require(condition: bool, key: str, value, expected: str) -> None:
    if not condition:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def is_int(value) -> bool:
    """An int, not a bool (Python counts True as 1): the one check every config value's type goes through."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, not a bool; NaN and ±inf pass here and fail the range checks beside it."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_range(value, low: float, high: float) -> bool:
    """A number in [low, high]; NaN and ±inf compare False, so they fail."""
    return is_number(value) and low <= value <= high


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first invalid top-level key."""
    _require(cfg.mode in MODES, "mode", cfg.mode, " | ".join(MODES))
    if cfg.mode != "train":
        _require(cfg.run_dir is not None, "run_dir", cfg.run_dir, f"a run folder for mode={cfg.mode}")
    _require(is_int(cfg.epochs) and 1 <= cfg.epochs <= MAX_EPOCHS, "epochs", cfg.epochs,
             f"an integer in [1, {MAX_EPOCHS}]")
    # Batch sizes have no upper bound here: a test or attack batch larger than the set is the whole
    # set, and a training batch larger than the training set is reported once the data is loaded.
    for key in ("batch_size", "test_batch_size"):
        _require(is_int(cfg[key]) and cfg[key] >= 1, key, cfg[key], "an integer >= 1")
    _require(is_int(cfg.seed) and 0 <= cfg.seed <= MAX_SEED, "seed", cfg.seed, f"an integer in [0, {MAX_SEED}]")
    # Optimizers and schedules check their own arguments when built; these are the ones a sweep over
    # optim=/scheduler= options shares, checked here so a bad value fails before any output.
    optim, scheduler = cfg.optim, cfg.scheduler
    _require(_in_range(optim.lr, SMALLEST, LARGEST), "optim.lr", optim.lr, POSITIVE)
    if "momentum" in optim:
        _require(is_number(optim.momentum) and 0 <= optim.momentum < 1, "optim.momentum",
                 optim.momentum, "a number in [0, 1)")
        _require(not optim.get("nesterov") or optim.momentum > 0, "optim.nesterov", optim.get("nesterov"),
                 "false when optim.momentum=0 (Nesterov needs momentum)")
    if "gamma" in scheduler:
        _require(_in_range(scheduler.gamma, SMALLEST, LARGEST), "scheduler.gamma", scheduler.gamma, POSITIVE)
    if "milestones" in scheduler:
        milestones = scheduler.milestones
        _require(isinstance(milestones, ListConfig) and all(is_int(m) and m >= 1 for m in milestones),
                 "scheduler.milestones", milestones, "a list of epochs >= 1 (e.g. [5,7])")
    if "gamma" in scheduler and "milestones" in scheduler:
        # A growing schedule (gamma > 1) must keep the learning rate in range too; in logs, since
        # lr·gamma^k itself may overflow a float. A milestone m changes the rate from epoch m + 1 on,
        # and MultiStepLR counts a repeated milestone twice.
        exponent = sum(1 for m in milestones if m < cfg.epochs)
        peak = math.log(optim.lr) + exponent * max(math.log(scheduler.gamma), 0.0)
        _require(peak <= math.log(LARGEST), "scheduler.gamma", scheduler.gamma,
                 f"a factor with optim.lr·gamma^{exponent} <= {LARGEST:g} ({exponent} milestones fall "
                 f"before epoch {cfg.epochs})")
    _require(is_int(cfg.eval.every) and 1 <= cfg.eval.every <= MAX_EPOCHS, "eval.every", cfg.eval.every,
             f"an integer in [1, {MAX_EPOCHS}] (epochs)")
    _require(cfg.eval.n is None or (is_int(cfg.eval.n) and cfg.eval.n >= 1), "eval.n", cfg.eval.n,
             "an integer >= 1 (test images) or null for all")
    _require(cfg.device in DEVICES, "device", cfg.device, " | ".join(DEVICES))
    _require(cfg.threads == "auto" or (is_int(cfg.threads) and 1 <= cfg.threads <= MAX_THREADS), "threads",
             cfg.threads, f"auto or an integer in [1, {MAX_THREADS}]")
    _require(cfg.precision in PRECISIONS, "precision", cfg.precision, " | ".join(PRECISIONS))
    # Switches are true or false only, so that a typo ('ture', 1) is not read as truthy or falsy.
    _require(cfg.channels_last == "auto" or isinstance(cfg.channels_last, bool), "channels_last",
             cfg.channels_last, "auto | true | false")
    _require(isinstance(cfg.compile, bool), "compile", cfg.compile, "true | false")
    validate_objectives(cfg)
    _require(cfg.wandb.mode in WANDB_MODES, "wandb.mode", cfg.wandb.mode, " | ".join(WANDB_MODES))
    for key in ("init_timeout_s", "finish_timeout_s"):
        timeout = cfg.wandb[key]
        _require(is_number(timeout) and 0 < timeout <= LARGEST, f"wandb.{key}", timeout, "seconds > 0 (e.g. 30)")


def validate_objectives(cfg: DictConfig) -> None:
    """`objectives`: metrics this run can produce. A robust-error key must name an attack of the run (or
    `best`) and an ε of its curve, so that a sweep does not train for hours to return NaN."""
    objectives = cfg.get("objectives")
    _require(isinstance(objectives, ListConfig) and len(objectives) >= 1
             and all(isinstance(o, str) and is_scalar_key(o) for o in objectives), "objectives", objectives,
             "a list of metric keys, e.g. [test/error_pct,attack/best/error_pct_l2@1] (see tulip/runs/metric_keys.py)")
    for name in objectives:
        key = parse_robust_error(name)
        if key is None:
            continue
        attacks = list(cfg.attack.get("methods") or {})
        if key.attack == "certified":
            _require(cfg.eval.bounds, "objectives", name, "eval.bounds=true for a certified-error objective")
        else:
            _require(key.attack == BEST_ATTACK or key.attack in attacks, "objectives", name,
                     f"an attack of this run: best or one of {attacks}")
        budgets = [float(e) for e in (cfg.attack.epsilons.get(key.norm) or [])]
        _require(key.eps_value in budgets, "objectives", name,
                 f"an eps of attack.epsilons.{key.norm} {budgets} (or add {key.eps} there)")


def objective_values(metrics: dict, names) -> float | tuple[float, ...]:
    """What run.py returns to a sweeper: the metrics `objectives` names (NaN where missing: a diverged
    or failed evaluation), one float for one objective, a tuple in order for several."""
    values = tuple(float(metrics.get(canonical(name), float("nan"))) for name in names)
    return values[0] if len(values) == 1 else values


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without CUDA is an error, not a silent CPU run."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is invalid: CUDA is not available on this machine "
                          "(use device=cpu or device=auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
