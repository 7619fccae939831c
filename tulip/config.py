"""The run-level schema and `validate(cfg)`: the whole config checked once, before any data is loaded or
any output is written.

Group options are checked by Hydra itself (an unknown option lists the available ones). Every value is
checked against a schema (tulip.schema): the run-level keys against the dataclasses below, each `_target_`
node (model, dataset, the training loss's parts, attacks, optimizer, schedule, the launcher and sweeper)
against its target's own signature. Then the few checks that relate keys to each other. A bad value raises
tulip.schema.ConfigError naming its dotted key; the bounds every check shares are defined there too.
"""
import math
from dataclasses import dataclass
from typing import Annotated

import torch
from omegaconf import DictConfig, ListConfig

from tulip.runs import metric_keys
from tulip.runs.metric_keys import BEST_ATTACK, canonical, is_scalar_key, parse_robust_error
from tulip.schema import (LARGEST, MAX_EPOCHS, MAX_ITERATIONS, MAX_SEED, MAX_THREADS, NONNEGATIVE, POSITIVE,
                          SMALLEST, ConfigError, Count, Epochs, Epsilons, Iterations, OptionalCount, Rule, Seed,
                          Switch, Target, Targets, check_node, integer_in, is_int, is_number, list_of, number_in,
                          one_of)

__all__ = ["LARGEST", "SMALLEST", "POSITIVE", "NONNEGATIVE", "MAX_EPOCHS", "MAX_ITERATIONS", "MAX_SEED",
           "MAX_THREADS", "ConfigError", "is_int", "is_number", "validate", "validate_objectives",
           "objective_values", "resolve_device"]

MODES = ("train", "evaluate", "summary")
DEVICES = ("auto", "cpu", "cuda")
WANDB_MODES = ("offline", "online", "disabled")
PRECISIONS = ("fp32", "bf16")

# The config keys that are training state: what the weights, the optimizer's state and the random
# streams depend on, and which epoch is the best (chosen on the validation error: the dataset's splits).
# A run resumes only with the same values of these; every other key may change between attempts:
# test_batch_size, eval.* and attack.* only measure, wandb.* only shows; the device and the thread count
# change rounding, not the math (a GPU job may go on on the CPU and back), and so do channels_last and
# compile (memory layout, fused kernels). precision=bf16 changes what each step computes: training state.
TRAINING_STATE = ("model", "dataset", "reg", "optim", "scheduler", "seed", "epochs", "batch_size", "precision",
                  "select")


@dataclass
class LowerBoundKeys:
    images: Count
    steps: Iterations


@dataclass
class EvalKeys:
    every: Annotated[int, integer_in(1, MAX_EPOCHS, f"an integer in [1, {MAX_EPOCHS}] (epochs)")]
    n: Annotated[int | None, Rule("an integer >= 1 (test images) or null for all",
                                  lambda v: v is None or (is_int(v) and v >= 1))]
    bounds: Switch
    lower_bound: LowerBoundKeys
    nn: Switch
    certify: Annotated[list, list_of(number_in(SMALLEST, LARGEST, ""), f"a list of L2 radii, each {POSITIVE}")]


@dataclass
class EpsilonKeys:
    l2: Epsilons
    linf: Epsilons


@dataclass
class AttackKeys:
    split: Annotated[str, one_of("test", "val")]
    n: OptionalCount
    batch_size: Count
    epsilons: EpsilonKeys
    methods: Targets


@dataclass
class WandbKeys:
    mode: Annotated[str, one_of(*WANDB_MODES)]
    init_timeout_s: Annotated[float, Rule("seconds > 0 (e.g. 30)", lambda v: is_number(v) and 0 < v <= LARGEST)]
    finish_timeout_s: Annotated[float, Rule("seconds > 0 (e.g. 300)", lambda v: is_number(v) and 0 < v <= LARGEST)]


@dataclass
class RegKeys:
    """The flat reg.* keys are checked where a part reads them (``lam: ${reg.lip}`` checks reg.lip)."""
    batches: Targets
    penalties: Targets


@dataclass
class HydraKeys:
    """The Hydra plugins Tulip provides read these; present when the config is composed with Hydra's node."""
    launcher: Target
    sweeper: Target


@dataclass
class RunKeys:
    mode: Annotated[str, one_of(*MODES)]
    epochs: Epochs
    # Batch sizes have no upper bound here: a test or attack batch larger than the set is the whole
    # set, and a training batch larger than the training set is reported once the data is loaded.
    batch_size: Count
    test_batch_size: Count
    seed: Seed
    optim: Target
    scheduler: Target
    eval: EvalKeys
    device: Annotated[str, one_of(*DEVICES)]
    threads: Annotated[int | str, Rule(f"auto or an integer in [1, {MAX_THREADS}]",
                                       lambda v: v == "auto" or (is_int(v) and 1 <= v <= MAX_THREADS))]
    precision: Annotated[str, one_of(*PRECISIONS)]
    channels_last: Annotated[bool | str, Rule("auto | true | false", lambda v: v == "auto" or isinstance(v, bool))]
    compile: Annotated[bool, Rule("true | false", lambda v: isinstance(v, bool))]
    model: Target
    dataset: Target
    reg: RegKeys
    attack: AttackKeys
    wandb: WandbKeys
    hydra: HydraKeys


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first invalid key of the whole config."""
    check_node(cfg, "", RunKeys)
    if cfg.mode != "train" and cfg.run_dir is None:
        raise ConfigError("run_dir", cfg.run_dir, f"a run folder for mode={cfg.mode}")
    optim, scheduler = cfg.optim, cfg.scheduler
    if optim.get("nesterov") and not optim.get("momentum"):
        raise ConfigError("optim.nesterov", optim.nesterov, "false when optim.momentum=0 (Nesterov needs momentum)")
    if "gamma" in scheduler and "milestones" in scheduler and "lr" in optim:
        # A growing schedule (gamma > 1) must keep the learning rate in range too; in logs, since
        # lr·gamma^k itself may overflow a float. A milestone m changes the rate from epoch m + 1 on,
        # and MultiStepLR counts a repeated milestone twice.
        exponent = sum(1 for m in scheduler.milestones if m < cfg.epochs)
        peak = math.log(optim.lr) + exponent * max(math.log(scheduler.gamma), 0.0)
        if peak > math.log(LARGEST):
            raise ConfigError("scheduler.gamma", scheduler.gamma,
                              f"a factor with optim.lr·gamma^{exponent} <= {LARGEST:g} ({exponent} milestones "
                              f"fall before epoch {cfg.epochs})")
    if cfg.attack.split == "val" and not _has_validation_split(cfg):
        raise ConfigError("attack.split", "val", "test when dataset.val_size=0 (there is no validation split)")
    validate_objectives(cfg)
    validate_select(cfg)


def validate_select(cfg: DictConfig) -> None:
    """`select`: val/error_pct, or the per-epoch certified error at a radius of eval.certify."""
    select, radii = cfg.select, [float(eps) for eps in cfg.eval.certify]
    allowed = [metric_keys.error_key("val"), *(metric_keys.epoch_certified_error("val", eps) for eps in radii)]
    if select not in allowed:
        raise ConfigError("select", select, f"one of {allowed} (a certified error needs its radius in eval.certify)")


def _has_validation_split(cfg: DictConfig) -> bool:
    return (cfg.dataset.get("val_size") or 0) > 0


# Per-epoch figures measured on test images (tulip.evaluate.measures); the final evaluation's families
# read the images of attack.split.
TEST_IMAGE_FIGURES = (metric_keys.LOSS_GRAD_MAX, metric_keys.LOSS_GRAD_MEAN, metric_keys.JACOBIAN_2INF)
EVALUATION_FAMILIES = (metric_keys.ATTACK_PREFIX, *metric_keys.BOUNDS_FAMILIES)


def reads_test_set(key: str, cfg: DictConfig) -> bool:
    """Whether metric `key` of a run with config `cfg` is computed from the test set's images."""
    if key.startswith("test/") or key == metric_keys.BEST_TEST_ERROR or key in TEST_IMAGE_FIGURES:
        return True
    return key.startswith(EVALUATION_FAMILIES) and cfg.attack.split == "test"


def validate_objectives(cfg: DictConfig) -> None:
    """`objectives`: metrics this run can produce, none read from the test set when there is a validation
    split (a sweep that chose on the test set would report an optimistic test error). A robust-error key
    must name an attack of the run (or `best`) and an ε of its curve, so that a sweep does not train for
    hours to return NaN."""
    objectives = cfg.get("objectives")
    if not (isinstance(objectives, ListConfig) and len(objectives) >= 1
            and all(isinstance(o, str) and is_scalar_key(o) for o in objectives)):
        raise ConfigError("objectives", objectives, "a list of metric keys, e.g. "
                          "[val/error_pct,attack/best/error_pct_l2@1] (see tulip/runs/metric_keys.py)")
    for name in objectives:
        if _has_validation_split(cfg) and reads_test_set(name, cfg):
            raise ConfigError("objectives", name, "a metric of the validation split, as choices never read the "
                              "test set: val/error_pct, best/val_error_pct, or an attack's or the certificate's "
                              "error with attack.split=val (dataset.val_size=0 chooses on the test set, the "
                              "original protocol)")
        key = parse_robust_error(name)
        if key is None:
            continue
        attacks = list(cfg.attack.get("methods") or {})
        if key.attack == "certified" and not cfg.eval.bounds:
            raise ConfigError("objectives", name, "eval.bounds=true for a certified-error objective")
        if key.attack not in ("certified", BEST_ATTACK, *attacks):
            raise ConfigError("objectives", name, f"an attack of this run: best or one of {attacks}")
        budgets = [float(e) for e in (cfg.attack.epsilons.get(key.norm) or [])]
        if key.eps_value not in budgets:
            raise ConfigError("objectives", name, f"an eps of attack.epsilons.{key.norm} {budgets} "
                              f"(or add {key.eps} there)")


def objective_values(metrics: dict, names) -> float | tuple[float, ...]:
    """What run.py returns to a sweeper: the metrics `objectives` names (NaN where missing: a diverged
    or failed evaluation), one float for one objective, a tuple in order for several."""
    values = tuple(float(metrics.get(canonical(name), float("nan"))) for name in names)
    return values[0] if len(values) == 1 else values


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present; `cuda` without CUDA is an error, not a silent CPU run."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", name, "a device this machine has: CUDA is not available here "
                          "(use device=cpu or device=auto)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
