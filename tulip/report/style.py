"""How the report's figures look: their size, fonts and the style of each series.

Each figure is WIDTH inches wide, the text width of a two-column paper, so that its 8-pt fonts print
at 8 pt when it spans the page. Each series keeps one colour, line style and marker in the order of
the table, baseline first.
"""
import functools

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display (login nodes, SLURM jobs)
import matplotlib.pyplot as plt  # noqa: E402  (after the backend choice)
import numpy as np  # noqa: E402

WIDTH = 7.0  # inches
ROW_HEIGHT = 2.6  # inches per row of panels
MAX_COLUMNS = 2  # panels per row: with the legend beside them, each stays about 2.7 in wide
LEGEND_ENTRY = 0.16  # inches per legend entry at 8 pt, text and spacing
DPI = 200  # of the PNG; the PDF is vector
# Set while a figure is drawn and saved (never globally: importing the report must not restyle other
# matplotlib figures of the same process).
STYLE = {
    "font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "xtick.labelsize": 8, "ytick.labelsize": 8,
    "legend.fontsize": 8, "lines.linewidth": 1.2, "lines.markersize": 4, "errorbar.capsize": 2,
    "axes.grid": True, "grid.alpha": 0.3, "grid.linewidth": 0.5, "axes.linewidth": 0.6,
    "legend.frameon": False, "legend.handlelength": 2.6,  # long enough to show a dash pattern
    "pdf.fonttype": 42,  # TrueType in the PDF: text a journal's pipeline can edit and search
}
# Okabe & Ito's colour-blind-safe palette, black first for the baseline. Its yellow is left out: too
# pale for a thin line on white paper. 7 colours x 4 line styles: 28 distinct (colour, style) pairs.
COLOURS = ("#000000", "#E69F00", "#56B4E9", "#009E73", "#D55E00", "#0072B2", "#CC79A7")
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def series_style(index: int) -> dict:
    """Colour, line style and marker of the index-th series: colours first, then the next line style.
    Every other round of colours has hollow markers, so that two series of one colour differ in a
    scatter plot too, where there are no lines."""
    colour, round_ = COLOURS[index % len(COLOURS)], index // len(COLOURS)
    return {"color": colour, "linestyle": LINESTYLES[round_ % len(LINESTYLES)],
            "marker": MARKERS[index % len(MARKERS)], "markerfacecolor": "white" if round_ % 2 else colour}


def row_styles(records: list[dict]) -> list[dict | None]:
    """The series_style of each table row with finished runs (None for the others): numbered over those
    rows only, so that a configuration whose runs all failed does not take the baseline's black."""
    indices = np.cumsum([bool(row["seeds"]) for row in records]) - 1
    return [series_style(int(i)) if row["seeds"] else None for i, row in zip(indices, records)]


def styled(plot):
    """Draws and saves inside STYLE."""
    @functools.wraps(plot)
    def wrapper(*args, **kwargs):
        with plt.rc_context(STYLE):
            return plot(*args, **kwargs)
    return wrapper
