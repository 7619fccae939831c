"""How the training step runs on its device: precision, memory layout, compilation.

`prepare_step` decides all three once per run, from `precision`, `channels_last` and `compile`, and
hands tulip.train.loop a StepSetup: the model the training loss calls, the context around each step's
loss and the memory format of each batch. The step loop itself then tests none of them.
"""
import contextlib
import copy
import functools
import logging
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
from omegaconf import DictConfig

from tulip.data import Data
from tulip.seeding import rng_state, set_rng_state

log = logging.getLogger("tulip.train.loop")  # its lines belong to the training run's log


def autocast_for(precision: str, device: torch.device) -> Callable[[], ContextManager]:
    """The context of the training step's forward passes and penalties: bf16 autocast, or nothing.

    Weights, their gradients and the optimizer state stay float32 (autocast casts bf16 copies for the
    matmuls and convolutions); bf16 has float32's exponent range, so small gradients do not underflow
    and no loss scaling (GradScaler) is needed. The parts that subtract nearby values keep those in
    float32 themselves (the finite-difference penalty, TRADES' KL, GloRo's power iteration).
    """
    if precision == "bf16":
        return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def uses_channels_last(setting, model: torch.nn.Module, device: torch.device) -> bool:
    """`channels_last`: auto is on for a convolutional model on CUDA, whose fast convolution kernels
    (cuDNN's, on tensor cores) are NHWC; off on the CPU and without convolutions, where it only adds copies."""
    if setting == "auto":
        return device.type == "cuda" and any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    return setting


@dataclass
class StepSetup:
    """How the training step runs, decided once per run (`prepare_step`), so that the step loop itself
    tests none of `precision`, `channels_last`, `compile`."""
    model: torch.nn.Module  # what the training loss calls: the model, or its torch.compile wrapper
    autocast: Callable[[], ContextManager] = contextlib.nullcontext  # around the step's loss
    memory_format: torch.memory_format = torch.contiguous_format  # of the step's input batch


def _probe(model, loss_fn, x: torch.Tensor, y: torch.Tensor, autocast) -> Callable[[torch.nn.Module], None]:
    """A function that runs one step's loss and weight gradients through a compiled `model`, so
    that torch.compile compiles (or fails) before training. Nothing of it remains: the batch statistics,
    the random generators and the loss's state are restored, and no .grad is written."""
    def probe(compiled: torch.nn.Module) -> None:
        buffers = [b.clone() for b in model.buffers()]
        rng, state = rng_state(), copy.deepcopy(loss_fn.state_dict())
        try:
            model.train()
            with autocast():
                loss = loss_fn(compiled, x, y).loss
            torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        finally:
            with torch.no_grad():
                for buffer, saved in zip(model.buffers(), buffers):
                    buffer.copy_(saved)
            set_rng_state(rng)
            loss_fn.load_state_dict(state)
    return probe


def compiled_for_training(model, loss_fn, probe: Callable[[torch.nn.Module], None]) -> torch.nn.Module:
    """torch.compile(model) for the training step; where that cannot apply, `model` itself and one log
    line saying why: a loss with double backprop (torch.compile's backward cannot be
    differentiated again), or torch.compile unavailable or failing on `probe`'s step."""
    if loss_fn.double_backprop:
        parts = [f"reg.{name}" for name, part in loss_fn.parts.items() if getattr(part, "needs_graph", False)]
        log.warning("compile=true: training the eager model: %s needs double backprop, which torch.compile "
                    "does not support", ", ".join(parts))
        return model
    try:
        compiled = torch.compile(model)
        probe(compiled)
    except Exception as error:  # no C compiler, a Python torch.compile does not support, an untraceable op…
        why = (str(error).strip().splitlines() or [""])[0]
        log.warning("compile=true: training the eager model: torch.compile failed (%s: %s)",
                    type(error).__name__, why)
        return model
    return compiled


def prepare_step(cfg: DictConfig, model: torch.nn.Module, loss_fn, data: Data,
                 device: torch.device) -> StepSetup:
    """The training step of `cfg.precision`, `cfg.channels_last` and `cfg.compile`. channels_last
    changes `model`'s memory format in place (the same values: checkpoints and the Lipschitz bounds read
    the same weights); the model keeps its own state_dict, never the compiled wrapper's."""
    if device.type == "cuda" and not (torch.are_deterministic_algorithms_enabled()
                                      or torch.backends.cudnn.deterministic):
        # Every step has the same shapes, so cuDNN's autotuning pays once per run. Not when determinism
        # was asked of torch (Tulip has no switch of its own): the fastest algorithm may vary between runs.
        torch.backends.cudnn.benchmark = True
    autocast = autocast_for(cfg.precision, device)
    memory_format = torch.contiguous_format
    if uses_channels_last(cfg.channels_last, model, device):
        memory_format = torch.channels_last
        model.to(memory_format=memory_format)
    step_model = model
    if cfg.compile:
        x = data.train_x[:cfg.batch_size].contiguous(memory_format=memory_format)
        step_model = compiled_for_training(model, loss_fn, _probe(model, loss_fn, x,
                                                                    data.train_y[:cfg.batch_size], autocast))
    return StepSetup(step_model, autocast, memory_format)
