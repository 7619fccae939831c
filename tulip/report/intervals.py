"""95 % intervals of the error rates in report.csv and report.md.

An error column is a key with `error_pct` in it (test, validation and best-epoch error, robust and
certified error at each ε, the attacked images' clean error). A configuration's interval is:
- with 2 or more finished seeds that have the metric, the Student-t interval of the mean over seeds
  (tulip.stats.seed_interval), cut to [0, 100]: how far the mean of another set of seeds may fall;
- with one, that run's own Wilson interval over its test images, which its summary.json carries as
  `ci95_low/<key>` and `ci95_high/<key>` (none in runs older than those keys: the interval is blank).
The `ci95_*` keys stay in runs.csv, never columns of their own in report.csv or report.md.
"""
import math

import numpy as np
import pandas as pd

from tulip.runs import metric_keys
from tulip.stats import seed_interval

INTERVAL_SUFFIXES = ("_ci_low", "_ci_high")
INTERVAL_NOTE = "95 % interval: t over seeds, or Wilson over images for one seed"


def table_keys(keys: list[str]) -> list[str]:
    """The keys that may be columns of report.csv and report.md: all but the `ci95_*` interval keys."""
    return [key for key in keys if metric_keys.interval_of(key) is None]


def interval_columns(key: str) -> tuple[str, str]:
    """report.csv's columns of a metric's interval: (`<key>_ci_low`, `<key>_ci_high`)."""
    return tuple(key + suffix for suffix in INTERVAL_SUFFIXES)


def configuration_intervals(finished: pd.DataFrame, present: pd.DataFrame, groups: pd.Series,
                            configurations: int, metrics: list[str]) -> dict[str, np.ndarray]:
    """{`<m>_ci_low`: per configuration, `<m>_ci_high`: ...} for each error metric of `metrics`.

    `finished` holds the finished runs' values (the `ci95_*` columns included, where runs have them),
    `present` which of them the runs' summary.json had, `groups` each run's configuration (0 to
    `configurations` − 1). NaN where there is no interval."""
    columns = {}
    for metric in filter(metric_keys.is_error_rate, metrics):
        bounds = np.full((2, configurations), math.nan)
        wilson = [key for key in metric_keys.interval_keys(metric) if key in finished.columns]
        for config, has in present[metric].groupby(groups):
            runs = has.index[has.to_numpy()]
            if len(runs) >= 2:
                summary = seed_interval(finished.loc[runs, metric])
                # a rate lies in [0, 100] whatever the t interval of a few seeds reaches
                bounds[:, config] = np.clip([summary.low, summary.high], 0.0, 100.0)
            elif len(runs) == 1 and len(wilson) == 2:
                bounds[:, config] = [finished.at[runs[0], key] for key in wilson]
        columns.update(zip(interval_columns(metric), bounds))
    return columns


def row_interval(row: dict, metric: str) -> tuple[float, float]:
    """(low, high) of a metric in one row of the aggregated table; NaN where it has none."""
    low, high = (row.get(column) for column in interval_columns(metric))
    as_number = (lambda value: math.nan if value is None or pd.isna(value) else float(value))
    return as_number(low), as_number(high)


def fmt_interval(mean: float, low: float, high: float, count: int, seeds: int) -> str:
    """An error cell of report.md: `2.93 [2.55, 3.31]` (percent, two decimals), the mean alone where
    there is no interval, `(n=…)` where only some of the seeds have the metric."""
    if count == 0:
        return "–"
    text = f"{mean:.2f}" if math.isnan(low) or math.isnan(high) else f"{mean:.2f} [{low:.2f}, {high:.2f}]"
    return text if count == seeds else f"{text} (n={count})"
