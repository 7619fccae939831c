"""A model built from the config for its dataset, and a saved run rebuilt from its checkpoint.

Beside tulip/data.py rather than in tulip/runs/ because it joins three things: the config's model
option, the dataset it is sized for, and a run folder's checkpoint. The run-folder layer only reads and
writes files; it builds neither datasets nor models. Training, the evaluation modes and the benchmarks
all build their models here, so a checkpoint always loads into the model it was saved from.
"""
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tulip.config import ConfigError
from tulip.data import Data, load_dataset
from tulip.runs.folder import RunFolder


def build_model(cfg: DictConfig, data: Data, device: torch.device) -> torch.nn.Module:
    # called through a partial so that the model's own ValueError reaches the user unwrapped
    model = instantiate(cfg.model, _partial_=True)(
        in_channels=data.in_channels, num_classes=data.num_classes, image_size=data.image_size)
    return model.to(device)


@dataclass
class LoadedRun:
    folder: RunFolder
    cfg: DictConfig  # the config the run was trained with
    model: torch.nn.Module  # the checkpoint's weights, eval mode, on the device
    data: Data
    checkpoint: dict


def load_run(path: Path | str, device: torch.device, which: str = "best") -> LoadedRun:
    """Rebuild a finished (or running) run's data and model from its checkpoint, for evaluation."""
    folder = RunFolder(path)
    checkpoint_path = folder.checkpoint(which)
    if not checkpoint_path.is_file():
        raise FileNotFoundError(f"run_dir={path}: no checkpoint {checkpoint_path.name} in "
                                f"{checkpoint_path.parent} (is this a Tulip run folder that trained at "
                                f"least one epoch?)")
    state = folder.load_checkpoint(which, device)  # old `_target_` paths already mapped (tulip.runs.targets)
    cfg = OmegaConf.create(state["config"])
    data = load_dataset(cfg.dataset, device)
    model = build_model(cfg, data, device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ConfigError(f"checkpoint {checkpoint_path} does not fit the model it was saved with "
                          f"(model={cfg.model.get('_target_')}): {error}") from error
    return LoadedRun(folder, cfg, model.eval(), data, state)
