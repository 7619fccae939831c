"""``python -m tulip.bench attacks``: one Foolbox attack on the same images, batched vs one image per call.

The original evaluated Foolbox 1.x attacks one image at a time; Tulip hands Foolbox 3 whole batches
(tulip.attacks.attack_distances). This benchmark trains tulip.models.CNNSmall for one epoch on mnist5k
(seeded), then runs the same attack (default: DDN, 50 steps) on the same ``--n`` test images both
ways, interleaved over ``--rounds`` rounds (medians), and compares the median L2 distances found.
``--device cuda`` measures the GPU.
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tulip import attacks
from tulip.data import mnist5k
from tulip.models import CNNSmall


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def trained_cnn(device: torch.device) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """CNNSmall after one seeded epoch on mnist5k; returns (model in eval mode, test_x, test_y)."""
    torch.manual_seed(0)
    data = mnist5k().to(device)
    model = CNNSmall(1, 10, 28).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    order = torch.randperm(len(data.train_y), device=device)
    for start in range(0, len(order), 128):
        idx = order[start:start + 128]
        loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval(), data.test_x, data.test_y


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tulip.bench attacks", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="test images")
    parser.add_argument("--steps", type=int, default=50, help="DDN steps")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model, test_x, test_y = trained_cnn(device)
    x, y = test_x[:args.n], test_y[:args.n]
    attack = attacks.ddn(steps=args.steps)

    def run(batch_size: int):
        started = time.perf_counter()
        distances = attacks.attack_distances(attack, model, x, y, [], batch_size)["l2"]
        sync()
        return time.perf_counter() - started, distances

    run(args.n)  # warm-up
    times = {"batched": [], "per_image": []}
    distances = {}
    for _ in range(args.rounds):
        for mode, batch_size in (("batched", args.n), ("per_image", 1)):
            elapsed, distances[mode] = run(batch_size)
            times[mode].append(elapsed)

    batched_s, single_s = statistics.median(times["batched"]), statistics.median(times["per_image"])
    median = {mode: d.median().item() for mode, d in distances.items()}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{cpu_name()}, {torch.get_num_threads()} threads")
    print(f"DDN ({args.steps} steps, L2) on {args.n} mnist5k test images, CNNSmall after 1 epoch; "
          f"{device} ({machine}), torch {torch.__version__}; median of {args.rounds} rounds\n")
    print("| mode | time (s) | images/s | median L2 distance | failures | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, seconds in (("one image per call (original)", single_s), ("batched (Tulip)", batched_s)):
        key = "per_image" if mode.startswith("one") else "batched"
        print(f"| {mode} | {seconds:.2f} | {args.n / seconds:.1f} | {median[key]:.4f} | "
              f"{int(distances[key].isinf().sum())} | {single_s / seconds:.1f}x |")
    print(f"\nrelative difference of the medians: "
          f"{abs(median['batched'] - median['per_image']) / median['per_image']:.2e}")
