"""``python -m tulip.bench attacks``: one Foolbox attack on the same images, batched vs one image per call.

The original evaluated Foolbox 1.x attacks one image at a time; Tulip hands Foolbox 3 whole batches
(tulip.evaluate.attacks.attack_distances). This benchmark trains tulip.nn.models.CNNSmall for one epoch on mnist5k
(seeded), then runs the same attack (default: DDN, 50 steps) on the same ``--n`` test images both
ways, interleaved over ``--rounds`` rounds (medians), and compares the median L2 distances found.
``--device cuda`` measures the GPU.

``--attack OPTION`` (any other option of conf/attack/, e.g. autoattack_l2 or autoattack_fast_linf)
instead runs every attack of that option once, as the evaluation builds them from the config (``--set``
adds overrides, e.g. ``--set attack.methods.square_l2.n_queries=1000``), and prints each one's time
and robust error at every ε of ``attack.epsilons``, and the per-image best over them (the ensemble).
"""
import argparse
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

from tulip.evaluate import attacks
from tulip.config_files import config_dir
from tulip.data import mnist5k
from tulip.evaluate.bounds import error_curve
from tulip.evaluate.final import build_evaluation
from tulip.runs.metric_keys import NORMS
from tulip.nn.models import CNNSmall



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
    parser.add_argument("--attack", default="ddn", help="ddn (batched vs per image), or an attack "
                        "option to time once per attack, e.g. autoattack_l2")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides for --attack")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    model, test_x, test_y = trained_cnn(device)
    x, y = test_x[:args.n], test_y[:args.n]
    if args.attack != "ddn":
        return time_option(args.attack, args.set, model, x, y, device, sync)
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


def time_option(option: str, overrides: list[str], model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                device: torch.device, sync) -> None:
    """Every attack of ``attack=<option>`` once on x, y: its time and robust error, then the ensemble's."""
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = compose("config", overrides=[f"attack={option}", f"attack.n={len(y)}", *overrides])
    evaluation = build_evaluation(cfg)
    epsilons = evaluation.settings.epsilons
    norms = [norm for norm in NORMS if any(a.norm == norm for a in evaluation.attacks.values())]
    best = {norm: torch.full((len(y),), torch.inf) for norm in NORMS}
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{cpu_name()}, {torch.get_num_threads()} threads")
    command = " ".join([f"attack={option}", *overrides])
    print(f"{command} on {len(y)} mnist5k test images, CNNSmall after 1 epoch; "
          f"{device} ({machine}), torch {torch.__version__}\n")
    print("| attack | norm | time (s) | " + " | ".join(
        f"error % @{eps:g}" for norm in norms for eps in epsilons[norm]) + " |")
    print("|---|---|---:|" + "---:|" * sum(len(epsilons[norm]) for norm in norms))
    total = 0.0
    for name, attack in evaluation.attacks.items():
        torch.manual_seed(0)  # as the evaluation: seeded before it runs
        started = time.perf_counter()
        distances = attack.distances(model, x, y, epsilons[attack.norm], evaluation.settings.batch_size)
        sync()
        elapsed = time.perf_counter() - started
        total += elapsed
        for norm in NORMS:
            best[norm] = torch.minimum(best[norm], distances[norm])
        cells = [f"{error:.1f}" if norm == attack.norm else "" for norm in norms
                 for _, error in error_curve(distances[norm], epsilons[norm])]
        print(f"| {name} | {attack.norm} | {elapsed:.1f} | " + " | ".join(cells) + " |")
    cells = [f"{error:.1f}" for norm in norms for _, error in error_curve(best[norm], epsilons[norm])]
    print(f"| **best (ensemble)** | {','.join(norms)} | {total:.1f} | " + " | ".join(cells) + " |")
