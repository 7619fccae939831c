"""The report's three PNG plots: final metrics against a swept multiplier, robust error against ε, and
training curves; each over the configurations of tulip.report.tables, mean ± std over seeds."""
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display (login nodes, SLURM jobs)
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from tulip import metric_keys  # noqa: E402
from tulip.report.runs import Run  # noqa: E402
from tulip.report.tables import Configuration, as_float, fmt, mean_std  # noqa: E402

# Figure geometry: every panel is PANEL_SIZE inches at DPI, so a figure of r x c panels is
# (c * PANEL_SIZE[0] * DPI) x (r * PANEL_SIZE[1] * DPI) pixels (plus LEGEND_WIDTH inches when a
# legend sits to the right of the panels).
DPI = 100
PANEL_SIZE = (5.0, 4.0)
LEGEND_WIDTH = 3.0

CURVE_METRICS = (metric_keys.TEST_ERROR, metric_keys.LOSS_GRAD_MAX)  # plots (1) and (3)
AXIS_LABELS = {
    metric_keys.TEST_ERROR: "test error (%)",
    metric_keys.LOSS_GRAD_MAX: "max per-image ‖∇ₓ loss‖₂ (Lipschitz estimate)",
}


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
    """Plot (1): the CURVE_METRICS against one swept multiplier, error bars over seeds.

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
        robust = metric_keys.parse_robust_error(key)
        if robust:
            norm = robust.norm or attack_norm(runs, robust.attack)
            panels.setdefault((robust.attack, norm), []).append((robust.eps_value, key))
    return {panel: sorted(points) for panel, points in panels.items()}


def attack_norm(runs: list[Run], attack: str) -> str:
    """The norm of a curve keyed without one (error_pct@<eps>), from the attack's median_<norm> key."""
    prefix = metric_keys.attack_median(attack, "")
    for run in runs:
        for key in run.summary:
            if key.startswith(prefix):
                return key[len(prefix):]
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
                     else ("best of all attacks" if name == metric_keys.BEST_ATTACK else f"attack {name}")
                     + (f" ({norm_label(norm)})" if norm else ""))
        ax.grid(alpha=0.3)
    fig.suptitle("Robust test error against perturbation size (mean ± std over seeds)")
    finish_figure(fig, axes, path)
    return True


def plot_training_curves(path: Path, keys, configurations) -> bool:
    """Plot (3): the CURVE_METRICS per epoch, mean over seeds with a ±std band."""
    if not any(run.epochs for config in configurations for run in config.finished):
        return False
    fig, axes = new_figure(len(CURVE_METRICS), legend=True)
    for ax, metric in zip(axes, CURVE_METRICS):
        for color, config in zip(line_colors(len(configurations)), configurations):
            per_epoch = {}
            for run in config.finished:
                for record in run.epochs:
                    value = as_float(record.get(metric))
                    if value is not None and metric_keys.EPOCH in record:
                        per_epoch.setdefault(record[metric_keys.EPOCH], []).append(value)
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
