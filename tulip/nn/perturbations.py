"""Input perturbations shared by training (tulip.train.regularizers) and evaluation (tulip's attacks).

Pure, model-agnostic functions on batches of shape (B, ...) whose first dimension indexes samples.
Every function treats each sample separately: norms, signs and maxima are taken over the N entries of one
sample (N = C*H*W for images). Inputs are images in [0, 1].

- Steepest-ascent directions of unit length for a gradient ``g`` (the J1 / J2 / Jinf training batches of
  Finlay, Oberman & Abbasi 2018, arXiv 1810.00953, and the finite-difference directions of Finlay &
  Oberman 2019, arXiv 1905.11468): :func:`sign_direction`, :func:`l2_direction`, :func:`max_entry_direction`.
- :func:`input_grad`: per-sample input gradients ∇_x out_i of per-sample outputs, the one place Tulip
  computes them (training penalties, attacks, measurements); :func:`loss_input_grad` for the cross-entropy.
- :func:`frozen_eval`: eval mode with frozen parameters, restored afterwards.
- Projected gradient descent (ascent) in the L-infinity and L2 balls: :func:`pgd_linf`, :func:`pgd_l2`.
"""
import contextlib
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from tulip.nn.models import eval_mode

LossFn = Callable[[torch.Tensor], torch.Tensor]  # x (B, ...) -> per-sample losses (B,)


def _per_sample_norm(v: torch.Tensor, p: float) -> torch.Tensor:
    """Norm of every sample of v (B, ...), shaped (B, 1, ..., 1) so it broadcasts against v."""
    return torch.linalg.vector_norm(v.flatten(1), ord=p, dim=1).view(-1, *([1] * (v.dim() - 1)))


def sign_direction(g: torch.Tensor) -> torch.Tensor:
    r"""Sign direction sign(g)/√N, the steepest-ascent direction for an L∞ step, rescaled to L2 length 1.

    Distance Measure : L2 (the step ``eps * sign_direction(g)`` has L2 norm eps and changes every entry by
    eps/√N). Used by J1 (Finlay et al. 2018, arXiv 1810.00953): to first order,
    ℓ(x + eps·v) ≈ ℓ(x) + eps·‖g‖₁/√N. Entries where g is 0 get no step.

    Arguments:
        g (Tensor): gradients, shape (B, ...); each sample has N entries.
    Shape:
        - Output: same as g.
    Examples::
        >>> x_train = x + eps * sign_direction(loss_input_grad(model, x, y))
    """
    return g.sign() / math.sqrt(g[0].numel())


def l2_direction(g: torch.Tensor) -> torch.Tensor:
    r"""L2-normalised direction g/‖g‖₂ per sample; a zero gradient gives a zero direction (no NaN).

    Distance Measure : L2. Used by J2 (Finlay et al. 2018, arXiv 1810.00953): to first order
    ℓ(x + eps·v) ≈ ℓ(x) + eps·‖g‖₂.

    Arguments:
        g (Tensor): gradients, shape (B, ...).
    Shape:
        - Output: same as g; every sample has L2 norm 1, or 0 where its gradient is 0.
    """
    norm = _per_sample_norm(g, 2)
    # Dividing by max(norm, tiny) leaves zero rows at zero instead of 0/0 = NaN.
    return g / norm.clamp_min(torch.finfo(g.dtype).tiny)


def max_entry_direction(g: torch.Tensor) -> torch.Tensor:
    r"""Signed one-hot sign(g_k)·e_k at k = argmax_j |g_j| per sample: one entry (pixel) per image.

    Distance Measure : L2 and L∞ length 1 (L1 as well). Used by Jinf (Finlay et al. 2018,
    arXiv 1810.00953): to first order ℓ(x + eps·v) ≈ ℓ(x) + eps·‖g‖∞. A zero gradient gives a zero
    direction (sign(0) = 0).

    Arguments:
        g (Tensor): gradients, shape (B, ...).
    Shape:
        - Output: same as g, exactly one nonzero entry per sample (none for a zero gradient).
    """
    flat = g.flatten(1)  # (B, N)
    k = flat.abs().argmax(dim=1, keepdim=True)  # (B, 1)
    one_hot = torch.zeros_like(flat).scatter_(1, k, flat.gather(1, k).sign())
    return one_hot.view_as(g)


def input_grad(outputs: torch.Tensor, x: torch.Tensor, create_graph: bool = False,
               retain_graph: bool | None = None) -> torch.Tensor:
    r"""∇_x Σ_i outputs_i, shape of x (B, ...): row i is g_i = ∇_{x_i} outputs_i, the per-sample
    gradient, whenever the samples do not interact (eval-mode BatchNorm, no batch statistics).

    Arguments:
        outputs (Tensor): per-sample values computed from x, shape (B,) (or any shape: they are summed;
            a scalar is its own sum).
        x (Tensor): the inputs, which require grad.
        create_graph (bool): keep a graph through the gradient, for double backprop.
        retain_graph (bool, optional): keep the graph of `outputs` for another backward pass (default:
            create_graph, as torch.autograd.grad).
    Only the input gradient is computed: parameter ``.grad`` fields are left untouched.
    """
    return torch.autograd.grad(outputs.sum(), x, create_graph=create_graph, retain_graph=retain_graph)[0]


def loss_input_grad(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    r"""Per-sample gradients g_i = ∇_x CE(model(x_i), y_i), shape (B, ...), detached: :func:`input_grad`
    of the cross-entropy. Call inside :func:`frozen_eval` for the original method's semantics (and for
    exact per-sample gradients with BatchNorm).
    """
    x = x.detach().requires_grad_(True)
    return input_grad(F.cross_entropy(model(x), y, reduction="sum"), x)


@contextlib.contextmanager
def frozen_eval(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode (tulip.nn.models.eval_mode) with ``requires_grad=False`` on every parameter; restores
    both on exit, every module's own mode included.

    Perturbations are computed like this (Finlay et al. 2018): BatchNorm uses its running statistics,
    dropout is off, and autograd builds no graph into the weights.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    with eval_mode(model):
        for p in params:
            p.requires_grad_(False)
        try:
            yield model
        finally:
            for p in params:
                p.requires_grad_(True)


def _ascent_grad(loss_fn: LossFn, x_adv: torch.Tensor) -> torch.Tensor:
    x_adv = x_adv.detach().requires_grad_(True)
    return input_grad(loss_fn(x_adv), x_adv)


def pgd_linf(loss_fn: LossFn, x: torch.Tensor, eps: float, steps: int = 7, step_size: float = 2 / 255,
             random_start: bool = True, start: torch.Tensor | None = None) -> torch.Tensor:
    r"""L∞ projected gradient ascent (PGD) of Madry et al. 2018, 'Towards Deep Learning Models Resistant
    to Adversarial Attacks' [https://arxiv.org/abs/1706.06083].

    Distance Measure : L∞. Each step: x ← clip_[0,1](Π_{‖x−x₀‖∞≤eps}(x + step_size·sign(∇ₓ Σᵢ loss_fn(x)ᵢ))).

    Arguments:
        loss_fn (callable): x (B, ...) -> per-sample losses (B,) to *maximise*, e.g.
            ``lambda z: F.cross_entropy(model(z), y, reduction="none")``. Put the model in eval mode
            yourself (see :func:`frozen_eval`).
        x (Tensor): clean inputs in [0, 1], shape (B, ...).
        eps (float): radius of the L∞ ball. (Default: 8/255 in the configs.)
        steps (int): number of gradient steps. (Default: 7)
        step_size (float): L∞ length of each step. (Default: 2/255)
        random_start (bool): start at a uniform random point of the ball. (Default: True)
        start (Tensor, optional): explicit starting point (overrides random_start), e.g. TRADES' x + 0.001·N(0, 1).
    Shape:
        - Output: same as x, detached, with ‖output − x‖∞ ≤ eps and entries in [0, 1].
    Examples::
        >>> x_adv = pgd_linf(lambda z: F.cross_entropy(model(z), y, reduction="none"), x, eps=8/255)
    """
    x = x.detach()
    if start is not None:
        x_adv = start.detach()
    elif random_start:
        x_adv = x + torch.empty_like(x).uniform_(-eps, eps)
    else:
        x_adv = x
    lower, upper = (x - eps).clamp_min(0), (x + eps).clamp_max(1)  # ball ∩ [0, 1], a box
    x_adv = torch.max(torch.min(x_adv, upper), lower)
    for _ in range(steps):
        x_adv = x_adv + step_size * _ascent_grad(loss_fn, x_adv).sign()
        x_adv = torch.max(torch.min(x_adv, upper), lower)
    return x_adv


def _project_l2(x: torch.Tensor, x_adv: torch.Tensor, eps: float) -> torch.Tensor:
    delta = x_adv - x
    # Shrink only samples outside the ball; the floor keeps eps = 0 from dividing 0 by 0.
    delta = delta * (eps / _per_sample_norm(delta, 2).clamp_min(max(eps, torch.finfo(x.dtype).tiny)))
    return (x + delta).clamp(0, 1)


def pgd_l2(loss_fn: LossFn, x: torch.Tensor, eps: float, steps: int = 7, step_size: float = 0.125,
           random_start: bool = True, start: torch.Tensor | None = None) -> torch.Tensor:
    r"""L2 projected gradient ascent (PGD) of Madry et al. 2018, 'Towards Deep Learning Models Resistant
    to Adversarial Attacks' [https://arxiv.org/abs/1706.06083].

    Distance Measure : L2. Each step: x ← clip_[0,1](Π_{‖x−x₀‖₂≤eps}(x + step_size·g/‖g‖₂)) per sample,
    g = ∇ₓ Σᵢ loss_fn(x)ᵢ (a zero gradient gives no step). Clipping to [0, 1] after the projection
    cannot leave the ball: it moves every entry towards x₀, which is in [0, 1].

    Arguments:
        loss_fn (callable): x (B, ...) -> per-sample losses (B,) to maximise (see :func:`pgd_linf`).
        x (Tensor): clean inputs in [0, 1], shape (B, ...).
        eps (float): radius of the L2 ball. (Default: 0.5 in the configs.)
        steps (int): number of gradient steps. (Default: 7)
        step_size (float): L2 length of each step. (Default: 0.125)
        random_start (bool): start at a random point of the ball (uniform direction, uniform radius, as
            torchattacks' PGDL2). (Default: True)
        start (Tensor, optional): explicit starting point (overrides random_start).
    Shape:
        - Output: same as x, detached, with ‖output − x‖₂ ≤ eps per sample and entries in [0, 1].
    """
    x = x.detach()
    if start is not None:
        x_adv = start.detach()
    elif random_start:
        direction = l2_direction(torch.randn_like(x))
        radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), dtype=x.dtype, device=x.device)
        x_adv = x + eps * radius * direction
    else:
        x_adv = x
    x_adv = _project_l2(x, x_adv, eps)
    for _ in range(steps):
        x_adv = _project_l2(x, x_adv + step_size * l2_direction(_ascent_grad(loss_fn, x_adv)), eps)
    return x_adv
