"""A run folder and everything in it: paths, atomic writers, the lock, checkpoints, summary.json.

    <run folder>/
        checkpoints/last.pt   the latest epoch: weights, optimizer, scheduler, RNG states, config, history
        checkpoints/best.pt   the epoch with the lowest test error (same contents)
        metrics.jsonl         one JSON object per completed epoch (tulip.runs.metric_keys)
        summary.json          the run's record: status, final and best metrics, evaluation results
        attacks.csv           per-image adversarial distances of the final evaluation
        bounds.csv            per-image lower bounds and certified radii
        nn.csv                per-image nearest differently-labelled training image
        wandb/                the W&B run(s) of the job's attempts

Jobs are killed at any moment (preemption, time limits) while sweeps and reports read these files, so
every file is written to a temporary file in the same folder and renamed over the old one: a reader sees
the old complete file or the new complete file, never half of one. Checkpoints are read with
``weights_only=True``, so a checkpoint holds tensors and plain data but never runs pickled code. One
process at a time writes a folder (`RunFolder.writer_lock`). A file that cannot be read is reported with
its path and left as it is.

Only files: building the data and the model a checkpoint belongs to is tulip.build's job.
"""
import contextlib
import csv
import fcntl
import json
import logging
import math
import os
import socket
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, IO

import torch
from tulip.runs import metric_keys
from tulip.runs.targets import upgrade_checkpoint

log = logging.getLogger(__name__)


def _rate_key(key: str) -> str:
    """The error rate an interval key belongs to (it goes with its family); any other key as it is."""
    interval = metric_keys.interval_of(key)
    return key if interval is None else interval[1]


class RunFolderError(RuntimeError):
    """A run folder that cannot be used as it is; the message names the file and what to do."""


TEMPORARY_SUFFIX = ".tmp"


def replace_atomically(path: Path, write: Callable[[IO], None], binary: bool = False) -> None:
    """Write `path` through `write(file)` into a temporary sibling, then rename it over `path`.

    A failed write (disk full, quota) removes the temporary file and leaves `path` as it was.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
    except OSError as error:
        raise RunFolderError(f"cannot write {path}: {error}") from error
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        kept = f"the previous {path.name} is intact" if path.exists() else f"no {path.name} was written"
        raise RunFolderError(f"cannot write {path} ({error.strerror or error}); {kept}") from error
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(text: str, path: Path) -> None:
    replace_atomically(path, lambda f: f.write(text))


def finite_or_none(metrics: dict) -> dict:
    """JSON has no NaN/inf; summary.json and W&B get None for a non-finite float."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a damaged file is a RunFolderError naming it (and left as it is)."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunFolderError(f"{path} is not valid JSON ({error}); it was left as it is: repair or "
                             f"delete it, then run again") from error
    if not isinstance(value, dict):
        raise RunFolderError(f"{path} holds a {type(value).__name__}, not a JSON object; it was left as "
                             f"it is: repair or delete it, then run again")
    return value


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

    @property
    def lock_file(self) -> Path:
        return self.path / ".tulip.lock"

    # --- one writer ---------------------------------------------------------------------------------

    @contextlib.contextmanager
    def writer_lock(self, create: bool = True):
        """Hold the folder's lock while this process writes it; a second writer fails at once.

        The lock is an flock, which the kernel drops when its process dies: a run killed by SIGKILL or
        a node failure leaves no stuck lock, and the next run takes the folder over. The lock file
        names its holder for the second writer's message. Temporary files that killed writers left
        behind are removed once the lock is held, when no other process can be writing them.
        `create=False` is for an existing run (mode=evaluate/summary): a missing folder is an error.
        """
        if not create and not self.path.is_dir():
            raise FileNotFoundError(f"run_dir={self.path}: no such folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as error:
            raise RunFolderError(f"cannot write the run folder {self.path}: {error}") from error
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunFolderError(f"{self.path} is being written by another Tulip run ({holder}); "
                                 f"refusing to start a second writer. Wait for it to end, stop it, or "
                                 f"use another output folder (hydra.run.dir)") from None
        except OSError as error:  # a filesystem without locks (e.g. Lustre mounted without flock)
            log.warning("cannot lock %s (%s): a second run started on this folder would not be stopped",
                        self.lock_file, error)
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
            for stale in [*self.path.glob(f".*{TEMPORARY_SUFFIX}"),
                          *self.checkpoint("last").parent.glob(f".*{TEMPORARY_SUFFIX}")]:
                stale.unlink(missing_ok=True)
            yield self
        finally:
            os.close(fd)  # releases the flock

    # --- checkpoints --------------------------------------------------------------------------------

    def save_checkpoint(self, state: dict, which: str) -> None:
        replace_atomically(self.checkpoint(which), lambda f: torch.save(state, f), binary=True)

    def load_checkpoint(self, which: str, device: torch.device | str = "cpu") -> dict:
        path = self.checkpoint(which)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint at {path}")
        try:
            # torch.load reads damaged tensor bytes without complaint; the zip records' CRC-32s catch it
            damaged = zipfile.ZipFile(path).testzip()
            if damaged is not None:
                raise ValueError(f"its record {damaged} fails its CRC check: the file is corrupted")
            state = torch.load(path, map_location=device, weights_only=True)
        except Exception as error:  # truncated, corrupted, or a pickle that would run code
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise RunFolderError(f"cannot read checkpoint {path} ({reason}); it was left as it is") from error
        return upgrade_checkpoint(state)

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
        (tulip.runs.metric_keys). Training writes the whole file (``merge=False``); mode=evaluate and
        mode=summary merge into it (``merge=True``), first dropping the keys under ``drop_prefixes`` so
        a re-evaluation leaves no stale results. Non-finite floats are written as null.
        """
        summary = {}
        if merge and self.summary_file.is_file():
            summary = {k: v for k, v in read_json(self.summary_file).items()
                       if not _rate_key(k).startswith(drop_prefixes)}
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

