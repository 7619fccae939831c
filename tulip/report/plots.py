"""The report's figures, each written twice: PDF (vector, for a paper) and PNG (for report.md).

    multiplier_<key>   test error and the Lipschitz estimate against a swept reg.* multiplier
    robust_error       robust error against ε, one panel per attack and norm, and the certified error
    clean_vs_robust    robust error at one ε against test error, one point per configuration
    training_curves    test error and the Lipschitz estimate per epoch

Sizes, fonts and each series' colour, line style and marker: tulip.report.style (a legend taller
than the panels makes the figure taller, never the fonts smaller). Values are the mean over seeds
with the sample std as error bars (or a band) where a configuration has 2 or more seeds.

All figures but the training curves need only the table of tulip.report.tables.aggregate, which a
report.csv holds too: `tulip-report --from-csv` redraws them without the run folders.
"""
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display (login nodes, SLURM jobs)
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from tulip.runs import metric_keys  # noqa: E402
from tulip.runs.status import Status  # noqa: E402
from tulip.report.style import (DPI, LEGEND_ENTRY, MAX_COLUMNS, ROW_HEIGHT, WIDTH,  # noqa: E402
                                 row_styles, series_style, styled)
from tulip.report.tables import as_float, fmt, stats  # noqa: E402

CURVE_METRICS = (metric_keys.TEST_ERROR, metric_keys.LOSS_GRAD_MAX)  # multiplier and training plots
AXIS_LABELS = {metric_keys.TEST_ERROR: "test error (%)",
               metric_keys.LOSS_GRAD_MAX: "max ‖∇ₓ loss‖₂"}
TITLES = {metric_keys.TEST_ERROR: "Test error", metric_keys.LOSS_GRAD_MAX: "Lipschitz estimate"}


def series_label(keys: list[str], values, by: str | None, skip: str = "") -> str:
    """`lip+J2, reg.lip=0.1`: the grouping key's option name alone (its numbers as key=value); keys a
    configuration does not have (None) are left out."""
    shown = [fmt(v) if k == by and isinstance(v, str) else f"{k}={fmt(v)}"
             for k, v in zip(keys, values) if k != skip and v is not None]
    return ", ".join(shown) or "all runs"


def new_figure(panels: int, entries: int):
    columns = min(panels, MAX_COLUMNS)
    rows = math.ceil(panels / columns)
    height = max(rows * ROW_HEIGHT, entries * LEGEND_ENTRY + 0.4)
    # constrained layout: room for the legend outside the axes (loc="outside ...") and for the labels.
    fig = plt.figure(figsize=(WIDTH, height), layout="constrained")
    return fig, [fig.add_subplot(rows, columns, i + 1) for i in range(panels)]


def save(fig, axes, stem: Path, order: list[str], handles: dict | None = None) -> Path:
    """One legend for all panels, outside them, its entries in `order` (their handles: `handles`, else
    the panels' own); then stem.pdf and stem.png."""
    handles = dict(handles or {})
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    labels = [label for label in order if label in handles]
    if labels:
        fig.legend([handles[label] for label in labels], labels, loc="outside right upper")
    # No bbox_inches="tight": the files keep the WIDTH the fonts were sized for. Suffixes appended, not
    # replaced: `multiplier_reg.lip` has a dot of its own.
    png = stem.parent / f"{stem.name}.png"
    # No creation date: redrawing unchanged numbers gives the same bytes (no diff in a committed PDF).
    fig.savefig(stem.parent / f"{stem.name}.pdf", metadata={"CreationDate": None})
    fig.savefig(png, dpi=DPI)
    plt.close(fig)
    return png


def spread(std, count) -> np.ndarray | None:
    """Error bars: the std where there are 2 or more seeds (a single run has none), else None."""
    std = np.where(np.asarray(count) >= 2, np.asarray(std, dtype=float), np.nan)
    return std if np.isfinite(std).any() else None


def draw(ax, x, mean, std, count, style: dict, label: str, line: bool = True, xerr=None):
    mean = np.asarray(mean, dtype=float)
    keep = np.isfinite(mean)
    if not keep.any():
        return
    yerr = spread(std, count)
    ax.errorbar(np.asarray(x, dtype=float)[keep], mean[keep], yerr=None if yerr is None else yerr[keep],
                xerr=None if xerr is None else xerr[keep], label=label, elinewidth=0.6,
                **(style if line else {**style, "linestyle": "none"}))


def is_constant(curves: list) -> float | None:
    """The value every finite point of every curve has, or None when they differ (or there are none)."""
    points = np.concatenate([np.asarray(c, dtype=float).ravel() for c in curves]) if curves else np.array([])
    points = points[np.isfinite(points)]
    if points.size == 0 or not np.allclose(points, points[0], rtol=1e-9, atol=1e-9):
        return None
    return float(points[0])


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


@styled
def plot_multipliers(stem: Path, key: str, keys: list[str], by, table: pd.DataFrame) -> tuple:
    """The CURVE_METRICS against one swept multiplier: one line per value of the other keys (the
    regularizer, other swept keys). A configuration without this key at all (regularizer=none when
    sweeping reg.lip) is a horizontal reference line with a ±std band: it does not depend on it.
    Returns (the PNG or None, notes on dropped panels)."""
    lines, references, labels = {}, [], []  # labels: both kinds in table order, so the baseline first
    for row in table.to_dict("records"):
        x = row[key]
        if not row["seeds"]:
            continue
        if x is None:
            references.append((f"{series_label(keys, [row[k] for k in keys], by)} (no {key})", row))
            labels.append(references[-1][0])
        elif isinstance(x, (int, float)):
            label = series_label(keys, [row[k] for k in keys], by, skip=key)
            lines.setdefault(label, []).append((x, row))
            labels += [] if label in labels else [label]
    if not lines:
        return None, []
    metrics, notes = [], []
    for metric in CURVE_METRICS:
        means = [stats(row, metric)[0] for points in lines.values() for _, row in points]
        means += [stats(row, metric)[0] for _, row in references]
        constant = is_constant(means)
        if constant is not None and len(means) > 1:
            notes.append(f"{stem.name}: no {TITLES[metric].lower()} panel: {constant:g} everywhere")
        elif np.isfinite(means).any():
            metrics.append(metric)
    if not metrics:
        return None, notes
    fig, axes = new_figure(len(metrics), len(labels))
    xs = [x for points in lines.values() for x, _ in points]
    for ax, metric in zip(axes, metrics):
        for label, points in lines.items():
            points.sort(key=lambda p: p[0])
            columns = np.array([stats(row, metric) for _, row in points]).T
            draw(ax, [x for x, _ in points], *columns, series_style(labels.index(label)), label)
        set_multiplier_scale(ax, xs, key)
        x_range = ax.get_xlim()  # the reference lines below must not widen it
        for label, row in references:
            mean, std, count = stats(row, metric)
            if count and math.isfinite(mean):
                style = series_style(labels.index(label))
                ax.axhline(mean, color=style["color"], linestyle=style["linestyle"], label=label)
                if count >= 2 and math.isfinite(std):
                    ax.axhspan(mean - std, mean + std, color=style["color"], alpha=0.12, linewidth=0)
        ax.set_xlim(x_range)
        ax.set_ylabel(AXIS_LABELS[metric])
        ax.set_title(TITLES[metric])
    return save(fig, axes, stem, labels), notes


def attack_norm(metrics: list[str], attack: str) -> str:
    """The norm of a curve keyed without one (error_pct@<eps>), from the attack's median_<norm> key."""
    prefix = metric_keys.attack_median(attack, "")
    return next((key[len(prefix):] for key in metrics if key.startswith(prefix)), "")


def robust_panels(metrics: list[str]) -> dict:
    """{(attack, norm): [(eps, key), ...]} from the robust-error keys: one panel per attack and norm."""
    panels = {}
    for key in metrics:
        robust = metric_keys.parse_robust_error(key)
        if robust:
            norm = robust.norm or attack_norm(metrics, robust.attack)
            panels.setdefault((robust.attack, norm), []).append((robust.eps_value, key))
    return {panel: sorted(points) for panel, points in panels.items()}


def single_attack(panels: dict, norm: str) -> str | None:
    """The one attack that ran in `norm`, or None when there were several (or none)."""
    attacks = [a for a, n in panels if n == norm and a not in (metric_keys.BEST_ATTACK, "certified")]
    return attacks[0] if len(attacks) == 1 else None


def norm_label(norm: str) -> str:
    return {"l2": "L2", "linf": "L∞", "l1": "L1"}.get(norm, norm)


def panel_title(attack: str, norm: str) -> str:
    names = {"certified": "certified", metric_keys.BEST_ATTACK: "best of all attacks"}
    name = names.get(attack, f"attack {attack}")
    return f"{name} ({norm_label(norm)})" if norm else name


def eps_label(norm: str) -> str:
    return f"ε ({norm_label(norm)} norm; pixels in [0, 1])" if norm else "ε"


@styled
def plot_robust_error(stem: Path, keys, by, table: pd.DataFrame, metrics: list[str]) -> tuple:
    """Robust error against ε for every configuration, one panel per attack and norm, and the certified
    error. Left out, with a note: the best of all attacks when one attack ran (it is that attack's
    panel again) and a panel whose every curve is one constant (a certificate at 100 % everywhere)."""
    panels, notes = robust_panels(metrics), []
    for attack, norm in list(panels):
        only = single_attack(panels, norm)
        if attack == metric_keys.BEST_ATTACK and only:
            del panels[(attack, norm)]
            notes.append(f"{stem.name}: no '{panel_title(attack, norm)}' panel: only {only} ran, whose "
                         f"panel it would repeat")
    rows = [row for row in table.to_dict("records") if row["seeds"]]
    for panel, points in list(panels.items()):
        means = [[stats(row, key)[0] for _, key in points] for row in rows]
        constant = is_constant(means)
        if not np.isfinite(means).any():
            del panels[panel]
        elif constant is not None and len(rows) * len(points) > 1:
            del panels[panel]
            notes.append(f"{stem.name}: no '{panel_title(*panel)}' panel: every configuration is at "
                         f"{constant:g} % at every ε")
    if not panels:
        return None, notes
    records = table.to_dict("records")
    labels, styles = [series_label(keys, [row[k] for k in keys], by) for row in records], row_styles(records)
    fig, axes = new_figure(len(panels), len(rows))
    for ax, ((attack, norm), points) in zip(axes, panels.items()):
        eps = [e for e, _ in points]
        for index, row in enumerate(records):
            if styles[index]:
                columns = np.array([stats(row, key) for _, key in points]).T
                draw(ax, eps, *columns, styles[index], labels[index])
        ax.set_xlabel(eps_label(norm))
        ax.set_ylabel("certified error (%)" if attack == "certified" else "robust error (%)")
        ax.set_ylim(-2, 102)
        ax.set_title(panel_title(attack, norm))
    return save(fig, axes, stem, labels), notes


def scatter_curve(metrics: list[str], epsilon: float | None) -> tuple[str, str, float, str] | None:
    """(attack, norm, ε, key) of the clean-vs-robust scatter: the attack that ran when only one did,
    else the best of all attacks, in the first norm; at `epsilon`, else the median ε of its curve.
    None when no attack curve exists; ValueError when the curve has no point at `epsilon`."""
    panels = {panel: points for panel, points in robust_panels(metrics).items() if panel[0] != "certified"}
    if not panels:
        return None
    norm = sorted({n for _, n in panels})[0]
    attack = single_attack(panels, norm)
    if attack is None:
        best = (metric_keys.BEST_ATTACK, norm) in panels
        attack = metric_keys.BEST_ATTACK if best else next(a for a, n in panels if n == norm)
    points = panels[(attack, norm)]
    if epsilon is None:
        eps, key = points[(len(points) - 1) // 2]  # the lower median: a point on the curve
        return attack, norm, eps, key
    for eps, key in points:
        if math.isclose(eps, epsilon, rel_tol=1e-6):
            return attack, norm, eps, key
    raise ValueError(f"--epsilon {epsilon:g}: the {panel_title(attack, norm)} curve has ε = "
                     + ", ".join(f"{e:g}" for e, _ in points))


@styled
def plot_clean_vs_robust(stem: Path, keys, by, table: pd.DataFrame, curve) -> Path | None:
    """One point per configuration: test error (x) against robust error at one ε (y), mean over seeds
    with std error bars both ways; the colours and markers of plot_robust_error."""
    attack, norm, eps, key = curve
    records = table.to_dict("records")
    points = [(index, row) for index, row in enumerate(records)
              if math.isfinite(stats(row, metric_keys.TEST_ERROR)[0]) and math.isfinite(stats(row, key)[0])]
    if not points:
        return None
    labels, styles = [series_label(keys, [row[k] for k in keys], by) for row in records], row_styles(records)
    fig, (ax,) = new_figure(1, len(points))
    markers = {}  # the legend shows the markers alone: crossed error bars would hide their shapes
    for index, row in points:
        x_mean, x_std, x_count = stats(row, metric_keys.TEST_ERROR)
        style = {**styles[index], "markersize": 6}  # few points: larger markers, shapes readable
        draw(ax, [x_mean], *np.array([stats(row, key)]).T, style, labels[index], line=False,
             xerr=spread([x_std], [x_count]))
        markers[labels[index]] = Line2D([], [], **{**style, "linestyle": "none"})
    ax.set_xlabel(f"{AXIS_LABELS[metric_keys.TEST_ERROR]}: clean test set")
    ax.set_ylabel(f"robust error (%) at ε = {eps:g}")
    ax.set_title(f"{panel_title(attack, norm)}, ε = {eps:g}")
    return save(fig, [ax], stem, labels, markers)


@styled
def plot_training_curves(stem: Path, keys, by, table: pd.DataFrame, groups: list) -> Path | None:
    """The CURVE_METRICS per epoch (metrics.jsonl of each finished run), mean over seeds with a ±std
    band. `groups[i]` are the runs of table row i."""
    records = table.to_dict("records")
    curves = {}  # (metric, row index) -> DataFrame of mean, std, count per epoch
    for index, runs in enumerate(groups):
        epochs = pd.DataFrame([record for run in runs if run.status == Status.FINISHED for record in run.epochs])
        if metric_keys.EPOCH not in epochs:
            continue
        for metric in CURVE_METRICS:
            if metric in epochs:
                values = pd.DataFrame({"epoch": epochs[metric_keys.EPOCH],
                                       "value": [as_float(v) for v in epochs[metric]]}).dropna()
                if len(values):
                    curves[metric, index] = values.groupby("epoch")["value"].agg(["mean", "std", "count"])
    metrics = [m for m in CURVE_METRICS if any(metric == m for metric, _ in curves)]
    if not metrics:
        return None
    labels, styles = [series_label(keys, [row[k] for k in keys], by) for row in records], row_styles(records)
    fig, axes = new_figure(len(metrics), len({index for _, index in curves}))
    for ax, metric in zip(axes, metrics):
        for (curve_metric, index), curve in curves.items():
            if curve_metric != metric:
                continue
            style, epochs = styles[index], curve.index.to_numpy(dtype=float)
            if len(curve) == 1:  # a band around a single point is invisible: an error bar
                draw(ax, epochs, curve["mean"], curve["std"], curve["count"], style, labels[index])
                continue
            ax.plot(epochs, curve["mean"], markersize=2.5, label=labels[index], **style)
            band = spread(curve["std"], curve["count"])
            if band is not None:
                ax.fill_between(epochs, curve["mean"] - band, curve["mean"] + band, color=style["color"],
                                alpha=0.15, linewidth=0)
        ax.set_xlabel("epoch")
        low, high = ax.get_xlim()
        if high - low < 2:  # one epoch: matplotlib would label fractions of it
            ax.set_xlim(round((low + high) / 2) - 1, round((low + high) / 2) + 1)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(AXIS_LABELS[metric])
        ax.set_title(f"{TITLES[metric]} per epoch")
    return save(fig, axes, stem, labels)


def make_figures(out: Path, keys, by, table: pd.DataFrame, metrics: list[str], scatter, groups=None):
    """Every figure the table supports, into `out`. `metrics`: every metric column (the figures do not
    follow --metric); `scatter`: scatter_curve's choice; `groups`: the runs of each table row, for the
    training curves (None: from a csv, without them). Returns ([(caption, png)], notes)."""
    plots, notes = [], []
    multipliers = [k for k in keys if k.startswith("reg.") and table[k].notna().any()
                   and all(isinstance(v, (int, float)) for v in table[k] if v is not None)]
    for key in multipliers:
        png, dropped = plot_multipliers(out / f"multiplier_{key}", key, keys, by, table)
        notes += dropped
        if png:
            plots.append((f"Test error and Lipschitz estimate against {key} (mean ± std over seeds)", png))
    png, dropped = plot_robust_error(out / "robust_error", keys, by, table, metrics)
    notes += dropped
    if png:
        plots.append(("Robust error against ε (mean ± std over seeds)", png))
    if scatter and (png := plot_clean_vs_robust(out / "clean_vs_robust", keys, by, table, scatter)):
        attack, norm, eps, _ = scatter
        plots.append((f"Clean against robust error at ε = {eps:g} ({panel_title(attack, norm)}; mean ± std "
                      f"over seeds)", png))
    if groups is not None and (png := plot_training_curves(out / "training_curves", keys, by, table, groups)):
        plots.append(("Training curves (mean ± std over seeds)", png))
    return plots, notes
