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
- Certificate (Tsuzuku, Sato & Sugiyama, NeurIPS 2018, arXiv 1802.04034): for the logit margin
  m(x) = f_y − max_{j≠y} f_j and logits that are K-Lipschitz in L2, no perturbation with
  ‖δ‖₂ < m(x) / (√2·K) changes the prediction. K = ``tulip.measures.layer_norm_product(model)``.

L and C are empirical maxima, so the first two are estimates; only the certificate is a guarantee.
All functions take a model in eval mode (BatchNorm on running statistics, so images are independent and
the gradient of a summed loss is the per-image gradient) and images in [0, 1] on the model's device.
"""
import math
from typing import NamedTuple

import torch
from torch import nn

from tulip.models import ReLU

# Piecewise-linear modules: a network containing any of them has a Hessian that is zero almost
# everywhere inside its linear regions, which says nothing about its curvature across the kinks.
NON_SMOOTH_MODULES = (ReLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.Hardtanh, nn.Hardswish,
                      nn.Hardsigmoid, nn.ELU, nn.CELU, nn.SELU, nn.MaxPool1d, nn.MaxPool2d,
                      nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)


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


def loss_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> LossGradients:
    """ℓ, ‖∇_x ℓ‖₂ and the logit margin for every image of x (n, C, H, W); CPU tensors."""
    parts = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].detach().requires_grad_(True)
        yb = y[start:start + batch_size]
        logits = model(xb)
        loss = probability_margin_loss(logits, yb)
        (grad,) = torch.autograd.grad(loss.sum(), xb)
        parts.append((loss.detach(), grad.flatten(1).norm(dim=1), logit_margin(logits.detach(), yb)))
    return LossGradients(*(torch.cat(column).cpu() for column in zip(*parts)))


def hessian_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                  iterations: int = 20, seed: int = 0) -> torch.Tensor:
    """‖∇²_x ℓ‖₂ per image (n,) by power iteration on Hessian-vector products, all images of a batch
    at once (the Hessian of the summed loss is block diagonal, one block per image). ``iterations``
    power steps from a seeded random start; each costs one double-backward pass."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    norms = []
    for start in range(0, len(x), batch_size):
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
