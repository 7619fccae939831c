"""report.md: the configurations' tables for humans, the problem runs, and the figures.

Each metric cell is the mean over a configuration's finished seeds; an error rate's cell carries its 95 %
interval (tulip.report.intervals), any other metric its sample standard deviation.
"""
from pathlib import Path

import pandas as pd

from tulip.runs import metric_keys
from tulip.runs.status import Status
from tulip.report.intervals import INTERVAL_NOTE, fmt_interval, row_interval
from tulip.report.runs import Run
from tulip.report.tables import SEED, fmt, fmt_stats, is_configuration_key, stats, status_text


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a markdown table; each cell on one line, its `|` escaped."""
    def cell(text) -> str:  # an error message may hold '|' or line breaks, which would end the row
        return " ".join(str(text).split()).replace("|", "\\|")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]


def write_markdown(path: Path, inputs, keys, runs, table: pd.DataFrame, metrics, plots, messages, sweep,
                   notes=()):
    """report.md: the inputs and the sweep, one table of results and one per robust-error curve (a
    row per configuration of `table`, a column per metric), the problem runs, the figures."""
    counts = {s: sum(run.status == s for run in runs) for s in dict.fromkeys(run.status for run in runs)}
    common = sorted({f"{k}={fmt(v)}" for run in runs for k, v in run.overrides.items()
                     if k not in keys and is_configuration_key(k)})
    lines = ["# Tulip report", ""]
    lines += [f"Inputs: {', '.join(f'`{p}`' for p in inputs)}. {len(runs)} runs: {status_text(counts)}."]
    if sweep:
        lines += ["", f"Sweep (multirun.yaml): `{' '.join(sweep)}`"]
    if common:
        lines += ["", "Common overrides: " + " ".join(f"`{c}`" for c in common)]
    lines += ["", "Each row is one configuration; values are the mean over its finished runs (`seeds` of "
              "them; `n=` where a metric is missing in some; `nan` where some run recorded a non-finite "
              "value, which summary.json stores as null): error rates (%) as `mean [low, high]`, the "
              f"{INTERVAL_NOTE}; other metrics as mean ± sample standard deviation. "
              "All columns and full precision: `report.csv`; one row per run: `runs.csv`.", ""]

    robust = {m: parsed for m in metrics if (parsed := metric_keys.parse_robust_error(m))}
    results = [m for m in metrics if m not in robust]
    # The results table, then one robust-error table per curve with the ε values as columns.
    tables = [("## Results", [(f"`{m}`", m) for m in results], True)]
    curves = {parsed.stem: parsed.attack for parsed in robust.values()}  # in the order of the columns
    for curve, attack in curves.items():
        columns = [(f"ε={parsed.eps}", m) for m, parsed in robust.items() if parsed.stem == curve]
        kind = "certified error (%): certified radius ≤ ε" if attack == "certified" else "robust error (%)"
        tables.append((f"## `{curve}@ε`: {kind}", columns, False))
    records = table.to_dict("records")
    for title, columns, with_status in tables:
        if not columns:
            continue
        header = keys + ["seeds"] + [label for label, _ in columns] + (["status"] if with_status else [])
        rows = []
        for row in records:
            seeds = int(row["seeds"])
            cells = [fmt(row[k]) for k in keys] + [str(seeds)]
            cells += [metric_cell(row, m, seeds) for _, m in columns]
            rows.append(cells + ([row["status"]] if with_status else []))
        lines += [title, ""] + markdown_table(header, rows) + [""]

    problems = [run for run in runs if run.status != Status.FINISHED]
    lines += ["## Failed, diverged and unreadable runs", ""]
    if problems:
        rows = [[f"`{run.path}`", run.status, fmt(run.value(SEED)),
                 ", ".join(f"{k}={fmt(run.value(k))}" for k in keys), run.problem or problem_detail(run)]
                for run in problems]
        lines += markdown_table(["run", "status", "seed", "configuration", "detail"], rows)
    else:
        lines += ["None: every run finished."]
    if messages:
        lines += ["", "Messages:", ""] + [f"- {m}" for m in messages]

    lines += ["", "## Plots", ""]
    for caption, file in plots:
        pdf = file.name[:-len(".png")] + ".pdf"
        lines += [f"**{caption}** (also `{pdf}`)", "", f"![{caption}]({file.name})", ""]
    if not plots:
        lines += ["No plots: no finished run with the metrics they need."]
    if notes:
        lines += ([] if lines[-1] == "" else [""]) + ["Left out of the figures:", ""]
        lines += [f"- {note}" for note in notes]
    path.write_text("\n".join(lines) + "\n")


def problem_detail(run: Run) -> str:
    """What summary.json says about a failed/diverged run (epoch, error message)."""
    fields = (metric_keys.EPOCH, "step", "error", "reason")
    return ", ".join(f"{k}={run.summary[k]}" for k in fields if k in run.summary)


def metric_cell(row: dict, metric: str, seeds: int) -> str:
    """A metric's cell: an error rate with its 95 % interval, anything else as mean ± std."""
    mean, std, count = stats(row, metric)
    if metric_keys.is_error_rate(metric):
        return fmt_interval(mean, *row_interval(row, metric), count, seeds)
    return fmt_stats(mean, std, count, seeds)
