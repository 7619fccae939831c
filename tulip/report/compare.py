"""`tulip-report --compare A B`: two configurations compared on the same test images, seed by seed.

A and B each select one configuration: a value of the `--by` key (`none`, `lip`) or `key=value` filters
on the runs' override keys (`regularizer=lip+J2,reg.lip=0.0332`). Their finished runs are paired by
`seed` (a seed only one of them has is left out), the images by the `index` column of the per-image
files (attacks.csv, bounds.csv): only the images every paired run has, with the same label everywhere.
Per measure (the clean error of the attacked images, each attack's robust error at each ε its runs'
summary.json lists, the certified error at each ε) an image is wrong or not in each run, which gives
two boolean (seed pairs × images) arrays, and from them (tulip.stats):
- the effect B − A in percentage points, with a percentile-bootstrap 95 % interval that resamples the
  images and the seed pairs: both the test set and the training seeds vary in it;
- the exact McNemar test on the discordant (seed, image) pairs, pooled over the seed pairs;
- the Holm-adjusted p-value, over every measure of every comparison of the command.
A row's verdict is "no measurable difference" unless the interval excludes 0 and the adjusted p-value is
below 0.05; then "B lower" or "B higher".

Figures of a whole run (the Lipschitz estimates and bounds of FIGURES, from summary.json) are compared
seed by seed as a ratio B/A: its t interval and p-value on the paired log ratios (tulip.stats.paired_ratio),
Holm-adjusted together with the rows above; compare_figures.csv.
"""
import csv
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tulip.runs import metric_keys
from tulip.runs.folder import RunFolder
from tulip.runs.status import Status
from tulip.report.markdown import markdown_table
from tulip.report.runs import Run, normalise, read_columns
from tulip.report.tables import SEED, fmt, fmt_csv
from tulip.stats import holm, mcnemar_exact, paired_bootstrap, paired_ratio

ALPHA = 0.05
NO_DIFFERENCE = "no measurable difference"
DEFAULT_SPLIT = "test"  # runs from before summary.json recorded `attack/split` attacked the test set
ATTACKS, BOUNDS = "attacks", "bounds"
CSV_COLUMNS = ["comparison", "a", "b", "a_configuration", "b_configuration", "measure", "a_error_pct",
               "b_error_pct", "effect_pct", "effect_pct_ci_low", "effect_pct_ci_high", "only_a", "only_b",
               "p_mcnemar", "p_holm", "images", "seed_pairs", "seeds", "verdict"]
# Figures of a whole run compared as ratios: the Lipschitz estimates and the guaranteed bounds
FIGURES = (metric_keys.LOSS_GRAD_MAX, metric_keys.JACOBIAN_2INF, metric_keys.LIPSCHITZ_EMPIRICAL_MAX,
           metric_keys.LAYER_NORM_PRODUCT, metric_keys.CERT_LIPSCHITZ_UPPER)
FIGURE_COLUMNS = ["comparison", "a", "b", "a_configuration", "b_configuration", "measure", "a_mean", "b_mean",
                  "ratio", "ratio_ci_low", "ratio_ci_high", "p_paired_t", "p_holm", "seed_pairs", "seeds",
                  "verdict"]
# `key=value,key=value`: split at the commas that start another `key=`, so a value may hold commas
_NEXT_FILTER = re.compile(r",(?=[+~]*[\w./@-]+=)")


@dataclass
class Measure:
    """An error rate recomputed from per-image files: `key` is the summary.json key it reproduces."""
    key: str
    file: str  # ATTACKS or BOUNDS
    column: str | None  # a distance column (wrong at ε: distance ≤ ε); None: the clean error
    eps: float = 0.0


@dataclass
class Compared:
    """What every row of a comparison starts with: which comparison, its two selections, what it measures."""
    comparison: int
    a: str
    b: str
    a_configuration: str
    b_configuration: str
    measure: str


@dataclass
class Row(Compared):
    """One measure of one comparison: compare.csv's row."""
    a_error_pct: float
    b_error_pct: float
    effect_pct: float
    effect_pct_ci_low: float
    effect_pct_ci_high: float
    only_a: int
    only_b: int
    p_mcnemar: float
    p_holm: float
    images: int
    seed_pairs: int
    seeds: str
    verdict: str = ""


@dataclass
class FigureRow(Compared):
    """One figure of a whole run compared as B/A over the seed pairs: compare_figures.csv's row."""
    a_mean: float  # geometric means over the seeds
    b_mean: float
    ratio: float
    ratio_ci_low: float
    ratio_ci_high: float
    p_paired_t: float
    p_holm: float
    seed_pairs: int
    seeds: str
    verdict: str = ""


def figure_rows(number: int, texts: tuple[str, str], configuration_labels: tuple[str, str],
                pairs: list[tuple], seeds: str) -> list[FigureRow]:
    """The FIGURES every paired run recorded, each as B/A over the seed pairs."""
    rows = []
    for key in FIGURES:
        values = [[run.summary.get(key) for run in (run_a, run_b)] for _, run_a, run_b in pairs]
        if not all(isinstance(v, (int, float)) and np.isfinite(v) for pair in values for v in pair):
            continue
        a, b = np.array(values, dtype=float).T
        ratio, low, high, p_value = paired_ratio(a, b)
        geometric = [float(np.exp(np.log(v).mean())) if np.all(v > 0) else float("nan") for v in (a, b)]
        rows.append(FigureRow(number, *texts, *configuration_labels, key, *geometric, ratio, low, high,
                              p_value, float("nan"), len(pairs), seeds))
    return rows


# --- which runs -----------------------------------------------------------------------------------

def parse_selection(text: str, by: str | None) -> list[tuple[str, object]]:
    """`lip` → [(by, "lip")]; `regularizer=lip+J2,reg.lip=0.0332` → [("regularizer", "lip+J2"),
    ("reg.lip", 0.0332)], values spelled as the report spells them (`normalise`)."""
    if "=" not in text:
        if by is None:
            raise ValueError(f"--compare {text}: the runs record no --by key; select with key=value")
        return [(by, normalise(text))]
    filters = []
    for part in _NEXT_FILTER.split(text):
        key, sep, value = part.partition("=")
        if not sep or not key.strip("+~"):
            raise ValueError(f"--compare {text}: `{part}` is not key=value")
        filters.append((key.strip().lstrip("+~"), normalise(value)))
    return filters


def select(text: str, by: str | None, labels: list[str], configurations: list[list[Run]]) -> int:
    """The one configuration (its position) whose runs match selection `text`; ValueError naming it and
    listing the configurations when none or several match."""
    filters = parse_selection(text, by)
    matching = [i for i, runs in enumerate(configurations)
                if any(all(run.value(key) == value for key, value in filters) for run in runs)]
    if len(matching) == 1:
        return matching[0]
    if not matching:
        raise ValueError(f"--compare {text}: no run matches it; the configurations are: {'; '.join(labels)}")
    raise ValueError(f"--compare {text}: matches {len(matching)} configurations ("
                     f"{'; '.join(labels[i] for i in matching)}): add key=value filters to choose one")


def pair_by_seed(runs_a: list[Run], runs_b: list[Run]) -> tuple[list[tuple], list[str]]:
    """[(seed, run of A, run of B)] for each seed both finished, and notes on what was left out."""
    notes = []

    def by_seed(runs, side):
        found = {}
        for run in (run for run in runs if run.status == Status.FINISHED):
            if run.value(SEED) in found:
                notes.append(f"{side} has several runs of seed {fmt(run.value(SEED))}: {found[run.value(SEED)].path} "
                             f"used, {run.path} left out")
            else:
                found[run.value(SEED)] = run
        return found

    seeds_a, seeds_b = by_seed(runs_a, "A"), by_seed(runs_b, "B")
    for side, mine, other in (("A", seeds_a, seeds_b), ("B", seeds_b, seeds_a)):
        alone = [fmt(seed) for seed in mine if seed not in other]
        if alone:
            notes.append(f"left out, finished in {side} only: seed {', '.join(alone)}")
    pairs = [(seed, seeds_a[seed], seeds_b[seed]) for seed in seeds_a if seed in seeds_b]
    return pairs, notes


def split_of(run: Run) -> str:
    return str(run.summary.get(metric_keys.ATTACKED_SPLIT) or DEFAULT_SPLIT)


# --- which images, and which of them each run gets wrong ---------------------------------------------

class PerImage:
    """A run's attacks.csv and bounds.csv as columns of text, and the measures they can give."""

    def __init__(self, run: Run):
        self.run = run
        folder = RunFolder(run.path)
        self.paths = {name: folder.csv_file(name) for name in (ATTACKS, BOUNDS)}
        self.files = {name: read_columns(path) for name, path in self.paths.items()}

    def missing(self, name: str) -> ValueError:
        return ValueError(f"{self.run.path}: no {self.paths[name].name} (or no image in it): --compare "
                          f"needs every paired run's per-image results")

    def measures(self) -> list[Measure]:
        """The clean error, and each robust or certified error whose ε summary.json lists."""
        attacks, bounds = self.files[ATTACKS], self.files[BOUNDS]
        if not attacks and not bounds:
            raise self.missing(ATTACKS)
        curves = [parsed for key in self.run.summary if (parsed := metric_keys.parse_robust_error(key))]
        certified = sorted({p.eps_value for p in curves if p.attack == "certified"})
        attacked = [p for p in curves if p.attack != "certified"]
        if attacked and not attacks:
            raise self.missing(ATTACKS)
        # older runs wrote the certified radii into attacks.csv
        radii_file = BOUNDS if metric_keys.CERTIFIED_COLUMN in bounds else ATTACKS
        if certified and metric_keys.CERTIFIED_COLUMN not in self.files[radii_file]:
            raise self.missing(BOUNDS)
        found = [Measure(metric_keys.ATTACKED_CLEAN_ERROR, ATTACKS if attacks else BOUNDS, None)]
        for column in attacks:
            distance = metric_keys.parse_distance_column(column)
            if distance is not None:
                epsilons = sorted({p.eps_value for p in attacked if (p.attack, p.norm) == tuple(distance)})
                found += [Measure(metric_keys.robust_error(*distance, eps), ATTACKS, column, eps) for eps in epsilons]
        found += [Measure(metric_keys.certified_error(eps), radii_file, metric_keys.CERTIFIED_COLUMN, eps)
                  for eps in certified]
        return found

    def numbers(self, name: str, column: str) -> np.ndarray:
        try:
            return np.array(self.files[name][column], dtype=float)
        except (KeyError, ValueError):
            raise ValueError(f"{self.paths[name]}: column `{column}` does not hold numbers") from None


def common_images(tables: list[PerImage], name: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """The indices of the images every run's file `name` has, and where each run holds them; a label
    that differs between two runs for one index means they are not the same images: ValueError."""
    indices = [table.numbers(name, "index").astype(np.int64) for table in tables]
    common = indices[0]
    for index in indices[1:]:
        common = np.intersect1d(common, index)
    if common.size == 0:
        raise ValueError(f"{tables[0].paths[name]} and the other paired runs' {name}.csv have no image index in common")
    positions = []
    for index in indices:
        order = np.argsort(index, kind="stable")
        positions.append(order[np.searchsorted(index[order], common)])
    reference = tables[0].numbers(name, "label")[positions[0]]
    for table, where in zip(tables[1:], positions[1:]):
        labels = table.numbers(name, "label")[where]
        if (labels != reference).any():
            first = np.flatnonzero(labels != reference)[0]
            raise ValueError(f"{tables[0].paths[name]} and {table.paths[name]}: image {common[first]} has label "
                             f"{fmt(float(reference[first]))} in one and {fmt(float(labels[first]))} in the "
                             f"other: not the same images")
    return common, positions


def wrong(table: PerImage, measure: Measure, where: np.ndarray) -> np.ndarray:
    """Which of the images at positions `where` the run gets wrong under `measure`."""
    if measure.column is None:
        return table.numbers(measure.file, "prediction")[where] != table.numbers(measure.file, "label")[where]
    # in float32, as the evaluation compared its float32 distances with ε (tulip.report.runs.distance_curve)
    distances = table.numbers(measure.file, measure.column)[where].astype(np.float32)
    return distances <= np.float32(measure.eps)


# --- the comparison ------------------------------------------------------------------------------

def compare(selections: list[tuple[str, str]], by: str | None, labels: list[str],
            configurations: list[list[Run]], resamples: int = 10_000
            ) -> tuple[list[Row], list[FigureRow], list[str]]:
    """Every comparison of `selections` [(A, B)]: its rows of error rates and of whole-run figures
    (Holm-adjusted over all of them, with their verdicts) and notes on what was left out.
    `configurations` holds each configuration's runs, `labels` its `key=value` text. ValueError, naming the selection, run or file, for what cannot be compared."""
    rows, figures, notes = [], [], []
    for number, (text_a, text_b) in enumerate(selections, 1):
        chosen_a, chosen_b = (select(text, by, labels, configurations) for text in (text_a, text_b))
        if chosen_a == chosen_b:
            raise ValueError(f"--compare {text_a} {text_b}: both select {labels[chosen_a]}")
        pairs, left_out = pair_by_seed(configurations[chosen_a], configurations[chosen_b])
        if not pairs:
            raise ValueError(f"--compare {text_a} {text_b}: no seed that both finished ({'; '.join(left_out)})")
        notes += [f"comparison {number} ({text_a} vs {text_b}): {note}" for note in left_out]
        # the pairs first, to name a mismatched pair; then across seeds, whose images are stacked too
        for run_a, run_b in [(a, b) for _, a, b in pairs] + [(pairs[0][1], r) for _, a, b in pairs for r in (a, b)]:
            if split_of(run_a) != split_of(run_b):
                raise ValueError(f"{run_a.path} (attack/split={split_of(run_a)}) and {run_b.path} (attack/split="
                                 f"{split_of(run_b)}) were evaluated on different images: not paired")
        tables_a = [PerImage(run_a) for _, run_a, _ in pairs]
        tables_b = [PerImage(run_b) for _, _, run_b in pairs]
        tables = tables_a + tables_b
        offered = [{m.key: m for m in table.measures()} for table in tables]
        measures = [m for key, m in offered[0].items()
                    if all(key in o and (o[key].file, o[key].column) == (m.file, m.column) for o in offered[1:])]
        images = {name: common_images(tables, name) for name in dict.fromkeys(m.file for m in measures)}
        seeds = " ".join(fmt(seed) for seed, _, _ in pairs)
        for measure in measures:
            common, positions = images[measure.file]
            wrong_all = np.array([wrong(t, measure, where) for t, where in zip(tables, positions)])
            wrong_a, wrong_b = wrong_all[:len(pairs)], wrong_all[len(pairs):]
            effect, low, high = paired_bootstrap(wrong_a, wrong_b, resamples=resamples)
            only_a, only_b, p_value = mcnemar_exact(wrong_a.ravel(), wrong_b.ravel())
            rows.append(Row(number, text_a, text_b, labels[chosen_a], labels[chosen_b], measure.key,
                            100.0 * wrong_a.mean(), 100.0 * wrong_b.mean(), effect, low, high, only_a, only_b,
                            p_value, float("nan"), int(common.size), len(pairs), seeds))
        figures += figure_rows(number, (text_a, text_b), (labels[chosen_a], labels[chosen_b]), pairs, seeds)
    adjusted = holm([row.p_mcnemar for row in rows] + [row.p_paired_t for row in figures])
    for row, p_holm in zip(rows + figures, adjusted):
        row.p_holm = p_holm
        row.verdict = verdict(row)
    return rows, figures, notes


def verdict(row: Row | FigureRow) -> str:
    """B lower / B higher only when both the interval excludes no change (0 points; a ratio of 1) and the
    adjusted p-value is below α."""
    if isinstance(row, FigureRow):
        no_change, effect, low, high = 1.0, row.ratio, row.ratio_ci_low, row.ratio_ci_high
    else:
        no_change, effect, low, high = 0.0, row.effect_pct, row.effect_pct_ci_low, row.effect_pct_ci_high
    if not low > no_change and not high < no_change or not row.p_holm < ALPHA:
        return NO_DIFFERENCE
    return "B lower" if effect < no_change else "B higher"


# --- the output ----------------------------------------------------------------------------------

HEADER = ["measure", "images", "A %", "B %", "B − A [95 % interval]", "only A", "only B", "McNemar p",
          "Holm p", "verdict"]
EXPLANATION = ("Each comparison pairs A's and B's runs by seed and their images by index (only the images "
               "all paired runs evaluated, with the same labels). Error rates in % over those images and "
               "seed pairs; B − A in percentage points with a percentile-bootstrap 95 % interval that "
               "resamples images and seed pairs; McNemar's exact test on the (seed, image) pairs that only "
               "one of A and B gets wrong (`only A`, `only B`), pooled over the seed pairs; its p-value "
               "Holm-adjusted over every row of every comparison. Verdict: \"no measurable difference\" "
               "when the interval contains 0 or the adjusted p is at least 0.05. Figures of a whole run "
               "(Lipschitz estimates and bounds): geometric means over the seeds, B / A with the t "
               "interval of the paired log ratios and its p-value, in the same Holm adjustment. Full "
               "precision: `compare.csv`, `compare_figures.csv`.")


def cells(row: Row) -> list[str]:
    return [row.measure, str(row.images), f"{row.a_error_pct:.2f}", f"{row.b_error_pct:.2f}",
            f"{row.effect_pct:+.2f} [{row.effect_pct_ci_low:+.2f}, {row.effect_pct_ci_high:+.2f}]",
            str(row.only_a), str(row.only_b), f"{row.p_mcnemar:.3g}", f"{row.p_holm:.3g}", row.verdict]


def heading(group: list[Row]) -> str:
    first = group[0]
    pairs = f"{first.seed_pairs} seed pair{'s' if first.seed_pairs != 1 else ''} (seed {first.seeds})"
    return f"Comparison {first.comparison}: A = {first.a_configuration}, B = {first.b_configuration}; {pairs}"


def text_table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


FIGURE_HEADER = ["figure", "A", "B", "B / A [95 % interval]", "paired t p", "Holm p", "verdict"]


def figure_cells(row: FigureRow) -> list[str]:
    return [row.measure, f"{row.a_mean:.4g}", f"{row.b_mean:.4g}",
            f"{row.ratio:.3g} [{row.ratio_ci_low:.3g}, {row.ratio_ci_high:.3g}]", f"{row.p_paired_t:.3g}",
            f"{row.p_holm:.3g}", row.verdict]


def write_csv_rows(path: Path, columns: list[str], rows: list) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([fmt_csv(getattr(row, column)) for column in columns] for row in rows)


def write_comparisons(out: Path, rows: list[Row], figures: list[FigureRow],
                      notes: list[str]) -> tuple[list[str], list[str]]:
    """compare.csv and compare_figures.csv, and (the "Paired comparisons" section of report.md, the lines
    to print)."""
    write_csv_rows(out / "compare.csv", CSV_COLUMNS, rows)
    write_csv_rows(out / "compare_figures.csv", FIGURE_COLUMNS, figures)
    section, printed = ["", "## Paired comparisons", "", EXPLANATION, ""], []
    for number in dict.fromkeys(row.comparison for row in rows):
        group = [row for row in rows if row.comparison == number]
        section += [f"**{heading(group)}**", ""] + markdown_table(HEADER, [cells(r) for r in group]) + [""]
        printed += ["", heading(group)] + text_table([HEADER] + [cells(r) for r in group])
        whole_runs = [row for row in figures if row.comparison == number]
        if whole_runs:  # geometric means over the seeds; B/A with the t interval of the paired log ratios
            section += markdown_table(FIGURE_HEADER, [figure_cells(r) for r in whole_runs]) + [""]
            printed += [""] + text_table([FIGURE_HEADER] + [figure_cells(r) for r in whole_runs])
    if notes:
        section += ["Left out of the comparisons:", ""] + [f"- {note}" for note in notes] + [""]
        printed += [""] + notes
    return section, printed
