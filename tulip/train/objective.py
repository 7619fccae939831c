"""The training objective: cross-entropy on a chosen batch plus penalties, composed from parts.

A regularizer is two choices, both made once when the objective is built:

1. *Which batch to train on*: the clean batch, or the one ``BatchChoice`` whose switch (an ε or β) is
   > 0 — a one-step perturbation, a PGD batch, TRADES' adversary beside the clean batch.
2. *Penalties* added to the mean cross-entropy of that batch: every ``Penalty`` whose multiplier is > 0,
   in the order of the config.

The parts are small classes with a Hydra ``_target_`` (tulip.train.regularizers holds the built-in ones), listed
under ``reg.batches`` and ``reg.penalties`` in conf/regularizer/_base.yaml, where each reads its
multiplier from a flat key by interpolation (``lam: ${reg.lip}``). That keeps the command line flat
(``reg.lip=0.1 reg.J2=0.01``) and lets options combine (``regularizer=[lip,J2]``). A new penalty is one
class plus one option file that adds it under ``reg.penalties.<name>``.

Each penalty declares what it needs from the training batch: the per-sample input gradients
(``needs_input_grad``) and a graph through them for double backprop (``needs_graph``); the objective
computes them once per step, only when some active penalty needs them.
"""
import functools
import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tulip.config import LARGEST, NONNEGATIVE, POSITIVE, SMALLEST, is_int, is_number
from tulip.runs.metric_keys import penalty as penalty_key

Model = torch.nn.Module


class ArgumentError(ValueError):
    """A part's invalid argument; `build_objective` reports it under the reg.* key the value came from."""

    def __init__(self, argument: str, value, expected: str):
        super().__init__(f"{argument}={value!r} is invalid: expected {expected}")
        self.argument, self.value, self.expected = argument, value, expected


# Comparisons with NaN are False, so each range check below rejects NaN as well as ±inf and values
# beyond LARGEST or (for positive ones) below SMALLEST, which float32 cannot use (see tulip.config).
def nonnegative(argument: str, value) -> float:
    if not (is_number(value) and 0 <= value <= LARGEST):
        raise ArgumentError(argument, value, NONNEGATIVE)
    return float(value)


def positive(argument: str, value) -> float:
    if not (is_number(value) and SMALLEST <= value <= LARGEST):
        raise ArgumentError(argument, value, POSITIVE)
    return float(value)


# Inner iterations per training step (PGD steps, power iterations): beyond this a run never finishes.
MAX_ITERATIONS = 100_000


def positive_int(argument: str, value) -> int:
    if not (is_int(value) and 1 <= value <= MAX_ITERATIONS):
        raise ArgumentError(argument, value, f"an integer in [1, {MAX_ITERATIONS}]")
    return value


def boolean(argument: str, value) -> bool:
    """A switch: true or false only, so that a typo ('ture', 0.5, []) is not read as truthy or falsy."""
    if not isinstance(value, bool):
        raise ArgumentError(argument, value, "true or false")
    return value


def norm_order(argument: str, value, allowed=(1.0, 2.0, float("inf"))) -> float:
    """A norm's order: 1, 2 or inf (YAML `.inf`; the strings "inf" and "linf" are accepted too)."""
    if isinstance(value, str) and value.lower() in ("inf", ".inf", "linf"):
        value = float("inf")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) not in allowed:
        names = " | ".join("inf" if a == float("inf") else str(int(a)) for a in allowed)
        raise ArgumentError(argument, value, names)
    return float(value)


# --- the parts --------------------------------------------------------------------------------------

@dataclass
class TrainingBatch:
    """The batch a step trains on and its forward pass: what the penalties see."""
    model: Model
    x: torch.Tensor  # (B, C, H, W), requires grad when a penalty needs input gradients
    x_adv: torch.Tensor | None  # an adversary of x that the batch choice computed beside it (TRADES)
    y: torch.Tensor  # (B,)
    logits: torch.Tensor  # (B, K)
    losses: torch.Tensor  # (B,) per-sample cross-entropy
    create_graph: bool  # keep the graph of input_grad (double backprop) for exact gradient penalties

    @functools.cached_property
    def input_grad(self) -> torch.Tensor:
        """(B, C, H, W): row i is g_i = ∇_x ℓ_i, the rows of ∇_x Σ_j ℓ_j; computed once, on first use."""
        return torch.autograd.grad(self.losses.sum(), self.x, create_graph=self.create_graph,
                                   retain_graph=True)[0]


class Part:
    """A part of an objective. ``switch`` names the argument (a multiplier, ε or β) that turns it on
    when > 0, so that every part is in the config and a multiplier of 0 is off.

    A part that depends on the model's structure checks it in ``prepare(model)``, called once before
    training (raise ArgumentError naming the switch for a model it cannot work with). A part that keeps
    state across steps returns it from ``state_dict()`` (tensors and plain data: it goes into the
    checkpoint, so that a resumed run continues exactly) and takes it back in ``load_state_dict``.
    """
    switch: str

    @property
    def active(self) -> bool:
        return getattr(self, self.switch) > 0

    def prepare(self, model: Model) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class BatchChoice(Part):
    """(model, x, y) -> (the batch to train on, an adversary to keep beside it or None), computed
    without a graph into the weights."""

    def __call__(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError


class Penalty(Part):
    """TrainingBatch -> a scalar added to the loss and logged as train/penalty_<name>."""
    needs_input_grad = False  # reads batch.input_grad
    needs_graph = False  # differentiates through it (double backprop)

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        raise NotImplementedError


# --- the objective ----------------------------------------------------------------------------------

class StepOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable w.r.t. the model parameters
    logits: torch.Tensor  # (B, C) logits of the batch actually trained on
    logs: dict  # name -> detached scalar tensor, e.g. {"train/penalty_lip": ...}


class Objective:
    """Cross-entropy on the chosen batch plus the active penalties; inactive parts are dropped here."""

    def __init__(self, batches: Mapping[str, BatchChoice], penalties: Mapping[str, Penalty]):
        chosen = [name for name, part in batches.items() if part.active]
        if len(chosen) > 1:
            raise ValueError(f"at most one training batch may be chosen; got {', '.join(chosen)}")
        self.batch = batches[chosen[0]] if chosen else None
        # The active parts by their place in the config, for the checkpoint's "objective" entry
        self.parts = {**{f"batches.{name}": batches[name] for name in chosen},
                      **{f"penalties.{name}": part for name, part in penalties.items() if part.active}}
        self.penalties = [(penalty_key(name), part) for name, part in penalties.items() if part.active]
        self.needs_input_grad = any(part.needs_input_grad for _, part in self.penalties)
        self.double_backprop = any(part.needs_graph for _, part in self.penalties)

    def state_dict(self) -> dict:
        return {name: state for name, part in self.parts.items() if (state := part.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        for name, part in self.parts.items():
            if name in state:
                part.load_state_dict(state[name])

    def __call__(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        x_train, x_adv = self.batch(model, x, y) if self.batch is not None else (x, None)
        x_train = x_train.detach().requires_grad_(self.needs_input_grad)
        logits = model(x_train)
        losses = F.cross_entropy(logits, y, reduction="none")
        batch = TrainingBatch(model, x_train, x_adv, y, logits, losses, self.double_backprop)
        loss, logs = losses.mean(), {}
        for name, penalty in self.penalties:
            value = penalty(batch)
            loss = loss + value
            logs[name] = value.detach()
        return StepOutput(loss, logits, logs)


# --- building it from cfg.reg -----------------------------------------------------------------------

_INTERPOLATION = re.compile(r"^\$\{([^}]+)\}$")
PART_GROUPS = ("batches", "penalties")


def _source_keys(node: DictConfig) -> dict[str, str]:
    """argument -> the config key its value is interpolated from (``lam: ${reg.lip}`` -> reg.lip)."""
    raw = OmegaConf.to_container(node, resolve=False)
    return {arg: match[1] for arg, value in raw.items()
            if isinstance(value, str) and (match := _INTERPOLATION.match(value))}


def _leaf_keys(node: DictConfig, prefix: str) -> list[str]:
    keys = []
    for key, value in node.items():
        keys += _leaf_keys(value, f"{prefix}.{key}") if isinstance(value, DictConfig) else [f"{prefix}.{key}"]
    return keys


def _reported(call, node: DictConfig, path: str):
    """call(); an ArgumentError becomes a ValueError naming the config key the argument came from."""
    try:
        return call()
    except ArgumentError as error:
        key = _source_keys(node).get(error.argument, f"{path}.{error.argument}")
        raise ValueError(f"{key}={error.value!r} is invalid: expected {error.expected}") from None
    except TypeError as error:  # a misspelt or missing argument
        raise ValueError(f"{path} is invalid: {error}") from None


def _build_part(node: DictConfig, path: str, model: Model | None) -> tuple[Part, str]:
    """The part (prepared for `model`, when given and the part is on) and the config key of its switch."""
    # a partial, so the part's own exception arrives unwrapped by Hydra
    part = _reported(lambda: instantiate(node, _partial_=True)(), node, path)
    if model is not None and part.active:
        _reported(lambda: part.prepare(model), node, path)
    return part, _source_keys(node).get(part.switch, f"{path}.{part.switch}")


def build_objective(reg: DictConfig, model: Model | None = None) -> Objective:
    """The objective of ``cfg.reg``; raises ValueError naming the reg.* key of a bad value.

    With `model`, every active part checks the model's structure now, before training (without it,
    parts that need the model prepare themselves on their first step).
    """
    built = {group: {name: _build_part(node, f"reg.{group}.{name}", model) for name, node in reg[group].items()}
             for group in PART_GROUPS}
    chosen = [key for part, key in built["batches"].values() if part.active]
    if len(chosen) > 1:
        switches = ", ".join(key for _, key in built["batches"].values())
        raise ValueError(f"at most one of {switches} may be > 0 (each chooses the batch to train on); "
                         f"got {', '.join(chosen)}")
    # A flat key that no part reads would be silently ignored: a typo such as +reg.pgd.epsilon=0.1.
    used = {key for group in PART_GROUPS for node in reg[group].values() for key in _source_keys(node).values()}
    unused = [key for name, value in reg.items() if name not in PART_GROUPS
              for key in (_leaf_keys(value, f"reg.{name}") if isinstance(value, DictConfig) else [f"reg.{name}"])
              if key not in used]
    if unused:
        raise ValueError(f"{', '.join(unused)}: no part of the objective reads "
                         f"{'this key' if len(unused) == 1 else 'these keys'} (reg.batches / reg.penalties)")
    parts = {group: {name: part for name, (part, _) in built[group].items()} for group in PART_GROUPS}
    return Objective(parts["batches"], parts["penalties"])
