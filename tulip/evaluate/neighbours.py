"""Nearest differently-labelled training image of every test image, in L2 and L∞ (``nnattack``).

The distance from a test image to the closest training image of another class is an adversarial
distance that needs no model: a classifier that fits the training data must change its prediction
somewhere on the segment between them. Finlay, Oberman & Abbasi (arXiv 1810.00953) report its mean,
median and the "data Lipschitz constant" 1 / min distance.

The original built a (500 × 500 × N) tensor of differences per block. Here nothing of size
(test × train × N) ever exists:

- L2: squared distances ‖a‖² + ‖b‖² − 2·a·b for a chunk of test images against the whole training set
  (one matrix product), same-label pairs masked, the ``candidates`` smallest kept; the float32
  cancellation error of that form is then removed by recomputing ‖a − b‖ exactly for those candidates
  and taking the smallest.
- L∞ has no product form: ``torch.cdist(p=inf)`` per chunk computes it directly, without
  materialising differences.
"""
from typing import NamedTuple

import torch


class Neighbours(NamedTuple):
    distance: torch.Tensor  # (n_test,) distance to the nearest training image of another label
    index: torch.Tensor  # (n_test,) index of that training image


def _chunk_rows(entries_per_row: int, budget: int) -> int:
    """Test rows per chunk so that a chunk holds ~``budget`` entries."""
    return max(1, budget // max(1, entries_per_row))


def nearest_l2(test_x: torch.Tensor, test_y: torch.Tensor, train_x: torch.Tensor, train_y: torch.Tensor,
               candidates: int = 8, budget: int = 1 << 24) -> Neighbours:
    """L2 distance from every test image to its nearest training image with a different label.

    test_x (n, ...) and train_x (m, ...) on the same device, labels (n,) and (m,). Works on chunks of
    test rows holding ~``budget`` pairwise entries; re-checks the ``candidates`` closest per row exactly.
    A test image with no differently-labelled training image gets +inf and index -1.
    """
    train = train_x.flatten(1)
    train_sq = (train * train).sum(1)  # (m,)
    distances, indices = [], []
    k = min(candidates, len(train))
    # Bounded by both the (rows × m) distance matrix and the (rows × k × N) re-check differences.
    rows = _chunk_rows(max(len(train), k * train.shape[1]), budget)
    for start in range(0, len(test_x), rows):
        test = test_x[start:start + rows].flatten(1)  # (r, N)
        labels = test_y[start:start + rows]
        squared = (test * test).sum(1, keepdim=True) + train_sq - 2.0 * test @ train.T  # (r, m)
        squared.masked_fill_(labels[:, None] == train_y[None, :], torch.inf)
        approx, candidate_idx = squared.topk(k, dim=1, largest=False)  # (r, k)
        # Exact re-check: (r, k, N) differences for the k candidates only.
        exact = (test[:, None, :] - train[candidate_idx]).norm(dim=2)
        exact = exact.masked_fill(approx.isinf(), torch.inf)
        best, which = exact.min(dim=1)
        best_idx = candidate_idx.gather(1, which[:, None]).squeeze(1)
        distances.append(best)
        indices.append(torch.where(best.isinf(), -1, best_idx))
    return Neighbours(torch.cat(distances), torch.cat(indices))


def nearest_linf(test_x: torch.Tensor, test_y: torch.Tensor, train_x: torch.Tensor,
                 train_y: torch.Tensor, budget: int = 1 << 22) -> Neighbours:
    """L∞ distance from every test image to its nearest training image with a different label
    (exact; ``torch.cdist`` with p=inf on chunks of ~``budget`` pairwise entries)."""
    train = train_x.flatten(1)
    distances, indices = [], []
    rows = _chunk_rows(len(train), budget)
    for start in range(0, len(test_x), rows):
        test = test_x[start:start + rows].flatten(1)
        labels = test_y[start:start + rows]
        dist = torch.cdist(test, train, p=float("inf"))  # (r, m)
        dist.masked_fill_(labels[:, None] == train_y[None, :], torch.inf)
        best, best_idx = dist.min(dim=1)
        distances.append(best)
        indices.append(torch.where(best.isinf(), -1, best_idx))
    return Neighbours(torch.cat(distances), torch.cat(indices))


def summarize(distance: torch.Tensor) -> dict[str, float]:
    """Mean and median distance and the data Lipschitz constant 1 / (smallest nonzero distance).

    Infinite distances (no image of another label) are left out; a duplicate image with another label
    (distance 0) would make the data Lipschitz constant infinite, so it is left out of the minimum.
    """
    finite = distance[distance.isfinite()].double()
    nonzero = finite[finite > 0]
    return {
        "mean": finite.mean().item() if len(finite) else float("nan"),
        "median": finite.median().item() if len(finite) else float("nan"),
        "data_lipschitz": 1.0 / nonzero.min().item() if len(nonzero) else float("inf"),
    }
