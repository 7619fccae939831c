"""L2 Lipschitz bounds of Tulip's models: per-layer operator norms, their product, and the last layer.

``layer_norm_bound(model)`` is a guaranteed upper bound on the L2 Lipschitz constant of the logits (in
eval mode): the product over the model's blocks of guaranteed bounds on each layer's operator norm.
``layer_norm_estimate(model)`` is the same product with cheaper per-layer *estimates* (power iteration),
kept for comparison. ``last_layer(model)`` splits a model into a feature map and its last linear layer,
for the pairwise certificate of tulip.evaluate.bounds (Leino, Wang & Fredrikson, ICML 2021, arXiv 2102.08452).

Convolutions (Delattre, Barthélemy, Araujo & Allauzen, ICML 2023, arXiv 2305.16173, and arXiv
2402.00240 for zero padding), for the real strided, zero-padded layer x -> conv2d(x, w, s, p) on (C, H, W):

1. Zero padding embeds x isometrically into the padded input (C, H + 2p, W + 2p), where the layer is
   an unpadded ("valid") convolution.
2. Stride s: writing each tap u = s·u' + a (a < s), the strided valid convolution *is* a stride-1 valid
   convolution of the polyphase input X[(c, a, b), i, j] = x_pad[c, s·i + a, s·j + b] (a permutation of
   the padded input, zero-extended to n = ⌈(H + 2p)/s⌉ per side: again an isometry) with the kernel
   w'[o, (c, a, b), u', v'] = w[o, c, s·u' + a, s·v' + b] (zero where s·u' + a ≥ k).
3. A valid convolution on an n×n grid is a restriction (norm ≤ 1) of the circular convolution on an
   N×N grid for any N ≥ n: through a nonzero tap, every output it keeps reads an input i + u' < n ≤ N,
   so nothing wraps around. (N is also at least the kernel's size, for its DFT.)
4. The 2-D DFT block-diagonalises a circular convolution: its norm is the largest spectral norm, over
   the N² frequencies ω, of the c_out×c_in matrix ŵ(ω) of the kernel's DFT (real kernels: ŵ(−ω) is the
   conjugate of ŵ(ω), so the rfft2 half of the frequencies suffices). Groups are a block-diagonal
   operator: the largest norm over groups.
5. Gram iteration bounds each ‖ŵ(ω)‖₂ (``gram_norm_bound``).

So ‖conv‖₂ ≤ max_ω ‖ŵ(ω)‖₂ ≤ max_ω Gram bound, by theorem. Eval-mode BatchNorm is folded into the
weights; everything is computed in float64 and a rounding slack is added (``_rounding_slack``).
"""
import math
from functools import singledispatch
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tulip.nn.models import (BoundedHead, BranchMean, ConvBN, DenseBN, GlobalAvgPool, Nonlinearity, Residual,
                          ScaledTanh, eval_mode)

POWER_ITERATIONS = 100
# Power iteration approaches a convolution's norm from below; after POWER_ITERATIONS steps from a
# random start the estimate fell short of the exact norm by less than this margin on every layer checked
# (docs/benchmarks.md; tests compare against dense SVDs). So it makes the estimate an upper bound in
# practice, not by theorem.
POWER_SAFETY = 1.02
# Gram iterations: the bound exceeds ‖A‖₂ by a factor ≤ rank^(1/2^(t+1)) (all singular values equal),
# e.g. ≤ 1.008 for rank 64 after 8 iterations; far less when the singular values decay.
GRAM_ITERATIONS_CONV = 8
GRAM_ITERATIONS_MATRIX = 12


# ----------------------------------------------------------------------------------------------------
# Per-layer norms: guaranteed bounds (Gram iteration) and estimates (power iteration, SVD)


def _rounding_slack(inner: int, rank: int, grid: int = 1) -> float:
    """1 + a relative allowance for float64 rounding in a Gram bound (u = 2^-53).

    Gram steps: a product of matrices of Frobenius norm 1 errs by ≤ n·u in Frobenius norm (inner
    dimension n; Higham, Accuracy and Stability of Numerical Algorithms, ch. 3), which moves σ₁ of the
    product by a relative ≤ r·n·u, since σ₁² ≥ ‖G‖_F²/r (rank r). The 2^t-th root weights step t's error
    by 2^-(t+1), so all steps together move the bound by ≤ r·n·u. The FFT (N×N grid) errs by
    ≤ c·log₂(N²)·u relative to the whole spectrum (Higham, ch. 24), which Parseval relates to the largest
    frequency's norm with a factor ≤ N·√r. Eight times the sum of both is the allowance.
    """
    fft = math.log2(grid * grid) * grid * math.sqrt(rank)
    return 1.0 + 8.0 * (inner * rank + fft + 1) * torch.finfo(torch.float64).eps


def gram_norm_bound(matrices: torch.Tensor, iterations: int) -> torch.Tensor:
    """Guaranteed upper bounds on the spectral norms of a batch of matrices (..., m, n) -> (...,).

    Gram iteration (Delattre et al. 2023): with G₀ = A and G_{t+1} = G_tᴴ G_t, σ₁(G_t) = σ₁(A)^(2^t)
    (the singular values of GᴴG are those of G squared), and σ₁ ≤ ‖·‖_F, so ‖A‖₂ ≤ ‖G_t‖_F^(1/2^t).
    Each step divides G by its Frobenius norm and carries the scale as a logarithm (no overflow).
    Real or complex input; exact arithmetic — see ``_rounding_slack`` for rounding.
    """
    g = matrices
    if g.shape[-2] > g.shape[-1]:  # the same singular values, and smaller Gram matrices
        g = g.mT
    log_scale = torch.zeros(g.shape[:-2], dtype=torch.float64, device=g.device)
    for step in range(iterations):
        # after the first step G is a product of matrices of Frobenius norm 1: no overflow in its norm
        norm = _frobenius(g) if step == 0 else torch.linalg.matrix_norm(g)
        norm = norm.clamp_min(torch.finfo(torch.float64).tiny)  # (...,)
        g = g / norm[..., None, None]  # (..., m, n)
        log_scale = 2 * (log_scale + norm.log())
        g = g @ g.mH if step == 0 else g.mH @ g  # first step: (m, m) with m ≤ n; then Hermitian
    final = _frobenius(g) if iterations == 0 else torch.linalg.matrix_norm(g)
    return torch.exp((log_scale + final.log()) / 2 ** iterations)


def _frobenius(g: torch.Tensor) -> torch.Tensor:
    """Frobenius norms of a batch of matrices (..., m, n) -> (...,), without overflow in the squares."""
    largest = g.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(torch.float64).tiny)
    return largest * torch.linalg.matrix_norm(g / largest[..., None, None])


def matrix_norm_bound(weight: torch.Tensor, iterations: int = GRAM_ITERATIONS_MATRIX) -> float:
    """Guaranteed upper bound on ‖W‖₂ of a (m, n) matrix: Gram iteration in float64, rounding slack."""
    w = weight.detach().double()
    slack = _rounding_slack(max(w.shape), min(w.shape))
    return gram_norm_bound(w, iterations).item() * slack


def matrix_norm_estimate(weight: torch.Tensor) -> float:
    """‖W‖₂ by SVD: exact up to rounding, in either direction."""
    return torch.linalg.matrix_norm(weight.detach(), ord=2).item()


def conv_output_shape(weight: torch.Tensor, shape, stride, padding) -> tuple[int, int, int]:
    """(C_out, H_out, W_out) of conv2d(x, weight, stride, padding) on inputs of shape (C, H, W)."""
    sizes = ((size + 2 * p - k) // s + 1 for size, s, p, k in zip(shape[1:], stride, padding, weight.shape[2:]))
    return (weight.shape[0], *sizes)


def conv_norm_bound(weight: torch.Tensor, shape, stride, padding, groups: int = 1,
                    iterations: int = GRAM_ITERATIONS_CONV) -> tuple[float, tuple]:
    """Guaranteed upper bound on the L2 operator norm of x -> conv2d(x, weight, stride, padding, groups)
    on inputs of shape (C, H, W), by the argument of the module docstring. Returns (bound, output shape)."""
    w = weight.detach().double()
    c_out, c_in, kh, kw = w.shape
    (sh, sw), (ph, pw) = stride, padding
    # Polyphase kernel (c_out, c_in·sh·sw, ⌈kh/sh⌉, ⌈kw/sw⌉): taps zero-filled up to multiples of s.
    th, tw = -(-kh // sh), -(-kw // sw)
    w = F.pad(w, (0, tw * sw - kw, 0, th * sh - kh))
    w = w.view(c_out, c_in, th, sh, tw, sw).permute(0, 1, 3, 5, 2, 4).reshape(c_out, c_in * sh * sw, th, tw)
    # The polyphase grid of the padded input, at least as large as the kernel.
    grid = (max(-(-(shape[1] + 2 * ph) // sh), th), max(-(-(shape[2] + 2 * pw) // sw), tw))
    spectrum = torch.fft.rfft2(w, s=grid)  # (c_out, c_in', N, N//2 + 1), complex128
    per_group = spectrum.view(groups, c_out // groups, *spectrum.shape[1:])
    matrices = per_group.permute(0, 3, 4, 1, 2)  # (groups, N, N//2 + 1, c_out/g, c_in')
    bound = gram_norm_bound(matrices, iterations).max().item()
    slack = _rounding_slack(max(matrices.shape[-2:]), min(matrices.shape[-2:]), max(grid))
    return bound * slack, conv_output_shape(weight, shape, stride, padding)


def conv_adjoint(u: torch.Tensor, weight: torch.Tensor, shape, stride, padding, groups: int = 1) -> torch.Tensor:
    """The adjoint of x -> conv2d(x, weight, stride, padding, groups) on inputs of shape (C, H, W), applied
    to u (B, C_out, H_out, W_out): conv_transpose2d with the output padding that restores (H, W), which a
    strided convolution rounds away."""
    output_padding = tuple(size - ((out - 1) * s - 2 * p + k) for size, out, s, p, k in
                           zip(shape[-2:], u.shape[2:], stride, padding, weight.shape[2:]))
    return F.conv_transpose2d(u, weight, stride=stride, padding=padding, output_padding=output_padding,
                              groups=groups)


def conv_norm_estimate(weight: torch.Tensor, shape, stride, padding, groups: int = 1,
                       iterations: int = POWER_ITERATIONS) -> tuple[float, tuple]:
    """Spectral norm of x -> conv2d(x, weight) on inputs of shape (C, H, W), by seeded power iteration.

    The adjoint is conv_transpose2d with the output padding that restores (H, W), so strides and zero
    padding are those of the real layer. Returns (norm estimate, output shape); the estimate is a lower
    bound that converges to the norm: an estimate, not a bound.
    """
    generator = torch.Generator(device=weight.device).manual_seed(0)
    v = torch.randn(1, *shape, generator=generator, device=weight.device, dtype=weight.dtype)
    for _ in range(iterations):
        v = v / v.norm()
        u = F.conv2d(v, weight, stride=stride, padding=padding, groups=groups)
        v = conv_adjoint(u, weight, shape, stride, padding, groups)
    v = v / v.norm()
    u = F.conv2d(v, weight, stride=stride, padding=padding, groups=groups)
    return u.norm().item(), tuple(u.shape[1:])


class NormMethod(NamedTuple):
    """How one product rates a layer: conv(weight, shape, stride, padding, groups) -> (norm, out shape)
    and matrix(weight) -> norm; float64: whether they get the folded weights in float64 (else in the
    layer's own dtype) and whether the figures are bounds by theorem (else estimates)."""
    conv: Callable
    matrix: Callable
    float64: bool


BOUND = NormMethod(conv=conv_norm_bound, matrix=matrix_norm_bound, float64=True)
ESTIMATE = NormMethod(conv=lambda *args: _scaled(POWER_SAFETY, *conv_norm_estimate(*args)),
                      matrix=matrix_norm_estimate, float64=False)


def _scaled(factor: float, norm: float, shape: tuple) -> tuple[float, tuple]:
    return factor * norm, shape


# ----------------------------------------------------------------------------------------------------
# Products of layer norms, walked over the model's known block types. Each rule takes (module, input
# shape without batch, NormMethod) and returns (L2 operator-norm bound, output shape).


def layer_norm_bound(model: nn.Module, input_shape=None) -> float:
    """Guaranteed upper bound on the L2 Lipschitz constant of the logits (eval mode): the product of
    the layers' guaranteed norm bounds; a residual block is bounded by shortcut + branch, every
    ``Nonlinearity`` is 1-Lipschitz. ``input_shape`` (C, H, W) defaults to ``model.input_shape``."""
    return _product(model, input_shape, BOUND)


def layer_norm_estimate(model: nn.Module, input_shape=None) -> float:
    """The same product with per-layer estimates: convolutions by power iteration times
    ``POWER_SAFETY``, linear layers by SVD. Cheap and usually close, but not a bound by theorem."""
    return _product(model, input_shape, ESTIMATE)


def _product(model: nn.Module, input_shape, norms: NormMethod) -> float:
    shape = tuple(model.input_shape if input_shape is None else input_shape)
    with torch.no_grad(), eval_mode(model):
        bound, _ = _lipschitz(model, shape, norms)
    return bound


@singledispatch
def _lipschitz(module: nn.Module, shape, norms: NormMethod):
    raise TypeError(f"the layer-norm product has no rule for {type(module).__name__}; build models from "
                    "the blocks in tulip.nn.models")


# How a module that defines a layer adds its rule: @lipschitz_rule def _(layer: MyLayer, shape, norms): ...
# (tulip.nn.one_lipschitz does, so that each of its layers and its bound are in one place).
lipschitz_rule = _lipschitz.register


@_lipschitz.register
def _(module: nn.Sequential, shape, norms):
    bound = 1.0
    for child in module:
        child_bound, shape = _lipschitz(child, shape, norms)
        bound *= child_bound
    return bound, shape


@_lipschitz.register
def _(module: Residual, shape, norms):
    branch, out_shape = _lipschitz(module.branch, shape, norms)
    shortcut, _ = _lipschitz(module.shortcut, shape, norms)
    return branch + shortcut, out_shape


@_lipschitz.register(Nonlinearity)
@_lipschitz.register(nn.ReLU)
@_lipschitz.register(nn.Identity)
def _(module, shape, norms):
    return 1.0, shape


@_lipschitz.register
def _(module: nn.Flatten, shape, norms):
    return 1.0, (math.prod(shape),)


@_lipschitz.register
def _(module: GlobalAvgPool, shape, norms):
    channels, height, width = shape
    return 1.0 / math.sqrt(height * width), (channels,)


@_lipschitz.register
def _(module: BranchMean, shape, norms):
    channels, height, width = shape
    return 1.0 / math.sqrt(module.branches), (channels // module.branches, height, width)


@_lipschitz.register
def _(module: nn.AvgPool2d, shape, norms):
    # Non-overlapping k x k windows: each output averages k^2 inputs no other output sees -> norm 1/k.
    kernel, stride = module.kernel_size, module.stride
    if not (isinstance(kernel, int) and stride == kernel and module.padding == 0):
        raise TypeError(f"the layer-norm product handles only non-overlapping AvgPool2d, got {module}")
    channels, height, width = shape
    return 1.0 / kernel, (channels, height // kernel, width // kernel)


def batch_norm_scale(bn: nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """Per-channel multiplier of eval-mode BatchNorm, in float64: gamma / sqrt(running_var + eps)."""
    scale = torch.rsqrt(bn.running_var.double() + bn.eps)
    return scale * bn.weight.double() if bn.affine else scale


@_lipschitz.register
def _(module: nn.BatchNorm1d, shape, norms):
    return batch_norm_scale(module).abs().max().item(), shape


@_lipschitz.register
def _(module: nn.Linear, shape, norms):
    return norms.matrix(module.weight), (module.out_features,)


@_lipschitz.register
def _(module: DenseBN, shape, norms):
    weight = module.linear.weight.double() * batch_norm_scale(module.bn)[:, None]
    return norms.matrix(_in_dtype(weight, module.linear.weight, norms)), (module.linear.out_features,)


def _in_dtype(folded: torch.Tensor, original: torch.Tensor, norms: NormMethod) -> torch.Tensor:
    return folded if norms.float64 else folded.to(original.dtype)


def _conv_rule(conv: nn.Conv2d, scale: torch.Tensor | None, shape, norms):
    if conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        raise TypeError(f"the layer-norm product handles zero-padded, undilated convolutions, got {conv}")
    weight = conv.weight.double() if scale is None else conv.weight.double() * scale[:, None, None, None]
    return norms.conv(_in_dtype(weight, conv.weight, norms), shape, conv.stride, conv.padding, conv.groups)


@_lipschitz.register
def _(module: nn.Conv2d, shape, norms):
    return _conv_rule(module, None, shape, norms)


@_lipschitz.register
def _(module: ConvBN, shape, norms):
    return _conv_rule(module.conv, batch_norm_scale(module.bn) if "bn" in module._modules else None,
                      shape, norms)


# ----------------------------------------------------------------------------------------------------
# The last linear layer, for the pairwise certificate


class LastLayer(NamedTuple):
    """logits_c = head_c(w_c · φ(x) + b_c): a feature map φ, the rows w_c of the last linear map, and
    the bounded head's per-class BatchNorm scales s_c (None without head; the head is then
    t·tanh(s_c·(z − μ_c)/|t|), whose derivative lies between 0 and sign(t)·s_c)."""
    feature_bound: float  # guaranteed L2 Lipschitz bound of φ
    weight: torch.Tensor  # (C, d) float64, BatchNorm folded in
    head_scale: torch.Tensor | None  # (C,) float64


def last_layer(model: nn.Module, input_shape=None) -> LastLayer | None:
    """Split a Sequential model before its last linear map; None when it does not end in one.

    The last linear map is an ``nn.Linear`` or ``DenseBN``, or — All-CNN's head — a 1×1, stride-1,
    unpadded ``ConvBN`` followed by ``GlobalAvgPool``: the two commute (the mean over positions of
    W·a(p) + b is W·mean_p a(p) + b), so φ = pool ∘ trunk and W is the 1×1 kernel. An optional
    ``BoundedHead`` may follow.
    """
    children = list(model.children()) if isinstance(model, nn.Sequential) else []
    head_scale = None
    if children and isinstance(children[-1], BoundedHead):
        head = children.pop()
        if not (len(head) == 2 and isinstance(head.norm, nn.BatchNorm1d) and isinstance(head.squash, ScaledTanh)):
            return None
        head_scale = batch_norm_scale(head.norm)
    if not children:
        return None
    last = children[-1]
    if isinstance(last, nn.Linear):
        weight, features = last.weight.double(), children[:-1]
    elif isinstance(last, DenseBN):
        weight = last.linear.weight.double() * batch_norm_scale(last.bn)[:, None]
        features = children[:-1]
    elif (isinstance(last, GlobalAvgPool) and len(children) > 1 and isinstance(children[-2], ConvBN)
          and _is_pointwise(children[-2].conv)):
        conv = children[-2]
        weight = conv.conv.weight.double()[:, :, 0, 0]
        if "bn" in conv._modules:
            weight = weight * batch_norm_scale(conv.bn)[:, None]
        features = children[:-2] + [last]
    else:
        return None
    shape = tuple(model.input_shape if input_shape is None else input_shape)
    with torch.no_grad(), eval_mode(model):
        bound, _ = _lipschitz(nn.Sequential(*features), shape, BOUND)
    return LastLayer(bound, weight.detach(), None if head_scale is None else head_scale.detach())


def _is_pointwise(conv: nn.Conv2d) -> bool:
    return (conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.padding == (0, 0)
            and conv.groups == 1 and conv.dilation == (1, 1))
