"""A run folder and everything in it: paths, atomic writers, summary.json, and loading a run back.

    <run folder>/
        checkpoints/last.pt   the latest epoch: weights, optimizer, scheduler, RNG states, config, history
        checkpoints/best.pt   the epoch with the lowest test error (same contents)
        metrics.jsonl         one JSON object per completed epoch (tulip.metric_keys)
        summary.json          the run's record: status, final and best metrics, evaluation results
        attacks.csv           per-image adversarial distances of the final evaluation
        bounds.csv            per-image lower bounds and certified radii
        nn.csv                per-image nearest differently-labelled training image
        wandb/                the W&B run(s) of the job's attempts

Jobs are killed at any moment (preemption, time limits) while sweeps and reports read these files, so
every file is written to a temporary file in the same folder and renamed over the old one: a reader sees
the old complete file or the new complete file, never half of one. Checkpoints are read with
``weights_only=True``, so a checkpoint holds tensors and plain data but never runs pickled code.
"""
import csv
import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, IO

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from tulip.config import ConfigError
from tulip.data import Data, load_dataset


def replace_atomically(path: Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Write `path` through `write(file)` into a temporary sibling, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: Path) -> None:
    replace_atomically(path, lambda f: f.write(text))


def finite_or_none(metrics: dict) -> dict:
    """JSON has no NaN/inf; summary.json and W&B get None for a non-finite float."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class RunFolder:
    path: Path

    def __post_init__(self):
        object.__setattr__(self, "path", Path(self.path))

    def checkpoint(self, which: str) -> Path:
        """checkpoints/last.pt (which="last") or checkpoints/best.pt (which="best")."""
        return self.path / "checkpoints" / f"{which}.pt"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_file(self) -> Path:
        return self.path / "summary.json"

    @property
    def wandb_dir(self) -> Path:
        return self.path / "wandb"

    def csv_file(self, name: str) -> Path:
        return self.path / f"{name}.csv"

    # --- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self, state: dict, which: str) -> None:
        replace_atomically(self.checkpoint(which), lambda f: torch.save(state, f), binary=True)

    def load_checkpoint(self, which: str, device: torch.device | str = "cpu") -> dict:
        path = self.checkpoint(which)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        try:
            return torch.load(path, map_location=device, weights_only=True)
        except Exception as error:  # a truncated or foreign file: say which file
            raise RuntimeError(f"cannot read checkpoint {path}: {error}") from error

    # --- metrics.jsonl ------------------------------------------------------------------------------

    def write_metrics_history(self, history: list[dict]) -> None:
        """Rewrite metrics.jsonl from the checkpointed history (a resumed run drops lost epochs)."""
        write_text_atomic("".join(json.dumps(row) + "\n" for row in history), self.metrics_file)

    def append_metrics(self, row: dict) -> None:
        with self.metrics_file.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def read_metrics(self) -> list[dict]:
        """Per-epoch rows; a half-written last line (a run killed mid-write) is skipped."""
        if not self.metrics_file.exists():
            return []
        rows = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
        return rows

    # --- summary.json -------------------------------------------------------------------------------

    def write_summary(self, values: dict, *, merge: bool = False, drop_prefixes: tuple[str, ...] = ()) -> dict:
        """Write summary.json, the one place that does; returns what was written.

        Its keys: ``status`` (finished | failed | diverged), ``epoch`` (epochs completed), ``overrides``
        (the job's command line), ``error`` (why it failed or diverged), ``time/*`` and metric keys
        (tulip.metric_keys). Training writes the whole file (``merge=False``); mode=evaluate and
        mode=summary merge into it (``merge=True``), first dropping the keys under ``drop_prefixes`` so
        a re-evaluation leaves no stale results. Non-finite floats are written as null.
        """
        summary = {}
        if merge and self.summary_file.is_file():
            summary = {k: v for k, v in read_json(self.summary_file).items() if not k.startswith(drop_prefixes)}
        summary.update(finite_or_none(values))
        text = json.dumps(summary, indent=2, sort_keys=True, default=str) + "\n"
        write_text_atomic(text, self.summary_file)
        return summary

    def read_summary(self) -> dict:
        return read_json(self.summary_file) if self.summary_file.is_file() else {}

    # --- per-image tables ---------------------------------------------------------------------------

    def write_csv(self, name: str, columns: dict[str, list]) -> None:
        """Columns of equal length to <name>.csv (floats as repr, so inf stays inf)."""
        def write(f):
            writer = csv.writer(f)
            writer.writerow(columns)
            writer.writerows(zip(*columns.values()))
        replace_atomically(self.csv_file(name), write)


# --- loading a run back -----------------------------------------------------------------------------

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
    state = folder.load_checkpoint(which, device)
    cfg = OmegaConf.create(state["config"])
    data = load_dataset(cfg.dataset, device)
    model = build_model(cfg, data, device)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise ConfigError(f"checkpoint {checkpoint_path} does not fit the model it was saved with "
                          f"(model={cfg.model.get('_target_')}): {error}") from error
    return LoadedRun(folder, cfg, model.eval(), data, state)
