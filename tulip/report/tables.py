"""Configurations of a sweep and their aggregates over seeds, written as report.csv and report.md."""
import csv
import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tulip import metric_keys
from tulip.report.runs import Run

STATUSES = ("finished", "failed", "diverged", "unreadable")
# Keys that never define a configuration: the seed is aggregated over, wandb.* only names the log.
NOT_CONFIGURATION = ("seed", "wandb.*", "hydra.*")
ATTACK_ERRORS, CERTIFIED_ERRORS, LEGACY_CERTIFIED_ERRORS = metric_keys.ROBUST_ERROR_GLOBS
DEFAULT_METRICS = (
    metric_keys.TEST_ERROR,
    metric_keys.BEST_TEST_ERROR,
    metric_keys.LOSS_GRAD_MAX,
    metric_keys.LOSS_GRAD_MEAN,
    metric_keys.JACOBIAN_2INF,
    metric_keys.PRODUCT_2INF,
    metric_keys.PRODUCT_SPECTRAL,
    metric_keys.LAYER_NORM_PRODUCT,
    metric_keys.TANH_SCALE,
    metric_keys.attack("*", "median_*"),
    ATTACK_ERRORS,
    metric_keys.CERT_MEDIAN,
    metric_keys.BOUNDS_CERTIFIED_MEDIAN,
    metric_keys.CERT_TIGHTNESS,
    metric_keys.LIPSCHITZ_UPPER_OVER_LOWER,
    CERTIFIED_ERRORS,
    LEGACY_CERTIFIED_ERRORS,
)


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


def select_metrics(runs: list[Run], requested: list[str]) -> tuple[list[str], list[str]]:
    """Metric columns: the defaults, replaced by --metric KEY, extended by --metric +KEY (globs allowed).
    Returns (columns, the requested patterns no run has)."""
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
    """Robust-error keys by curve and then by ε as a number, everything else alphabetically."""
    robust = metric_keys.parse_robust_error(key)
    if robust:
        return (robust.stem, robust.eps_value)
    return (key, 0.0)


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

    robust = {m: parsed for m in metrics if (parsed := metric_keys.parse_robust_error(m))}
    results = [m for m in metrics if m not in robust]
    # The results table, then one robust-error table per curve with the ε values as columns.
    tables = [("## Results", [(f"`{m}`", m) for m in results], True)]
    curves = {parsed.stem: parsed.attack for parsed in robust.values()}  # in the order of the columns
    for curve, attack in curves.items():
        columns = [(f"ε={parsed.eps}", m) for m, parsed in robust.items() if parsed.stem == curve]
        kind = "certified error (%): certified radius ≤ ε" if attack == "certified" else "robust error (%)"
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
    fields = (metric_keys.EPOCH, "step", "error", "reason")
    return ", ".join(f"{k}={run.summary[k]}" for k in fields if k in run.summary)
