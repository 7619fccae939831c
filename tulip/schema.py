"""What a config value may be, said once: the bounds, the types and the one error they raise.

A schema is a set of annotated arguments. A class or function that a config node builds (its `_target_`:
a model, a dataset, an attack, a part of the training loss, the launcher) declares its schema in its own
signature, with the types below:

    def pgd_linf(steps: Iterations = 40, rel_stepsize: Positive = 1 / 30, random_start: Switch = True): ...

so a new one is checked without any list to update. The run-level keys are dataclasses of the same types
(tulip.config), and torch's optimizers and schedules, whose signatures Tulip does not own, have theirs in
TORCH_SCHEMAS below. `check_node` walks a config node against its schema once, before anything runs, and
raises ConfigError naming the dotted key; an argument that is an interpolation (``lam: ${reg.lip}``) is
blamed on the key it comes from. `checked` and `check_init` make the same check when the class or
function is called directly, naming the argument.

Every range is a whole range, not just a sign: NaN, ±inf and absurd magnitudes (10**12 epochs, a
learning rate of 1e300) fail here instead of as an overflow deep inside training. Comparisons with NaN
are False, so every `low <= v <= high` below rejects NaN.
"""
import dataclasses
import functools
import inspect
import math
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Mapping, get_args, get_origin

from hydra.utils import get_object
from omegaconf import Container, DictConfig, OmegaConf

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
# Inner iterations per step (PGD steps, power iterations, attack steps): beyond this a run never finishes.
MAX_ITERATIONS = 100_000
# Python's, NumPy's and torch's generators all accept seeds in this range (NumPy's is the narrowest).
MAX_SEED = 2**32 - 1
# More CPU threads than any machine has cores.
MAX_THREADS = 4096

_NO_VALUE = object()


class ConfigError(ValueError):
    """A config value that cannot work: `key` (dotted, e.g. reg.pgd.eps), its `value`, and what was
    `expected`. Raised with a message alone, it is about the config as a whole (a run folder trained
    with another config, a mode with nothing to do), and key, value and expected are None."""

    def __init__(self, key: str, value: Any = _NO_VALUE, expected: str | None = None):
        if value is _NO_VALUE:
            super().__init__(key)
            self.key = self.value = self.expected = None
        else:
            super().__init__(f"{key}={value!r} is invalid: expected {expected}")
            self.key, self.value, self.expected = key, value, expected

    def __reduce__(self):  # a sweep's job sends its error to the launcher's process
        if self.key is None:
            return ConfigError, self.args
        return ConfigError, (self.key, self.value, self.expected)


def is_int(value) -> bool:
    """An int, not a bool (Python counts True as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """An int or a float, not a bool; NaN and ±inf pass here and fail the ranges beside it."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Rule:
    """What one value may be: `accepts(value)` on the plain (resolved) value, and the words for it."""
    expected: str
    accepts: Callable[[Any], bool]

    def check(self, key: str, value) -> None:
        value = OmegaConf.to_container(value, resolve=True) if isinstance(value, Container) else value
        if not self.accepts(value):
            raise ConfigError(key, value, self.expected)


def number_in(low: float, high: float, expected: str, high_open: bool = False) -> Rule:
    return Rule(expected, lambda v: is_number(v) and low <= v and (v < high if high_open else v <= high))


def integer_in(low: int, high: float = math.inf, expected: str | None = None, nullable: bool = False) -> Rule:
    expected = expected or (f"an integer >= {low}" if high == math.inf else f"an integer in [{low}, {high}]")
    return Rule(expected + (" or null (all)" if nullable else ""),
                lambda v: (nullable and v is None) or (is_int(v) and low <= v <= high))


def one_of(*choices) -> Rule:
    """One of `choices`, of the same type (True is not 1 here)."""
    return Rule(" | ".join(map(str, choices)), lambda v: any(type(v) is type(c) and v == c for c in choices))


def list_of(element: Rule, expected: str, min_size: int = 0, size: int | None = None) -> Rule:
    return Rule(expected, lambda v: isinstance(v, list) and len(v) >= min_size and (size is None or len(v) == size)
                and all(element.accepts(e) for e in v))


_INFINITY_WORDS = ("inf", ".inf", "linf")


def as_norm_order(value) -> float:
    """A NormOrder's value as a float: 1.0, 2.0 or inf (YAML `.inf`, or the words inf / linf)."""
    return math.inf if isinstance(value, str) and value.lower() in _INFINITY_WORDS else float(value)


def norm_order(*orders: float) -> Rule:
    """A norm's order among `orders`: 1, 2 or inf (YAML `.inf`; the strings "inf" and "linf" too)."""
    names = " | ".join("inf" if o == math.inf else str(int(o)) for o in orders)
    return Rule(names, lambda v: (isinstance(v, str) and v.lower() in _INFINITY_WORDS and math.inf in orders)
                or (is_number(v) and float(v) in orders))


# --- the types: annotate an argument with one of these (or Annotated[T, a Rule of your own]) ----------

NonNegative = Annotated[float, number_in(0, LARGEST, NONNEGATIVE)]
Positive = Annotated[float, number_in(SMALLEST, LARGEST, POSITIVE)]
Fraction = Annotated[float, number_in(0, 1, "a number in [0, 1)", high_open=True)]  # momentum, β of Adam
Iterations = Annotated[int, integer_in(1, MAX_ITERATIONS)]
Count = Annotated[int, integer_in(1)]  # images, batch sizes, trials: no bound but the data's
OptionalCount = Annotated[int | None, integer_in(1, nullable=True)]
NonNegativeInt = Annotated[int, integer_in(0)]
Seed = Annotated[int, integer_in(0, MAX_SEED)]
Epochs = Annotated[int, integer_in(1, MAX_EPOCHS)]
# A switch is true or false only, so that a typo ('ture', 1, []) is not read as truthy or falsy.
Switch = Annotated[bool, Rule("true or false", lambda v: isinstance(v, bool))]
NormOrder = Annotated[float | str, norm_order(1.0, 2.0, math.inf)]
AttackNorm = Annotated[str, one_of("l2", "linf")]
PositiveInts = Annotated[list, list_of(integer_in(1), "a non-empty list of integers >= 1, e.g. [32, 64]", 1)]
Epsilons = Annotated[list, list_of(number_in(0, LARGEST, ""), f"a non-empty list, each {NONNEGATIVE}", 1)]
Milestones = Annotated[list, list_of(integer_in(1), "a list of epochs >= 1 (e.g. [5,7])")]
Betas = Annotated[list, list_of(number_in(0, 1, "", high_open=True), "two numbers in [0, 1) (e.g. [0.9, 0.999])",
                                size=2)]


class Target:
    """Annotation of a key that holds a config node with a `_target_`, checked against that target's schema."""


class Targets:
    """Annotation of a key that holds named `_target_` nodes (reg.penalties, attack.methods)."""


# torch's optimizers and schedules (conf/optim, conf/scheduler): their signatures are torch's.
TORCH_SCHEMAS: dict[str, Mapping[str, Any]] = {
    "torch.optim.SGD": {"lr": Positive, "momentum": Fraction, "dampening": Fraction, "weight_decay": NonNegative,
                        "nesterov": Switch},
    **{f"torch.optim.{name}": {"lr": Positive, "betas": Betas, "eps": Positive, "weight_decay": NonNegative,
                               "amsgrad": Switch} for name in ("Adam", "AdamW")},
    "torch.optim.lr_scheduler.MultiStepLR": {"milestones": Milestones, "gamma": Positive},
    "torch.optim.lr_scheduler.CosineAnnealingLR": {"T_max": Count, "eta_min": NonNegative},
    "torch.optim.lr_scheduler.ConstantLR": {
        "factor": Annotated[float, number_in(0, 1, "a number in [0, 1]")], "total_iters": NonNegativeInt},
    "torch.optim.lr_scheduler.OneCycleLR": {
        "max_lr": Positive, "total_steps": Count, "div_factor": Positive, "final_div_factor": Positive,
        "pct_start": Annotated[float, number_in(0, 1, "a number in [0, 1]")]},
}


# --- the walker -------------------------------------------------------------------------------------

def rule_of(annotation) -> Rule | None:
    if get_origin(annotation) is Annotated:
        return next((m for m in get_args(annotation)[1:] if isinstance(m, Rule)), None)
    return None


def parameters(schema) -> Mapping[str, Any]:
    """name -> annotation of a schema: a mapping as it is, or a class's or function's signature."""
    if isinstance(schema, Mapping):
        return schema
    return {name: p.annotation for name, p in inspect.signature(schema, eval_str=True).parameters.items()}


def schema_of(node: DictConfig, key: str):
    """The schema of a `_target_` node: torch's from TORCH_SCHEMAS, any other the target's signature."""
    if not isinstance(node, DictConfig) or not isinstance(node.get("_target_"), str):
        raise ConfigError(key, node, "a config node with a _target_ (an option of its config group)")
    path = node._target_
    if path in TORCH_SCHEMAS:
        return TORCH_SCHEMAS[path]
    try:
        return get_object(path)
    except Exception:  # noqa: BLE001 - Hydra raises ImportError or its own wrapper
        raise ConfigError(f"{key}._target_", path, "an importable class or function") from None


def _source(node: DictConfig, name: str, key: str):
    """(the node a value comes from, its key): an interpolation's source (``lam: ${reg.lip}`` -> the node
    of reg.lip), else the value's own node and `key`. Each interpolation is parsed once."""
    child = node._get_node(name)
    if OmegaConf.is_interpolation(node, name):
        source = child._dereference_node()
        return source, source._get_full_key(None) or key
    return child, key


def source_key(node: DictConfig, name: str, key: str) -> str:
    """The key a value comes from: its interpolation's source (``lam: ${reg.lip}`` -> reg.lip), else `key`."""
    return _source(node, name, key)[1]


def check_node(node: DictConfig, key: str = "", schema=None) -> None:
    """Check `node` against `schema` (by default its `_target_`'s); raise ConfigError naming the dotted key.
    Keys the schema does not name are left to their reader; a missing key takes the default."""
    schema = schema_of(node, key) if schema is None else schema
    for name, annotation in parameters(schema).items():
        if node._get_node(name, validate_access=False) is None:  # not `in`: it resolves interpolations
            continue
        child = f"{key}.{name}" if key else name
        if annotation is Target:
            check_node(node[name], child)
        elif annotation is Targets:
            for part, part_node in (node[name] or {}).items():
                check_node(part_node, f"{child}.{part}")
        elif dataclasses.is_dataclass(annotation):
            check_node(node[name], child, annotation)
        elif (rule := rule_of(annotation)) is not None:
            source, source_name = _source(node, name, child)
            rule.check(source_name, source if isinstance(source, Container) else source._value())


# --- the same check on a direct call, naming the argument (or prefix.argument) ------------------------

def checked(prefix: str | None = None):
    """Decorator: check a function's annotated arguments on every call; ConfigError names
    `prefix.argument` (`argument` without a prefix: the caller knows where it came from)."""
    def decorate(function):
        signature = inspect.signature(function, eval_str=True)  # eval_str: `from __future__ import annotations`

        @functools.wraps(function)
        def call(*args, **kwargs):
            for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
                if (rule := rule_of(signature.parameters[name].annotation)) is not None:
                    rule.check(f"{prefix}.{name}" if prefix else name, value)
            return function(*args, **kwargs)
        return call
    return decorate


def check_init(cls: type, prefix: str | None = None) -> None:
    """For a base class's __init_subclass__: `cls.__init__`, when `cls` defines one, checks its arguments."""
    if "__init__" in cls.__dict__ and not hasattr(cls.__init__, "__wrapped__"):
        cls.__init__ = checked(prefix)(cls.__init__)
