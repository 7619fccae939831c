"""The training loss: cross-entropy on a chosen batch plus penalties, composed from parts.

A regularizer is two choices, both made once when the loss is built:

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
(``needs_input_grad``) and a graph through them for double backprop (``needs_graph``); the loss
computes them once per step, only when some active penalty needs them.
"""
import functools
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tulip.nn import perturbations
from tulip.runs.metric_keys import penalty as penalty_key
from tulip.schema import ConfigError, check_init, source_key

Model = torch.nn.Module


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
        return perturbations.input_grad(self.losses, self.x, create_graph=self.create_graph, retain_graph=True)


class Part:
    """A part of a training loss. ``switch`` names the argument (a multiplier, ε or β) that turns it on
    when > 0, so that every part is in the config and a multiplier of 0 is off.

    Its arguments' schema is its ``__init__`` signature (``lam: NonNegative = 0.0``, types from
    tulip.schema): they are checked on every construction, and ``tulip.config.validate`` checks the config
    against it before anything runs. A part that depends on the model's structure checks it in
    ``prepare(model)``, called once before training (raise ``ConfigError(switch, value, expected)``
    naming the switch for a model it cannot work with). A part that keeps
    state across steps returns it from ``state_dict()`` (tensors and plain data: it goes into the
    checkpoint, so that a resumed run continues exactly) and takes it back in ``load_state_dict``; a part
    whose strength follows a schedule sets it in ``start_epoch``, which depends on the epoch alone.
    """
    switch: str

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_init(cls)  # a bad argument raises ConfigError naming it; build_loss names its reg.* key

    @property
    def active(self) -> bool:
        return getattr(self, self.switch) > 0

    def prepare(self, model: Model) -> None:
        pass

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each epoch (1-based) of `epochs`: for a part whose strength follows a schedule."""

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


# --- the loss ---------------------------------------------------------------------------------------

class StepOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable w.r.t. the model parameters
    logits: torch.Tensor  # (B, C) logits of the batch actually trained on
    logs: dict  # name -> detached scalar tensor, e.g. {"train/penalty_lip": ...}


class TrainingLoss:
    """Cross-entropy on the chosen batch plus the active penalties; inactive parts are dropped here."""

    def __init__(self, batches: Mapping[str, BatchChoice], penalties: Mapping[str, Penalty]):
        chosen = [name for name, part in batches.items() if part.active]
        if len(chosen) > 1:
            raise ValueError(f"at most one training batch may be chosen; got {', '.join(chosen)}")
        self.batch = batches[chosen[0]] if chosen else None
        # The active parts by their place in the config, for the checkpoint's "loss" entry
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

    def start_epoch(self, epoch: int, epochs: int) -> None:
        for part in self.parts.values():
            part.start_epoch(epoch, epochs)

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

PART_GROUPS = ("batches", "penalties")


def _leaf_keys(node: DictConfig, prefix: str) -> list[str]:
    keys = []
    for key, value in node.items():
        keys += _leaf_keys(value, f"{prefix}.{key}") if isinstance(value, DictConfig) else [f"{prefix}.{key}"]
    return keys


def _read_keys(node: DictConfig) -> set[str]:
    """The config keys a part's arguments are interpolated from (``lam: ${reg.lip}`` -> reg.lip)."""
    return {source_key(node, arg, "") for arg in node if OmegaConf.is_interpolation(node, arg)}


def _reported(call, node: DictConfig, path: str):
    """call(); a part's ConfigError naming one of its arguments is re-raised naming the config key the
    value came from (``lam`` of ``lam: ${reg.lip}`` -> reg.lip)."""
    try:
        return call()
    except ConfigError as error:
        if error.key is None or error.key not in node:
            raise
        raise ConfigError(source_key(node, error.key, f"{path}.{error.key}"), error.value, error.expected) from None
    except TypeError as error:  # a misspelt or missing argument
        target = node.get("_target_")
        raise ConfigError(path, target, f"the arguments of {target} ({error})") from None


def _build_part(node: DictConfig, path: str, model: Model | None) -> tuple[Part, str]:
    """The part (prepared for `model`, when given and the part is on) and the config key of its switch."""
    # a partial, so the part's own exception arrives unwrapped by Hydra
    part = _reported(lambda: instantiate(node, _partial_=True)(), node, path)
    if model is not None and part.active:
        _reported(lambda: part.prepare(model), node, path)
    return part, source_key(node, part.switch, f"{path}.{part.switch}")


def build_loss(reg: DictConfig, model: Model | None = None) -> TrainingLoss:
    """The training loss of ``cfg.reg``; raises ConfigError naming the reg.* key of a bad value.

    With `model`, every active part checks the model's structure now, before training (without it,
    parts that need the model prepare themselves on their first step).
    """
    built = {group: {name: _build_part(node, f"reg.{group}.{name}", model) for name, node in reg[group].items()}
             for group in PART_GROUPS}
    chosen = [key for part, key in built["batches"].values() if part.active]
    if len(chosen) > 1:
        switches = ", ".join(key for _, key in built["batches"].values())
        second = next(part for part, key in built["batches"].values() if key == chosen[1])
        raise ConfigError(chosen[1], getattr(second, second.switch),
                          f"0 while {chosen[0]} > 0: at most one of {switches} may be > 0 (each chooses the "
                          f"batch to train on)")
    # A flat key that no part reads would be silently ignored: a typo such as +reg.pgd.epsilon=0.1.
    used = {key for group in PART_GROUPS for node in reg[group].values() for key in _read_keys(node)}
    unused = [key for name, value in reg.items() if name not in PART_GROUPS
              for key in (_leaf_keys(value, f"reg.{name}") if isinstance(value, DictConfig) else [f"reg.{name}"])
              if key not in used]
    if unused:
        raise ConfigError(unused[0], OmegaConf.select(reg, unused[0].removeprefix("reg.")),
                          f"a key that a part of the loss reads (reg.batches / reg.penalties); none reads "
                          f"{', '.join(unused)}")
    parts = {group: {name: part for name, (part, _) in built[group].items()} for group in PART_GROUPS}
    return TrainingLoss(parts["batches"], parts["penalties"])
