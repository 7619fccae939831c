"""Perturbation directions and PGD loops (tulip.nn.perturbations): norms, zero gradients, ball and box."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tulip.nn.perturbations import (frozen_eval, l2_direction, loss_input_grad, max_entry_direction,
                                 pgd_l2, pgd_linf, sign_direction)


def small_cnn(num_classes=10):
    """A dummy MNIST-shaped CNN with BatchNorm (RobustBench-style test model)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4), nn.Softplus(),
                         nn.Flatten(), nn.Linear(4 * 13 * 13, num_classes))


@pytest.fixture
def batch():
    torch.manual_seed(0)
    x = torch.rand(6, 1, 28, 28)
    y = torch.randint(0, 10, (6,))
    return x, y


def norms(v, p):
    return torch.linalg.vector_norm(v.flatten(1), ord=p, dim=1)


def test_sign_direction_step_has_l2_norm_eps_and_equal_magnitudes():
    g = torch.randn(5, 3, 8, 8)
    step = 0.3 * sign_direction(g)
    torch.testing.assert_close(norms(step, 2), torch.full((5,), 0.3))
    torch.testing.assert_close(step.abs(), torch.full_like(step, 0.3 / math.sqrt(3 * 8 * 8)))
    assert torch.equal(step.sign(), g.sign())


def test_l2_direction_step_has_norm_eps_and_is_parallel_to_g():
    g = torch.randn(5, 3, 8, 8) * torch.tensor([1e-3, 1, 10, 1e3, 1e-8]).view(5, 1, 1, 1)
    step = 0.25 * l2_direction(g)
    torch.testing.assert_close(norms(step, 2), torch.full((5,), 0.25))
    cosine = (step.flatten(1) * g.flatten(1)).sum(1) / (norms(step, 2) * norms(g, 2))
    torch.testing.assert_close(cosine, torch.ones(5))


def test_max_entry_direction_changes_exactly_one_entry_per_image():
    g = torch.randn(5, 3, 8, 8)
    v = max_entry_direction(g)
    flat_v, flat_g = v.flatten(1), g.flatten(1)
    assert torch.equal((flat_v != 0).sum(1), torch.ones(5, dtype=torch.long))
    k = flat_g.abs().argmax(1)
    assert torch.equal(flat_v.abs().argmax(1), k)
    assert torch.equal(flat_v[torch.arange(5), k], flat_g[torch.arange(5), k].sign())


@pytest.mark.parametrize("direction", [sign_direction, l2_direction, max_entry_direction])
def test_zero_gradient_gives_no_step_and_no_nan(direction):
    g = torch.randn(4, 1, 5, 5)
    g[1] = 0  # one sample with a zero gradient, among nonzero ones
    v = direction(g)
    assert torch.isfinite(v).all()
    assert torch.equal(v[1], torch.zeros_like(v[1]))
    assert (norms(v, 2)[[0, 2, 3]] > 0.5).all()


def test_loss_input_grad_equals_single_sample_gradients_and_leaves_param_grads(batch):
    x, y = batch
    model = small_cnn().eval()
    g = loss_input_grad(model, x, y)
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        gi, = torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi)
        torch.testing.assert_close(g[i:i + 1], gi)
    assert all(p.grad is None for p in model.parameters())
    assert not g.requires_grad


def test_frozen_eval_restores_mode_and_requires_grad():
    model = small_cnn().train()
    already_frozen = model[0].bias
    already_frozen.requires_grad_(False)
    with frozen_eval(model):
        assert not model.training and not model[1].training
        assert not any(p.requires_grad for p in model.parameters())
    assert model.training and model[1].training
    assert not already_frozen.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not already_frozen)
    with pytest.raises(RuntimeError), frozen_eval(model):  # restored after an exception too
        raise RuntimeError
    assert model.training and model[0].weight.requires_grad


def ce_loss_fn(model, y):
    return lambda z: F.cross_entropy(model(z), y, reduction="none")


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_linf_stays_in_ball_and_box_and_beats_fgsm(batch, random_start):
    x, y = batch
    x[:, :, :5] = 0.0  # entries on the box boundary
    x[:, :, -5:] = 1.0
    torch.manual_seed(1)
    model = small_cnn().eval()
    eps = 0.1
    loss_fn = ce_loss_fn(model, y)
    x_adv = pgd_linf(loss_fn, x, eps=eps, steps=10, step_size=eps / 4, random_start=random_start)
    fgsm = pgd_linf(loss_fn, x, eps=eps, steps=1, step_size=eps, random_start=False)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert not x_adv.requires_grad
    with torch.no_grad():
        clean, one_step, pgd = (loss_fn(z).sum() for z in (x, fgsm, x_adv))
    assert one_step > clean
    assert pgd >= one_step


@pytest.mark.parametrize("random_start", [False, True])
def test_pgd_l2_stays_in_ball_and_box_and_beats_one_step(batch, random_start):
    x, y = batch
    x[:, :, :5] = 1.0
    torch.manual_seed(1)
    model = small_cnn().eval()
    eps = 1.5
    loss_fn = ce_loss_fn(model, y)
    x_adv = pgd_l2(loss_fn, x, eps=eps, steps=10, step_size=eps / 4, random_start=random_start)
    one_step = pgd_l2(loss_fn, x, eps=eps, steps=1, step_size=eps, random_start=False)
    assert (norms(x_adv - x, 2) <= eps * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    with torch.no_grad():
        clean, one, pgd = (loss_fn(z).sum() for z in (x, one_step, x_adv))
    assert one > clean
    assert pgd >= one


@pytest.mark.parametrize("attack", [pgd_linf, pgd_l2])
def test_pgd_random_start_lies_in_ball_and_zero_eps_is_identity(batch, attack):
    x, y = batch
    torch.manual_seed(2)
    model = small_cnn().eval()
    start = attack(ce_loss_fn(model, y), x, eps=0.3, steps=0, step_size=0.1, random_start=True)
    p = math.inf if attack is pgd_linf else 2
    assert (norms(start - x, p) <= 0.3 * (1 + 1e-5)).all() and (norms(start - x, p) > 0).all()
    same = attack(ce_loss_fn(model, y), x, eps=0.0, steps=3, step_size=0.1, random_start=True)
    assert torch.equal(same, x)


def test_pgd_is_model_agnostic_and_maximises_any_loss(batch):
    """The loop only needs x -> per-sample losses: here a loss with a known maximiser in the box."""
    x, _ = batch
    target = torch.rand_like(x)
    x_adv = pgd_linf(lambda z: -(z - target).square().flatten(1).sum(1), x, eps=1.0, steps=60,
                     step_size=0.05, random_start=False)
    # Sign steps of 0.05 oscillate around the target, ending within one step of it.
    assert (x_adv - target).abs().max() <= 0.05 + 1e-6
