"""The `tulip-report` command line: arguments, then read the runs, tabulate, plot, and write."""
import argparse
import sys
from pathlib import Path

import pandas as pd

from tulip.runs.status import UNREADABLE
from tulip.report.compare import compare, write_comparisons
from tulip.report.doc_tables import DEFAULT_FORMAT, add_table_arguments, print_table
from tulip.report.markdown import write_markdown
from tulip.report.pareto import front_axes, recorded_objectives, write_fronts
from tulip.report.plots import make_figures, scatter_curve
from tulip.report.runs import normalise, read_runs, read_sweep, sweep_text
from tulip.report.tables import RunTable, aggregate, fmt, read_report_csv, select_metrics, swept_keys, write_csv

DEFAULT_BY = "regularizer"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="tulip-report",
        description="Tables (report.md, report.csv, runs.csv) and figures (PDF and PNG) from Tulip run "
                    "folders or a multirun folder; with --markdown CSV, one markdown table of a CSV for the "
                    "docs, printed.")
    parser.add_argument("inputs", nargs="*", type=Path,
                        help="multirun folders (numbered job folders) and/or run folders; searched "
                             "recursively")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: the first input, or the folder of --from-csv)")
    parser.add_argument("--by", default=None, metavar="KEY",
                        help="grouping key (override, config group or config key): the table's first "
                             f"column and one plot line per value (default: {DEFAULT_BY}, the "
                             "regularizer choice, when the runs record it); with --markdown, the CSV "
                             "column(s) whose values each make one row, mean ± std over their rows")
    parser.add_argument("--metric", action="append", default=[], metavar="KEY",
                        help="summary.json key (glob allowed, e.g. 'attack/*/median_*') for the table; "
                             "KEY replaces the default columns, +KEY adds to them; repeatable")
    parser.add_argument("--order", default=None, metavar="V1,V2,...",
                        type=lambda text: [normalise(v) for v in text.split(",") if v],
                        help="the --by key's values in this order in the tables and legends (default: "
                             "the order the multirun.yaml files sweep them in; `none` always first); with "
                             "--markdown, the rows with these values of --by (else of the first column) "
                             "first, in this order")
    parser.add_argument("--epsilon", type=float, default=None, metavar="EPS",
                        help="the ε of the clean-vs-robust scatter (default: the median ε of the curve)")
    parser.add_argument("--from-csv", type=Path, default=None, metavar="CSV",
                        help="redraw the figures (all but the training curves) from a runs.csv or "
                             "report.csv that tulip-report wrote, without the run folders")
    parser.add_argument("--front", nargs="?", const="", default=None, metavar="X,Y",
                        help="Pareto fronts per --by value and across all: front.{pdf,png,csv} (and "
                             "front_certified.* against the certified error at the smallest ε) and a "
                             "report.md section; X and Y are summary.json keys, both minimised (default: "
                             "the first two of the runs' config `objectives`). Put a bare --front after "
                             "the folders")
    parser.add_argument("--compare", nargs=2, action="append", default=[], metavar=("A", "B"),
                        help="paired comparison of two configurations on the same test images, seed by "
                             "seed: effect B − A with a bootstrap 95 %% interval, exact McNemar test, "
                             "Holm-adjusted over all measures and pairs; printed, in compare.csv and in "
                             "report.md. A and B: a --by value (none, lip) or key=value[,key=value] "
                             "filters on override keys; repeatable")
    add_table_arguments(parser)
    args = parser.parse_args(argv)
    if args.markdown:
        # a third mode: it reads one CSV and prints; nothing of the other two applies
        given = [option for option, value in (("folders", args.inputs), ("--from-csv", args.from_csv),
                                             ("--out", args.out), ("--metric", args.metric),
                                             ("--epsilon", args.epsilon), ("--front", args.front),
                                             ("--compare", args.compare)) if value not in (None, [])]
        if given:
            parser.error(f"{', '.join(given)}: not with --markdown, which prints one table of a CSV")
        return args
    markdown_only = [option for option, value in (("--column", args.column), ("--where", args.where))
                     if value] + [option for option, value, default in (("--spread", args.spread, "std"),
                                                        ("--format", args.format, DEFAULT_FORMAT))
                                  if value != default]
    if markdown_only:
        parser.error(f"{', '.join(markdown_only)}: options of --markdown CSV")
    if args.front and "," not in args.front:
        # `tulip-report --front multirun/study` would take the folder for the axes: say so.
        parser.error(f"--front {args.front}: X,Y are two summary.json keys separated by a comma; for the "
                     f"default axes put --front after the folders")
    if bool(args.inputs) == bool(args.from_csv):
        parser.error("give run folders, --from-csv CSV or --markdown CSV (one of the three)")
    if args.compare and args.from_csv:
        parser.error("--compare pairs the runs' per-image files: give run folders, not --from-csv")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        return print_table(args)
    if args.from_csv:
        return replot(args)
    out = args.out or args.inputs[0]
    runs, messages = read_runs(args.inputs)
    for message in messages:
        print(f"tulip-report: {message}", file=sys.stderr)
    if not any(run.status != UNREADABLE for run in runs):
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
    table = RunTable.from_runs(runs, by)
    placed_rows = table.rows([run.has_configuration for run in runs])
    keys = swept_keys(placed_rows, by)
    sweep = read_sweep(args.inputs)
    order = args.order or [value for swept in sweep if swept.key == by for _, value in swept.values]
    configurations, members = aggregate(placed_rows, keys, table.metrics, order)
    metrics, unmatched = select_metrics(table.metrics, args.metric)
    for pattern in unmatched:
        messages.append(f"--metric {pattern}: no run's summary.json has a numeric key matching it")
        print(f"tulip-report: {messages[-1]}", file=sys.stderr)
    try:
        scatter = scatter_curve(table.metrics, args.epsilon)
        if args.front is not None:  # checked before anything is written
            front = front_axes(args.front, recorded_objectives([run.config for run in placed]), table.metrics)
        if args.compare:
            # a key a configuration does not set (None) is left out of its name
            labels = [", ".join(f"{k}={fmt(row[k])}" for k in keys if row[k] is not None) or "all runs"
                      for row in configurations.to_dict("records")]
            compared = compare(args.compare, by, labels, [[placed[i] for i in rows] for rows in members])
    except ValueError as error:
        print(f"tulip-report: {error}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)

    # Every figure from every metric, whatever --metric chose for the table.
    plots, notes = make_figures(out, keys, by, configurations, table.metrics, scatter,
                                [[placed[i] for i in rows] for rows in members])
    for note in notes:
        print(f"tulip-report: {note}")
    # runs.csv in the table's order (a configuration's runs in folder order), the unplaced runs last:
    # `--from-csv runs.csv` then finds the sweep's order in it.
    positions = [i for i, run in enumerate(runs) if run.has_configuration]
    unplaced = [i for i, run in enumerate(runs) if not run.has_configuration]
    table.rows([positions[i] for rows in members for i in rows] + unplaced).write_csv(out / "runs.csv")
    write_csv(out / "report.csv", configurations, keys, metrics)
    write_markdown(out / "report.md", args.inputs, keys, runs, configurations, metrics, plots, messages,
                   sweep_text(sweep), notes)
    if args.front is not None:
        folders = [[(str(placed[i].path), placed[i].status) for i in rows] for rows in members]
        section, printed = write_fronts(out, configurations, keys, by, table.metrics, front, folders)
        with (out / "report.md").open("a") as report_md:
            report_md.write("\n".join(section) + "\n")
        for line in printed:
            print(f"tulip-report: {line}")
    if args.compare:
        section, printed = write_comparisons(out, *compared)
        with (out / "report.md").open("a") as report_md:
            report_md.write("\n".join(section) + "\n")
        print("\n".join(["tulip-report: paired comparisons (also compare.csv, report.md):"] + printed))
    readable = sum(run.status != UNREADABLE for run in runs)
    print(f"tulip-report: {readable}/{len(runs)} runs read, {len(configurations)} configurations -> "
          f"{out / 'report.md'}, report.csv, runs.csv, {len(plots)} figures (PDF and PNG)")
    return 0


def replot(args) -> int:
    """--from-csv: the figures from a report.csv (one row per configuration, the configuration columns
    before `seeds`) or a runs.csv (one row per run, aggregated here)."""
    path = args.from_csv
    out = args.out or path.parent
    folders = None  # of each configuration's runs: in a runs.csv, not in a report.csv
    try:
        if "seeds" in pd.read_csv(path, nrows=0).columns:
            configurations, keys, metrics = read_report_csv(path, args.order or ())
            by = keys[0] if keys else None  # report.csv puts the grouping key first
            if args.by and args.by != by:
                print(f"tulip-report: --by {args.by}: {path} is grouped by {by}", file=sys.stderr)
                return 2
        else:
            table = RunTable.read_csv(path)
            by = args.by or (DEFAULT_BY if DEFAULT_BY in table.columns else None)
            if by is not None and by not in table.columns:
                print(f"tulip-report: --by {by}: no such column in {path}", file=sys.stderr)
                return 2
            placed = table.rows(table.placed)
            keys, metrics = swept_keys(placed, by), table.metrics
            order = args.order or (list(placed.frame[by]) if by else [])  # the order runs.csv lists them in
            configurations, members = aggregate(placed, keys, metrics, order)
            runs = list(zip(placed.frame["run"], placed.frame["status"]))
            folders = [[runs[i] for i in rows] for rows in members]
        scatter = scatter_curve(metrics, args.epsilon)
        # a csv does not hold the runs' config: the axes must be named
        front = None if args.front is None else front_axes(args.front, None, metrics)
    except (OSError, ValueError, pd.errors.ParserError) as error:
        print(f"tulip-report: {error}", file=sys.stderr)
        option = isinstance(error, ValueError) and str(error).startswith(("--epsilon", "--front"))
        return 2 if option else 1
    out.mkdir(parents=True, exist_ok=True)
    plots, notes = make_figures(out, keys, by, configurations, metrics, scatter)
    for note in notes:
        print(f"tulip-report: {note}")
    if front is not None:  # the fronts' section, without report.md to end: front.md
        section, printed = write_fronts(out, configurations, keys, by, metrics, front, folders)
        (out / "front.md").write_text("\n".join([f"# Tulip report: {path}"] + section) + "\n")
        for line in printed:
            print(f"tulip-report: {line}")
    print(f"tulip-report: {len(configurations)} configurations from {path} -> {len(plots)} figures "
          f"(PDF and PNG) in {out}: " + ", ".join(png.stem for _, png in plots))
    return 0
