"""Image classifiers for Tulip, built so that they can be measured the way the paper does.

Finlay, Oberman & Abbasi (arXiv 1810.00953) report, for every trained network, statistics of its
*linearization* (every nonlinearity replaced by the identity, BatchNorm in eval mode) and of its layers'
operator norms. Three design rules make that clean for every model here:

* every nonlinearity is a ``Nonlinearity`` module (``ReLU``, ``MinMax``, ``ScaledTanh``; the SLL layers'
  inner ReLU too), so ``linearized(model)``
  can switch each one to its linearization without knowing the architecture;
* no max-pooling: downsampling is a strided convolution or an average pool, both linear, so the
  linearized network is one well-defined affine map x -> M x + b;
* every model is a ``Classifier``: an ``nn.Sequential`` of a few known block types (``ConvBN``,
  ``DenseBN``, ``Residual``, ``BranchMean``, ``GlobalAvgPool``, ``nn.AvgPool2d``, ``nn.Flatten``,
  ``nn.Linear``, the bounded head), which ``tulip.nn.lipschitz.layer_norm_bound`` walks to bound the
  Lipschitz constant.

Every constructor has the signature ``(in_channels, num_classes, image_size, tanh=False, **hyper)``, its
hyper-parameters typed with tulip.schema's types (their schema: checked before training and on every
construction, naming ``model.<argument>``), and is built by
``hydra.utils.instantiate(cfg.model, in_channels=..., num_classes=..., image_size=...)`` from
``conf/model/*.yaml``. Inputs are (B, in_channels, image_size, image_size); outputs (B, num_classes).
"""
from collections import OrderedDict
from contextlib import contextmanager
from typing import Annotated, Iterator

import torch
from torch import nn

from tulip.nn.nonlinearities import Nonlinearity, ReLU
from tulip.schema import Count, PositiveInts, Rule, Switch, Target, check_init, integer_in, is_int, list_of


# ----------------------------------------------------------------------------------------------------
# Nonlinearities and their linearizations


class ScaledTanh(Nonlinearity):
    """t * tanh(z / |t|) with a learnable scalar t (initialised to 1), the original's ``--tanh`` head.

    Its derivative t/|t| * sech^2(z/|t|) has magnitude <= 1, so it is 1-Lipschitz; its linearization
    at z = 0 is sign(t) * z.
    """

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def nonlinear(self, z):
        return self.scale * torch.tanh(z / self.scale.abs())

    def linearization(self, z):
        return torch.sign(self.scale) * z


class BoundedHead(nn.Sequential):
    """logits -> BatchNorm1d(C, affine=False) -> t * tanh(z / |t|)  (``model.tanh=true``)."""

    def __init__(self, num_classes: int):
        super().__init__(OrderedDict(norm=nn.BatchNorm1d(num_classes, affine=False), squash=ScaledTanh()))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode inside the block; on exit, also after an error, every module gets back its own
    train/eval flag (a model may hold frozen eval-mode parts inside a training one)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


@contextmanager
def linearized(model: nn.Module):
    """Within the block, ``model`` is its linearization: an affine map x -> M x + b.

    Every ``Nonlinearity`` is replaced by its linearization (ReLU -> identity, the bounded head's
    t*tanh(z/|t|) -> sign(t)*z) and every module is in eval mode, so BatchNorm is the fixed affine map
    of its running statistics. Flags and train/eval modes are restored on exit, also after an error.
    """
    nonlinearities = [module for module in model.modules() if isinstance(module, Nonlinearity)]
    with eval_mode(model):
        for module in nonlinearities:
            module.linear = True
        try:
            yield model
        finally:
            for module in nonlinearities:
                module.linear = False


# ----------------------------------------------------------------------------------------------------
# Linear building blocks (each one is affine in eval mode)


class ConvBN(nn.Sequential):
    """Conv2d followed by BatchNorm2d (no conv bias: BN has one); ``batch_norm=False`` keeps the bias."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=None, groups=1,
                 batch_norm=True):
        padding = kernel_size // 2 if padding is None else padding
        layers = OrderedDict(conv=nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding,
                                            groups=groups, bias=not batch_norm))
        if batch_norm:
            layers["bn"] = nn.BatchNorm2d(out_channels)
        super().__init__(layers)


class DenseBN(nn.Sequential):
    """Linear followed by BatchNorm1d (no linear bias: BN has one)."""

    def __init__(self, in_features, out_features):
        super().__init__(OrderedDict(linear=nn.Linear(in_features, out_features, bias=False),
                                     bn=nn.BatchNorm1d(out_features)))


class Residual(nn.Module):
    """branch(x) + shortcut(x); a Lipschitz bound is Lip(branch) + Lip(shortcut)."""

    def __init__(self, branch: nn.Module, shortcut: nn.Module):
        super().__init__()
        self.branch = branch
        self.shortcut = shortcut

    def forward(self, x):
        return self.branch(x) + self.shortcut(x)


class BranchMean(nn.Module):
    """Mean of ``branches`` equal channel groups: (B, b*C, H, W) -> (B, C, H, W). Operator norm 1/sqrt(b)."""

    def __init__(self, branches: int):
        super().__init__()
        self.branches = branches

    def forward(self, x):
        batch, channels, height, width = x.shape
        return x.view(batch, self.branches, channels // self.branches, height, width).mean(1)


class GlobalAvgPool(nn.Module):
    """(B, C, H, W) -> (B, C), the mean over positions. Operator norm 1/sqrt(H*W)."""

    def forward(self, x):
        return x.mean(dim=(2, 3))


# ----------------------------------------------------------------------------------------------------
# Models


def _conv_out(size: int, kernel_size: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel_size) // stride + 1


Widths = Annotated[list, list_of(integer_in(1), "a list of integers >= 1 (empty: a linear model)")]
TwoWidths = Annotated[list, list_of(integer_in(1), "two integers >= 1, e.g. [32, 64]", size=2)]
WideResNetDepth = Annotated[int, Rule("6n + 4 with n >= 1 (10, 16, 22, 28, ...)",
                                      lambda v: is_int(v) and v >= 10 and (v - 4) % 6 == 0)]


class Classifier(nn.Sequential):
    """Base of every Tulip model: a named sequence of blocks, plus the optional bounded head.

    ``input_shape`` (C, S, S) is kept so measures can build the layer operators; ``tanh_scale`` is the
    head's t, or None without the head.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_init(cls, "model")

    def __init__(self, layers: OrderedDict, in_channels: int, num_classes: int, image_size: int, tanh: bool):
        if tanh:
            layers["bounded_head"] = BoundedHead(num_classes)
        super().__init__(layers)
        self.input_shape = (in_channels, image_size, image_size)
        self.num_classes = num_classes

    @property
    def tanh_scale(self) -> torch.Tensor | None:
        return self.bounded_head.squash.scale if "bounded_head" in self._modules else None


class MLP(Classifier):
    """Fully connected net: flatten -> [Linear -> BN -> ReLU] per entry of ``hidden`` -> Linear.

    ``hidden=[]`` is a linear (softmax regression) model.
    """

    def __init__(self, in_channels, num_classes, image_size, tanh: Switch = False, hidden: Widths = (512, 512)):
        layers = OrderedDict(flatten=nn.Flatten())
        width = in_channels * image_size * image_size
        for i, out in enumerate(hidden):
            layers[f"dense{i}"] = DenseBN(width, out)
            layers[f"act{i}"] = ReLU()
            width = out
        layers["classifier"] = nn.Linear(width, num_classes)
        super().__init__(layers, in_channels, num_classes, image_size, tanh)


class CNNSmall(Classifier):
    """LeNet-like net for 28x28 digits (LeCun et al. 1998), max-pooling replaced by stride 2.

    [5x5 conv, stride 2 -> BN -> ReLU] per entry of ``channels`` -> flatten -> Linear(hidden) -> BN ->
    ReLU -> Linear. Defaults: channels (32, 64), hidden 256: 28x28 -> 14x14 -> 7x7.
    """

    def __init__(self, in_channels, num_classes, image_size, tanh: Switch = False, channels: PositiveInts = (32, 64),
                 hidden: Count = 256):
        layers = OrderedDict()
        size, width = image_size, in_channels
        for i, out in enumerate(channels):
            layers[f"conv{i}"] = ConvBN(width, out, kernel_size=5, stride=2, padding=2)
            layers[f"act{i}"] = ReLU()
            size, width = _conv_out(size, 5, 2, 2), out
        layers["flatten"] = nn.Flatten()
        layers["dense"] = DenseBN(width * size * size, hidden)
        layers["act_dense"] = ReLU()
        layers["classifier"] = nn.Linear(hidden, num_classes)
        super().__init__(layers, in_channels, num_classes, image_size, tanh)


class CNN4C3F(Classifier):
    """GloRo's 4C3F (Leino, Wang & Fredrikson, ICML 2021, arXiv 2102.08452), without BatchNorm, whose
    division by running statistics inflates Lipschitz bounds: for certification and certified training.

    3x3 conv c1 -> 4x4 conv c1, stride 2 -> 3x3 conv c2 -> 4x4 conv c2, stride 2 (each + activation;
    'same' padding: 28 -> 14 -> 7) -> flatten -> [Linear(hidden) -> activation] x 2 -> Linear. Defaults
    c = (32, 64), hidden 512, ReLU (GloRo's own MNIST recipe uses MinMax: model/activation=minmax).
    """

    def __init__(self, in_channels, num_classes, image_size, tanh: Switch = False, channels: TwoWidths = (32, 64),
                 hidden: Count = 512, activation: Target = ReLU):  # conf/model/activation: a _partial_ node
        c1, c2 = channels
        layers, size, width = OrderedDict(), image_size, in_channels
        for i, (out, kernel_size, stride) in enumerate([(c1, 3, 1), (c1, 4, 2), (c2, 3, 1), (c2, 4, 2)]):
            padding = 1  # 'same' for 3x3 stride 1, and halves the size for 4x4 stride 2
            layers[f"conv{i}"] = ConvBN(width, out, kernel_size, stride, padding, batch_norm=False)
            layers[f"act{i}"] = activation()
            size, width = _conv_out(size, kernel_size, stride, padding), out
        layers["flatten"] = nn.Flatten()
        width *= size * size
        for i in range(2):
            layers[f"dense{i}"], layers[f"act_dense{i}"], width = nn.Linear(width, hidden), activation(), hidden
        layers["classifier"] = nn.Linear(width, num_classes)
        super().__init__(layers, in_channels, num_classes, image_size, tanh)


class AllCNN(Classifier):
    """All-CNN-C (Springenberg et al. 2015, arXiv 1412.6806), with BatchNorm after every conv.

    3x[3x3 conv c1] (last stride 2) -> 3x[3x3 conv c2] (last stride 2) -> 3x3 conv c2 -> 1x1 conv c2 ->
    1x1 conv num_classes -> global average pool. Defaults ``channels: [96, 192]``.
    """

    def __init__(self, in_channels, num_classes, image_size, tanh: Switch = False, channels: TwoWidths = (96, 192)):
        c1, c2 = channels
        plan = [  # (out_channels, kernel_size, stride)
            (c1, 3, 1), (c1, 3, 1), (c1, 3, 2),
            (c2, 3, 1), (c2, 3, 1), (c2, 3, 2),
            (c2, 3, 1), (c2, 1, 1),
        ]
        layers = OrderedDict()
        width = in_channels
        for i, (out, kernel_size, stride) in enumerate(plan):
            layers[f"conv{i}"] = ConvBN(width, out, kernel_size, stride)
            layers[f"act{i}"] = ReLU()
            width = out
        layers["classifier"] = ConvBN(width, num_classes, 1, batch_norm=False)
        layers["pool"] = GlobalAvgPool()
        super().__init__(layers, in_channels, num_classes, image_size, tanh)


def basic_block(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    """Post-activation ResNet basic block (He et al. 2016): ReLU(conv-BN-ReLU-conv-BN(x) + shortcut(x)).

    The shortcut is the identity, or a strided 1x1 conv + BN when the shape changes.
    """
    branch = nn.Sequential(ConvBN(in_channels, out_channels, 3, stride), ReLU(),
                           ConvBN(out_channels, out_channels, 3))
    shortcut = (nn.Identity() if stride == 1 and in_channels == out_channels
                else ConvBN(in_channels, out_channels, 1, stride))
    return nn.Sequential(Residual(branch, shortcut), ReLU())


def _residual_trunk(layers: OrderedDict, in_channels: int, stem_width: int,
                    widths: list[int], blocks: list[int], strides: list[int]) -> int:
    """Append stem conv + stages of basic blocks to ``layers``; return the final width."""
    layers["stem"] = ConvBN(in_channels, stem_width, 3)
    layers["stem_act"] = ReLU()
    width = stem_width
    for stage, (out, count, stride) in enumerate(zip(widths, blocks, strides)):
        for i in range(count):
            layers[f"stage{stage}_block{i}"] = basic_block(width, out, stride if i == 0 else 1)
            width = out
    return width


class ResNet18(Classifier):
    """ResNet-18, CIFAR style (3x3 stem, no max-pool; He et al. 2016): 4 stages of basic blocks,
    widths width*(1, 2, 4, 8), strides (1, 2, 2, 2), global average pool, linear. Defaults
    ``width: 64``, ``blocks: [2, 2, 2, 2]``."""

    def __init__(self, in_channels, num_classes, image_size, tanh: Switch = False, width: Count = 64,
                 blocks: PositiveInts = (2, 2, 2, 2)):
        layers = OrderedDict()
        widths = [width * 2 ** i for i in range(len(blocks))]
        strides = [1] + [2] * (len(blocks) - 1)
        final = _residual_trunk(layers, in_channels, width, widths, blocks, strides)
        layers["pool"] = GlobalAvgPool()
        layers["classifier"] = nn.Linear(final, num_classes)
        super().__init__(layers, in_channels, num_classes, image_size, tanh)


class WideResNet(Classifier):
    """Wide ResNet WRN-depth-width (Zagoruyko & Komodakis 2016, arXiv 1605.07146).

    (depth - 4) / 6 basic blocks per stage, widths 16*width, 32*width, 64*width, strides 1, 2, 2, a
    16-channel stem. Differences to the paper: post-activation blocks (conv-BN-ReLU, so every BN folds
    into the conv before it) and no dropout. Defaults ``depth: 28``, ``width: 10``.
    """

    def __init__(self, in_channels, num_classes, image_size, tanh: Switch = False, depth: WideResNetDepth = 28,
                 width: Count = 10):
        per_stage = (depth - 4) // 6
        layers = OrderedDict()
        final = _residual_trunk(layers, in_channels, 16, [16 * width, 32 * width, 64 * width],
                                [per_stage] * 3, [1, 2, 2])
        layers["pool"] = GlobalAvgPool()
        layers["classifier"] = nn.Linear(final, num_classes)
        super().__init__(layers, in_channels, num_classes, image_size, tanh)


def branch_block(channels: int, cardinality: int) -> nn.Sequential:
    """The successor paper's ResNeXt-style block (cfinlay/tulip ``BranchBlock``).

    ReLU(x + mean over branches of [3x3 conv C -> C*b, BN, ReLU, grouped 3x3 conv (b groups), BN]):
    a ResNeXt block whose branches are aggregated by a mean instead of a 1x1 conv.
    """
    wide = channels * cardinality
    branch = nn.Sequential(ConvBN(channels, wide, 3), ReLU(),
                           ConvBN(wide, wide, 3, groups=cardinality), BranchMean(cardinality))
    return nn.Sequential(Residual(branch, nn.Identity()), ReLU())


class ResNeXt34(Classifier):
    """ResNeXt-34 (2x32) of Finlay & Oberman's successor paper (arXiv 1905.11468), their CIFAR-10 net.

    3x3 stem conv to ``base_width`` channels, then stages of ``blocks`` branch blocks (default [5, 5, 5])
    of ``cardinality`` branches (default 2); each later stage starts with a 1x1 conv doubling the width
    and a 2x2 average pool. Global average pool, linear. 1 + 2*15 + 2 + 1 = 34 weight layers.
    """

    def __init__(self, in_channels, num_classes, image_size, tanh: Switch = False, blocks: PositiveInts = (5, 5, 5),
                 cardinality: Count = 2, base_width: Count = 32):
        layers = OrderedDict(stem=ConvBN(in_channels, base_width, 3), stem_act=ReLU())
        width = base_width
        for stage, count in enumerate(blocks):
            if stage > 0:
                layers[f"stage{stage}_widen"] = ConvBN(width, 2 * width, 1)
                layers[f"stage{stage}_widen_act"] = ReLU()
                layers[f"stage{stage}_pool"] = nn.AvgPool2d(2)
                width *= 2
            for i in range(count):
                layers[f"stage{stage}_block{i}"] = branch_block(width, cardinality)
        layers["pool"] = GlobalAvgPool()
        layers["classifier"] = nn.Linear(width, num_classes)
        super().__init__(layers, in_channels, num_classes, image_size, tanh)
