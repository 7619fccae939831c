"""Shared test helpers: compose the real Hydra config and shrink it.

Tests build their config exactly as `python run.py` does (same conf/ folder, same defaults), then
shrink it with overrides: one epoch, subsets of mnist5k, W&B disabled unless W&B is under test.
"""
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
sys.path.insert(0, str(Path(__file__).parent))  # for tests/wandb_records.py
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
    import tulip.train
    from tulip.main import run

    real_measure, calls = tulip.train.measure, []

    def crash_on_second_epoch(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated preemption")
        return real_measure(*args, **kwargs)

    monkeypatch.setattr(tulip.train, "measure", crash_on_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, run_dir)
    monkeypatch.setattr(tulip.train, "measure", real_measure)
