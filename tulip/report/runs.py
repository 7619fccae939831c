"""Finding and reading the run folders of a sweep: overrides, Hydra's record, summary.json, metrics.jsonl
and, for a summary without robust-error curves, the per-image distances of attacks.csv and bounds.csv.

A job's summary and overrides are read as the end-of-sweep table and the sweeper read them
(tulip.runs.jobs), so all three name a job by the same overrides.
"""
import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import HydraException

from tulip.runs import metric_keys
from tulip.runs.folder import RunFolder
from tulip.runs.status import STATUS, UNREADABLE
from tulip.runs.jobs import natural_order, read_overrides, read_yaml, summary_or_problem
from tulip.runs.targets import upgrade_targets



@dataclass
class Run:
    path: Path
    overrides: dict  # {"reg.lip": 0.1, "seed": 1, ...}, parsed from `read_overrides`
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
                      key=natural_order)
    return [run for child in children for run in find_run_folders(child)]


def normalise(value):
    """One spelling per value, so `reg.lip=1e-3` on the command line equals 0.001 in config.yaml."""
    if value is None:  # `key=null`: the key is unset, as in a config without it
        return None
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


_PARSER = OverridesParser.create()


def parse_override(text: str) -> Override | None:
    """One override as Hydra parses it (`+key=1`, `~key`, `key='a,b'`, `key=[1,2]`, `key=a,b`), or None
    for text Hydra would not accept."""
    try:
        (override,) = _PARSER.parse_overrides([str(text)])
    except (HydraException, ValueError):
        return None
    return override


def override_key(override: Override) -> str:
    """The config key or group an override sets (`+reg.extra=1` -> reg.extra); `group@pkg` keeps its
    package, which makes it another key."""
    return f"{override.key_or_group}@{override.package}" if override.package else override.key_or_group


def parse_overrides(overrides) -> dict:
    """["reg.lip=0.1", "+x=1", "~y", "k='a,b'"] -> {"reg.lip": 0.1, "x": 1, "k": "a,b"}: Hydra's own
    parser, so prefixes and quoting mean what they meant on the command line. Deletions set nothing and
    are left out; text Hydra rejects is split at its first `=` rather than dropped."""
    parsed = {}
    for item in overrides or []:
        override = parse_override(item)
        if override is None:
            key, sep, value = str(item).partition("=")
            if sep:
                parsed[key.lstrip("+~")] = normalise(value)
        elif not override.is_delete():
            value = override.value()
            if override.is_sweep_override():  # not in a job's record; kept as written if it ever is
                value = str(item).split("=", 1)[1]
            parsed[override_key(override)] = normalise(value)
    return parsed


def read_run(path: Path) -> Run:
    folder = RunFolder(path)
    summary, problem = summary_or_problem(path)
    choices = lookup(read_yaml(path / ".hydra" / "hydra.yaml") or {}, "hydra.runtime.choices") or {}
    config = upgrade_targets(read_yaml(path / ".hydra" / "config.yaml") or {})
    overrides = parse_overrides(read_overrides(path, summary))
    status = UNREADABLE if problem else str(summary.get(STATUS, "unknown"))
    epochs = folder.read_metrics()
    if epochs and metric_keys.EPOCHS_TIME not in summary:  # a run from before the key: the same sum
        summary = {**summary, metric_keys.EPOCHS_TIME: metric_keys.epochs_time(epochs)}
    return Run(path, overrides, choices, config, status, summary, epochs, problem)


@dataclass
class SweptOverride:
    """One key of what a multirun swept, from its multirun.yaml."""
    key: str  # the config key or group (`override_key`), for matching against run values
    written: str  # the key as written, prefix included (`+reg.extra`, `~key`)
    values: list = field(default_factory=list)  # [(text as written, normalised value)], first seen first


def read_sweep(inputs: list[Path]) -> list[SweptOverride]:
    """What the multiruns below the inputs swept: each multirun.yaml's command-line task overrides
    (`reg.lip=0,0.1`) and the sweeper params of its sweep config (sweeps/*.yaml) that the command line
    did not replace. The values of a key are the union over all inputs, in first-seen order, so a report
    over several sweep folders names every value that any of them ran."""
    swept: dict[str, SweptOverride] = {}
    for root in inputs:
        hydra_cfg = lookup(read_yaml(root / "multirun.yaml") or {}, "hydra") or {}
        task = [str(o) for o in lookup(hydra_cfg, "overrides.task") or []]
        params = lookup(hydra_cfg, "sweeper.params") or {}
        given = {override_key(o) for o in map(parse_override, task) if o is not None}
        texts = task + [f"{k}={v}" for k, v in params.items()
                        if (o := parse_override(f"{k}={v}")) is None or override_key(o) not in given]
        for text in texts:
            override = parse_override(text)
            if override is None:  # shown as written
                swept.setdefault(text, SweptOverride(text, text))
                continue
            entry = swept.setdefault(override.get_key_element(),
                                     SweptOverride(override_key(override), override.get_key_element()))
            for value in sweep_values(override, text):
                if value[0] not in [seen for seen, _ in entry.values]:
                    entry.values.append(value)
    return list(swept.values())


def sweep_values(override: Override, text: str) -> list[tuple]:
    """[(text, value)] of one override: each choice of a sweep (`a,b`, `range(3)`), else its one value;
    an interval or glob, which has no list of values, as written."""
    if override.is_delete() and override.value() is None:
        return []
    written = text.split("=", 1)[1] if "=" in text else ""
    if not override.is_sweep_override():
        return [(written, normalise(override.value()))]
    try:
        texts, values = override.sweep_string_iterator(), override.sweep_iterator()
        return [(text, normalise(value)) for text, value in zip(texts, values)]
    except HydraException:
        return [(written, None)]


def sweep_text(swept: list[SweptOverride]) -> list[str]:
    """The sweep as override text: `regularizer=none,lip seed=0,1,2 ~key`."""
    return [f"{s.written}={','.join(t for t, _ in s.values)}" if s.values else s.written for s in swept]


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

    attacks.csv's distance columns (metric_keys.distance_column) hold adversarial distances (0: already
    misclassified, inf: the attack failed), bounds.csv's `certified_l2` the certified radii (older runs
    wrote it into attacks.csv). The robust error at ε is the % of images at distance ≤ ε.
    Returns {metric_keys.robust_error(...) or metric_keys.certified_error(...): %}.
    """
    folder = RunFolder(path)
    columns = read_columns(folder.csv_file("attacks"))
    # bounds.csv is the newer record of the certificate; older runs wrote it into attacks.csv
    certified = read_columns(folder.csv_file("bounds")).get(metric_keys.CERTIFIED_COLUMN,
                                                            columns.get(metric_keys.CERTIFIED_COLUMN))
    curves = {}
    for column, values in columns.items():
        parsed = metric_keys.parse_distance_column(column)
        distances = _floats(values) if parsed is not None else None
        if distances is not None:
            for eps, error in distance_curve(distances, parsed.norm, config).items():
                curves[metric_keys.robust_error(parsed.attack, parsed.norm, eps)] = error
    distances = _floats(certified) if certified is not None else None
    if distances is not None:
        for eps, error in distance_curve(distances, "l2", config).items():
            curves[metric_keys.certified_error(eps)] = error
    return curves


def _floats(values: list) -> np.ndarray | None:
    """A csv column as numbers; None for a column that does not hold numbers."""
    try:
        return np.array([float(v) for v in values])
    except (TypeError, ValueError):
        return None


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
