"""The guaranteed layer bounds: never below the exact operator norm (dense SVDs), and close to it."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SHRINK, build_model_option, dense_matrix, exact_operator_norm, with_random_statistics

from tulip.nn.lipschitz import (conv_norm_bound, gram_norm_bound, last_layer, layer_norm_bound,
                             layer_norm_estimate, matrix_norm_bound)
from tulip.nn.models import BranchMean, ConvBN, DenseBN, GlobalAvgPool

# At 9x9 and 12x12 inputs the bound was at most 1.24x the exact norm over strides 1/2, paddings 0/1/2,
# groups 1/2 and kernels 1/3/4/5 (three seeds each); it is loosest when the output has few positions.
CONV_FACTOR = 1.3


def spectral_norm(matrix: torch.Tensor) -> float:
    return torch.linalg.svdvals(matrix)[0].item()


@pytest.mark.parametrize("shape,dtype", [((7, 5), torch.float64), ((5, 7), torch.float64),
                                         ((6, 6), torch.complex128), ((3, 9, 4), torch.complex128)])
def test_gram_bound_is_above_the_norm_and_converges(shape, dtype):
    torch.manual_seed(0)
    matrices = torch.randn(shape, dtype=dtype)
    exact = torch.linalg.matrix_norm(matrices, ord=2)
    rank = min(shape[-2:])
    for iterations in (1, 3, 6, 10):
        bound = gram_norm_bound(matrices, iterations)
        assert (bound >= exact * (1 - 1e-12)).all()
        # the overshoot factor is at most rank^(1/2^(t+1)), reached when all singular values are equal
        assert (bound <= exact * rank ** (1 / 2 ** (iterations + 1)) * (1 + 1e-12)).all()
    assert torch.allclose(gram_norm_bound(matrices, 10), exact, rtol=1e-4)


def test_gram_bound_of_equal_singular_values_and_of_zero():
    """An orthogonal matrix times 3: every singular value is 3, the worst case; and the zero matrix."""
    q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    assert 3 <= gram_norm_bound(3 * q, 4).item() <= 3 * 8 ** (1 / 32) * (1 + 1e-12)
    assert gram_norm_bound(torch.zeros(3, 4, dtype=torch.float64), 5).item() == 0
    huge = torch.diag(torch.tensor([1e200, 1.0], dtype=torch.float64))  # no overflow in the squares
    assert gram_norm_bound(huge, 12).item() == pytest.approx(1e200)


def test_matrix_bound_is_the_spectral_norm():
    torch.manual_seed(0)
    weight = torch.randn(30, 50)
    exact = spectral_norm(weight.double())
    assert exact <= matrix_norm_bound(weight) <= exact * (1 + 1e-6)


@pytest.mark.parametrize("size", [(9, 9), (12, 12)])
@pytest.mark.parametrize("kernel", [1, 3, 4, 5])
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("padding", [0, 1, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_bound_is_above_and_close_to_the_exact_norm(stride, padding, groups, kernel, size):
    torch.manual_seed(stride * 100 + padding * 10 + groups + kernel)
    shape = (4, *size)
    weight = torch.randn(6, 4 // groups, kernel, kernel, dtype=torch.float64)
    conv = lambda v: F.conv2d(v, weight, stride=stride, padding=padding, groups=groups)  # noqa: E731
    exact = spectral_norm(dense_matrix(conv, shape))
    bound, out_shape = conv_norm_bound(weight, shape, (stride, stride), (padding, padding), groups)
    assert exact <= bound <= CONV_FACTOR * exact
    assert out_shape == conv(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:]


@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((3, 5, 5), 5, 1, 0),  # one output position: loosest
    ((2, 4, 7), 4, 2, 1),  # even kernel, non-square input
    ((3, 3, 3), 5, 1, 2),  # kernel larger than the input
    ((2, 6, 6), 3, 3, 1),  # stride 3
])
def test_conv_bound_is_sound_in_corner_cases(shape, kernel, stride, padding):
    torch.manual_seed(kernel)
    weight = torch.randn(5, shape[0], kernel, kernel, dtype=torch.float64)
    exact = spectral_norm(dense_matrix(lambda v: F.conv2d(v, weight, stride=stride, padding=padding), shape))
    bound, _ = conv_norm_bound(weight, shape, (stride, stride), (padding, padding))
    assert bound >= exact


def test_conv_bound_on_real_layer_sizes_is_close_to_power_iteration():
    """cnn_small's second layer (32 -> 64, 5x5, stride 2 on 14x14): too large for a dense SVD, but the
    bound must sit above the power-iteration estimate (a lower bound) and close to it."""
    torch.manual_seed(0)
    layer = nn.Sequential(ConvBN(32, 64, 5, stride=2, padding=2)).double().eval()
    bound, estimate = layer_norm_bound(layer, (32, 14, 14)), layer_norm_estimate(layer, (32, 14, 14)) / 1.02
    assert estimate <= bound <= 1.05 * estimate


@pytest.mark.parametrize("layer,shape", [
    (ConvBN(3, 5, 3, stride=2), (3, 9, 9)),
    (ConvBN(4, 6, 3, groups=2), (4, 9, 9)),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), (3, 2, 2)),
    (nn.Sequential(nn.Flatten(), DenseBN(12, 7)), (3, 2, 2)),
    (GlobalAvgPool(), (3, 5, 4)),
    (nn.AvgPool2d(2), (2, 6, 6)),
    (BranchMean(2), (6, 3, 3)),
], ids=["conv_bn", "grouped_conv_bn", "linear", "dense_bn", "global_avg_pool", "avg_pool", "branch_mean"])
def test_layer_bounds_are_above_the_operator_norms(layer, shape):
    """Eval-mode BatchNorm (nontrivial statistics) folded into the weights; pools and branch means exact."""
    layer = with_random_statistics(layer)
    exact = exact_operator_norm(layer, shape)
    with torch.no_grad():
        bound = layer_norm_bound(layer, shape)
    assert exact * (1 - 1e-12) <= bound <= CONV_FACTOR * exact


def test_last_layer_of_every_model_family():
    """The feature bound times the last layer's norm is the whole product (up to Gram rounding); All-CNN's
    last linear map is its 1x1 conv (after the pool); a bounded head brings its BatchNorm scales."""
    for name in SHRINK:
        for tanh in (False, True):
            model = build_model_option(name, [*SHRINK[name], f"model.tanh={str(tanh).lower()}"]).double().eval()
            last = last_layer(model)
            assert last is not None, name
            assert last.weight.shape[0] == 10 and (last.head_scale is not None) == tanh
            head = last.head_scale.abs().max().item() if tanh else 1.0
            whole = layer_norm_bound(model)
            assert last.feature_bound * spectral_norm(last.weight) * head <= whole * (1 + 1e-9), name
            assert whole <= last.feature_bound * matrix_norm_bound(last.weight) * head * 1.01, name
    allcnn = build_model_option("allcnn", SHRINK["allcnn"])
    assert torch.equal(last_layer(allcnn).weight, allcnn.classifier.conv.weight.double()[:, :, 0, 0])
    assert last_layer(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU())) is None
