"""Nearest differently-labelled training image: exact against brute force, chunking-invariant."""
import math

import pytest
import torch

from tulip.evaluate.neighbours import nearest_l2, nearest_linf, summarize


def brute_force(test_x, test_y, train_x, train_y, p):
    """The original's method: every difference materialised (fine at this size), in float64."""
    diff = test_x.flatten(1).double()[:, None, :] - train_x.flatten(1).double()[None, :, :]
    dist = diff.norm(dim=2) if p == 2 else diff.abs().amax(dim=2)
    dist[test_y[:, None] == train_y[None, :]] = math.inf
    return dist.min(dim=1)


@pytest.fixture
def problem():
    generator = torch.Generator().manual_seed(0)
    train_x = torch.rand(300, 3, 6, 6, generator=generator)
    train_y = torch.randint(0, 4, (300,), generator=generator)
    test_x = torch.rand(70, 3, 6, 6, generator=generator)
    test_y = torch.randint(0, 4, (70,), generator=generator)
    return test_x, test_y, train_x, train_y


@pytest.mark.parametrize("nearest, p", [(nearest_l2, 2), (nearest_linf, math.inf)])
@pytest.mark.parametrize("budget", [1 << 22, 500])  # one chunk; many chunks of a few rows
def test_matches_brute_force(problem, nearest, p, budget):
    found = nearest(*problem, budget=budget)
    expected = brute_force(*problem, p)
    torch.testing.assert_close(found.distance.double(), expected.values, rtol=1e-6, atol=0)
    assert torch.equal(found.index, expected.indices)
    test_y, train_y = problem[1], problem[3]
    assert (train_y[found.index] != test_y).all()  # never a same-label neighbour


def test_exact_recheck_fixes_cancellation():
    """Bright images 1e-3 apart: ‖a‖² + ‖b‖² − 2ab loses everything to float32 cancellation (its
    error, ~1e-7·‖a‖² ≈ 3e-4, exceeds d² = 1e-6); the exact re-check recovers the distance."""
    generator = torch.Generator().manual_seed(1)
    base = 0.9 + 0.1 * torch.rand(50, 3072, generator=generator)
    direction = torch.randn(50, 3072, generator=generator)
    near = base + 1e-3 * direction / direction.norm(dim=1, keepdim=True)
    far = (base + 0.05 * torch.randn(50, 3072, generator=generator)).clamp(0, 1)
    train_x, train_y = torch.cat([near, far]), torch.cat([torch.ones(50), torch.ones(50)]).long()
    test_y = torch.zeros(50, dtype=torch.long)
    found = nearest_l2(base, test_y, train_x, train_y)
    expected = brute_force(base, test_y, train_x, train_y, 2)
    assert torch.equal(found.index, expected.indices)
    rel = ((found.distance.double() - expected.values) / expected.values).abs().max()
    assert rel <= 1e-5, rel
    # The product form on its own is far off at this scale (what the re-check is for).
    a, b = base[0], near[0]
    approx = ((a @ a) + (b @ b) - 2 * (a @ b)).clamp_min(0).sqrt()
    assert abs(approx.item() - 1e-3) > 1e-4


def test_same_label_duplicates_are_skipped_and_zero_distance_other_label():
    train_x = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    train_y = torch.tensor([0, 1, 1])
    test_x = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    test_y = torch.tensor([0, 0])
    for nearest in (nearest_l2, nearest_linf):
        found = nearest(test_x, test_y, train_x, train_y)
        # image 0 equals a class-0 training image (skipped); image 1 equals a class-1 one.
        assert found.distance.tolist() == [1.0, 0.0]
        assert found.index.tolist() == [1, 1]


def test_no_other_label_gives_inf():
    found = nearest_l2(torch.zeros(2, 4), torch.tensor([0, 1]), torch.ones(3, 4), torch.tensor([0, 0, 0]))
    assert found.distance[0].item() == math.inf and found.index[0].item() == -1
    assert found.distance[1].item() == pytest.approx(2.0)


def test_summarize():
    stats = summarize(torch.tensor([0.0, 2.0, 4.0, 0.5, math.inf]))
    assert stats["mean"] == pytest.approx((0 + 2 + 4 + 0.5) / 4)
    assert stats["median"] == 0.5  # lower median of the finite values
    assert stats["data_lipschitz"] == pytest.approx(2.0)  # 1 / smallest nonzero
