"""``python -m tulip.bench memory``: the peak memory of one training step of every regularizer.

For each ``conf/regularizer`` option (default: every option the regularizers benchmark times;
``--options`` to choose), in one process, on one model built from the real config (``--model``,
default cnn_small) and one batch of the real mnist5k training set (``--batch-size``, default 128):
the peak memory of one training step as ``tulip.train.loop.train_one_epoch`` takes it — the loss's
forward pass, ``zero_grad``, the backward pass into the weights and the optimizer step (``conf/optim``'s
default) — above what persists between steps (weights, their gradients, the optimizer's state, the
batch), and its ratio to the plain step's (``regularizer=none``). Each option's first step is an
unmeasured warm-up (it allocates the optimizer's momentum and any state the loss keeps); then
``--rounds`` rounds (default 3) measure every option in turn, and the table gives the medians.

How the peak is measured:

- CUDA: ``torch.cuda.max_memory_allocated()`` after ``torch.cuda.reset_peak_memory_stats()``, minus
  ``torch.cuda.memory_allocated()`` before the step: the caching allocator's count of live tensor
  blocks (cuDNN workspaces included), not what the cache has reserved from the driver.
- CPU: there is no allocator counter, so the step runs under ``torch.profiler.profile(profile_memory=True)``
  and the peak is that of the running sum of the profiler's allocation records (positive bytes when a
  block is allocated, negative when it is freed), in time order. Those are the raw ``[memory]``
  records of the profiler's result (``prof.profiler.kineto_results.events()``): the ``[memory]`` rows
  of ``prof.events()`` are only the records that fall outside every operator, and an operator's
  ``cpu_memory_usage`` sums its children's records too, so neither gives a running peak. The profiler
  cannot size a block allocated before it started, and drops such a block's free, which would overstate
  the peak by the blocks the step frees (the previous step's gradients, state a loss replaces
  every step). So one unmeasured step runs inside the same profile first (torch's warning "Memory block
  of unknown size was allocated before the profiling started" is about that step's frees): the measured
  step then frees only blocks the profiler has seen, and its peak is taken relative to the running sum
  where it starts (a ``record_function`` mark). Checked here: every step's records sum to 0 (a steady
  step frees all it allocates, the old gradients included), and with glibc's mmap threshold at 64 KiB
  the growth of the resident set's high-water mark over one step (``/proc/self/clear_refs``) agreed
  within 3 % for none, lip and pgd_linf.

Caveats: on CPU only allocations through PyTorch's CPU allocator are seen (tensor storage and what
else PyTorch allocates through it), not memory that MKL/oneDNN or Python allocate by themselves; and
only allocations on threads the profiler follows (the default table was measured with
``OMP_NUM_THREADS=1``; 2 threads gave the same figures for none, lip and pgd_linf). Byte counts are
the sizes requested, without the allocator's rounding (CUDA's count includes its 512-byte
rounding). CPU and CUDA figures differ because their kernels allocate differently; compare ratios
within one device. The peak is the step's own need: the process's total adds the model, its
gradients, the optimizer's state, the dataset and the allocator's caching or fragmentation.
"""
import argparse
import statistics
from typing import Callable

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from torch.profiler import ProfilerActivity, profile, record_function

from tulip.bench.attacks import cpu_name
from tulip.bench.regularizers import CONF, options
from tulip.data import load_dataset
from tulip.train.loss import build_loss
from tulip.build import build_model

MEASURED = "tulip.bench.memory: measured step"  # the record_function mark of the measured CPU step
MiB = 2 ** 20


def cpu_step_peak(step: Callable[[], None]) -> tuple[int, int]:
    """(peak, net) bytes of `step()` on the CPU above the allocations live when it starts.

    `net` is what the step leaves allocated (bytes freed count against it): for a training step that
    is its new gradients minus the previous ones, 0 in a steady state — a check that every free the
    step makes is on record.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()  # so that every block the measured step frees was allocated on record
        with record_function(MEASURED):
            step()
    events = prof.profiler.kineto_results.events()
    (start,) = [e.start_ns() for e in events if e.name() == MEASURED]
    # a stable sort on the time alone: records of one nanosecond keep the order they were made in
    records = sorted(((e.start_ns(), e.nbytes()) for e in events
                      if e.name() == "[memory]" and e.device_type().name == "CPU"), key=lambda r: r[0])
    running = peak = 0  # relative to the start of the measured step
    for time_ns, nbytes in records:
        if time_ns >= start:
            running += nbytes
            peak = max(peak, running)
    return peak, running


def cuda_step_peak(step: Callable[[], None], device: torch.device) -> tuple[int, int]:
    """(peak, net) bytes of `step()` on a CUDA device above the memory allocated when it starts."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before, torch.cuda.memory_allocated(device) - before


def measure(names: list[str], model_name: str = "cnn_small", batch_size: int = 128,
            device: torch.device | str = "cpu", rounds: int = 3, strict: bool = True):
    """Peak step memory per regularizer option: ({option: [bytes per round]}, {option: why skipped}, model).

    An option the model cannot train with (build_loss's ValueError: GloRo needs a BatchNorm-free
    chain) raises SystemExit if `strict`, else is skipped with the reason.
    """
    device = torch.device(device)
    with initialize_config_dir(str(CONF), version_base=None):
        configs = {name: compose("config", overrides=[f"regularizer={name}", f"model={model_name}"])
                   for name in names}
    cfg = next(iter(configs.values()))
    data = load_dataset(cfg.dataset, device)
    torch.manual_seed(0)
    model = build_model(cfg, data, device).train()
    optimizer = instantiate(cfg.optim)(model.parameters())  # a partial, as tulip.train.loop builds it
    weights = [p for p in model.parameters() if p.requires_grad]
    idx = torch.randperm(len(data.train_y))[:batch_size].to(device)
    x, y = data.augment(data.train_x[idx]), data.train_y[idx]

    losses, skipped = {}, {}
    for name in names:
        try:
            losses[name] = build_loss(configs[name].reg, model)
        except ValueError as error:  # build_loss names the reg.* key the model fails
            if strict:
                raise SystemExit(f"regularizer={name} with model={model_name}: {error}")
            skipped[name] = str(error)

    def step_of(loss_fn):
        def step():  # train_one_epoch's step; its locals (the graph) are freed when it returns
            out = loss_fn(model, x, y)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward(inputs=weights)
            optimizer.step()
        return step

    steps = {name: step_of(loss_fn) for name, loss_fn in losses.items()}
    for step in steps.values():  # momentum buffers, a loss's kept state
        step()
    peaks = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            peak, _ = cuda_step_peak(step, device) if device.type == "cuda" else cpu_step_peak(step)
            peaks[name].append(peak)
    return peaks, skipped, model


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tulip.bench memory", description=__doc__.split("\n")[0])
    parser.add_argument("--options", nargs="*", default=None, help="regularizer options (default: all)")
    parser.add_argument("--model", default="cnn_small", help="a conf/model option (default cnn_small)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    names = list(args.options or options())
    unknown = set(names) - set(options())
    if unknown:
        raise SystemExit(f"unknown regularizer(s) {sorted(unknown)}; known: {', '.join(options())}")
    names = ["none", *(name for name in names if name != "none")]  # the reference first
    device = torch.device(args.device)
    peaks, skipped, model = measure(names, args.model, args.batch_size, device, args.rounds,
                                    strict=bool(args.options))
    median = {name: statistics.median(values) for name, values in peaks.items()}

    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"{type(model).__name__} (model={args.model}), mnist5k batch {args.batch_size}, {device} ({machine}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; peak above the memory live between "
          f"steps, medians of {args.rounds} rounds\n")
    print("| regularizer | peak step memory MiB | × plain |")
    print("|---|---:|---:|")
    for name in peaks:
        print(f"| {name} | {median[name] / MiB:.1f} | {median[name] / median['none']:.2f} |")
    for name, why in skipped.items():
        print(f"\nnot measured: {name} cannot train {type(model).__name__} ({why}); "
              f"measure it with --model cnn_4c3f")
