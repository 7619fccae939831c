"""Shared test helpers: compose the real Hydra config and shrink it.

Tests build their config exactly as `python run.py` does (same conf/ folder, same defaults), then
shrink it with overrides: one epoch, subsets of mnist5k, W&B disabled unless W&B is under test.
"""
import copy
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "conf"
sys.path.insert(0, str(Path(__file__).parent))  # for tests/support/
# One intra-op thread per process: tests start several jobs at once (multiruns, SLURM), and
# oversubscribed BLAS threads on 2 cores made small SVDs and convolutions 10x slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# One epoch on 512 training and 200 test images of mnist5k, on the CPU, without W&B or attacks; the
# per-epoch figures on all 200 test images, so the summary needs no second measurement.
TINY = ["epochs=1", "batch_size=64", "dataset.train_subset=512", "dataset.test_subset=200",
        "device=cpu", "wandb.mode=disabled", "attack=none", "eval.n=null"]


def compose_with_hydra(*overrides: str, config_dir: Path = CONF_DIR, config_name: str = "config") -> DictConfig:
    """The config with its `hydra` node, as `python run.py [--config-dir D --config-name N] <overrides>`
    composes it (a sweep file in sweeps/ finds conf/ through hydra.searchpath)."""
    GlobalHydra.instance().clear()
    if config_dir != CONF_DIR:
        overrides = (f"hydra.searchpath=[file://{CONF_DIR}]", *overrides)
    with initialize_config_dir(str(config_dir), version_base="1.3"):
        return compose(config_name, overrides=list(overrides), return_hydra_config=True)


def compose_config(*overrides: str, tiny: bool = True) -> DictConfig:
    """The config `python run.py <overrides>` would get, with Hydra's job info set as in a job."""
    cfg = compose_with_hydra(*(TINY if tiny else []), *overrides)
    HydraConfig.instance().set_config(cfg)  # run() reads the chosen options and overrides here
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


# Narrow versions of every model so model and measure tests stay fast on 2 CPU cores.
SHRINK = {
    "mlp": ["model.hidden=[32,16]"],
    "cnn_small": ["model.channels=[4,8]", "model.hidden=16"],
    "cnn_4c3f": ["model.channels=[4,8]", "model.hidden=16"],
    "allcnn": ["model.channels=[4,8]"],
    "resnet18": ["model.width=4", "model.blocks=[1,1,1,1]"],
    "wide_resnet": ["model.depth=10", "model.width=1"],
    "resnext34_2x32": ["model.base_width=4", "model.blocks=[2,1,1]"],
}


def build_model_option(name: str, overrides=(), channels: int = 1, size: int = 28,
                       classes: int = 10) -> torch.nn.Module:
    """The model `model=<name> <overrides>` composes to, for inputs (channels, size, size)."""
    cfg = compose_config(f"model={name}", *overrides, tiny=False)
    return instantiate(cfg.model, in_channels=channels, num_classes=classes, image_size=size)


# (model, regularizer) pairs whose objective precision=bf16 must compute as float32 does: every penalty
# family, on cnn_small (BatchNorm) and on the BatchNorm-free cnn_4c3f that GloRo needs.
BF16_CASES = [("cnn_small", r) for r in ("none", "lip", "gradnorm", "gradnorm_fd", "J1", "J2", "Jinf", "lip+J2",
                                         "pgd_l2", "pgd_linf", "trades")] + \
             [("cnn_4c3f", r) for r in ("none", "lip", "gradnorm", "gradnorm_fd", "J2", "gloro")]


def objective_in_fp32_and_bf16(model_name: str, regularizer: str, device):
    """(StepOutput, weight gradient) of `regularizer=<regularizer>` on one batch of 64 digits, in float32
    and under precision=bf16's autocast (tulip.train.step.autocast_for): same weights, batch and random draws,
    each on its own copy of the model (a train-mode step updates BatchNorm's running statistics).

    TRADES' adversary is a chaotic function of the gradients' signs (bf16 changes half of its pixels and
    the KL by 7 %), so TRADES is given the float32 step's adversary: what is compared is its penalty."""
    from tulip.data import load_dataset
    from tulip.train.objective import build_objective
    from tulip.train.step import autocast_for

    cfg = compose_config(f"regularizer={regularizer}", f"model={model_name}", *SHRINK[model_name])
    data = load_dataset(cfg.dataset, torch.device("cpu"))
    x, y = data.train_x[:64].to(device), data.train_y[:64].to(device)
    torch.manual_seed(0)
    model = build_model_option(model_name, SHRINK[model_name]).to(device).train()
    outputs, chosen = [], None
    for precision in ("fp32", "bf16"):
        on_copy = copy.deepcopy(model)
        objective = build_objective(cfg.reg, on_copy)
        if regularizer == "trades":
            torch.manual_seed(1)
            chosen = chosen or objective.batch(on_copy, x, y)
            objective.batch = lambda model, x, y: chosen
        torch.manual_seed(1)  # the same PGD starts
        with autocast_for(precision, torch.device(device))():
            out = objective(on_copy, x, y)
        gradient = torch.autograd.grad(out.loss, list(on_copy.parameters()))  # as training, outside autocast
        outputs.append((out, torch.cat([g.flatten() for g in gradient])))
    return outputs


@pytest.fixture
def make_config():
    return compose_config


def dense_matrix(linear_map, shape):
    """The matrix of a linear map on inputs of `shape`, column by column (small shapes only)."""
    d = math.prod(shape)
    basis = torch.eye(d, dtype=torch.float64).view(d, *shape)
    return linear_map(basis).reshape(d, -1).T


def with_random_statistics(layer: torch.nn.Module) -> torch.nn.Module:
    """`layer` in float64 and eval mode, its BatchNorms with nontrivial running statistics and scales."""
    torch.manual_seed(0)
    layer = layer.double()
    for module in layer.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.running_var.uniform_(0.1, 4.0)
            module.running_mean.normal_()
            module.weight.data.normal_()
    return layer.eval()


@torch.no_grad()
def exact_operator_norm(layer: torch.nn.Module, shape) -> float:
    """The L2 operator norm of an affine layer's linear part on inputs of `shape`, by a dense SVD."""
    offset = layer(torch.zeros(1, *shape, dtype=torch.float64))  # BN / bias shift
    return torch.linalg.svdvals(dense_matrix(lambda v: layer(v) - offset, shape))[0].item()


def run_interrupted_in_second_epoch(cfg: DictConfig, run_dir: Path, monkeypatch) -> None:
    """Run `cfg` in `run_dir`, killed (KeyboardInterrupt) during epoch 2's measurements: the folder then
    holds epoch 1's checkpoint, as after a preemption."""
    import tulip.train.loop
    from tulip.main import run

    real_measure, calls = tulip.train.loop.measure, []

    def crash_on_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated preemption")
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(tulip.train.loop, "measure", crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, run_dir)
    monkeypatch.setattr(tulip.train.loop, "measure", real_measure)
