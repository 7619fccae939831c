"""Measures equal hand-computed values where they are known, and the layer bound really bounds."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import SHRINK, build_model_option, dense_matrix, exact_operator_norm, with_random_statistics
from tulip.nn.lipschitz import (POWER_SAFETY, conv_norm_estimate, layer_norm_bound, layer_norm_estimate)
from tulip.data import class_balanced_subset
from tulip.evaluate.measures import measure
from tulip.nn.perturbations import loss_input_grad
from tulip.nn.models import BranchMean, ConvBN, GlobalAvgPool, Residual


def build(name, overrides=(), channels=1, size=28, classes=10):
    return build_model_option(name, overrides, channels, size, classes)


# ---------------------------------------------------------------------------------------------------
# A linear softmax model: every measure has a closed form


@pytest.fixture
def linear_model():
    """mlp with no hidden layer = softmax regression f(x) = W x + b, in float64 for exact comparisons."""
    torch.manual_seed(0)
    model = build("mlp", ["model.hidden=[]"], channels=1, size=6, classes=5).double()
    with torch.no_grad():
        model.classifier.weight.normal_()
        model.classifier.bias.normal_()
    x = torch.rand(40, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 5, (40,))
    return model, x, y


def closed_form_loss_grads(W, b, x, y):
    """grad_x CE(W x + b, y) = W^T (softmax(W x + b) - onehot(y)), one row per sample."""
    flat = x.flatten(1)
    probs = torch.softmax(flat @ W.T + b, dim=1)
    return (probs - F.one_hot(y, W.shape[0]).double()) @ W


def test_linear_model_measures_match_closed_form(linear_model):
    model, x, y = linear_model
    W, b = model.classifier.weight.detach(), model.classifier.bias.detach()
    metrics = measure(model, x, y, batch_size=16)

    logits = x.flatten(1) @ W.T + b
    grads = closed_form_loss_grads(W, b, x, y)
    row_norm = W.norm(dim=1).max().item()
    spectral = torch.linalg.svdvals(W)[0].item()
    assert metrics["test/error_pct"] == pytest.approx(100 * (logits.argmax(1) != y).double().mean().item())
    assert metrics["test/loss"] == pytest.approx(F.cross_entropy(logits, y).item())
    assert metrics["lipschitz/loss_grad_max"] == pytest.approx(grads.norm(dim=1).max().item())
    assert metrics["lipschitz/loss_grad_mean"] == pytest.approx(grads.norm(dim=1).mean().item())
    assert metrics["lipschitz/jacobian_2inf"] == pytest.approx(row_norm)
    assert metrics["weights/product_2inf"] == pytest.approx(row_norm)
    assert metrics["weights/product_spectral"] == pytest.approx(spectral)
    assert metrics["weights/layer_norm_product"] == pytest.approx(spectral)
    assert "model/tanh_scale" not in metrics


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_per_sample_loss_grad_norms_closed_form(linear_model, p):
    model, x, y = linear_model
    model.eval()
    expected = closed_form_loss_grads(model.classifier.weight.detach(), model.classifier.bias.detach(), x, y)
    torch.testing.assert_close(loss_input_grad(model, x, y).flatten(1).norm(p=p, dim=1), expected.norm(p=p, dim=1))


def test_linear_model_with_bounded_head():
    """With the head, the linearized map is M = sign(t) diag(1/sqrt(var + eps)) W."""
    torch.manual_seed(0)
    model = build("mlp", ["model.hidden=[]", "model.tanh=true"], size=6, classes=5).double()
    with torch.no_grad():
        model.classifier.weight.normal_()
        model.bounded_head.norm.running_var.uniform_(0.2, 3.0)
        model.bounded_head.norm.running_mean.normal_()
        model.tanh_scale.fill_(-1.7)
    x, y = torch.rand(30, 1, 6, 6, dtype=torch.float64), torch.randint(0, 5, (30,))
    metrics = measure(model, x, y, batch_size=30)
    bn = model.bounded_head.norm
    scale = torch.rsqrt(bn.running_var + bn.eps)
    M = -scale[:, None] * model.classifier.weight.detach()
    assert metrics["weights/product_2inf"] == pytest.approx(M.norm(dim=1).max().item())
    assert metrics["weights/product_spectral"] == pytest.approx(torch.linalg.svdvals(M)[0].item())
    # the head is 1-Lipschitz after its BatchNorm: the bound is ||W|| * max 1/sqrt(var + eps)
    assert metrics["weights/layer_norm_product"] == pytest.approx(
        torch.linalg.svdvals(model.classifier.weight.detach())[0].item() * scale.max().item())
    assert metrics["model/tanh_scale"] == pytest.approx(-1.7)


# ---------------------------------------------------------------------------------------------------
# measure() on real models: mode handling and batch independence


def trained(name, overrides=(), steps=3):
    """A shrunk model after a few SGD steps, so BatchNorm statistics and weights are nontrivial."""
    torch.manual_seed(0)
    model = build(name, [*SHRINK[name], *overrides])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        loss = F.cross_entropy(model(torch.rand(16, 1, 28, 28)), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def test_measure_is_eval_mode_batch_independent_and_restores_mode():
    model = trained("cnn_small", ["model.tanh=true"])
    model.train()
    model.zero_grad(set_to_none=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.rand(50, 1, 28, 28), torch.randint(0, 10, (50,))
    small, large = measure(model, x, y, batch_size=7), measure(model, x, y, batch_size=50)
    assert small.keys() == large.keys() == {
        "test/error_pct", "test/loss", "lipschitz/loss_grad_max", "lipschitz/loss_grad_mean",
        "lipschitz/jacobian_2inf", "weights/product_2inf", "weights/product_spectral",
        "weights/layer_norm_product", "weights/layer_norm_estimate", "model/tanh_scale"}
    for key in small:
        assert small[key] == pytest.approx(large[key], rel=1e-4), key
    assert all(isinstance(v, float) for v in small.values())
    assert all(m.training for m in model.modules())
    for key, value in model.state_dict().items():  # BatchNorm statistics untouched
        assert torch.equal(value, state[key]), key
    assert all(p.grad is None for p in model.parameters())  # input gradients only
    # the per-sample gradients are those of eval mode, one sample at a time
    model.eval()
    one = loss_input_grad(model, x[:1], y[:1]).flatten(1).norm(dim=1)
    assert small["lipschitz/loss_grad_max"] >= one.item() - 1e-6
    norms = loss_input_grad(model, x, y).flatten(1).norm(dim=1)
    assert small["lipschitz/loss_grad_mean"] == pytest.approx(norms.mean().item(), rel=1e-4)
    assert norms[0].item() == pytest.approx(one.item(), rel=1e-4)


def test_jacobian_2inf_is_max_row_norm_of_full_jacobian():
    model = trained("cnn_small").eval()
    x = torch.rand(3, 1, 28, 28)
    expected = max(torch.autograd.functional.jacobian(model, x[i:i + 1])[0, :, 0].flatten(1).norm(dim=1).max()
                   for i in range(3))
    metrics = measure(model, x, torch.zeros(3, dtype=torch.long), batch_size=3)
    assert metrics["lipschitz/jacobian_2inf"] == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------
# Layer operator norms


@pytest.mark.parametrize("stride,padding,groups,kernel", [(1, 1, 1, 3), (2, 1, 1, 3), (2, 2, 1, 5),
                                                          (1, 1, 2, 3), (2, 0, 1, 1), (1, 0, 1, 3)])
def test_conv_norm_estimate_matches_dense_svd(stride, padding, groups, kernel):
    torch.manual_seed(stride * 100 + padding * 10 + groups + kernel)
    shape = (4, 9, 9)
    weight = torch.randn(6, 4 // groups, kernel, kernel, dtype=torch.float64)
    exact = torch.linalg.svdvals(dense_matrix(
        lambda v: F.conv2d(v, weight, stride=stride, padding=padding, groups=groups), shape))[0].item()
    estimate, out_shape = conv_norm_estimate(weight, shape, (stride, stride), (padding, padding), groups)
    assert estimate <= exact * (1 + 1e-9)
    assert estimate * POWER_SAFETY >= exact
    assert estimate >= 0.99 * exact
    assert out_shape == F.conv2d(torch.zeros(1, *shape, dtype=torch.float64), weight, stride=stride,
                                 padding=padding, groups=groups).shape[1:]


@pytest.mark.parametrize("layer,shape", [
    (ConvBN(3, 5, 3, stride=2), (3, 7, 7)),
    (nn.Sequential(nn.Flatten(), nn.Linear(12, 5)), (3, 2, 2)),
    (GlobalAvgPool(), (3, 5, 4)),
    (nn.AvgPool2d(2), (2, 6, 6)),
    (BranchMean(2), (6, 3, 3)),
], ids=["conv_bn", "linear", "global_avg_pool", "avg_pool", "branch_mean"])
def test_layer_norms_are_the_operator_norms(layer, shape):
    """Eval-mode BatchNorm folded into the conv; pools and branch means exact (the power-iteration
    estimate; tests/unit/test_lipschitz.py checks the guaranteed bound on the same layers)."""
    layer = with_random_statistics(layer)
    exact = exact_operator_norm(layer, shape)
    with torch.no_grad():
        bound = layer_norm_estimate(layer, shape)
    assert exact * (1 - 1e-12) <= bound <= POWER_SAFETY * exact * (1 + 1e-12)


def test_residual_bound_is_branch_plus_shortcut_and_unknown_modules_are_refused():
    torch.manual_seed(0)
    block = Residual(nn.Sequential(nn.Flatten(), nn.Linear(8, 8)), nn.Flatten()).double()
    branch = torch.linalg.svdvals(block.branch[1].weight.detach())[0].item()
    assert layer_norm_bound(block, (2, 2, 2)) == pytest.approx(branch + 1)
    with pytest.raises(TypeError, match="MaxPool2d"):
        layer_norm_bound(nn.Sequential(nn.MaxPool2d(2)), (1, 4, 4))


def top_jacobian_direction(model, x):
    """Unit input direction v maximizing ||J(x) v||, and ||J(x)||_2, from the full C x d Jacobian."""
    jac = torch.autograd.functional.jacobian(model, x)[0, :, 0].flatten(1)  # (C, d)
    _, singular_values, vh = torch.linalg.svd(jac, full_matrices=False)
    return vh[0].view_as(x), singular_values[0].item()


@pytest.mark.parametrize("tanh", [False, True])
@pytest.mark.parametrize("name", list(SHRINK))
def test_layer_norm_product_bounds_every_model(name, tanh):
    model = trained(name, [f"model.tanh={str(tanh).lower()}"]).eval().double()
    bound = layer_norm_bound(model)
    torch.manual_seed(1)
    x = torch.rand(16, 1, 28, 28, dtype=torch.float64)
    with torch.no_grad():
        ratio = lambda a, b: ((model(a) - model(b)).norm(dim=1) / (a - b).flatten(1).norm(dim=1)).max().item()
        assert ratio(x, torch.rand_like(x)) <= bound  # random pairs
        assert ratio(x, x + 1e-3 * torch.randn_like(x)) <= bound  # close pairs, random directions
    for i in range(2):  # close pairs along the locally steepest direction: ratio ~ ||J(x)||_2
        direction, local_norm = top_jacobian_direction(model, x[i:i + 1])
        with torch.no_grad():
            steep = ratio(x[i:i + 1], x[i:i + 1] + 1e-5 * direction)
        assert steep == pytest.approx(local_norm, rel=1e-3)
        assert local_norm <= bound
    metrics = measure(model, x, torch.randint(0, 10, (16,)), batch_size=16)
    assert metrics["weights/layer_norm_product"] == pytest.approx(bound)
    # the linearization's layers have the same norms, and each Jacobian is the product of masked layers
    assert metrics["weights/product_spectral"] <= bound
    assert metrics["lipschitz/jacobian_2inf"] <= bound


def test_class_balanced_subset_is_fixed_balanced_and_all_when_n_is_large():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    subset = class_balanced_subset(y, 24, seed=0)
    assert torch.equal(subset, class_balanced_subset(y, 24, seed=0))  # the same images every epoch
    assert not torch.equal(subset, class_balanced_subset(y, 24, seed=1))
    assert len(subset.unique()) == 24 and torch.equal(subset, subset.sort().values)
    # as equal as the labels allow: class 2 has only 5 images, the others share the rest equally
    assert sorted(torch.bincount(y[subset]).tolist()) == [5, 9, 10]
    assert class_balanced_subset(y, 85) is None and class_balanced_subset(y, None) is None
