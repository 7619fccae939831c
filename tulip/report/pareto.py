"""Pareto fronts of a multi-objective study: `tulip-report --front`.

Two metrics X and Y, both minimised: by default the first two of the runs' config `objectives` (what
hydra/sweeper=optuna minimised), else `--front X,Y`. Each configuration (the table's rows: runs that
differ only in `seed`) is one point, the mean over its finished seeds. A configuration is on the front
of its family (its --by value, e.g. the regularizer) when no other configuration of that family is ≤
on both means and < on one; the front `all` is chosen the same way among every family's configurations.

Writes into the output folder:
  front.{pdf,png}              per family every configuration (faint) and its front (a step line, error
                               bars = the std over seeds), test error against robust error
  front.csv                    the fronts' configurations, full precision
  front_certified.{pdf,png,csv} the same against the certified error at the smallest ε the runs have
                               (`cert/error_pct_l2@<eps>`), the fronts chosen again in that plane
and returns the markdown section that report.md (or, from a csv, front.md) ends with.
"""
import csv
import math
from dataclasses import dataclass
from pathlib import Path

from matplotlib.lines import Line2D
import numpy as np
import pandas as pd

from tulip.runs import metric_keys
from tulip.runs.status import Status
from tulip.report.markdown import markdown_table
from tulip.report.plots import AXIS_LABELS, new_figure, norm_label, panel_title, save, spread
from tulip.report.style import series_style, styled
from tulip.report.tables import fmt, fmt_csv, fmt_stats, stats

ALL = "all"  # the front across every family
OPTION = "--front X,Y"  # named in every error, so that the message says what to type
OVERALL_STYLE = {"color": "0.6", "linewidth": 4, "alpha": 0.35}  # the `all` front, behind the families'
FAINT = 0.25  # opacity of the configurations off the front


def non_dominated(points: list[tuple[float, float]]) -> list[bool]:
    """Which (x, y) points no other point dominates, both minimised: b dominates a when b is ≤ a on
    both and < on one. Equal points do not dominate each other, so both stay on the front."""
    return [not any(bx <= x and by <= y and (bx < x or by < y) for bx, by in points) for x, y in points]


def find_metric(key: str, metrics: list[str]) -> str | None:
    """The metric column `key` names: itself, or the same key spelled another way (`objectives` may
    say `…@1.0` where summary.json writes `…@1`)."""
    by_canonical = {metric_keys.canonical(metric): metric for metric in metrics}
    return key if key in metrics else by_canonical.get(metric_keys.canonical(key))


def recorded_objectives(configs: list[dict]) -> list[list[str]]:
    """The `objectives` list of each run config that has one."""
    return [[str(k) for k in c["objectives"]] for c in configs if isinstance(c.get("objectives"), list)]


def front_axes(requested: str, objectives: list[list[str]] | None, metrics: list[str]) -> tuple[str, str]:
    """(X, Y) metric columns: the keys of `--front X,Y`, else (`requested` empty) the first two
    `objectives` the runs agree on. `objectives` None: the input (a csv) does not record them.
    ValueError naming the option when there are no two keys or no run has one of them."""
    if requested:
        names = [name.strip() for name in requested.split(",")]
        if len(names) != 2 or not all(names):
            raise ValueError(f"--front {requested}: name two summary.json keys, {OPTION}")
    elif objectives is None:
        raise ValueError(f"--front: a csv does not record the runs' objectives; name the axes: {OPTION}")
    else:
        pairs = list(dict.fromkeys(tuple(o[:2]) for o in objectives if len(o) >= 2))
        if not pairs:
            raise ValueError(f"--front: the runs record fewer than 2 objectives (config `objectives`: "
                             f"{objectives[0] if objectives else 'none'}); name the axes: {OPTION}")
        if len(pairs) > 1:
            raise ValueError(f"--front: the runs minimised different objectives "
                             f"({'; '.join(','.join(p) for p in pairs)}); name the axes: {OPTION}")
        names = list(pairs[0])
    found = [find_metric(name, metrics) for name in names]
    missing = [name for name, metric in zip(names, found) if metric is None]
    if missing:
        raise ValueError(f"--front: no run's summary.json has {' or '.join(missing)}; name the axes: {OPTION}")
    if found[0] == found[1]:
        raise ValueError(f"--front: X and Y are both {found[0]}; name two different keys: {OPTION}")
    return found[0], found[1]


def certified_key(metrics: list[str]) -> str | None:
    """The certified error at the smallest ε the runs have: the most images certified, and the ε
    closest to what the certificate literature reports."""
    curve = sorted((parsed.eps_value, key) for key in metrics if (parsed := metric_keys.parse_robust_error(key))
                   and parsed.stem == metric_keys.CERTIFIED_ERROR_STEM)
    return curve[0][1] if curve else None


@dataclass
class Front:
    name: str  # the family (a --by value), or ALL
    rows: list[int]  # the table rows on the front, by X ascending
    candidates: list[int]  # every table row it was chosen from


def find_fronts(table: pd.DataFrame, by: str | None, x: str, y: str) -> tuple[list[Front], int]:
    """One front per family in table order, then ALL when there are several families (with one, ALL
    would repeat it; without --by it is the only one). Configurations without a finished run or
    without finite X and Y means cannot be placed: left out, and counted (second value)."""
    records = table.to_dict("records")
    means = [(stats(row, x)[0], stats(row, y)[0]) for row in records]
    usable = [i for i, row in enumerate(records) if row["seeds"] and all(map(math.isfinite, means[i]))]
    families = list(dict.fromkeys(records[i][by] for i in usable)) if by else []
    groups = [(fmt(family), [i for i in usable if records[i][by] == family]) for family in families]
    if len(groups) != 1:
        groups.append((ALL, usable))
    fronts = []
    for name, rows in groups:
        on_front = [i for i, keep in zip(rows, non_dominated([means[i] for i in rows])) if keep]
        fronts.append(Front(name, sorted(on_front, key=lambda i: means[i]), rows))
    return [f for f in fronts if f.candidates], sum(1 for row in records if row["seeds"]) - len(usable)


def family_keys(table: pd.DataFrame, keys: list[str], by: str | None, rows: list[int]) -> list[str]:
    """The keys a family's configurations differ in (its searched multipliers); for a family of one
    configuration, the keys it has a value for."""
    others = [k for k in keys if k != by]
    varying = [k for k in others if table[k].iloc[rows].map(repr).nunique() > 1]
    return varying or [k for k in others if table[k].iloc[rows].notna().any()]


def key_text(value) -> str:
    """A swept value in 3 significant digits: the sampler's 0.044303752452182654 reads as 0.0443."""
    return f"{value:.3g}" if isinstance(value, float) else fmt(value)


def axis_label(key: str) -> str:
    """Short enough for the height of one panel; which attack it was goes in the title."""
    parsed = metric_keys.parse_robust_error(key)
    if parsed is None:
        return AXIS_LABELS.get(key, key)
    kind = "certified" if parsed.attack == "certified" else "robust"
    return f"{kind} error (%), " + " ".join(filter(None, [norm_label(parsed.norm), f"ε = {parsed.eps}"]))


def figure_title(by: str | None, x: str, y: str) -> str:
    """`Pareto front per regularizer: best of all attacks (L2)`: the curves the axes come from."""
    curves = [panel_title(p.attack, p.norm) for p in map(metric_keys.parse_robust_error, (x, y)) if p]
    return f"Pareto front{f' per {by}' if by else ''}" + (f": {', '.join(curves)}" if curves else "")


def columns(table: pd.DataFrame, rows: list[int], metric: str) -> tuple[np.ndarray, ...]:
    """(means, stds, counts) of a metric over some table rows."""
    values = np.array([stats(table.iloc[i].to_dict(), metric) for i in rows], dtype=float).reshape(-1, 3)
    return values[:, 0], values[:, 1], values[:, 2]


@styled
def plot_front(stem: Path, table: pd.DataFrame, by: str | None, x: str, y: str, fronts: list[Front]) -> Path:
    families = [f for f in fronts if f.name != ALL] or fronts  # without families, ALL is the one series
    overall = next((f for f in fronts if f.name == ALL), None) if len(fronts) > 1 else None
    labels = [f.name if by else "all runs" for f in families]
    handles = {}
    fig, (ax,) = new_figure(1, len(families) + 2)
    if overall is not None:
        means_x, _, _ = columns(table, overall.rows, x)
        means_y, _, _ = columns(table, overall.rows, y)
        ax.plot(means_x, means_y, drawstyle="steps-post", solid_capstyle="round", zorder=1, **OVERALL_STYLE)
        labels.append(f"front of all {by} values")
        handles[labels[-1]] = Line2D([], [], **OVERALL_STYLE)
    for index, front in enumerate(families):
        style = series_style(index)
        faint_x, _, _ = columns(table, front.candidates, x)
        faint_y, _, _ = columns(table, front.candidates, y)
        ax.plot(faint_x, faint_y, linestyle="none", marker=style["marker"], color=style["color"],
                alpha=FAINT, markersize=3, zorder=2)
        mean_x, std_x, count_x = columns(table, front.rows, x)
        mean_y, std_y, count_y = columns(table, front.rows, y)
        # steps-post: from a front point, Y stays until the next point's X, where it drops; no
        # configuration of the family lies below that line.
        ax.plot(mean_x, mean_y, drawstyle="steps-post", color=style["color"], linestyle=style["linestyle"],
                zorder=3)
        ax.errorbar(mean_x, mean_y, xerr=spread(std_x, count_x), yerr=spread(std_y, count_y), linestyle="none",
                    marker=style["marker"], color=style["color"], markerfacecolor=style["markerfacecolor"],
                    elinewidth=0.6, zorder=4, label=labels[index])
        handles[labels[index]] = Line2D([], [], **style)
    labels.append("every configuration")
    handles[labels[-1]] = Line2D([], [], linestyle="none", marker="o", color="0.3", alpha=FAINT, markersize=3)
    front_rows = [row for front in families for row in front.rows]
    everything = [row for front in families for row in front.candidates]
    zoom(ax, [columns(table, front_rows, key)[0] for key in (x, y)],
         [columns(table, everything, key)[0] for key in (x, y)], tuple("error_pct" in key for key in (x, y)))
    ax.set_xlabel(axis_label(x))
    ax.set_ylabel(axis_label(y))
    ax.set_title(figure_title(by, x, y))
    return save(fig, [ax], stem, labels, handles)


def zoom(ax, front: list[np.ndarray], candidates: list[np.ndarray], percent: tuple[bool, bool]) -> None:
    """Frame the fronts: a diverged or far-off configuration (90 % test error) would otherwise squeeze
    every front into a corner. The limits are the fronts' extent plus a tenth of it (a % axis stays
    within [0, 100]); the configurations left outside are counted in a corner note."""
    limits = []
    for values, is_percent in zip(front, percent):
        values = values[np.isfinite(values)]
        if values.size == 0:
            return
        low, high = float(values.min()), float(values.max())
        pad = 0.1 * (high - low) or 0.1 * max(abs(high), 1e-12)
        low, high = low - pad, high + pad
        limits.append((max(low, -1.0), min(high, 101.0)) if is_percent else (low, high))
    outside = sum(1 for px, py in zip(*candidates) if np.isfinite(px) and np.isfinite(py)
                  and not (limits[0][0] <= px <= limits[0][1] and limits[1][0] <= py <= limits[1][1]))
    ax.set_xlim(*limits[0])
    ax.set_ylim(*limits[1])
    if outside:
        ax.annotate(f"{outside} configuration{'s' if outside > 1 else ''} beyond the axes",
                    xy=(0.99, 0.98), xycoords="axes fraction", ha="right", va="top", fontsize="small", color="0.4")


def run_folders(runs: list[tuple[str, str]]) -> str:
    """A configuration's runs: the folders of its finished runs, the others with their status."""
    return "; ".join(path if status == Status.FINISHED else f"{path} ({status})" for path, status in runs)


@dataclass
class Plane:
    """One figure and table: the fronts of (x, y); `metrics`: every column the table shows."""
    stem: str
    x: str
    y: str
    metrics: list[str]
    fronts: list[Front]
    left_out: int


def rows_of(plane: Plane, table: pd.DataFrame, keys: list[str], by: str | None, folders, full: bool):
    """(header, rows) of a plane's table: front, family, the families' keys (a key another family
    searched is empty), seeds, each metric (`full`: mean and std columns at full precision, else mean ±
    std), runs."""
    records = table.to_dict("records")
    own = {f.name: family_keys(table, keys, by, f.candidates) for f in plane.fronts if f.name != ALL}
    if not own:  # no families: one set of keys
        own = {ALL: family_keys(table, keys, by, plane.fronts[0].candidates) if plane.fronts else []}
    shown = [k for k in keys if any(k in ks for ks in own.values())]
    header = ["front", "family"] + shown + ["seeds"]
    header += [c for m in plane.metrics for c in ((m, f"{m}_std") if full else (m,))] + ["runs"]
    value_text = fmt_csv if full else key_text
    rows = []
    for front in plane.fronts:
        for i in front.rows:
            row = records[i]
            family = fmt(row[by]) if by else ""
            keys_of_row = own.get(family, own.get(ALL, []))
            cells = [front.name, family] + [value_text(row[k]) if k in keys_of_row else "" for k in shown]
            cells.append(str(int(row["seeds"])))
            for metric in plane.metrics:
                mean, std, count = stats(row, metric)
                if full:
                    cells += [fmt_csv(mean) if count else "", fmt_csv(std) if count > 1 else ""]
                else:
                    cells.append(fmt_stats(mean, std, count, int(row["seeds"])))
            cells.append(run_folders(folders[i]) if folders else "")
            rows.append(cells)
    return header, rows


def write_fronts(out: Path, table: pd.DataFrame, keys: list[str], by: str | None, metrics: list[str],
                 axes: tuple[str, str], folders: list | None) -> tuple[list[str], list[str]]:
    """The front figures and csv files into `out`. `folders[i]`: [(folder, status)] of table row i's
    runs (None: not known, from a report.csv). Returns (the markdown section, lines for stdout)."""
    x, y = axes
    certified = certified_key(metrics)
    shown = [x, y] + ([certified] if certified and certified not in (x, y) else [])
    planes = [Plane("front", x, y, shown, *find_fronts(table, by, x, y))]
    if len(shown) == 3:
        planes.append(Plane("front_certified", x, certified, shown, *find_fronts(table, by, x, certified)))
    section = ["", "## Pareto fronts", "",
               f"Configurations (mean over seeds) that no other configuration of the same "
               f"{by or 'sweep'} beats on both `{x}` and `{y}`, both minimised"
               + (f"; `{ALL}`: across every {by} value" if by else "")
               + (f"; then the same against the certified error `{certified}`" if len(planes) > 1 else "")
               + ". Swept values to 3 significant digits; full precision: the csv files."]
    printed = []
    for plane in planes:
        header, rows = rows_of(plane, table, keys, by, folders, full=True)
        with (out / f"{plane.stem}.csv").open("w", newline="") as handle:
            csv.writer(handle).writerows([header] + rows)
        header, rows = rows_of(plane, table, keys, by, folders, full=False)
        heading = f"`{plane.x}` against `{plane.y}`"
        section += ["", f"### {heading}", ""]
        if not plane.fronts:
            section.append(f"No configuration has finished runs with both `{plane.x}` and `{plane.y}`.")
            printed.append(f"{plane.stem}: no configuration with both {plane.x} and {plane.y}")
            continue
        png = plot_front(out / plane.stem, table, by, plane.x, plane.y, plane.fronts)
        plain = ("front", "family", "seeds", "runs")  # the others are keys: in backticks, as in report.md
        section += markdown_table([h if h in plain else f"`{h}`" for h in header], rows)
        section += ["", f"**Pareto fronts: {heading}** (mean ± std over seeds; also `{plane.stem}.pdf`)", "",
                    f"![Pareto fronts: {heading}]({png.name})"]
        sizes = ", ".join(f"{f.name} {len(f.rows)} of {len(f.candidates)}" for f in plane.fronts)
        printed.append(f"{plane.stem}: configurations on the front: {sizes} -> {plane.stem}.csv, "
                       f"{plane.stem}.pdf, {plane.stem}.png")
        if plane.left_out:
            note = (f"{plane.left_out} configuration(s) without finite `{plane.x}` and `{plane.y}` means "
                    f"are on no front")
            section += ["", note]
            printed.append(f"{plane.stem}: {note.replace('`', '')}")
    return section, printed
