"""Bounds: the estimates' formulas, the Hessian power iteration, and the certificate's soundness."""
import math

import pytest
import torch

from tulip.evaluate import attacks, bounds
from tulip.evaluate.attacks import attack_distances
from tulip.data import mnist5k
from tulip.nn.lipschitz import layer_norm_bound
from tulip.nn.models import MLP, CNNSmall
from tulip.train.loss import TrainingLoss
from tulip.train.loop import train_one_epoch


@pytest.fixture(scope="module")
def digits():
    return mnist5k()


@pytest.fixture(scope="module")
def trained_mlp(digits):
    """A one-hidden-layer MLP after one quick epoch on mnist5k."""
    torch.manual_seed(0)
    model = MLP(1, 10, 28, hidden=[64])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_one_epoch(model, TrainingLoss(batches={}, penalties={}), optimizer, digits, batch_size=128, epoch=1, progress=False)
    return model.eval()


def test_margins_sign_matches_misclassification():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 1.0, 0.0]])
    y = torch.tensor([0, 0, 2])
    margin = bounds.logit_margin(logits, y)
    assert margin.tolist() == [1.0, -3.0, -1.0]
    loss = bounds.probability_margin_loss(logits, y)
    p = logits.softmax(1)
    assert loss[0].item() == pytest.approx((p[0, 1] - p[0, 0]).item())
    assert (loss < 0).tolist() == [True, False, False]


def test_loss_gradients_are_per_image(trained_mlp, digits):
    x, y = digits.test_x[:12], digits.test_y[:12]
    batched = bounds.loss_gradients(trained_mlp, x, y, batch_size=5)
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        loss = bounds.probability_margin_loss(trained_mlp(xi), y[i:i + 1])
        (grad,) = torch.autograd.grad(loss.sum(), xi)
        assert batched.loss[i].item() == pytest.approx(loss.item(), abs=1e-6)
        assert batched.grad_norm[i].item() == pytest.approx(grad.norm().item(), rel=1e-5)


def test_first_and_second_order_formulas():
    loss = torch.tensor([-0.5, -0.2, 0.3])
    grad_norm = torch.tensor([1.0, 2.0, 4.0])
    assert bounds.first_order_radii(loss, grad_norm).tolist() == pytest.approx([0.125, 0.05, 0.0])
    curvature = 3.0
    radius = bounds.second_order_radii(loss, grad_norm, curvature)
    # r solves ‖∇ℓ‖·r + C·r²/2 = (−ℓ)₊ (and is 0 for misclassified images)
    residual = grad_norm * radius + curvature * radius ** 2 / 2 - (-loss).clamp_min(0)
    assert residual.abs().max() < 1e-6 and radius[2] == 0
    # C -> 0: the first-order radius of each image's own gradient
    assert bounds.second_order_radii(loss, grad_norm, 0.0).tolist() == pytest.approx([0.5, 0.1, 0.0])


def test_hessian_power_iteration_matches_dense_hessian():
    """A smooth model (linear layer + the bounded tanh head), 16 inputs: compare with the dense Hessian."""
    torch.manual_seed(0)
    model = MLP(1, 3, 4, hidden=[], tanh=True)
    head_norm = model.bounded_head.norm
    head_norm.running_var.uniform_(0.05, 0.2)  # sharpen the head so the Hessian is far from 0
    model.eval()
    assert bounds.is_smooth(model)
    x, y = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 0])
    estimate = bounds.hessian_norms(model, x, y, batch_size=3, iterations=100)
    for i in range(len(x)):
        hessian = torch.autograd.functional.hessian(
            lambda z: bounds.probability_margin_loss(model(z.view(1, 1, 4, 4)), y[i:i + 1]).sum(),
            x[i].flatten())
        exact = torch.linalg.eigvalsh(hessian).abs().max().item()
        assert estimate[i].item() == pytest.approx(exact, rel=1e-3)


def test_relu_models_are_not_smooth():
    assert not bounds.is_smooth(CNNSmall(1, 10, 28))
    assert not bounds.is_smooth(MLP(1, 10, 28, hidden=[8]))


def test_certificate_is_tight_for_a_two_class_linear_model():
    """Logits (w·x + b, −w·x − b): K = ‖W‖₂ = √2‖w‖, and the exact distance to the decision boundary
    is m / ‖w₀ − w₁‖ = m / (2‖w‖) = m / (√2·K): the certificate equals the true distance, and DeepFool
    (exact on a linear model, 2% overshoot) must land just beyond it."""
    torch.manual_seed(0)
    model = MLP(1, 2, 8, hidden=[])
    w = torch.randn(64) * 0.1
    with torch.no_grad():
        model.classifier.weight.copy_(torch.stack([w, -w]))
        model.classifier.bias.zero_()
    model.eval()
    # Images near 0.5 with small margins: the boundary lies well inside [0, 1]^64.
    x = (0.5 + 0.05 * torch.randn(40, 1, 8, 8)).clamp(0, 1)
    y = model(x).argmax(1)
    y[:3] = 1 - y[:3]  # three misclassified images: radius 0, distance 0
    margin = bounds.logit_margin(model(x).detach(), y)
    certified = bounds.certified_radii(margin, layer_norm_bound(model))
    exact = margin.clamp_min(0) / (2 * w.norm())
    torch.testing.assert_close(certified, exact, rtol=1e-5, atol=1e-7)
    found = attack_distances(attacks.deepfool_l2(steps=10, overshoot=0.02), model, x, y, [], 64)["l2"]
    assert found[:3].tolist() == [0.0, 0.0, 0.0] and certified[:3].tolist() == [0.0, 0.0, 0.0]
    assert (found >= certified).all()
    ratio = found[3:] / certified[3:]
    assert ratio.max() < 1.05, ratio  # a certificate 5% too small would fail here


def test_no_attack_beats_the_certificate_on_a_trained_model(trained_mlp, digits):
    x, y = digits.test_x[:64], digits.test_y[:64]
    grads = bounds.loss_gradients(trained_mlp, x, y, 64)
    certified = bounds.certified_radii(grads.margin, layer_norm_bound(trained_mlp))
    assert (certified > 0).sum() > 40  # most images get a nonzero certificate
    for attack in (attacks.ddn(steps=30), attacks.deepfool_l2(steps=20), attacks.fmn_l2(steps=30),
                   attacks.deepfool_linf(steps=20)):
        found = attack_distances(attack, trained_mlp, x, y, [], 64)["l2"]
        assert found.isfinite().sum() > 40
        assert (found >= certified).all(), (found - certified).min()
    # The first-order estimate is an estimate, not a bound, but sits well above the certificate.
    first = bounds.first_order_radii(grads.loss, grads.grad_norm)
    assert first.median() > certified.median()
    assert math.isclose(bounds.first_order_radii(grads.loss, grads.grad_norm).max().item(),
                        ((-grads.loss).clamp_min(0) / grads.grad_norm.max()).max().item())
