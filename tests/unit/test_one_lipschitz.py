"""The 1-Lipschitz layers and MinMax: Tulip's own bounds (by theorem, from the weights) are at least each
layer's true norm, and at most 1 plus rounding; the margin and GloRo losses as defined; the radius warm-up
as GloRo schedules it."""
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import SHRINK, build_model_option, compose_config, dense_matrix
from tulip.nn.lipschitz import BOUND, _lipschitz, layer_norm_bound
from tulip.nn.nonlinearities import MinMax
from tulip.nn.one_lipschitz import AOLConv2d, AOLLinear, SLLConv2d, SLLLinear
from tulip.train.gloro import RadiusSchedule
from tulip.train.loss import build_loss

ROUNDING = 1e-7  # "1 plus rounding": the float64 allowances of the bounds (tulip.nn.lipschitz._rounding_slack)


def randomized(layer: torch.nn.Module, scale: float) -> torch.nn.Module:
    """`layer` in float64 with weights far from their initialization (as after training)."""
    torch.manual_seed(0)
    layer = layer.double()
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(scale * torch.randn_like(parameter))
    return layer


def jacobian_norms(layer, shape, points: int = 6) -> list[float]:
    """‖∂layer/∂x‖₂ at random inputs of `shape` (dense Jacobians, float64)."""
    torch.manual_seed(1)
    norms = []
    for _ in range(points):
        x = torch.randn(1, *shape, dtype=torch.float64)
        jacobian = torch.autograd.functional.jacobian(layer, x).reshape(-1, math.prod(shape))
        norms.append(torch.linalg.matrix_norm(jacobian, ord=2).item())
    return norms


LINEAR_LAYERS = {  # AOL layers are linear: their exact norm is the dense matrix's largest singular value
    "aol_conv3x3": (lambda: AOLConv2d(3, 5), (3, 6, 6)),
    "aol_conv1x1_narrowing": (lambda: AOLConv2d(8, 2, kernel_size=1), (8, 5, 5)),
    "aol_conv5x5": (lambda: AOLConv2d(2, 4, kernel_size=5), (2, 7, 7)),
    "aol_dense_widening": (lambda: AOLLinear(6, 9), (6,)),
    "aol_dense_narrowing": (lambda: AOLLinear(9, 4), (9,)),
}


@pytest.mark.parametrize("scale", [0.1, 3.0])
@pytest.mark.parametrize("name", LINEAR_LAYERS)
def test_aol_bound_is_at_least_the_exact_norm_and_at_most_one(name, scale):
    make, shape = LINEAR_LAYERS[name]
    layer = randomized(make(), scale).eval()
    bias = layer(torch.zeros(1, *shape, dtype=torch.float64))
    exact = torch.linalg.svdvals(dense_matrix(lambda v: layer(v) - bias, shape))[0].item()
    bound, _ = _lipschitz(layer, shape, BOUND)
    assert exact * (1 - 1e-12) <= bound <= 1 + ROUNDING
    assert exact > 0.3  # the rescaling keeps a useful norm, not a vanishing one


RESIDUAL_LAYERS = {
    "sll_conv": (lambda: SLLConv2d(3, 5), (3, 6, 6)),
    "sll_conv_narrow_inner": (lambda: SLLConv2d(4, 2, kernel_size=1), (4, 5, 5)),
    "sll_dense": (lambda: SLLLinear(7, 5), (7,)),
}


@pytest.mark.parametrize("scale", [0.1, 3.0])
@pytest.mark.parametrize("name", RESIDUAL_LAYERS)
def test_sll_bound_is_at_least_every_jacobian_norm_and_at_most_one(name, scale):
    make, shape = RESIDUAL_LAYERS[name]
    layer = randomized(make(), scale).eval()
    bound, out_shape = _lipschitz(layer, shape, BOUND)
    assert out_shape == shape
    norms = jacobian_norms(layer, shape)
    assert max(norms) <= bound * (1 + 1e-12) and bound <= 1 + ROUNDING
    assert max(norms) > 0.5  # a residual layer: far from a constant map


def test_sll_bound_detects_a_layer_that_is_not_one_lipschitz():
    """The bound is computed, not assumed: with T halved (the Gershgorin condition broken) it exceeds 1 and
    still covers the Jacobian."""
    layer = randomized(SLLLinear(6, 6), 1.0).eval()
    real = layer.inner_scale_of
    layer.inner_scale_of = lambda weight: real(weight) / 4
    bound, _ = _lipschitz(layer, (6,), BOUND)
    assert bound > 1.0 + 1e-3
    assert max(jacobian_norms(layer, (6,), points=20)) <= bound * (1 + 1e-12)


def test_minmax_sorts_pairs_of_channels_and_is_one_lipschitz():
    torch.manual_seed(0)
    minmax = MinMax()
    x = torch.randn(5, 6, 3, 3)
    out = minmax(x)
    a, b = x[:, :3], x[:, 3:]
    torch.testing.assert_close(out, torch.cat([torch.maximum(a, b), torch.minimum(a, b)], 1))
    # a permutation of each sample's coordinates: the same multiset, so the same norm
    torch.testing.assert_close(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    x2 = x + 0.3 * torch.randn_like(x)
    assert ((minmax(x2) - out).flatten(1).norm(dim=1) <= (x2 - x).flatten(1).norm(dim=1) + 1e-6).all()
    with pytest.raises(ValueError, match="even number"):
        minmax(torch.randn(2, 5))


@pytest.mark.parametrize("name", ["aol_4c3f", "sll"])
def test_constrained_models_are_one_lipschitz_up_to_their_last_layer(name):
    """Their whole-model bound is at most the last layer's norm, and no pair of inputs beats it."""
    torch.manual_seed(0)
    model = build_model_option(name, SHRINK[name]).double().eval()
    bound = layer_norm_bound(model)
    assert bound <= torch.linalg.matrix_norm(model.classifier.weight, ord=2).item() * (1 + ROUNDING)
    x = torch.rand(32, 1, 28, 28, dtype=torch.float64)
    x2 = x + 0.05 * torch.randn_like(x)
    with torch.no_grad():
        ratios = (model(x2) - model(x)).norm(dim=1) / (x2 - x).flatten(1).norm(dim=1)
    assert ratios.max() <= bound


def test_margin_penalty_is_the_extra_loss_of_the_offset_logits():
    torch.manual_seed(0)
    model = build_model_option("aol_4c3f", SHRINK["aol_4c3f"])
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    loss_fn = build_loss(compose_config("model=aol_4c3f", "regularizer=margin", "reg.margin=0.5", tiny=False).reg,
                         model)
    out = loss_fn(model, x, y)
    # the reference, written out: f_i + ε ‖w_i − w_y‖ for i ≠ y, K₋ = 1 for a 1-Lipschitz body
    logits, w = model(x), model.classifier.weight
    offset = torch.stack([torch.stack([logits[b, i] + (0.5 * (w[i] - w[y[b]]).norm() if i != y[b] else 0)
                                       for i in range(10)]) for b in range(16)])
    expected = F.cross_entropy(offset, y)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    assert out.logs["train/penalty_margin"] > 0


def test_gloro_trades_penalty_is_the_kl_of_the_clean_to_the_augmented_prediction():
    torch.manual_seed(0)
    model = build_model_option("cnn_4c3f", [*SHRINK["cnn_4c3f"], "model/activation=minmax"])
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    cfg = compose_config("model=cnn_4c3f", "regularizer=gloro_trades", "reg.radius_warmup.until=0", tiny=False)
    loss_fn = build_loss(cfg.reg, model)
    out = loss_fn(model, x, y)
    penalty = dict(loss_fn.penalties)["train/penalty_gloro"]
    logits, w, k = model(x), model.classifier.weight, penalty.norms.product()
    j = logits.argmax(1)
    bot = torch.stack([max(logits[b, i] + 0.3 * 1.1 * k * (w[i] - w[j[b]]).norm() for i in range(10) if i != j[b])
                       for b in range(16)])
    clean = F.softmax(logits, 1)
    augmented = F.softmax(torch.cat([logits, bot[:, None]], 1), 1)[:, :10]
    kl = (clean * (clean.log() - augmented.log())).sum(1).mean()
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, y) + 1.5 * kl, rtol=1e-5, atol=1e-6)


def test_radius_warmup_follows_gloros_log_schedule():
    """[0.01]-log-[50%:1.1] over 10 epochs at ε = 0.3: GloRo's interpolation, linear in exp(radius),
    from 0.003 over epochs 1-5, then 0.33 kept."""
    schedule = RadiusSchedule(0.3, start=0.01, end=1.1, until=0.5)
    low, high = math.exp(0.003), math.exp(0.33)
    expected = [math.log(low + (high - low) * i / 5) for i in range(5)] + [0.33] * 5
    assert [schedule(epoch, 10) for epoch in range(1, 11)] == pytest.approx(expected)
    assert RadiusSchedule(0.3, start=0.01, end=1.0, until=0.0)(1, 10) == pytest.approx(0.3)


def test_the_training_loss_follows_the_schedule_epoch_by_epoch():
    model = build_model_option("aol_4c3f", SHRINK["aol_4c3f"])
    cfg = compose_config("model=aol_4c3f", "regularizer=margin", "reg.margin=1.0", "reg.radius_warmup.start=0.1",
                         "reg.radius_warmup.until=0.5", tiny=False)
    loss_fn = build_loss(cfg.reg, model)
    penalty = dict(loss_fn.penalties)["train/penalty_margin"]
    radii = []
    for epoch in range(1, 5):
        loss_fn.start_epoch(epoch, 4)
        radii.append(penalty.radius)
    assert radii[0] == pytest.approx(0.1) and radii[2:] == [1.0, 1.0] and 0.1 < radii[1] < 1.0


@pytest.mark.parametrize("name", ["aol_4c3f", "sll"])
def test_at_initialization_every_layer_is_bounded_by_one_plus_rounding(name):
    """The layers start (semi-)orthogonal, where all singular values are 1 and the Gram bound alone would
    exceed 1 by up to 1 %: the Gershgorin bound shows what the construction guarantees."""
    model = build_model_option(name).eval()  # the full-size model
    shape = model.input_shape
    for child in model.children():
        bound, shape = _lipschitz(child, shape, BOUND)
        if child is not model.classifier:
            assert bound <= 1 + ROUNDING, type(child).__name__
