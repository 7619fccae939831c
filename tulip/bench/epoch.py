"""``python -m tulip.bench epoch``: what measuring costs next to training, per model.

For each ``--models`` option (default cnn_small and resnet18, at their default sizes) on mnist5k, in one
process, interleaved over ``--rounds`` rounds (medians): one training epoch (plain cross-entropy, SGD),
the per-epoch measurements as the defaults make them (test error and loss on the whole test set;
the Lipschitz figures on ``eval.n`` images every ``eval.every`` epochs, averaged over those epochs, with
the layer product's estimate), and the full measurement, guaranteed bound included, that the summary
gets once after the last epoch. The per-epoch column's ratio to
the training epoch is what every epoch of a run pays for its curves.
"""
import argparse
import statistics
import time

import torch
from hydra import compose, initialize_config_dir

from tulip.bench.attacks import cpu_name
from tulip.config_files import config_dir
from tulip.data import class_balanced_subset, load_dataset
from tulip.evaluate.measures import measure
from tulip.train.loss import build_loss
from tulip.build import build_model
from tulip.train.loop import train_one_epoch


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tulip.bench epoch", description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cnn_small", "resnet18"], help="conf/model options")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", nargs="*", default=[], help="config overrides, e.g. eval.n=100 eval.every=2")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(call) -> float:
        sync()
        start = time.perf_counter()
        call()
        sync()
        return time.perf_counter() - start

    rows = []
    for name in args.models:
        with initialize_config_dir(str(config_dir()), version_base="1.3"):
            cfg = compose("config", overrides=[f"model={name}", *args.set])
        data = load_dataset(cfg.dataset, device)
        torch.manual_seed(0)
        model = build_model(cfg, data, device)
        loss_fn = build_loss(cfg.reg, model)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        images = class_balanced_subset(data.test_y, cfg.eval.n, seed=0)
        x, y, batch = data.test_x, data.test_y, cfg.test_batch_size
        every = cfg.eval.every
        times = {"train": [], "per_epoch": [], "final": []}
        for _ in range(args.rounds):
            times["train"].append(timed(lambda: train_one_epoch(model, loss_fn, optimizer, data, cfg.batch_size,
                                                                epoch=1, progress=False)))
            with_figures = timed(lambda: measure(model, x, y, batch, images, guaranteed_bound=False))
            without = timed(lambda: measure(model, x, y, batch, images, lipschitz=False))
            times["per_epoch"].append((with_figures + (every - 1) * without) / every)
            times["final"].append(timed(lambda: measure(model, x, y, batch)))
        median = {k: statistics.median(v) for k, v in times.items()}
        rows.append((name, median, cfg.eval.n, every))

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"mnist5k ({len(data.train_y)} training, {len(data.test_y)} test images), {device} ({machine}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; medians of {args.rounds} rounds\n")
    print("| model | training epoch (s) | per-epoch measurements (s) | × epoch | final full measurement (s) "
          "| × epoch | eval.n, eval.every |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, t, n, every in rows:
        print(f"| {name} | {t['train']:.3f} | {t['per_epoch']:.3f} | {t['per_epoch'] / t['train']:.2f} | "
              f"{t['final']:.3f} | {t['final'] / t['train']:.2f} | {n}, {every} |")
