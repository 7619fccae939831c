"""The runs as a tidy table (runs.csv) and their configurations aggregated over seeds with pandas
(report.csv); report.md is tulip.report.markdown.

A configuration is one combination of the swept keys' values. Its row holds, for every metric, the mean
and sample standard deviation (ddof=1) over its finished runs and how many of them have the metric, and
for every error rate its 95 % interval (tulip.report.intervals); a metric that some run recorded as
non-finite (summary.json stores null) makes the mean and std NaN instead of silently leaving them to
the finite runs.
"""
import csv
import fnmatch
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tulip.runs import metric_keys
from tulip.runs.status import READ_STATUSES, Status
from tulip.report.intervals import configuration_intervals, interval_columns, table_keys
from tulip.report.runs import Run, normalise

# Keys that never define a configuration: the seed is aggregated over, wandb.* only names the log,
# hydra.* and hydra/* (launcher, sweeper) only say where and how the job ran.
NOT_CONFIGURATION = ("seed", "wandb.*", "hydra.*", "hydra/*")
BASELINE = "none"  # the value that is no method at all (regularizer=none): first in tables and legends
ATTACK_ERRORS, CERTIFIED_ERRORS, LEGACY_CERTIFIED_ERRORS = metric_keys.ROBUST_ERROR_GLOBS
DEFAULT_METRICS = (
    metric_keys.VAL_ERROR,
    metric_keys.TEST_ERROR,
    metric_keys.BEST_VAL_ERROR,
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
SEED = "seed"  # runs.csv: the last configuration column; the metrics follow it


# ---------------------------------------------------------------------------------------------------
# Values


def as_float(value):
    """A number from summary.json, or None. JSON has no inf/NaN, so they may arrive as text."""
    text = value.strip().lower() if isinstance(value, str) else ""
    if text in ("inf", "+inf", "-inf", "infinity", "-infinity", "nan"):
        return float(text.replace("infinity", "inf"))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def is_configuration_key(key: str) -> bool:
    return not any(fnmatch.fnmatchcase(key, pattern) for pattern in NOT_CONFIGURATION)


def sort_key(value):
    """Numbers before text, numbers by size: 0 < 0.01 < 0.1 < 1."""
    return (0, value, "") if isinstance(value, (int, float)) else (1, 0, str(value))


def value_order(values, preferred=()) -> list:
    """The values of the grouping key in the order of tables and legends: the baseline (`none`) first,
    then `preferred` (the sweep's order), then the others numbers first and by size."""
    preferred = list(dict.fromkeys(preferred))
    rank = {v: i for i, v in enumerate(preferred)}
    return sorted(dict.fromkeys(values),
                  key=lambda v: (v != BASELINE, v not in rank, rank.get(v, 0), sort_key(v)))


def metric_order(key: str):
    """Robust-error keys by curve and then by ε as a number, everything else alphabetically."""
    robust = metric_keys.parse_robust_error(key)
    if robust:
        return (robust.stem, robust.eps_value)
    return (key, 0.0)


def numeric_keys(runs: list[Run]) -> list[str]:
    """Every summary.json key holding a number (null counts: a median distance that is +inf in every
    run is still a metric), in metric_order."""
    return sorted({k for run in runs for k, v in run.summary.items() if v is None or as_float(v) is not None},
                  key=metric_order)


def select_metrics(available: list[str], requested: list[str]) -> tuple[list[str], list[str]]:
    """Metric columns: the defaults, replaced by --metric KEY, extended by --metric +KEY (globs allowed).
    Returns (columns, the requested patterns no run has). The `ci95_*` interval keys are never columns:
    they are the error columns' intervals."""
    available = table_keys(available)
    replacing = [m for m in requested if not m.startswith("+")]
    patterns = (replacing or list(DEFAULT_METRICS)) + [m[1:] for m in requested if m.startswith("+")]
    chosen, unmatched = [], []
    for pattern in patterns:
        matches = [k for k in available if fnmatch.fnmatchcase(k, pattern)]
        chosen += [k for k in matches if k not in chosen]
        if not matches and pattern not in DEFAULT_METRICS:
            unmatched.append(pattern)
    return chosen, unmatched


# ---------------------------------------------------------------------------------------------------
# One row per run: runs.csv


# runs.csv's first columns: the run folder, its W&B run (entity/project/id, to open it in the UI; empty
# without W&B) and how it ended; the configuration and the metrics follow.
RUN_COLUMNS = ["run", "wandb_run", "status"]


@dataclass
class RunTable:
    """One row per run. `frame` holds `run` (the folder), `status`, the configuration columns (Python
    values as the overrides gave them, None where a run does not have the key) and the metrics (float,
    NaN where missing or non-finite); `present` says which metric cells the run's summary.json had, so a
    recorded non-finite value (null) is told apart from a metric the run never wrote."""
    frame: pd.DataFrame
    present: pd.DataFrame
    columns: list  # configuration columns: the grouping key, the override keys, `seed` last
    metrics: list

    @classmethod
    def from_runs(cls, runs: list[Run], by: str | None) -> "RunTable":
        overrides = sorted({k for run in runs for k in run.overrides} - {by, SEED})
        columns = ([by] if by else []) + overrides + ([SEED] if by != SEED else [])
        metrics = [k for k in numeric_keys(runs) if k not in columns]  # threads=1 also in summary.json: one column
        frame = pd.DataFrame([[str(run.path), run.summary.get(metric_keys.WANDB_RUN_PATH) or "", run.status]
                              + [run.value(k) for k in columns] for run in runs],
                             columns=RUN_COLUMNS + columns, dtype=object)
        values = pd.DataFrame([[summary_value(run.summary, m) for m in metrics] for run in runs],
                              columns=metrics, dtype=float)
        present = pd.DataFrame([[m in run.summary for m in metrics] for run in runs], columns=metrics,
                               dtype=bool)
        return cls(pd.concat([frame, values], axis=1), present, columns, metrics)

    @classmethod
    def read_csv(cls, path: Path) -> "RunTable":
        """A runs.csv written by `write_csv`: the columns after RUN_COLUMNS up to `seed` are the configuration."""
        text = pd.read_csv(path, dtype=str, keep_default_na=False)
        names = list(text.columns)
        if names[:len(RUN_COLUMNS)] != RUN_COLUMNS or SEED not in names:
            raise ValueError(f"{path}: not a runs.csv of tulip-report "
                             f"(columns {', '.join(RUN_COLUMNS)}, ..., seed, metrics)")
        columns = names[len(RUN_COLUMNS):names.index(SEED) + 1]
        metrics = names[names.index(SEED) + 1:]
        frame = text[RUN_COLUMNS].astype(object)
        for column in columns:
            frame[column] = pd.Series([None if c == "" else normalise(c) for c in text[column]], dtype=object)
        present = text[metrics] != ""
        values = text[metrics].apply(pd.to_numeric, errors="coerce").astype(float)
        return cls(pd.concat([frame, values], axis=1), present, columns, metrics)

    def write_csv(self, path: Path):
        cells = self.frame[RUN_COLUMNS + self.columns].map(fmt_csv)
        values = self.frame[self.metrics].map(fmt_csv)
        # A recorded non-finite value is `nan`, a metric the run does not have is empty.
        values = values.where(self.present, "")
        pd.concat([cells, values], axis=1).to_csv(path, index=False)

    def rows(self, selection) -> "RunTable":
        """The rows where a boolean `selection` is true, or those at the positions it lists, in that order."""
        selection = np.asarray(selection)
        positions = np.flatnonzero(selection) if selection.dtype == bool else selection.astype(int)
        return RunTable(self.frame.iloc[positions], self.present.iloc[positions], self.columns, self.metrics)

    @property
    def placed(self) -> pd.Series:
        """Runs with a configuration: a folder without even its .hydra/ is listed, not tabulated."""
        return self.frame[self.columns].notna().any(axis=1)


def summary_value(summary: dict, key: str) -> float:
    if key not in summary or summary[key] is None:
        return math.nan
    value = as_float(summary[key])
    return math.nan if value is None else value


def swept_keys(table: RunTable, by: str | None) -> list[str]:
    """`by` first, then every configuration key whose value differs between the runs."""
    frame = table.frame
    varying = [k for k in table.columns
               if k != by and is_configuration_key(k) and frame[k].map(repr).nunique() > 1]
    return ([by] if by else []) + varying


# ---------------------------------------------------------------------------------------------------
# One row per configuration: report.csv


def aggregate(table: RunTable, keys: list[str], metrics: list[str], order=()) -> tuple[pd.DataFrame, list]:
    """The configurations of `keys`, one row each in table order (the grouping key's values in
    `value_order(..., order)`, the other keys by value), with report.csv's columns: the keys, `seeds`
    (finished runs), `n_<status>`, `status`, and per metric `<m>`, `<m>_std`, `<m>_n` (runs that have it),
    and per error metric `<m>_ci_low`, `<m>_ci_high` (tulip.report.intervals). Also returns, per row,
    the positions in `table` of its runs."""
    frame = table.frame.reset_index(drop=True)
    present = table.present.reset_index(drop=True)
    configs = list(dict.fromkeys(frame[keys].itertuples(index=False, name=None)))
    if keys:  # the grouping key in value_order, then the other keys by value
        rank = {v: i for i, v in enumerate(value_order([c[0] for c in configs], order))}
        configs.sort(key=lambda c: (rank[c[0]], [sort_key(v) for v in c[1:]]))
    position = {config: i for i, config in enumerate(configs)}
    config = pd.Series([position[c] for c in frame[keys].itertuples(index=False, name=None)], dtype=int)
    every = pd.RangeIndex(len(configs))

    finished = frame["status"] == Status.FINISHED
    values = frame.loc[finished, metrics].astype(float)
    has = present.loc[finished, metrics]
    groups = config[finished]
    by_config = values.groupby(groups)
    with np.errstate(invalid="ignore"):  # inf - inf in the std of infinite distances: nan is right
        mean, std = (by_config.agg(stat).reindex(index=every, columns=metrics) for stat in ("mean", "std"))
    # `count` of pandas leaves out NaN, a recorded non-finite value included: counted from `present`.
    counts = has.groupby(groups).sum().reindex(index=every, columns=metrics, fill_value=0)
    nulls = (has & values.isna()).groupby(groups).sum().reindex(index=every, columns=metrics, fill_value=0)
    mean, std = mean.mask(nulls > 0), std.mask(nulls > 0)
    intervals = configuration_intervals(frame.loc[finished], present.loc[finished], groups, len(configs), metrics)

    statuses = list(dict.fromkeys(list(READ_STATUSES) + list(frame["status"])))
    by_status = pd.crosstab(config, frame["status"]).reindex(index=every, columns=statuses, fill_value=0)
    parts = [pd.DataFrame(configs, columns=keys, dtype=object),
             pd.DataFrame({"seeds": by_status[Status.FINISHED].to_numpy()}),
             by_status.add_prefix("n_").reset_index(drop=True),
             pd.DataFrame({"status": [status_text(row) for row in by_status.to_dict("records")]})]
    for metric in metrics:
        parts.append(pd.DataFrame({metric: mean[metric].to_numpy(), f"{metric}_std": std[metric].to_numpy(),
                                   f"{metric}_n": counts[metric].to_numpy()}))
        parts += [pd.DataFrame({c: intervals[c] for c in interval_columns(metric) if c in intervals})]
    grouped = pd.concat(parts, axis=1)
    members = [list(frame.index[config == i]) for i in range(len(configs))]
    return grouped, members


def read_report_csv(path: Path, order=()) -> tuple[pd.DataFrame, list[str], list[str]]:
    """A report.csv written by `write_csv` (the configuration columns are those before `seeds`) as
    `aggregate` returns it, rows re-ordered by `value_order(..., order)`. Returns (table, keys, metrics)."""
    text = pd.read_csv(path, dtype=str, keep_default_na=False)
    names = list(text.columns)
    if "seeds" not in names:
        raise ValueError(f"{path}: not a report.csv of tulip-report (configuration columns, seeds, ...)")
    keys = names[:names.index("seeds")]
    metrics = [m for m in names if f"{m}_std" in names]
    table = pd.DataFrame({k: pd.Series([None if c == "" else normalise(c) for c in text[k]], dtype=object)
                          for k in keys})
    table["seeds"] = text["seeds"].astype(int)
    for name in names[len(keys) + 1:]:
        if name.startswith("n_"):
            table[name] = text[name].astype(int)
    table["status"] = text.get("status", "")
    columns = {}
    for metric in metrics:
        columns[metric] = pd.to_numeric(text[metric], errors="coerce")
        columns[f"{metric}_std"] = pd.to_numeric(text[f"{metric}_std"], errors="coerce")
        for interval in (c for c in interval_columns(metric) if c in names):  # not metrics: no `_std` of theirs
            columns[interval] = pd.to_numeric(text[interval], errors="coerce")
        # `<m>_n` is written only where it differs from `seeds`
        columns[f"{metric}_n"] = (text[f"{metric}_n"].astype(int) if f"{metric}_n" in names
                                  else table["seeds"].where(text[metric] != "", 0))
    table = pd.concat([table, pd.DataFrame(columns)], axis=1)
    if keys:
        rank = {v: i for i, v in enumerate(value_order(table[keys[0]], list(order) + list(table[keys[0]])))}
        positions = sorted(range(len(table)), key=lambda i: (rank[table[keys[0]][i]],
                                                             [sort_key(table[k][i]) for k in keys[1:]]))
        table = table.iloc[positions].reset_index(drop=True)
    return table, keys, metrics


def stats(row: dict, metric: str) -> tuple[float, float, int]:
    """(mean, std, count) of a metric in one row of `aggregate`'s table; NaN and 0 where it has none."""
    if metric not in row:
        return math.nan, math.nan, 0
    return float(row[metric]), float(row[f"{metric}_std"]), int(row[f"{metric}_n"])


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def fmt_stats(mean: float, std: float, count: int, seeds: int) -> str:
    if count == 0:
        return "–"
    text = fmt(mean) if math.isnan(std) else f"{mean:.4g} ± {std:.2g}"
    return text if count == seeds else f"{text} (n={count})"


def fmt_csv(value) -> str:
    """Full precision (a float as its repr, so inf and nan stay readable), empty for None."""
    if value is None:
        return ""
    return repr(float(value)) if isinstance(value, (float, np.floating)) else str(value)


def status_text(counts: dict) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items() if n) or "no runs"


def write_csv(path: Path, table: pd.DataFrame, keys: list[str], metrics: list[str]):
    """report.csv: the keys, seeds, n_<status>, status, then `<m>` and `<m>_std` per metric, `<m>_ci_low`
    and `<m>_ci_high` per error metric (empty where there is no interval), and `<m>_n` only where some
    configuration lacks the metric in some finished run."""
    statuses = [c for c in table.columns if c.startswith("n_")]
    header = keys + ["seeds"] + statuses + ["status"]
    for metric in metrics:
        partial = ((table[f"{metric}_n"] != 0) & (table[f"{metric}_n"] != table["seeds"])).any()
        intervals = list(interval_columns(metric)) if metric_keys.is_error_rate(metric) else []
        header += [metric, f"{metric}_std"] + intervals + ([f"{metric}_n"] if partial else [])
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in table.to_dict("records"):
            cells = [fmt_csv(row[k]) for k in keys + ["seeds"] + statuses] + [row["status"]]
            for metric in metrics:
                mean, std, count = stats(row, metric)
                cells += [fmt_csv(mean) if count else "", fmt_csv(std) if count > 1 else ""]
                cells += [fmt_csv(row[c]) if c in row and not pd.isna(row[c]) else ""
                          for c in interval_columns(metric) if c in header]
                cells += [count] if f"{metric}_n" in header else []
            writer.writerow(cells)

