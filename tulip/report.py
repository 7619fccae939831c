"""`tulip-report`: one table and a few plots from a sweep, as plain files (no W&B, no network).

    tulip-report multirun/2026-11-02/10-00-00                 # a Hydra multirun folder
    tulip-report outputs/a outputs/b --out report/ --by model  # several run folders
    python -m tulip.report multirun/... --metric +train/loss   # the same, as a module

Reads every run folder found below the inputs (a folder holding summary.json or .hydra/overrides.yaml):
summary.json, metrics.jsonl, .hydra/{overrides,hydra,config}.yaml and attacks.csv when present. A run's
configuration is its overrides without `seed` (and without `wandb.*`, which does not change a result);
the override keys whose values differ between runs are the swept keys and become the table's columns.
The finished runs of a configuration are aggregated over seeds: mean ± sample standard deviation
(ddof=1) and their count. Failed, diverged and unreadable runs are counted in the status columns and
listed by folder in report.md, never dropped.

Writes into --out (default: the first input folder):
  report.csv                    one row per configuration, raw metric keys (`<key>`, `<key>_std`)
  report.md                     the same tables for humans, the problem runs, and the plots
  multiplier_<key>.png          test error and lipschitz/loss_grad_max against each swept reg.* multiplier
  robust_error.png              robust error against ε per attack (and the certified error), per config
  training_curves.png           test error and lipschitz/loss_grad_max per epoch, per config
Exit status 1 only when not a single run could be read; every unreadable run is named on stderr.
"""
import argparse
import csv
import fnmatch
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display (login nodes, SLURM jobs)
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import yaml  # noqa: E402

# Figure geometry: every panel is PANEL_SIZE inches at DPI, so a figure of r x c panels is
# (c * PANEL_SIZE[0] * DPI) x (r * PANEL_SIZE[1] * DPI) pixels (plus LEGEND_WIDTH inches when a
# legend sits to the right of the panels).
DPI = 100
PANEL_SIZE = (5.0, 4.0)
LEGEND_WIDTH = 3.0

STATUSES = ("finished", "failed", "diverged", "unreadable")
DEFAULT_BY = "regularizer"
# Keys that never define a configuration: the seed is aggregated over, wandb.* only names the log.
NOT_CONFIGURATION = ("seed", "wandb.*", "hydra.*")
DEFAULT_METRICS = (
    "test/error_pct",
    "best/test_error_pct",
    "lipschitz/loss_grad_max",
    "lipschitz/loss_grad_mean",
    "lipschitz/jacobian_2inf",
    "weights/product_2inf",
    "weights/product_spectral",
    "weights/layer_norm_product",
    "model/tanh_scale",
    "attack/*/median_*",
    "attack/*/error_pct*@*",
    "bounds/certified_median",
    "bounds/certified_error_pct@*",
)
CURVE_METRICS = ("test/error_pct", "lipschitz/loss_grad_max")  # plots (1) and (3)
AXIS_LABELS = {
    "test/error_pct": "test error (%)",
    "lipschitz/loss_grad_max": "max per-image ‖∇ₓ loss‖₂ (Lipschitz estimate)",
}
# The robust-error curves: attack/<name>/error_pct_<norm>@<eps> (or without _<norm>) and
# bounds/certified_error_pct@<eps> (the L2 certificate).
ROBUST_KEY = re.compile(r"^(?:attack/(?P<attack>[^/]+)/|bounds/certified_)"
                        r"error_pct(?:_(?P<norm>[a-z0-9]+))?@(?P<eps>.+)$")


# ---------------------------------------------------------------------------------------------------
# Reading runs


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
    if (root / "summary.json").exists() or (root / ".hydra").is_dir():
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
    overrides_file = read_yaml(path / ".hydra" / "overrides.yaml")
    choices = lookup(read_yaml(path / ".hydra" / "hydra.yaml") or {}, "hydra.runtime.choices") or {}
    config = read_yaml(path / ".hydra" / "config.yaml") or {}

    problem, summary = "", {}
    summary_file = path / "summary.json"
    if not summary_file.exists():
        problem = "no summary.json (crashed before writing it, or still running)"
    else:
        try:
            summary = json.loads(summary_file.read_text())
            if not isinstance(summary, dict):
                problem, summary = "summary.json is not a JSON object", {}
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            problem = f"summary.json is not valid JSON (half-written?): {error}"

    overrides = parse_overrides(overrides_file if overrides_file is not None else summary.get("overrides"))
    status = "unreadable" if problem else str(summary.get("status", "unknown"))
    epochs = read_metrics(path / "metrics.jsonl")
    return Run(path, overrides, choices, config, status, summary, epochs, problem)


def read_metrics(path: Path) -> list:
    """Per-epoch metrics; a half-written last line (a run killed mid-write) is skipped."""
    if not path.exists():
        return []
    epochs = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            epochs.append(record)
    return epochs


def read_attack_curves(path: Path, config: dict) -> dict:
    """Robust-error curves from a per-image attacks.csv, for a summary.json without them.

    Columns `<attack>_<norm>` hold per-image adversarial distances (0: already misclassified, inf: the
    attack failed), `certified_l2` the certified radii; the robust error at ε is the % of images at
    distance ≤ ε, at the run's `attack.epsilons.<norm>` (else 10 values up to the largest distance).
    Returns {"attack/<attack>/error_pct_<norm>@<eps>" or "bounds/certified_error_pct@<eps>": %}.
    """
    if not path.exists():
        return {}
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    curves = {}
    for column in rows[0] if rows else []:
        name, _, norm = column.rpartition("_")
        if not name or name.startswith(("first_order", "second_order")):  # estimates, not attacks
            continue
        try:
            distances = np.array([float(row[column]) for row in rows])
        except (TypeError, ValueError):
            continue
        epsilons = lookup(config, f"attack.epsilons.{norm}")
        if not isinstance(epsilons, list):
            finite = distances[np.isfinite(distances)]
            epsilons = np.linspace(0.0, finite.max(), 10) if finite.size and finite.max() > 0 else [0.0]
        prefix = "bounds/certified_error_pct" if name == "certified" else f"attack/{name}/error_pct_{norm}"
        for eps in epsilons:
            curves[f"{prefix}@{float(eps):g}"] = 100.0 * float(np.mean(distances <= eps))
    return curves


def read_runs(inputs: list[Path]) -> tuple[list[Run], list[str]]:
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
            elif not any(ROBUST_KEY.match(k) for k in run.summary):
                run.summary.update(read_attack_curves(folder / "attacks.csv", run.config))
            runs.append(run)
    return runs, messages


# ---------------------------------------------------------------------------------------------------
# Configurations and aggregation


def is_configuration_key(key: str) -> bool:
    return not any(fnmatch.fnmatchcase(key, pattern) for pattern in NOT_CONFIGURATION)


def swept_keys(runs: list[Run], by: str | None) -> list[str]:
    """`by` first, then every override key whose resolved value differs between runs."""
    mentioned = sorted({k for run in runs for k in run.overrides if is_configuration_key(k)})
    varying = [k for k in mentioned if k != by and len({repr(run.value(k)) for run in runs}) > 1]
    return ([by] if by else []) + varying


def sort_key(value):
    """Numbers before text, numbers by size: 0 < 0.01 < 0.1 < 1."""
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


@dataclass
class Configuration:
    values: tuple  # one value per swept key
    runs: list

    @property
    def finished(self) -> list:
        return [run for run in self.runs if run.status == "finished"]

    def status_counts(self) -> dict:
        counts = {status: 0 for status in STATUSES}
        for run in self.runs:
            counts[run.status] = counts.get(run.status, 0) + 1
        return counts

    def stats(self, key: str) -> tuple[float, float, int]:
        """Mean, sample std (nan for a single run) and count of `key` over the finished runs."""
        # A null in summary.json is a value that was not finite (JSON has neither inf nor NaN): it
        # counts, as NaN, rather than silently leaving the mean to the finite runs.
        values = [math.nan if run.summary[key] is None else as_float(run.summary[key])
                  for run in self.finished if key in run.summary]
        return mean_std(np.array([v for v in values if v is not None]))


def as_float(value):
    """A number from summary.json, or None. JSON has no inf/NaN, so they may arrive as text."""
    text = value.strip().lower() if isinstance(value, str) else ""
    if text in ("inf", "+inf", "-inf", "infinity", "-infinity", "nan"):
        return float(text.replace("infinity", "inf"))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def mean_std(values: np.ndarray) -> tuple[float, float, int]:
    if values.size == 0:
        return math.nan, math.nan, 0
    with np.errstate(invalid="ignore"):  # inf - inf in the std of infinite distances: nan is right
        std = float(np.std(values, ddof=1)) if values.size > 1 else math.nan
    return float(np.mean(values)), std, int(values.size)


def group_runs(runs: list[Run], keys: list[str]) -> list[Configuration]:
    groups = {}
    for run in runs:
        groups.setdefault(tuple(run.value(k) for k in keys), []).append(run)
    ordered = sorted(groups, key=lambda values: [sort_key(v) for v in values])
    return [Configuration(values, groups[values]) for values in ordered]


def select_metrics(runs: list[Run], requested: list[str]) -> list[str]:
    """Metric columns: the defaults, replaced by --metric KEY, extended by --metric +KEY (globs allowed)."""
    replacing = [m for m in requested if not m.startswith("+")]
    patterns = (replacing or list(DEFAULT_METRICS)) + [m[1:] for m in requested if m.startswith("+")]
    # null counts as a number: a median distance that is +inf in every run is still a column.
    available = sorted({k for run in runs for k, v in run.summary.items()
                        if v is None or as_float(v) is not None}, key=metric_order)
    chosen, unmatched = [], []
    for pattern in patterns:
        matches = [k for k in available if fnmatch.fnmatchcase(k, pattern)]
        chosen += [k for k in matches if k not in chosen]
        if not matches and pattern not in DEFAULT_METRICS:
            unmatched.append(pattern)
    return chosen, unmatched


def metric_order(key: str):
    """Robust-error keys by attack and then by ε as a number, everything else alphabetically."""
    match = ROBUST_KEY.match(key)
    if match:
        return (key.split("@")[0], float_or_inf(match["eps"]))
    return (key, 0.0)


def float_or_inf(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        return math.inf


# ---------------------------------------------------------------------------------------------------
# Tables


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def fmt_stats(mean: float, std: float, count: int, seeds: int) -> str:
    if count == 0:
        return "–"
    text = fmt(mean) if math.isnan(std) else f"{mean:.4g} ± {std:.2g}"
    return text if count == seeds else f"{text} (n={count})"


def status_text(counts: dict) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items() if n) or "no runs"


def write_csv(path: Path, keys: list[str], configurations: list[Configuration], metrics: list[str]):
    statuses = list(dict.fromkeys(list(STATUSES) + [s for c in configurations for s in c.status_counts()]))
    # A `<metric>_n` column only where some configuration lacks the metric in some finished run.
    partial = {m for m in metrics for c in configurations if c.stats(m)[2] not in (0, len(c.finished))}
    header = keys + ["seeds"] + [f"n_{s}" for s in statuses] + ["status"]
    for metric in metrics:
        header += [metric, f"{metric}_std"] + ([f"{metric}_n"] if metric in partial else [])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for config in configurations:
            counts = config.status_counts()
            row = [fmt_csv(v) for v in config.values] + [len(config.finished)]
            row += [counts.get(s, 0) for s in statuses] + [status_text(counts)]
            for metric in metrics:
                mean, std, count = config.stats(metric)
                row += [fmt_csv(mean if count else None), fmt_csv(std if count > 1 else None)]
                row += [count] if metric in partial else []
            writer.writerow(row)


def fmt_csv(value) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cell(text) -> str:  # an error message may hold '|' or line breaks, which would end the row
        return " ".join(str(text).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]


def write_markdown(path: Path, inputs, keys, runs, configurations, metrics, plots, messages, sweep):
    counts = {s: sum(run.status == s for run in runs) for s in dict.fromkeys(run.status for run in runs)}
    common = sorted({f"{k}={fmt(v)}" for run in runs for k, v in run.overrides.items()
                     if k not in keys and is_configuration_key(k)})
    lines = ["# Tulip report", ""]
    lines += [f"Inputs: {', '.join(f'`{p}`' for p in inputs)}. {len(runs)} runs: {status_text(counts)}."]
    if sweep:
        lines += ["", f"Sweep (multirun.yaml): `{' '.join(sweep)}`"]
    if common:
        lines += ["", "Common overrides: " + " ".join(f"`{c}`" for c in common)]
    lines += ["", "Each row is one configuration; values are the mean ± sample standard deviation over its "
              "finished runs (`seeds` of them; `n=` where a metric is missing in some; `nan` where some run "
              "recorded a non-finite value, which summary.json stores as null). "
              "All columns and full precision: `report.csv`.", ""]

    robust = [m for m in metrics if ROBUST_KEY.match(m)]
    results = [m for m in metrics if m not in robust]
    # The results table, then one robust-error table per curve with the ε values as columns.
    tables = [("## Results", [(f"`{m}`", m) for m in results], True)]
    for curve in dict.fromkeys(m.split("@")[0] for m in robust):
        columns = [(f"ε={m.split('@')[1]}", m) for m in robust if m.split("@")[0] == curve]
        kind = ("certified error (%): certified radius ≤ ε" if curve.startswith("bounds/")
                else "robust error (%)")
        tables.append((f"## `{curve}@ε`: {kind}", columns, False))
    for title, columns, with_status in tables:
        if not columns:
            continue
        header = keys + ["seeds"] + [label for label, _ in columns] + (["status"] if with_status else [])
        rows = []
        for config in configurations:
            seeds = len(config.finished)
            row = [fmt(v) for v in config.values] + [str(seeds)]
            row += [fmt_stats(*config.stats(m), seeds) for _, m in columns]
            rows.append(row + ([status_text(config.status_counts())] if with_status else []))
        lines += [title, ""] + markdown_table(header, rows) + [""]

    problems = [run for run in runs if run.status != "finished"]
    lines += ["## Failed, diverged and unreadable runs", ""]
    if problems:
        rows = [[f"`{run.path}`", run.status, fmt(run.value("seed")),
                 ", ".join(f"{k}={fmt(run.value(k))}" for k in keys), run.problem or problem_detail(run)]
                for run in problems]
        lines += markdown_table(["run", "status", "seed", "configuration", "detail"], rows)
    else:
        lines += ["None: every run finished."]
    if messages:
        lines += ["", "Messages:", ""] + [f"- {m}" for m in messages]

    lines += ["", "## Plots", ""]
    for caption, file in plots:
        lines += [f"**{caption}**", "", f"![{caption}]({file.name})", ""]
    if not plots:
        lines += ["No plots: no finished run with the metrics they need."]
    path.write_text("\n".join(lines) + "\n")


def problem_detail(run: Run) -> str:
    """What summary.json says about a failed/diverged run (epoch, error message)."""
    details = [f"{k}={run.summary[k]}" for k in ("epoch", "step", "error", "reason") if k in run.summary]
    return ", ".join(details)


# ---------------------------------------------------------------------------------------------------
# Plots


def config_label(keys: list[str], values: tuple, skip: str = "") -> str:
    """`regularizer=lip, reg.lip=0.1`; keys a configuration does not have (None) are left out."""
    shown = [f"{k}={fmt(v)}" for k, v in zip(keys, values) if k != skip and v is not None]
    return ", ".join(shown) or "all runs"


def new_figure(panels: int, legend: bool):
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    width = columns * PANEL_SIZE[0] + (LEGEND_WIDTH if legend else 0.0)
    fig = plt.figure(figsize=(width, rows * PANEL_SIZE[1]), dpi=DPI, layout="constrained")
    axes = [fig.add_subplot(rows, columns, i + 1) for i in range(panels)]
    return fig, axes


def finish_figure(fig, axes, path: Path):
    legend = {}  # label -> handle, over all panels (a configuration may be missing from some)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(legend.values(), legend.keys(), loc="outside right upper", fontsize="small")
    # No bbox_inches="tight": the file keeps the size documented at the top of this module.
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def line_colors(count: int) -> list:
    """Distinct colours: matplotlib's 10-colour cycle, tab20 beyond that."""
    if count <= 10:
        return [f"C{i}" for i in range(count)]
    return [plt.get_cmap("tab20")(i % 20) for i in range(count)]


def set_multiplier_scale(ax, xs: list[float], key: str):
    """Log x-axis when the positive values span a decade or more; symlog keeps 0 on the axis."""
    positive = sorted(x for x in xs if x > 0)
    if len(positive) < 2 or positive[-1] / positive[0] < 10:
        ax.set_xlabel(key)
        return
    if min(xs) <= 0:
        ax.set_xscale("symlog", linthresh=positive[0], linscale=0.5)
        ax.set_xlabel(f"{key} (symlog: linear below {positive[0]:g})")
    else:
        ax.set_xscale("log")
        ax.set_xlabel(f"{key} (log scale)")


def plot_multipliers(path: Path, key: str, keys: list[str], configurations: list[Configuration]) -> bool:
    """Plot (1): test error and lipschitz/loss_grad_max against one swept multiplier, error bars over seeds.

    One line per value of the other columns (the regularizer, other swept keys). A configuration
    without this key at all (e.g. regularizer=none when sweeping reg.lip) is a dashed horizontal
    reference line: its value does not depend on the multiplier.
    """
    index = keys.index(key)
    lines, references = {}, []
    for config in (c for c in configurations if c.finished):
        x = config.values[index]
        if x is None:
            references.append(config)
        elif isinstance(x, (int, float)):
            lines.setdefault(config_label(keys, config.values, skip=key), []).append((x, config))
    if not lines:
        return False
    fig, axes = new_figure(len(CURVE_METRICS), legend=True)
    xs = [x for points in lines.values() for x, _ in points]
    colors = line_colors(len(lines) + len(references))
    for ax, metric in zip(axes, CURVE_METRICS):
        for color, (label, points) in zip(colors, lines.items()):
            points.sort(key=lambda p: p[0])
            stats = np.array([config.stats(metric) for _, config in points])
            ax.errorbar([x for x, _ in points], stats[:, 0], yerr=np.nan_to_num(stats[:, 1]),
                        marker="o", capsize=3, color=color, label=label)
        set_multiplier_scale(ax, xs, key)
        x_range = ax.get_xlim()  # the reference bands below must not widen it
        for color, config in zip(colors[len(lines):], references):
            mean, std, count = config.stats(metric)
            if count:
                label = f"{config_label(keys, config.values)} (no {key})"
                ax.axhline(mean, linestyle="--", color=color, label=label)
                ax.axhspan(mean - np.nan_to_num(std), mean + np.nan_to_num(std), color=color, alpha=0.1)
        ax.set_xlim(x_range)
        ax.set_ylabel(AXIS_LABELS[metric])
        ax.set_title(f"{AXIS_LABELS[metric].split(' (')[0]} vs {key}")
        ax.grid(alpha=0.3)
    fig.suptitle(f"Final metrics against {key} (mean ± std over seeds)")
    finish_figure(fig, axes, path)
    return True


def robust_panels(runs: list[Run], metrics: list[str]) -> dict:
    """{(attack, norm): [(eps, key), ...]} from the robust-error keys: one panel per attack and norm."""
    panels = {}
    for key in metrics:
        match = ROBUST_KEY.match(key)
        if match:
            attack = match["attack"] or "certified"
            norm = match["norm"] or ("l2" if attack == "certified" else attack_norm(runs, attack))
            panels.setdefault((attack, norm), []).append((float_or_inf(match["eps"]), key))
    return {panel: sorted(points) for panel, points in panels.items()}


def attack_norm(runs: list[Run], attack: str) -> str:
    """The norm of a curve keyed without one (error_pct@<eps>), from the attack's median_<norm> key."""
    for run in runs:
        for key in run.summary:
            if key.startswith(f"attack/{attack}/median_"):
                return key.rsplit("_", 1)[1]
    return ""


def norm_label(norm: str) -> str:
    return {"l2": "L2", "linf": "L∞", "l1": "L1"}.get(norm, norm)


def plot_robust_error(path: Path, keys, runs, configurations, metrics) -> bool:
    """Plot (2): robust error against ε for every configuration, one panel per attack."""
    panels = robust_panels(runs, metrics)
    if not panels:
        return False
    fig, axes = new_figure(len(panels), legend=True)
    for ax, ((name, norm), points) in zip(axes, panels.items()):
        eps = [e for e, _ in points]
        for color, config in zip(line_colors(len(configurations)), configurations):
            stats = np.array([config.stats(key) for _, key in points])
            if config.finished and np.isfinite(stats[:, 0]).any():
                ax.errorbar(eps, stats[:, 0], yerr=np.nan_to_num(stats[:, 1]), marker="o", capsize=3,
                            color=color, label=config_label(keys, config.values))
        ax.set_xlabel(f"ε ({norm_label(norm)} norm of the perturbation; pixels in [0, 1])" if norm else "ε")
        ax.set_ylabel("certified error (%): radius ≤ ε" if name == "certified" else "robust error (%)")
        ax.set_ylim(-2, 102)
        ax.set_title("certified (L2 certificate)" if name == "certified"
                     else ("best of all attacks" if name == "best" else f"attack {name}")
                     + (f" ({norm_label(norm)})" if norm else ""))
        ax.grid(alpha=0.3)
    fig.suptitle("Robust test error against perturbation size (mean ± std over seeds)")
    finish_figure(fig, axes, path)
    return True


def plot_training_curves(path: Path, keys, configurations) -> bool:
    """Plot (3): test error and lipschitz/loss_grad_max per epoch, mean over seeds with a ±std band."""
    if not any(run.epochs for config in configurations for run in config.finished):
        return False
    fig, axes = new_figure(len(CURVE_METRICS), legend=True)
    for ax, metric in zip(axes, CURVE_METRICS):
        for color, config in zip(line_colors(len(configurations)), configurations):
            per_epoch = {}
            for run in config.finished:
                for record in run.epochs:
                    value = as_float(record.get(metric))
                    if value is not None and "epoch" in record:
                        per_epoch.setdefault(record["epoch"], []).append(value)
            if not per_epoch:
                continue
            epochs = sorted(per_epoch)
            stats = np.array([mean_std(np.array(per_epoch[e]))[:2] for e in epochs])
            std = np.nan_to_num(stats[:, 1])
            label = config_label(keys, config.values)
            if len(epochs) == 1:  # a band around a single point is invisible: an error bar
                ax.errorbar(epochs, stats[:, 0], yerr=std, marker="o", capsize=3, color=color, label=label)
                continue
            ax.plot(epochs, stats[:, 0], marker="o", markersize=3, color=color, label=label)
            ax.fill_between(epochs, stats[:, 0] - std, stats[:, 0] + std, color=color, alpha=0.2)
        ax.set_xlabel("epoch")
        low, high = ax.get_xlim()
        if high - low < 2:  # one epoch: matplotlib would label fractions of it
            ax.set_xlim(round((low + high) / 2) - 1, round((low + high) / 2) + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(AXIS_LABELS[metric])
        ax.set_title(f"{AXIS_LABELS[metric].split(' (')[0]} per epoch")
        ax.grid(alpha=0.3)
    fig.suptitle("Training curves on the test set (mean ± std over seeds)")
    finish_figure(fig, axes, path)
    return True


# ---------------------------------------------------------------------------------------------------
# Command line


def sweep_overrides(inputs: list[Path]) -> list[str]:
    """What the multirun swept, from multirun.yaml: the command line's task overrides (`reg.lip=0,0.1`)
    and the sweeper params of a sweep config (sweeps/*.yaml) that the command line did not replace."""
    for root in inputs:
        hydra_cfg = lookup(read_yaml(root / "multirun.yaml") or {}, "hydra") or {}
        task = [str(o) for o in lookup(hydra_cfg, "overrides.task") or []]
        given = {o.split("=", 1)[0].lstrip("+~") for o in task}
        params = lookup(hydra_cfg, "sweeper.params") or {}
        swept = task + [f"{k}={v}" for k, v in params.items() if k not in given]
        if swept:
            return swept
    return []


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="tulip-report",
        description="Tables (report.md, report.csv) and PNG plots from Tulip run folders or a "
                    "multirun folder.")
    parser.add_argument("inputs", nargs="+", type=Path,
                        help="a multirun folder (numbered job folders) and/or run folders; "
                             "searched recursively")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first input)")
    parser.add_argument("--by", default=None, metavar="KEY",
                        help="grouping key (override, config group or config key): the table's first "
                             f"column and one plot line per value (default: {DEFAULT_BY}, the "
                             "regularizer choice, when the runs record it)")
    parser.add_argument("--metric", action="append", default=[], metavar="KEY",
                        help="summary.json key (glob allowed, e.g. 'attack/*/median_*') for the table; "
                             "KEY replaces the default columns, +KEY adds to them; repeatable")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = args.out or args.inputs[0]
    runs, messages = read_runs(args.inputs)
    for message in messages:
        print(f"tulip-report: {message}", file=sys.stderr)
    if not any(run.status != "unreadable" for run in runs):
        print("tulip-report: no run could be read; nothing written", file=sys.stderr)
        return 1

    # A run without even its .hydra/ folder belongs to no configuration: listed, not tabulated.
    placed = [run for run in runs if run.has_configuration]
    by = args.by or DEFAULT_BY
    if all(run.value(by) is None for run in placed):
        if args.by:
            print(f"tulip-report: --by {by}: no run has this key (an override, config group or "
                  f"config key such as regularizer, model, reg.lip)", file=sys.stderr)
            return 2
        by = None  # runs without Hydra's record of the regularizer choice: group by swept keys only
    keys = swept_keys(placed, by)
    configurations = group_runs(placed, keys)
    metrics, unmatched = select_metrics(runs, args.metric)
    for pattern in unmatched:
        messages.append(f"--metric {pattern}: no run's summary.json has a numeric key matching it")
        print(f"tulip-report: {messages[-1]}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)

    plots = []
    multipliers = [k for k in keys if k.startswith("reg.")
                   and all(isinstance(c.values[keys.index(k)], (int, float)) for c in configurations
                           if c.values[keys.index(k)] is not None)]
    for key in multipliers:
        file = out / f"multiplier_{key}.png"
        if plot_multipliers(file, key, keys, configurations):
            plots.append((f"Test error and Lipschitz estimate against {key}", file))
    file = out / "robust_error.png"
    # Every curve, whatever --metric chose for the table.
    curves, _ = select_metrics(runs, ["attack/*/error_pct*@*", "bounds/certified_error_pct@*"])
    if plot_robust_error(file, keys, runs, configurations, curves):
        plots.append(("Robust error against ε", file))
    file = out / "training_curves.png"
    if plot_training_curves(file, keys, configurations):
        plots.append(("Training curves", file))

    write_csv(out / "report.csv", keys, configurations, metrics)
    write_markdown(out / "report.md", args.inputs, keys, runs, configurations, metrics, plots, messages,
                   sweep_overrides(args.inputs))
    readable = sum(run.status != "unreadable" for run in runs)
    print(f"tulip-report: {readable}/{len(runs)} runs read, {len(configurations)} configurations -> "
          f"{out / 'report.md'}, {out / 'report.csv'}, {len(plots)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
