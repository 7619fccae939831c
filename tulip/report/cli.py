"""The `tulip-report` command line: arguments, then read the runs, plot, and write the tables."""
import argparse
import sys
from pathlib import Path

from tulip import metric_keys
from tulip.report.plots import plot_multipliers, plot_robust_error, plot_training_curves
from tulip.report.runs import lookup, read_runs, read_yaml
from tulip.report.tables import group_runs, select_metrics, swept_keys, write_csv, write_markdown

DEFAULT_BY = "regularizer"


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
    curves, _ = select_metrics(runs, list(metric_keys.ROBUST_ERROR_GLOBS))
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
