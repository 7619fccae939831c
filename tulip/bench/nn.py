"""``python -m tulip.bench nn``: nearest differently-labelled training image, Tulip vs the original.

Problem: 1,000 test × 5,000 train images of 3,072 values (CIFAR-sized), uniform in [0, 1], 10 classes.

- Tulip (tulip.evaluate.neighbours.nearest_l2): chunked ‖a‖² + ‖b‖² − 2·a·b with an exact re-check of the
  candidates, on the whole problem.
- The original (``nnattack``): blocks of test × train images whose differences are materialised as a
  (test × train × N) tensor, then normed. A 500 × 500 block of 3,072 values is 3 GB, so it is timed on
  a subset (``--subset-test`` × ``--subset-train``, one block) and scaled by the number of pairs —
  its cost is linear in the pairs.

Timings are interleaved over ``--rounds`` rounds (medians), so load from other processes hits both
alike. Distances are compared on the subset: the largest relative difference between the two methods.
L∞ (tulip.evaluate.neighbours.nearest_linf) is timed once for reference.
"""
import argparse
import math
import statistics
import time

import torch

from tulip.bench.attacks import cpu_name
from tulip.evaluate.neighbours import nearest_l2, nearest_linf


def original_broadcast(test_x, test_y, train_x, train_y) -> torch.Tensor:
    """The original method on one block: materialise every difference, norm, mask, minimum."""
    diff = test_x.flatten(1)[:, None, :] - train_x.flatten(1)[None, :, :]  # (t, m, N)
    dist = diff.norm(dim=2)
    dist[test_y[:, None] == train_y[None, :]] = math.inf
    return dist.min(dim=1).values


def _timed(fn):
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tulip.bench nn", description=__doc__.split("\n")[0])
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--subset-test", type=int, default=100)
    parser.add_argument("--subset-train", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    train_x = torch.rand(args.train, args.dim, generator=generator).to(device)
    train_y = torch.randint(0, 10, (args.train,), generator=generator).to(device)
    test_x = torch.rand(args.test, args.dim, generator=generator).to(device)
    test_y = torch.randint(0, 10, (args.test,), generator=generator).to(device)
    sub = (test_x[:args.subset_test], test_y[:args.subset_test],
           train_x[:args.subset_train], train_y[:args.subset_train])
    scale = (args.test * args.train) / (args.subset_test * args.subset_train)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run_tulip():
        result = nearest_l2(test_x, test_y, train_x, train_y)
        sync()
        return result

    def run_original():
        result = original_broadcast(*sub)
        sync()
        return result

    run_tulip(), run_original()  # warm-up
    tulip_times, original_times = [], []
    for _ in range(args.rounds):
        tulip_times.append(_timed(run_tulip)[0])
        original_times.append(_timed(run_original)[0] * scale)
    linf_time, _ = _timed(lambda: (nearest_linf(test_x, test_y, train_x, train_y), sync()))

    # Same distances: both methods on the subset problem.
    reference = original_broadcast(*sub).double()
    ours = nearest_l2(*sub).distance.double()
    rel_diff = ((ours - reference).abs() / reference).max().item()

    tulip_s, original_s = statistics.median(tulip_times), statistics.median(original_times)
    print(f"Nearest differently-labelled training image, L2: {args.test} test x {args.train} train x "
          f"{args.dim} values, {device} ({cpu_name()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}); median of {args.rounds} rounds\n")
    print("| method | time (s) | speed-up |")
    print("|---|---:|---:|")
    print(f"| original broadcast differences (timed on {args.subset_test} x {args.subset_train}, "
          f"scaled x{scale:g}) | {original_s:.2f} | 1.0x |")
    print(f"| Tulip chunked ‖a‖²+‖b‖²−2ab + exact re-check | {tulip_s:.3f} | {original_s / tulip_s:.0f}x |")
    print(f"| Tulip L∞ (cdist p=inf, chunked; for reference) | {linf_time:.2f} | - |")
    print(f"\nlargest relative difference of the L2 distances (subset): {rel_diff:.2e}")
