"""Training objectives: cross-entropy plus whatever the chosen regularizer adds.

Every regularizer is an ``Objective``: called on (model, x, y) it returns the loss to backpropagate,
the logits of the batch it trained on (for the running train error) and detached scalars to log.
The training loop calls it without knowing which regularizer is active.

An objective is two independent choices, both made once in the constructor:

1. *Which batch to train on* (at most one): the clean batch, a one-step perturbation x + ε·v(g) (J1, J2,
   Jinf of Finlay, Oberman & Abbasi 2018, arXiv 1810.00953), an L∞/L2 PGD batch (Madry et al. 2018), or
   the clean batch with TRADES' adversary x′ beside it (Zhang et al. 2019, arXiv 1901.08573).
   Perturbations are computed before the training forward pass, in eval mode with frozen parameters.
   J1/J2/Jinf are not clamped to [0, 1] (clamping would break their first-order equivalence with
   gradient-norm penalties); PGD and TRADES are.
2. *Additive penalties* on that batch: the Lipschitz penalty λ·max_i ‖g_i‖ (``lip``), the squared gradient
   norm λ·mean_i ‖g_i‖²/2 exactly (``gradnorm``) or by the finite difference of Finlay & Oberman 2019,
   arXiv 1905.11468 (``gradnorm_fd``), TRADES' β·KL(f(x) ‖ f(x′)), and weight decay λ·Σ‖W‖².

Per-sample gradients g_i = ∇_x ℓ_i are taken on the batch actually trained on, in the mode the model is
in (train mode during training), as the rows of ∇_x Σ_j ℓ_j from the same forward pass that gives the
loss (one forward pass, double backprop). In eval mode (and for models without batch statistics) the rows
are exactly the per-sample gradients. In train mode BatchNorm's batch statistics couple the samples, so row
i also holds the O(1/B) terms ∂ℓ_j/∂x_i, j ≠ i — the original code differentiated the batch in train mode in
the same way, and the penalty then regularizes exactly the function that is being trained.

The original code penalized ∇_x of the batch *mean*, whose rows are g_i / B, so its ``--lip λ`` equals
``reg.lip=λ/B`` here (e.g. 0.1 with batch 128 -> 7.8e-4).
"""
import functools
import math
from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple

import torch
import torch.nn.functional as F

from tulip.perturbations import (frozen_eval, l2_direction, loss_input_grad, max_entry_direction,
                                 pgd_l2, pgd_linf, sign_direction)

Model = torch.nn.Module


class StepOutput(NamedTuple):
    loss: torch.Tensor  # scalar, differentiable w.r.t. the model parameters
    logits: torch.Tensor  # (B, C) logits of the batch actually trained on
    logs: dict  # name -> detached scalar tensor, e.g. {"train/penalty_lip": ...}


@dataclass
class TrainingBatch:
    """The batch a step trains on and its forward pass; what the penalties see."""
    model: Model
    x: torch.Tensor  # (B, C, H, W), requires grad when a penalty needs input gradients
    x_adv: torch.Tensor | None  # TRADES' adversary of x, else None
    y: torch.Tensor  # (B,)
    logits: torch.Tensor  # (B, K)
    losses: torch.Tensor  # (B,) per-sample cross-entropy
    create_graph: bool  # keep the graph of input_grad (double backprop) for exact gradient penalties

    @functools.cached_property
    def input_grad(self) -> torch.Tensor:
        """(B, C, H, W): row i is g_i = ∇_x ℓ_i (see the module docstring for train-mode BatchNorm)."""
        return torch.autograd.grad(self.losses.sum(), self.x, create_graph=self.create_graph,
                                   retain_graph=True)[0]


# ----------------------------------------------------------------------------------------------------
# Which batch to train on: (model, x, y) -> (x_train, x_adv or None), without a graph into the weights.

Inputs = tuple[torch.Tensor, torch.Tensor | None]


def clean_batch(model: Model, x: torch.Tensor, y: torch.Tensor) -> Inputs:
    return x, None


class GradientStepBatch:
    """x + ε·direction(g), g the per-sample loss gradient in eval mode (J1, J2, Jinf); not clamped."""

    def __init__(self, eps: float, direction: Callable[[torch.Tensor], torch.Tensor]):
        self.eps, self.direction = eps, direction

    def __call__(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> Inputs:
        with frozen_eval(model):
            g = loss_input_grad(model, x, y)
        return x + self.eps * self.direction(g), None


class PGDBatch:
    """The PGD adversarial batch (``attack`` = pgd_linf or pgd_l2 with its settings bound)."""

    def __init__(self, attack: Callable[..., torch.Tensor]):
        self.attack = attack

    def __call__(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> Inputs:
        with frozen_eval(model):
            return self.attack(lambda z: F.cross_entropy(model(z), y, reduction="none"), x), None


class TradesBatch:
    """The clean batch, and beside it TRADES' x′: L∞ PGD on KL(f(x) ‖ f(x′)) started at x + 0.001·N(0, 1)
    (clamped to [0, 1]; TRADES clamps only after the loop)."""

    def __init__(self, eps: float, steps: int, step_size: float):
        self.attack = functools.partial(pgd_linf, eps=eps, steps=steps, step_size=step_size)

    def __call__(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> Inputs:
        with frozen_eval(model):
            p_clean = F.softmax(model(x), dim=1)

            def kl(z):  # per-sample KL(p_clean ‖ f(z))
                return F.kl_div(F.log_softmax(model(z), dim=1), p_clean, reduction="none").sum(dim=1)

            return x, self.attack(kl, x, start=x + 0.001 * torch.randn_like(x))


# ----------------------------------------------------------------------------------------------------
# Additive penalties: TrainingBatch -> scalar added to the loss (and logged as train/penalty_<name>).

class LipschitzPenalty:
    """λ · max_i ‖g_i‖_p (Finlay et al. 2018), double backprop so it trains the weights."""

    def __init__(self, lam: float, norm: float):
        self.lam, self.norm = lam, norm

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        return self.lam * torch.linalg.vector_norm(batch.input_grad.flatten(1), ord=self.norm, dim=1).max()


class GradNormPenalty:
    """λ · mean_i ‖g_i‖₂² / 2, exact (double backprop)."""

    def __init__(self, lam: float):
        self.lam = lam

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        return self.lam * batch.input_grad.square().sum() / (2 * batch.x.shape[0])


class FiniteDifferencePenalty:
    """λ · mean_i dl_i² / 2 with dl_i the finite difference of ℓ_i along v = direction(g) (Finlay &
    Oberman 2019, arXiv 1905.11468): (ℓ_i(x + hv) − ℓ_i(x))/h (order 1, reuses the step's forward pass)
    or (ℓ_i(x + hv) − ℓ_i(x − hv))/(2h) (order 2). dl_i → g_i·v_i = ‖g_i‖ as h → 0; no double backprop.
    """

    def __init__(self, lam: float, h: float, order: int, direction: Callable[[torch.Tensor], torch.Tensor]):
        self.lam, self.h, self.direction = lam, h, direction
        self._losses_below, self._span = (self._losses_at_x, h) if order == 1 else (self._losses_at_minus_h, 2 * h)

    def _losses_at_x(self, batch: TrainingBatch, step: torch.Tensor) -> torch.Tensor:
        return batch.losses

    def _losses_at_minus_h(self, batch: TrainingBatch, step: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(batch.model(batch.x.detach() - step), batch.y, reduction="none")

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        # Detached x and v: the extra forward passes need no input gradient, only weight gradients.
        step = self.h * self.direction(batch.input_grad.detach())
        losses_above = F.cross_entropy(batch.model(batch.x.detach() + step), batch.y, reduction="none")
        slope = (losses_above - self._losses_below(batch, step)) / self._span  # (B,)
        return self.lam * slope.square().mean() / 2


class TradesPenalty:
    """β · KL(f(x) ‖ f(x′)) (TRADES, Zhang et al. 2019, arXiv 1901.08573), averaged over the batch, with
    x′ from TradesBatch; both f in train mode, as in TRADES."""

    def __init__(self, beta: float):
        self.beta = beta

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        log_p_adv = F.log_softmax(batch.model(batch.x_adv), dim=1)
        return self.beta * F.kl_div(log_p_adv, F.softmax(batch.logits, dim=1), reduction="batchmean")


class WeightDecayPenalty:
    """λ · Σ‖W‖² over weight matrices and kernels (parameters with ≥ 2 dims): not biases, not BatchNorm
    scales, not the scalar tanh scale."""

    def __init__(self, lam: float):
        self.lam = lam

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        return self.lam * sum(p.square().sum() for p in batch.model.parameters() if p.dim() > 1)


# ----------------------------------------------------------------------------------------------------
# Validation helpers: each raises a ValueError naming the reg.* key.

DIRECTIONS = {1.0: sign_direction, 2.0: l2_direction, math.inf: max_entry_direction}
# Defaults of the nested groups for direct calls; conf/regularizer/none.yaml holds the same values (tested).
PGD_DEFAULTS = dict(eps=0.0, steps=7, step_size=2 / 255, random_start=True, norm=math.inf)
TRADES_DEFAULTS = dict(beta=0.0, eps=0.031, steps=10, step_size=0.007)


def _nonnegative(key: str, value) -> float:
    if not isinstance(value, (int, float)) or not value >= 0:  # `not >=` also rejects NaN
        raise ValueError(f"reg.{key} must be a number >= 0, got {value!r}")
    return float(value)


def _positive(key: str, value) -> float:
    if not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"reg.{key} must be a number > 0, got {value!r}")
    return float(value)


def _norm(key: str, value, allowed=(1.0, 2.0, math.inf)) -> float:
    if isinstance(value, str) and value.lower() in ("inf", ".inf", "linf"):
        value = math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)) or float(value) not in allowed:
        names = ", ".join("inf" if a == math.inf else str(int(a)) for a in allowed)
        raise ValueError(f"reg.{key} must be one of {names}, got {value!r}")
    return float(value)


def _settings(key: str, values: Mapping | None, defaults: dict) -> dict:
    values = dict(values or {})
    unknown = sorted(set(values) - set(defaults))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'reg.{key}.{k}' for k in unknown)}; "
                         f"known: {', '.join(defaults)}")
    return {**defaults, **values}


# ----------------------------------------------------------------------------------------------------

class Objective:
    """Cross-entropy on the chosen batch plus the chosen penalties (``cfg.reg``; all default to off).

    Arguments (the ``reg.*`` keys):
        lip (float): λ of the Lipschitz penalty λ·max_i ‖∇_x ℓ_i‖. (Default: 0)
        lip_norm (1 | 2 | inf): the norm of the gradient in ``lip``. (Default: 2)
        J1, J2, Jinf (float): ε of the one-step training perturbation x + ε·sign(g)/√N, x + ε·g/‖g‖₂,
            x + ε·sign(g_k)·e_k (k = argmax |g|). (Default: 0)
        pgd (mapping): eps (0 = off), steps (7), step_size (2/255), random_start (true), norm (inf | 2).
        trades (mapping): beta (0 = off), eps (0.031), steps (10), step_size (0.007).
        decay (float): λ of λ·Σ‖W‖² over weights. (Default: 0)
        gradnorm (float): λ of λ·mean_i ‖g_i‖²/2, exact. (Default: 0)
        gradnorm_fd (float): λ of the finite-difference version. (Default: 0)
        h (float): finite-difference step. (Default: 0.01)
        fd_order (1 | 2): forward or central difference. (Default: 1)
        fd_norm (1 | 2 | inf): direction of the difference: sign(g)/√N, g/‖g‖₂, or one-hot. (Default: 2)
    At most one of J1, J2, Jinf, pgd.eps, trades.beta may be > 0; the penalties combine with any of them.
    """

    def __init__(self, lip: float = 0.0, lip_norm=2, J1: float = 0.0, J2: float = 0.0, Jinf: float = 0.0,
                 pgd: Mapping | None = None, trades: Mapping | None = None, decay: float = 0.0,
                 gradnorm: float = 0.0, gradnorm_fd: float = 0.0, h: float = 0.01, fd_order: int = 1,
                 fd_norm=2):
        pgd, trades = _settings("pgd", pgd, PGD_DEFAULTS), _settings("trades", trades, TRADES_DEFAULTS)
        lip, J1, J2, Jinf, decay = (_nonnegative(k, v) for k, v in
                                    dict(lip=lip, J1=J1, J2=J2, Jinf=Jinf, decay=decay).items())
        gradnorm, gradnorm_fd = _nonnegative("gradnorm", gradnorm), _nonnegative("gradnorm_fd", gradnorm_fd)
        lip_norm, fd_norm = _norm("lip_norm", lip_norm), _norm("fd_norm", fd_norm)
        h = _positive("h", h)
        if fd_order not in (1, 2) or isinstance(fd_order, bool):
            raise ValueError(f"reg.fd_order must be 1 or 2, got {fd_order!r}")
        for key, group in (("pgd", pgd), ("trades", trades)):
            _nonnegative(f"{key}.eps", group["eps"])
            _positive(f"{key}.step_size", group["step_size"])
            if isinstance(group["steps"], bool) or not isinstance(group["steps"], int) or group["steps"] < 1:
                raise ValueError(f"reg.{key}.steps must be an integer >= 1, got {group['steps']!r}")
        pgd_norm = _norm("pgd.norm", pgd["norm"], allowed=(2.0, math.inf))
        beta = _nonnegative("trades.beta", trades["beta"])

        perturbations = {"reg.J1": J1, "reg.J2": J2, "reg.Jinf": Jinf, "reg.pgd.eps": pgd["eps"],
                         "reg.trades.beta": beta}
        active = [k for k, v in perturbations.items() if v > 0]
        if len(active) > 1:
            raise ValueError(f"at most one of {', '.join(perturbations)} may be > 0 (they choose the batch "
                             f"to train on); got {', '.join(active)}")

        # 1. Which batch to train on.
        self.batch = clean_batch
        for eps, direction in ((J1, sign_direction), (J2, l2_direction), (Jinf, max_entry_direction)):
            if eps > 0:
                self.batch = GradientStepBatch(eps, direction)
        if pgd["eps"] > 0:
            attack = pgd_linf if pgd_norm == math.inf else pgd_l2
            self.batch = PGDBatch(functools.partial(attack, eps=pgd["eps"], steps=pgd["steps"],
                                                    step_size=pgd["step_size"],
                                                    random_start=bool(pgd["random_start"])))
        if beta > 0:
            self.batch = TradesBatch(trades["eps"], trades["steps"], trades["step_size"])
        # 2. Penalties, in the order they are evaluated (exact gradient penalties first, so a later
        # finite difference reuses their input gradient).
        candidates = [
            ("lip", lip, lambda: LipschitzPenalty(lip, lip_norm)),
            ("gradnorm", gradnorm, lambda: GradNormPenalty(gradnorm)),
            ("gradnorm_fd", gradnorm_fd, lambda: FiniteDifferencePenalty(gradnorm_fd, h, fd_order,
                                                                         DIRECTIONS[fd_norm])),
            ("trades", beta, lambda: TradesPenalty(beta)),
            ("decay", decay, lambda: WeightDecayPenalty(decay)),
        ]
        self.penalties = [(f"train/penalty_{name}", make()) for name, lam, make in candidates if lam > 0]
        self.needs_input_grad = lip > 0 or gradnorm > 0 or gradnorm_fd > 0
        self.double_backprop = lip > 0 or gradnorm > 0

    def __call__(self, model: Model, x: torch.Tensor, y: torch.Tensor) -> StepOutput:
        x_train, x_adv = self.batch(model, x, y)
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

