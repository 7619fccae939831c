"""Lower bounds on each test image's adversarial L2 distance: two estimates and one certificate.

For an image x with label y and softmax output p, the successor paper (Finlay & Oberman, arXiv
1905.11468, ``test_statistics.py``) uses the loss ℓ(x) = max_{j≠y} p_j − p_y: x is misclassified iff
ℓ ≥ 0, so a perturbation δ can only fool the model once ℓ(x + δ) reaches 0.

- First-order estimate: with L = the largest ‖∇ℓ‖₂ over the evaluated images,
  dist ≥ (−ℓ)₊ / L.
- Second-order estimate: with C = the largest Hessian norm ‖∇²ℓ‖₂ over the evaluated images (power
  iteration on Hessian-vector products),
  dist ≥ [−‖∇ℓ‖₂ + √(‖∇ℓ‖₂² + 2C(−ℓ)₊)] / C.
  Only meaningful for a smooth network: with ReLUs the Hessian ignores the kinks, so it is skipped.
- Global certificate (Tsuzuku, Sato & Sugiyama, NeurIPS 2018, arXiv 1802.04034): for the logit margin
  m(x) = f_y − max_{j≠y} f_j and logits that are K-Lipschitz in L2, no perturbation with
  ‖δ‖₂ < m(x) / (√2·K) changes the prediction (f_y − f_j is √2·K-Lipschitz).
  K = ``tulip.nn.lipschitz.layer_norm_bound(model)``, a bound by theorem.
- Pairwise certificate (GloRo, Leino, Wang & Fredrikson, ICML 2021, arXiv 2102.08452): for logits
  f_j = w_j·φ(x) + b_j with φ K₋-Lipschitz, f_y − f_j is K₋·‖w_y − w_j‖₂-Lipschitz, so no perturbation
  with ‖δ‖₂ < min_{j≠y} (f_y − f_j) / (K₋·‖w_y − w_j‖₂) changes the prediction. Since
  ‖w_y − w_j‖₂ ≤ √2·‖W‖₂ and K ≥ K₋·‖W‖₂, it is never below the global radius.

L and C are empirical maxima, so the first two are estimates; only the certificates are guarantees.
``lipschitz_lower_bound`` searches the other side: pairs whose ratio ‖f(x)−f(x′)‖₂/‖x−x′‖₂ is large.
All functions take a model in eval mode (BatchNorm on running statistics, so images are independent and
the gradient of a summed loss is the per-image gradient) and images in [0, 1] on the model's device.
"""
import math
import sys
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from tulip.nn.lipschitz import LastLayer
from tulip.nn.nonlinearities import MinMax, ReLU
from tulip.nn.perturbations import l2_direction

# Piecewise-linear modules: a network containing any of them has a Hessian that is zero almost
# everywhere inside its linear regions, which says nothing about its curvature across the kinks.
NON_SMOOTH_MODULES = (ReLU, MinMax, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Hardtanh, nn.Hardswish,
                      nn.Hardsigmoid, nn.ELU, nn.CELU, nn.SELU, nn.MaxPool1d, nn.MaxPool2d,
                      nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


def _batches(n: int, batch_size: int, desc: str):
    """The batch starts 0, batch_size, ... < n: with a progress bar on a terminal only, as in training
    (a log gets tulip.evaluate.final's bounds lines)."""
    return tqdm(range(0, n, batch_size), desc=desc, leave=False, disable=not sys.stderr.isatty())


def is_smooth(model: nn.Module) -> bool:
    """False when the model contains a piecewise-linear activation or max-pooling."""
    return not any(isinstance(module, NON_SMOOTH_MODULES) for module in model.modules())


def probability_margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓ = max_{j≠y} p_j − p_y per image: (B, K) logits, (B,) labels -> (B,); ≥ 0 iff misclassified."""
    p = logits.softmax(dim=1)
    p_true = p.gather(1, y[:, None]).squeeze(1)
    p_other = p.scatter(1, y[:, None], -torch.inf).amax(dim=1)
    return p_other - p_true


def logit_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """m = f_y − max_{j≠y} f_j per image: (B, K), (B,) -> (B,); > 0 iff correctly classified."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], -torch.inf).amax(dim=1)
    return true - other


class LossGradients(NamedTuple):
    loss: torch.Tensor  # (n,) ℓ per image
    grad_norm: torch.Tensor  # (n,) ‖∇ℓ‖₂ per image
    margin: torch.Tensor  # (n,) logit margin m per image
    logits: torch.Tensor  # (n, C), for the pairwise certificate


def loss_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> LossGradients:
    """ℓ, ‖∇_x ℓ‖₂, the logit margin and the logits for every image of x (n, C, H, W); CPU tensors."""
    parts = []
    for start in _batches(len(x), batch_size, "bounds: gradients"):
        xb = x[start:start + batch_size].detach().requires_grad_(True)
        yb = y[start:start + batch_size]
        logits = model(xb)
        loss = probability_margin_loss(logits, yb)
        (grad,) = torch.autograd.grad(loss.sum(), xb)
        logits = logits.detach()
        parts.append((loss.detach(), grad.flatten(1).norm(dim=1), logit_margin(logits, yb), logits))
    return LossGradients(*(torch.cat(column).cpu() for column in zip(*parts)))


def hessian_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """‖∇²_x ℓ‖₂ per image (n,) by power iteration on Hessian-vector products, all images of a batch
    at once (the Hessian of the summed loss is block diagonal, one block per image). ``iterations``
    power steps from a seeded random start; each costs one double-backward pass."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    norms = []
    for start in _batches(len(x), batch_size, "bounds: Hessian norms"):
        xb = x[start:start + batch_size].detach().requires_grad_(True)
        yb = y[start:start + batch_size]
        (grad,) = torch.autograd.grad(probability_margin_loss(model(xb), yb).sum(), xb, create_graph=True)
        v = torch.randn(xb.shape, generator=generator, device=x.device, dtype=x.dtype)
        norm = torch.zeros(len(xb), device=x.device)
        for _ in range(iterations):
            v = v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (v.dim() - 1))
            (hv,) = torch.autograd.grad(grad, xb, grad_outputs=v, retain_graph=True)  # (B, C, H, W)
            norm = hv.flatten(1).norm(dim=1)  # ‖H v‖ with ‖v‖ = 1 -> the top |eigenvalue|
            v = hv.detach()
        norms.append(norm.detach())
    return torch.cat(norms).cpu()


def first_order_radii(loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """(−ℓ)₊ / L with L = max ‖∇ℓ‖₂ (n,); 0 for misclassified images, +inf if every gradient is 0."""
    gap = (-loss).clamp_min(0)
    return torch.where(gap > 0, gap / grad_norm.max(), 0.0)


def second_order_radii(loss: torch.Tensor, grad_norm: torch.Tensor, curvature: float) -> torch.Tensor:
    """[−‖∇ℓ‖ + √(‖∇ℓ‖² + 2C(−ℓ)₊)] / C per image (n,) for the curvature bound C ≥ 0 (the smallest
    ‖δ‖ at which the quadratic upper model ℓ + ‖∇ℓ‖‖δ‖ + C‖δ‖²/2 reaches 0). C = 0 gives the
    linear limit (−ℓ)₊/‖∇ℓ‖."""
    gap = (-loss).clamp_min(0).double()
    g = grad_norm.double()
    # Rationalised form of (−g + √(g² + 2C·gap)) / C, free of cancellation when C·gap ≪ g².
    radius = 2 * gap / (g + torch.sqrt(g * g + 2 * max(curvature, 0.0) * gap))
    return torch.where(gap > 0, radius, 0.0).float()


def certified_radii(margin: torch.Tensor, lipschitz: float) -> torch.Tensor:
    """m₊ / (√2·K) per image: no L2 perturbation shorter than this changes the prediction when the
    logits are K-Lipschitz in L2 (Tsuzuku et al. 2018). 0 for misclassified images (m ≤ 0)."""
    return margin.clamp_min(0) / (math.sqrt(2.0) * lipschitz)


def pair_lipschitz(weight: torch.Tensor, head_scale: torch.Tensor | None = None) -> torch.Tensor:
    """(C, C): c_ij, an L2 Lipschitz constant of f_i − f_j as a function of the features φ.

    Without head ‖w_i − w_j‖₂. With the bounded head f_c = t·tanh(s_c·(w_c·φ + b_c − μ_c)/|t|), the
    gradient of f_i − f_j is sign(t)·(a·s_i w_i − b·s_j w_j) with a, b ∈ [0, 1] depending on x; its norm
    is convex in (a, b), so at most its largest value at a corner: max(‖s_i w_i‖, ‖s_j w_j‖,
    ‖s_i w_i − s_j w_j‖) — still ≤ √2·max|s|·‖W‖₂, the global form's constant.
    """
    rows = weight if head_scale is None else head_scale[:, None] * weight  # (C, d)
    pairs = (rows[:, None, :] - rows[None, :, :]).norm(dim=2)  # exact differences, not cdist's shortcut
    if head_scale is not None:
        norms = rows.norm(dim=1)
        pairs = torch.maximum(pairs, torch.maximum(norms[:, None], norms[None, :]))
    return pairs


def pairwise_radii(logits: torch.Tensor, y: torch.Tensor, feature_lipschitz: float,
                   pairs: torch.Tensor) -> torch.Tensor:
    """min_{j≠y} (f_y − f_j) / (K₋·c_yj) per image: (n, C) logits, (n,) labels, (C, C) ``pair_lipschitz``
    -> (n,). 0 for misclassified images (some f_j ≥ f_y); +inf for a pair that cannot swap (c_yj = 0)."""
    logits = logits.double()
    gaps = logits.gather(1, y[:, None]) - logits  # (n, C): f_y − f_j
    radii = torch.where(gaps > 0, gaps / (feature_lipschitz * pairs.to(logits)[y]), 0.0)
    radii = radii.scatter(1, y[:, None], torch.inf)  # j = y is no competitor
    return radii.amin(dim=1).float()


def last_layer_radii(last: LastLayer, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``pairwise_radii`` of a model split by tulip.nn.lipschitz.last_layer: (n, C) logits, (n,) labels -> (n,)."""
    return pairwise_radii(logits, y, last.feature_bound, pair_lipschitz(last.weight, last.head_scale))


def error_curve(radii: torch.Tensor, epsilons: list[float]) -> list[list[float]]:
    """Rows [eps, % of images with radius ≤ eps] of a robust- or certified-error curve."""
    return [[eps, 100.0 * (radii <= eps).double().mean().item()] for eps in epsilons]


def tightness(attack_l2: torch.Tensor, certified: torch.Tensor, correct: torch.Tensor) -> float:
    """Median over correctly classified images of (best attack's L2 distance) / (certified radius): ≥ 1
    for a sound certificate, 1 when it is exact; nan without correctly classified images."""
    ratio = attack_l2[correct].double() / certified[correct].double()
    return ratio.median().item() if len(ratio) else float("nan")


@dataclass(frozen=True)
class LowerBoundSearch:
    """How hard `lipschitz_lower_bound` searches (eval.lower_bound): pairs start from the first `images`
    images and take `steps` ascent steps. Any search gives a valid lower bound; a longer one a tighter one."""
    images: int = 64
    steps: int = 30


def lipschitz_lower_bound(model: nn.Module, x: torch.Tensor, batch_size: int, steps: int = 30,
                          radius: float = 0.01, seed: int = 0, images: int = 64) -> float:
    """The largest ‖f(a) − f(b)‖₂ / ‖a − b‖₂ found: a lower bound on the L2 Lipschitz constant of the
    logits (every pair evaluated is a witness), for judging an upper bound's tightness.

    Starts from pairs of test images (x_i, x_{i−1}) and from (x_i, x_i + noise of norm ``radius``); then
    ``steps`` of normalized gradient ascent on the ratio, moving a by 1 in L2 (unclipped: the constant
    is that of the logits on all of R^d) and turning the direction of b − a, whose length stays fixed
    (at small lengths this is power iteration on the local Jacobian, at large ones it finds steep
    chords). Model in eval mode.

    Only the first ``images`` images start pairs: the best ratio comes from the local power iteration,
    whose result varies little between images, and each step costs three passes per image. On 200 test
    images, the first 64 found 12.02 (all 200: 12.02) on the default model and 6.90 (6.92) on a GloRo
    model, in a third of the time; a lower bound found on fewer pairs only makes K / lower more cautious.
    """
    x = x[:images]
    generator = torch.Generator(device=x.device).manual_seed(seed)
    best = 0.0
    for start in _batches(len(x), batch_size, "bounds: Lipschitz lower bound"):
        a = x[start:start + batch_size]
        noise = torch.randn(a.shape, generator=generator, device=x.device, dtype=x.dtype)
        noise = radius * l2_direction(noise)
        for offset in (a.roll(1, 0) - a, noise):
            best = max(best, _ascend_ratio(model, a, offset, steps))
    return best


def _per_image(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, ...) broadcasting against ``like``."""
    return values.view(-1, *[1] * (like.dim() - 1))


def _ascend_ratio(model: nn.Module, a: torch.Tensor, offset: torch.Tensor, steps: int,
                  a_step: float = 1.0, turn: float = 0.5) -> float:
    length = offset.flatten(1).norm(dim=1)  # (B,), fixed
    a, offset, length = a[length > 0], offset[length > 0], length[length > 0]  # no pair of equal images
    if not len(a):
        return 0.0
    direction, best = l2_direction(offset), 0.0
    for step in range(steps + 1):
        with torch.enable_grad():
            a = a.detach().requires_grad_(True)
            direction = direction.detach().requires_grad_(True)
            unit = l2_direction(direction)
            b = a + _per_image(length, a) * unit
            ratio = (model(b) - model(a)).norm(dim=1) / (b - a).flatten(1).norm(dim=1)  # (B,)
            best = max(best, ratio.max().item())
            if step == steps:
                break
            grad_a, grad_direction = torch.autograd.grad(ratio.sum(), (a, direction))
        a = a + a_step * l2_direction(grad_a)
        direction = unit.detach() + turn * l2_direction(grad_direction)
    return best
