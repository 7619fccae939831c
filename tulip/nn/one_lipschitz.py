"""1-Lipschitz layers by construction, each 1-Lipschitz in L2 whatever its parameters, and the models
built from them (``AOL4C3F``, ``SLLNet``: conf/model/aol_4c3f.yaml, sll.yaml). Nothing here
is *assumed* by the certificate: tulip.nn.lipschitz bounds each layer from its actual weights (in
float64, by theorem), and the tests check that the bound is at most 1 plus rounding.

Both layers rest on one inequality. For a linear map A and a positive vector q, the diagonal matrix

    T_ii = Σ_j |(A Aᵀ)_ij| q_j / q_i

satisfies T ⪰ A Aᵀ (Gershgorin's theorem applied to Q⁻¹(T − A Aᵀ)Q, Q = diag(q)), so ‖T^(-1/2) A‖₂ ≤ 1.
For a convolution A with kernel w (out, in, k, k), A Aᵀ is again a convolution, whose kernel is the
autocorrelation of w over its input channels and taps, (out, out, 2k−1, 2k−1) (``gram_kernel``). A
stride-1 convolution on a finite image with zero padding is a restriction of the circular one, whose
Gram matrix has those entries (or sums of them, on grids smaller than the kernel's), so the same T works.

Each layer's bound (the rules for tulip.nn.lipschitz after the layers) is the smaller of two
bounds by theorem, computed in float64: the Gram-iteration bound every layer gets, and the (weighted)
Gershgorin bound ‖A‖₂² ≤ max_i Σ_j |(A Aᵀ)_ij| q_j / q_i, which is what the construction makes 1. Gram
iteration alone would not show it: on a map whose singular values are all 1 (an orthogonal one, as the
layers start) it exceeds the norm by up to rank^(1/2^(t+1)): 0.7 % for a 3x3 conv from 32 to 64 channels.

Shapes: conv layers take and return (B, C, H, W) (stride 1, 'same' padding, odd kernels); dense layers
(B, d).
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from tulip.nn.lipschitz import NormMethod, _in_dtype, _rounding_slack, lipschitz_rule
from tulip.nn.models import Classifier, TwoWidths
from tulip.nn.nonlinearities import MinMax, ReLU
from tulip.schema import Count, Switch, Target, check_init


def gram_kernel(weight: torch.Tensor) -> torch.Tensor:
    """The kernel of A Aᵀ for the convolution A of `weight` (out, in, k, k): (out, out, 2k−1, 2k−1).

    G[i, j, s] = Σ_c Σ_u w[i, c, u] w[j, c, u + s]: the cross-correlation of every pair of filters,
    which is conv2d with the filters as a batch of `out` images of `in` channels."""
    k = weight.shape[-2:]
    return F.conv2d(weight, weight, padding=(k[0] - 1, k[1] - 1))


def gershgorin_scale(weight: torch.Tensor, log_q: torch.Tensor | None = None) -> torch.Tensor:
    """T (out,) of the module docstring for the convolution (or, with 1x1 kernels, the matrix) `weight`
    (out, in, k, k): T_i = Σ_j Σ_s |G[i, j, s]| q_j / q_i, with q = exp(log_q) (all ones without)."""
    row_sums = gram_kernel(weight).abs().sum(dim=(2, 3))  # (out, out)
    if log_q is None:
        return row_sums.sum(1)
    q = log_q.exp()
    return (row_sums * q[None, :]).sum(1) / q


def _dense_as_conv(weight: torch.Tensor) -> torch.Tensor:
    return weight[:, :, None, None]


class OneLipschitz(nn.Module):
    """Base of the layers here: 1-Lipschitz in L2 for every value of their parameters."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_init(cls, "model")


class AOLConv2d(OneLipschitz):
    """Almost-Orthogonal-Lipschitz convolution (Prach & Lampert, "Almost-Orthogonal Layers for Efficient
    General-Purpose Lipschitz Networks", ECCV 2022, arXiv 2208.03160).

    conv2d(x, w·D) + b with D = diag(d), d_c = (Σ_j Σ_s |(wᵀ ⋆ w)[c, j, s]|)^(-1/2): the rescaling of the
    input channels for which ‖A D‖₂ ≤ 1 (the module docstring's T for Aᵀ, whose Gram matrix is Aᵀ A); a
    narrowing layer rescales its output channels instead (``aol_conv``). Stride 1, 'same' zero padding, odd
    kernel sizes. Bound: ‖conv(w·D)‖₂ ≤ 1.
    """

    def __init__(self, in_channels: Count, out_channels: Count, kernel_size: Count = 3):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"AOLConv2d needs an odd kernel_size ('same' padding), got {kernel_size}")
        self.weight = nn.Parameter(torch.zeros(out_channels, in_channels, kernel_size, kernel_size))
        # As the paper: an orthogonal centre tap and no other, so that the layer starts as a (semi-)orthogonal
        # map that AOL leaves unscaled, not as a random one that it would shrink (a deep chain of those
        # starts with vanishing logits and trains slowly)
        nn.init.orthogonal_(self.weight[:, :, kernel_size // 2, kernel_size // 2])
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.padding = kernel_size // 2

    def rescaled_weight(self) -> torch.Tensor:
        """w·D (out, in, k, k): the kernel the layer applies."""
        return aol_conv(self.weight)

    def forward(self, x):
        return F.conv2d(x, self.rescaled_weight(), self.bias, padding=self.padding)


class AOLLinear(OneLipschitz):
    """The dense AOL layer (Prach & Lampert, ECCV 2022): x -> W D x + b, d_i = (Σ_j |WᵀW|_ij)^(-1/2).

    When the layer narrows (out < in) the rows are rescaled instead, D W with D from |W Wᵀ|: the same
    bound for Wᵀ, at a cost of out²·in per step rather than in²·out (a 3136 -> 512 layer: 6x less).
    Bound: ‖W D‖₂ ≤ 1 (‖D W‖₂ ≤ 1)."""

    def __init__(self, in_features: Count, out_features: Count):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.orthogonal_(self.weight)  # a (semi-)orthogonal start, as AOLConv2d's
        self.bias = nn.Parameter(torch.zeros(out_features))

    def rescaled_weight(self) -> torch.Tensor:
        return aol_dense(self.weight)

    def forward(self, x):
        return F.linear(x, self.rescaled_weight(), self.bias)


def aol_dense(weight: torch.Tensor) -> torch.Tensor:
    """AOLLinear's rescaled matrix of `weight` (out, in), in its dtype."""
    out_features, in_features = weight.shape
    if out_features < in_features:
        return weight * gershgorin_scale(_dense_as_conv(weight)).clamp_min(1e-12).rsqrt()[:, None]
    return weight * gershgorin_scale(_dense_as_conv(weight.t())).clamp_min(1e-12).rsqrt()[None, :]


def aol_conv(weight: torch.Tensor) -> torch.Tensor:
    """AOLConv2d's rescaled kernel of `weight` (out, in, k, k), in its dtype: its input channels rescaled
    (T of Aᵀ, whose Gram matrix is AᵀA), or, when the layer narrows (out < in), its output channels, as
    AOLLinear does: the Gram kernel costs out²·in rather than in²·out (4x less for 256 -> 64 channels)."""
    if weight.shape[0] < weight.shape[1]:
        return weight * gershgorin_scale(weight).clamp_min(1e-12).rsqrt()[:, None, None, None]
    input_side = gershgorin_scale(weight.transpose(0, 1))  # (in,)
    return weight * input_side.clamp_min(1e-12).rsqrt()[None, :, None, None]


class SLLConv2d(OneLipschitz):
    """SDP-based Lipschitz Layer, convolutional (Araujo, Havens, Delattre, Allauzen & Hu, "A Unified
    Algebraic Perspective on Lipschitz Neural Networks", ICLR 2023, arXiv 2303.03169).

    A residual layer x -> x − 2 Aᵀ T⁻¹ ReLU(A x + b) with A = conv(w): (C, H, W) -> (inner, H, W) and
    T = diag(Σ_j |(A Aᵀ)_ij| q_j / q_i) over the inner channels (q learnable). Its Jacobian is
    I − 2 Vᵀ Λ V with V = T^(-1/2) A and Λ = diag(ReLU') ∈ [0, 1], so its norm is at most
    max(1, 2‖V‖₂² − 1) = 1 as ‖V‖₂ ≤ 1. Keeps the shape (B, C, H, W). Stride 1, odd kernels.
    """

    def __init__(self, channels: Count, inner_channels: Count, kernel_size: Count = 3):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"SLLConv2d needs an odd kernel_size ('same' padding), got {kernel_size}")
        self.weight = nn.Parameter(torch.empty(inner_channels, channels, kernel_size, kernel_size))
        nn.init.kaiming_normal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(inner_channels))
        self.log_q = nn.Parameter(torch.zeros(inner_channels))
        self.padding = kernel_size // 2
        self.activation = ReLU()  # a Nonlinearity: the layer linearizes to x - 2 Aᵀ T⁻¹ (A x + b)

    def inner_scale_of(self, weight: torch.Tensor) -> torch.Tensor:
        """T (inner,) for `weight` (this layer's, in any dtype)."""
        return gershgorin_scale(weight, self.log_q.to(weight.dtype)).clamp_min(1e-12)

    def forward(self, x):
        z = self.activation(F.conv2d(x, self.weight, self.bias, padding=self.padding))  # (B, inner, H, W)
        z = z * (2.0 / self.inner_scale_of(self.weight))[None, :, None, None]
        # conv_transpose2d with the same stride-1 'same' padding is the adjoint Aᵀ
        return x - F.conv_transpose2d(z, self.weight, padding=self.padding)


class SLLLinear(OneLipschitz):
    """The dense SLL layer (Araujo et al., ICLR 2023): x -> x − 2 Wᵀ T⁻¹ ReLU(W x + b), W (inner, d),
    T = diag(Σ_j |W Wᵀ|_ij q_j / q_i). Bound: max(1, 2‖T^(-1/2) W‖₂² − 1) = 1. Keeps the shape (B, d)."""

    def __init__(self, features: Count, inner_features: Count):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(inner_features, features))
        nn.init.kaiming_normal_(self.weight)
        self.bias = nn.Parameter(torch.zeros(inner_features))
        self.log_q = nn.Parameter(torch.zeros(inner_features))
        self.activation = ReLU()

    def inner_scale_of(self, weight: torch.Tensor) -> torch.Tensor:
        """T (inner,) for `weight` (this layer's, in any dtype)."""
        return gershgorin_scale(_dense_as_conv(weight), self.log_q.to(weight.dtype)).clamp_min(1e-12)

    def forward(self, x):
        z = self.activation(F.linear(x, self.weight, self.bias)) * (2.0 / self.inner_scale_of(self.weight))[None, :]
        return x - F.linear(z, self.weight.t())


# --- their bounds ----------------------------------------------------------------------------------

def gershgorin_norm_bound(weight: torch.Tensor, log_q: torch.Tensor | None = None) -> float:
    """‖A‖₂ ≤ (max_i Σ_j Σ_s |G[i, j, s]| q_j / q_i)^(1/2) for the convolution A of `weight` (out, in, k, k)
    (float64), G its Gram kernel: Gershgorin's theorem for Q⁻¹ A Aᵀ Q, on the circular convolution that
    every zero-padded one restricts (module docstring). Includes a rounding slack."""
    out, _, kh, kw = weight.shape
    slack = _rounding_slack(weight[0].numel() * (2 * kh - 1) * (2 * kw - 1) * out, 1)
    return gershgorin_scale(weight, log_q).max().sqrt().item() * slack


def _smaller(gram: float, gershgorin: float, norms: NormMethod) -> float:
    return min(gram, gershgorin) if norms.float64 else gram  # estimates stay power iteration's / SVD's


@lipschitz_rule
def _(module: AOLConv2d, shape, norms: NormMethod):
    weight = aol_conv(module.weight.double())
    gram, out_shape = norms.conv(_in_dtype(weight, module.weight, norms), shape, (1, 1), (module.padding,) * 2, 1)
    # Gershgorin on either Gram matrix bounds ‖A‖ = ‖Aᵀ‖: on the rescaled side's, which AOL made 1
    rescaled_side = weight if weight.shape[0] < weight.shape[1] else weight.transpose(0, 1)
    return _smaller(gram, gershgorin_norm_bound(rescaled_side), norms), out_shape


@lipschitz_rule
def _(module: AOLLinear, shape, norms: NormMethod):
    weight = aol_dense(module.weight.double())
    rescaled_side = weight if weight.shape[0] < weight.shape[1] else weight.t()  # as aol_dense chose
    gershgorin = gershgorin_norm_bound(_dense_as_conv(rescaled_side))
    return _smaller(norms.matrix(_in_dtype(weight, module.weight, norms)), gershgorin, norms), (weight.shape[0],)


@lipschitz_rule(SLLConv2d)
@lipschitz_rule(SLLLinear)
def _(module, shape, norms: NormMethod):
    """x − 2 Aᵀ T⁻¹ σ(A x + b), σ' ∈ [0, 1]: the Jacobian I − 2 Vᵀ Λ V (V = T^(-1/2) A) is symmetric with
    eigenvalues in [1 − 2‖V‖², 1], so its norm is at most max(1, 2‖V‖² − 1). Gershgorin on V Vᵀ with the
    weights q·√T gives Σ_j |(A Aᵀ)_ij| q_j / (q_i T_i), which T makes 1."""
    weight = module.weight.double()
    scale = module.inner_scale_of(weight)  # T
    scaled = weight * scale.rsqrt().view(-1, *[1] * (weight.dim() - 1))  # V
    as_conv = scaled if weight.dim() == 4 else _dense_as_conv(scaled)
    gram = (norms.matrix(_in_dtype(scaled, module.weight, norms)) if weight.dim() == 2 else
            norms.conv(_in_dtype(scaled, module.weight, norms), shape, (1, 1), (module.padding,) * 2, 1)[0])
    inner = _smaller(gram, gershgorin_norm_bound(as_conv, module.log_q.double() + 0.5 * scale.log()), norms)
    return max(1.0, 2.0 * inner ** 2 - 1.0), shape


@lipschitz_rule
def _(module: nn.PixelUnshuffle, shape, norms: NormMethod):  # a permutation of the pixels into channels
    r = module.downscale_factor
    channels, height, width = shape
    return 1.0, (channels * r * r, height // r, width // r)


# ----------------------------------------------------------------------------------------------------
# Models


class AOL4C3F(Classifier):
    """GloRo's 4C3F made 1-Lipschitz by construction, from AOL layers (Prach & Lampert, ECCV 2022,
    tulip.nn.one_lipschitz): certification without a penalty on the constant.

    3x3 AOL conv c1 -> [pixel unshuffle -> 3x3 AOL conv c1] -> 3x3 AOL conv c2 -> [pixel unshuffle ->
    3x3 AOL conv c2] (each + activation) -> flatten -> [AOL dense(hidden) -> activation] x 2 -> Linear.
    4C3F's strided 4x4 convolutions become a pixel unshuffle (a permutation of the pixels: an isometry
    that halves the image and quadruples the channels) and a stride-1 convolution, with the same output
    shapes (28 -> 14 -> 7 on MNIST). The last layer is an unconstrained Linear, which the pairwise
    certificate handles (its rows' differences set each pair's margin). Defaults c = (32, 64), hidden
    512, MinMax activations.
    """

    def __init__(self, in_channels, num_classes, image_size, tanh: Switch = False, channels: TwoWidths = (32, 64),
                 hidden: Count = 512, activation: Target = MinMax):
        _check_divisible(image_size, 4)
        (c1, c2), layers, width = channels, OrderedDict(), in_channels
        for i, (out, downsample) in enumerate([(c1, False), (c1, True), (c2, False), (c2, True)]):
            if downsample:
                layers[f"down{i}"], width = nn.PixelUnshuffle(2), 4 * width
            layers[f"conv{i}"], layers[f"act{i}"], width = AOLConv2d(width, out), activation(), out
        layers["flatten"] = nn.Flatten()
        width *= (image_size // 4) ** 2
        for i in range(2):
            layers[f"dense{i}"], layers[f"act_dense{i}"], width = AOLLinear(width, hidden), activation(), hidden
        layers["classifier"] = nn.Linear(width, num_classes)
        super().__init__(layers, in_channels, num_classes, image_size, tanh)


class SLLNet(Classifier):
    """A deeper network that is 1-Lipschitz by construction: residual SLL layers (Araujo et al.,
    ICLR 2023) between AOL layers that change the width (tulip.nn.one_lipschitz).

    3x3 AOL conv c1 -> activation -> ``blocks`` x SLL conv (c1) -> pixel unshuffle -> 3x3 AOL conv c2 ->
    activation -> ``blocks`` x SLL conv (c2) -> pixel unshuffle -> 3x3 AOL conv c2 -> activation -> flatten
    -> AOL dense(hidden) -> activation -> ``blocks`` x SLL dense (hidden) -> Linear. Defaults c = (32, 64),
    blocks 3 (3 + 3·3 + 2 = 14 layers with weights), hidden 512, MinMax activations.
    """

    def __init__(self, in_channels, num_classes, image_size, tanh: Switch = False, channels: TwoWidths = (32, 64),
                 blocks: Count = 3, hidden: Count = 512, activation: Target = MinMax):
        _check_divisible(image_size, 4)
        (c1, c2), layers, width = channels, OrderedDict(), in_channels
        for stage, out in enumerate((c1, c2)):
            layers[f"conv{stage}"], layers[f"act{stage}"], width = AOLConv2d(width, out), activation(), out
            for i in range(blocks):
                layers[f"stage{stage}_block{i}"] = SLLConv2d(out, out)
            layers[f"down{stage}"], width = nn.PixelUnshuffle(2), 4 * out
        layers["conv2"], layers["act2"], width = AOLConv2d(width, c2), activation(), c2
        layers["flatten"] = nn.Flatten()
        width *= (image_size // 4) ** 2
        layers["dense"], layers["act_dense"] = AOLLinear(width, hidden), activation()
        for i in range(blocks):
            layers[f"dense_block{i}"] = SLLLinear(hidden, hidden)
        layers["classifier"] = nn.Linear(hidden, num_classes)
        super().__init__(layers, in_channels, num_classes, image_size, tanh)


def _check_divisible(image_size: int, factor: int) -> None:
    if image_size % factor:
        raise ValueError(f"this model halves the image twice with a pixel unshuffle: image_size must be a "
                         f"multiple of {factor}, got {image_size}")
