"""The built-in parts of Tulip's training losses (see tulip.train.loss for how they compose).

Batch choices (``reg.batches``): the one-step perturbations x + ε·v(g) of J1, J2, Jinf (Finlay, Oberman &
Abbasi 2018, arXiv 1810.00953), an L∞/L2 PGD batch (Madry et al. 2018), and the clean batch with TRADES'
adversary x′ beside it (Zhang et al. 2019, arXiv 1901.08573). They are computed before the training
forward pass, in eval mode with frozen parameters. J1/J2/Jinf are not clamped to [0, 1] (clamping would
break their first-order equivalence with gradient-norm penalties); PGD and TRADES are.

Penalties (``reg.penalties``): the Lipschitz penalty λ·max_i ‖g_i‖, the squared gradient norm
λ·mean_i ‖g_i‖²/2 exactly or by the finite difference of Finlay & Oberman 2019 (arXiv 1905.11468),
TRADES' β·KL(f(x) ‖ f(x′)), and weight decay λ·Σ‖W‖².

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
from typing import Annotated

import torch
import torch.nn.functional as F

from tulip.nn.perturbations import (frozen_eval, l2_direction, loss_input_grad, max_entry_direction, pgd_l2,
                                    pgd_linf, sign_direction)
from tulip.schema import Iterations, NonNegative, NormOrder, Positive, Switch, as_norm_order, norm_order, one_of
from tulip.train.loss import BatchChoice, Model, Penalty, TrainingBatch

# A direction's norm order -> the unit step of that norm's steepest ascent for a gradient g.
DIRECTIONS = {1.0: sign_direction, 2.0: l2_direction, math.inf: max_entry_direction}


def at_least_float32(logits: torch.Tensor) -> torch.Tensor:
    """bf16 logits (precision=bf16's autocast) in float32; float32 and float64 ones as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


# --- batch choices ----------------------------------------------------------------------------------

class GradientStepBatch(BatchChoice):
    """x + ε·v(g), g the per-sample loss gradient in eval mode; not clamped. ``direction`` is the norm
    order of v: 1 -> sign(g)/√N (J1), 2 -> g/‖g‖₂ (J2), inf -> sign(g_k)·e_k, k = argmax|g| (Jinf)."""
    switch = "eps"

    def __init__(self, eps: NonNegative = 0.0, direction: NormOrder = 2):
        self.eps = float(eps)
        self.direction = DIRECTIONS[as_norm_order(direction)]

    def __call__(self, model: Model, x: torch.Tensor, y: torch.Tensor):
        with frozen_eval(model):
            g = loss_input_grad(model, x, y)
        return x + self.eps * self.direction(g), None


class PGDBatch(BatchChoice):
    """The PGD adversarial batch (Madry et al. 2018, arXiv 1706.06083), L∞ or L2, projected and clamped
    to [0, 1]; trains on the adversarial batch only. Defaults: the successor paper's 7 steps of 2/255."""
    switch = "eps"

    def __init__(self, eps: NonNegative = 0.0, steps: Iterations = 7, step_size: Positive = 2 / 255,
                 random_start: Switch = True, norm: Annotated[float | str, norm_order(2.0, math.inf)] = math.inf):
        self.eps = float(eps)
        attack = pgd_linf if as_norm_order(norm) == math.inf else pgd_l2
        self.attack = functools.partial(attack, eps=self.eps, steps=steps, step_size=float(step_size),
                                        random_start=random_start)

    def __call__(self, model: Model, x: torch.Tensor, y: torch.Tensor):
        with frozen_eval(model):
            return self.attack(lambda z: F.cross_entropy(model(z), y, reduction="none"), x), None


class TradesBatch(BatchChoice):
    """The clean batch, and beside it TRADES' x′: L∞ (or L2) PGD on KL(f(x) ‖ f(x′)) started at
    x + 0.001·N(0, 1) (clamped to [0, 1]; TRADES clamps only after the loop). On when beta > 0
    (TradesPenalty's β). Defaults: TRADES' CIFAR-10 L∞ settings, 10 steps of 0.007 in the ball of 0.031."""
    switch = "beta"

    def __init__(self, beta: NonNegative = 0.0, eps: NonNegative = 0.031, steps: Iterations = 10,
                 step_size: Positive = 0.007, norm: Annotated[float | str, norm_order(2.0, math.inf)] = math.inf):
        self.beta = float(beta)
        attack = pgd_linf if as_norm_order(norm) == math.inf else pgd_l2
        self.attack = functools.partial(attack, eps=float(eps), steps=steps, step_size=float(step_size))

    def __call__(self, model: Model, x: torch.Tensor, y: torch.Tensor):
        with frozen_eval(model):
            p_clean = F.softmax(at_least_float32(model(x)), dim=1)

            def kl(z):  # per-sample KL(p_clean ‖ f(z)); float32 log-probabilities, see TradesPenalty
                return F.kl_div(F.log_softmax(at_least_float32(model(z)), dim=1), p_clean,
                                reduction="none").sum(dim=1)

            return x, self.attack(kl, x, start=x + 0.001 * torch.randn_like(x))


# --- penalties --------------------------------------------------------------------------------------

class LipschitzPenalty(Penalty):
    """λ · max_i ‖g_i‖_p (Finlay et al. 2018), double backprop so it trains the weights. p: 2, 1 or inf."""
    switch, needs_input_grad, needs_graph = "lam", True, True

    def __init__(self, lam: NonNegative = 0.0, norm: NormOrder = 2):
        self.lam, self.norm = float(lam), as_norm_order(norm)

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        return self.lam * torch.linalg.vector_norm(batch.input_grad.flatten(1), ord=self.norm, dim=1).max()


class GradNormPenalty(Penalty):
    """λ · mean_i ‖g_i‖₂² / 2, exact (double backprop)."""
    switch, needs_input_grad, needs_graph = "lam", True, True

    def __init__(self, lam: NonNegative = 0.0):
        self.lam = float(lam)

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        return self.lam * batch.input_grad.square().sum() / (2 * batch.x.shape[0])


class FiniteDifferencePenalty(Penalty):
    """λ · mean_i dl_i² / 2 with dl_i the finite difference of ℓ_i along v = direction(g) (Finlay &
    Oberman 2019, arXiv 1905.11468): (ℓ_i(x + hv) − ℓ_i(x))/h (order 1, reuses the step's forward pass)
    or (ℓ_i(x + hv) − ℓ_i(x − hv))/(2h) (order 2). dl_i → g_i·v_i = ‖g_i‖ as h → 0; no double backprop.
    ``norm`` picks v: 2 -> g/‖g‖₂, 1 -> sign(g)/√N, inf -> a signed one-hot. Defaults: h=0.01, order 1, 2.
    """
    switch, needs_input_grad = "lam", True

    def __init__(self, lam: NonNegative = 0.0, h: Positive = 0.01, order: Annotated[int, one_of(1, 2, 1.0, 2.0)] = 1,
                 norm: NormOrder = 2):
        self.lam, self.h = float(lam), float(h)
        self.direction = DIRECTIONS[as_norm_order(norm)]
        self._losses_below, self._span = (self._losses_at_x, h) if order == 1 else (self._losses_at_minus_h, 2 * h)

    def _losses_at_x(self, batch: TrainingBatch, step: torch.Tensor, recompute: bool) -> torch.Tensor:
        if recompute:
            return F.cross_entropy(batch.model(batch.x.detach()), batch.y, reduction="none")
        return batch.losses

    def _losses_at_minus_h(self, batch: TrainingBatch, step: torch.Tensor, recompute: bool) -> torch.Tensor:
        return F.cross_entropy(batch.model(batch.x.detach() - step), batch.y, reduction="none")

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        # Detached x and v: the extra forward passes need no input gradient, only weight gradients.
        step = self.h * self.direction(batch.input_grad.detach())
        # The difference of two nearby losses cancels most of their digits: from bf16 logits (autocast,
        # precision=bf16) the rounding noise is larger than the slope itself (30x the float32 penalty at
        # initialisation), so both losses are computed in float32 then, the step's own forward pass at x
        # (bf16) recomputed for order 1 (in train mode that pass moves BatchNorm's running statistics
        # once more, as order 2's second pass does).
        device = batch.x.device.type
        low_precision = torch.is_autocast_enabled(device)
        with torch.autocast(device, enabled=False):
            losses_above = F.cross_entropy(batch.model(batch.x.detach() + step), batch.y, reduction="none")
            slope = (losses_above - self._losses_below(batch, step, low_precision)) / self._span  # (B,)
        return self.lam * slope.square().mean() / 2


class TradesPenalty(Penalty):
    """β · KL(f(x) ‖ f(x′)) (TRADES, Zhang et al. 2019, arXiv 1901.08573), averaged over the batch, with
    x′ from TradesBatch; both f in train mode, as in TRADES."""
    switch = "beta"

    def __init__(self, beta: NonNegative = 0.0):
        self.beta = float(beta)

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        if batch.x_adv is None:
            raise ValueError("the TRADES penalty needs TRADES' adversary: train on TradesBatch (reg.trades.beta)")
        # In float32 at least (precision=bf16's autocast makes the logits bf16): CPU autocast keeps
        # log_softmax in bf16, whose 8 bits round log-probabilities near -2.3 by up to 0.008, and that
        # noise swamps a KL between nearby inputs (0.03 against 2e-6 in float32 at initialisation).
        log_p_adv = F.log_softmax(at_least_float32(batch.model(batch.x_adv)), dim=1)
        return self.beta * F.kl_div(log_p_adv, F.softmax(at_least_float32(batch.logits), dim=1),
                                    reduction="batchmean")


class WeightDecayPenalty(Penalty):
    """λ · Σ‖W‖² over weight matrices and kernels (parameters with ≥ 2 dims): not biases, not BatchNorm
    scales, not the scalar tanh scale."""
    switch = "lam"

    def __init__(self, lam: NonNegative = 0.0):
        self.lam = float(lam)

    def __call__(self, batch: TrainingBatch) -> torch.Tensor:
        return self.lam * sum(p.square().sum() for p in batch.model.parameters() if p.dim() > 1)
