"""Finding and reading the run folders of a sweep: overrides, Hydra's record, summary.json, metrics.jsonl
and, for a summary without robust-error curves, the per-image distances of attacks.csv and bounds.csv."""
import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from tulip import metric_keys
from tulip.run_folder import RunFolder, RunFolderError

# Per-image columns of attacks.csv and bounds.csv that are not distances of an attack or certificate:
# the image itself, the first/second-order estimates (lower-bound guesses, not attacks) and the global
# certificate (kept for comparison; the certified curve is that of certified_l2).
NOT_DISTANCES = ("index", "label", "prediction", "first_order_l2", "second_order_l2", "certified_global_l2")
CERTIFIED_COLUMN = "certified_l2"  # bounds.csv (older runs: attacks.csv): the certified L2 radii


@dataclass
class Run:
    path: Path
    overrides: dict  # {"reg.lip": 0.1, "seed": 1, ...} from .hydra/overrides.yaml
    choices: dict  # Hydra's group choices {"regularizer": "lip", ...} from .hydra/hydra.yaml
    config: dict  # the composed config, .hydra/config.yaml
    status: str  # finished | failed | diverged | unreadable | whatever summary.json says
    summary: dict = field(default_factory=dict)
    epochs: list = field(default_factory=list)  # metrics.jsonl, one dict per epoch
    problem: str = ""  # why the run is unreadable (or empty)

    def value(self, key: str):
        """A key's value in this run: its override, else the group choice Hydra recorded, else the
        composed config. So a key overridden in only some runs still compares across all of them."""
        if key in self.overrides:
            return self.overrides[key]
        if key in self.choices:
            return normalise(self.choices[key])
        found = lookup(self.config, key)
        return None if found is None or isinstance(found, dict) else normalise(found)

    @property
    def has_configuration(self) -> bool:
        return bool(self.overrides or self.choices or self.config)


def find_run_folders(root: Path) -> list[Path]:
    """Run folders at or below `root`, in natural order (job 2 before job 10)."""
    if RunFolder(root).summary_file.exists() or (root / ".hydra").is_dir():
        return [root]
    children = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                      key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)])
    return [run for child in children for run in find_run_folders(child)]


def normalise(value):
    """One spelling per value, so `reg.lip=1e-3` on the command line equals 0.001 in config.yaml."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(str(normalise(v)) for v in value) + "]"
    text = str(value).strip()
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return text


def lookup(config: dict, dotted_key: str):
    node = config
    for part in dotted_key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text()) if path.exists() else None
    except yaml.YAMLError:
        return None


def parse_overrides(overrides) -> dict:
    """["reg.lip=0.1", "+x=1", "~y"] -> {"reg.lip": 0.1, "x": 1} (deletions are not configurations)."""
    parsed = {}
    for item in overrides or []:
        key, sep, value = str(item).partition("=")
        if sep:
            parsed[key.lstrip("+")] = normalise(value)
    return parsed


def read_run(path: Path) -> Run:
    folder = RunFolder(path)
    overrides_file = read_yaml(path / ".hydra" / "overrides.yaml")
    choices = lookup(read_yaml(path / ".hydra" / "hydra.yaml") or {}, "hydra.runtime.choices") or {}
    config = read_yaml(path / ".hydra" / "config.yaml") or {}

    # A run killed while writing, or still running, is reported as unreadable rather than raising.
    problem, summary = "", {}
    if not folder.summary_file.exists():
        problem = "no summary.json (crashed before writing it, or still running)"
    else:
        try:
            summary = folder.read_summary()
        except RunFolderError as error:
            problem = str(error)

    overrides = parse_overrides(overrides_file if overrides_file is not None else summary.get("overrides"))
    status = "unreadable" if problem else str(summary.get("status", "unknown"))
    return Run(path, overrides, choices, config, status, summary, folder.read_metrics(), problem)


def read_columns(path: Path) -> dict[str, list[str]]:
    """A per-image csv as {column: values}, {} when the file is missing or empty."""
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
    return {column: [row[column] for row in rows] for column in reader.fieldnames or []} if rows else {}


def distance_curve(distances: np.ndarray, norm: str, config: dict) -> dict[float, float]:
    """{eps: % of images at distance ≤ eps} at the run's `attack.epsilons.<norm>` (else 10 values up to
    the largest finite distance)."""
    epsilons = lookup(config, f"attack.epsilons.{norm}")
    if not isinstance(epsilons, list):
        finite = distances[np.isfinite(distances)]
        epsilons = np.linspace(0.0, finite.max(), 10) if finite.size and finite.max() > 0 else [0.0]
    # Compared in float32, as the evaluation compares its float32 distances: a fixed-ε attack's distance
    # equals float32(ε), which a float64 comparison with ε would put on either side.
    single = distances.astype(np.float32)
    return {float(eps): 100.0 * float(np.mean(single <= np.float32(eps))) for eps in epsilons}


def read_attack_curves(path: Path, config: dict) -> dict:
    """Robust-error curves from the per-image distances of a run folder, for a summary.json without them.

    attacks.csv's columns `<attack>_<norm>` hold adversarial distances (0: already misclassified, inf:
    the attack failed), bounds.csv's `certified_l2` the certified radii (older runs wrote it into
    attacks.csv). The robust error at ε is the % of images at distance ≤ ε.
    Returns {metric_keys.robust_error(...) or metric_keys.certified_error(...): %}.
    """
    folder = RunFolder(path)
    columns = read_columns(folder.csv_file("attacks"))
    certified = read_columns(folder.csv_file("bounds")).get(CERTIFIED_COLUMN)
    if certified is not None:  # bounds.csv is the newer record of the certificate
        columns[CERTIFIED_COLUMN] = certified
    curves = {}
    for column, values in columns.items():
        name, _, norm = column.rpartition("_")
        if not name or column in NOT_DISTANCES:
            continue
        try:
            distances = np.array([float(v) for v in values])
        except (TypeError, ValueError):
            continue
        for eps, error in distance_curve(distances, norm, config).items():
            key = (metric_keys.certified_error(eps) if column == CERTIFIED_COLUMN
                   else metric_keys.robust_error(name, norm, eps))
            curves[key] = error
    return curves


def read_runs(inputs: list[Path]) -> tuple[list[Run], list[str]]:
    """Every run folder below the inputs, and a message for each input or run that could not be read."""
    runs, messages = [], []
    for root in inputs:
        if not root.is_dir():
            messages.append(f"{root}: not a folder")
            continue
        folders = find_run_folders(root)
        if not folders:
            messages.append(f"{root}: no run folders (a folder with summary.json or .hydra/) below it")
        for folder in folders:
            run = read_run(folder)
            if run.problem:
                messages.append(f"{folder}: {run.problem}")
            elif not any(metric_keys.parse_robust_error(k) for k in run.summary):
                run.summary.update(read_attack_curves(folder, run.config))
            runs.append(run)
    return runs, messages
