"""`tulip-report`: tables and figures from a sweep, as plain files (no W&B, no network).

    tulip-report multirun/2026-11-02/10-00-00                 # a Hydra multirun folder
    tulip-report multirun/part_a multirun/part_b --out report/ # several sweeps in one report
    tulip-report outputs/a outputs/b --out report/ --by model  # run folders
    tulip-report --from-csv report/report.csv --order none,lip # redraw the figures from a table
    tulip-report multirun/study --front                       # Pareto fronts of multi-objective studies
    tulip-report multirun/... --compare none lip              # a paired comparison of two configurations
    tulip-report --markdown report.csv --column test/error_pct # one markdown table of a CSV, for the docs
    python -m tulip.report multirun/... --metric +train/loss   # the same, as a module

Reads every run folder found below the inputs (a folder holding summary.json or .hydra/overrides.yaml):
summary.json, metrics.jsonl, .hydra/{overrides,hydra,config}.yaml and, for a summary.json without
robust-error curves, the per-image distances in attacks.csv and bounds.csv. A run's overrides are
those its summary.json records, else .hydra/overrides.yaml, parsed by Hydra's override parser. A run's
configuration is its overrides without `seed` (and without `wandb.*`, which does not change a result);
the override keys whose values differ between runs are the swept keys and become the table's columns.
The finished runs of a configuration are aggregated over seeds: mean ± sample standard deviation
(ddof=1) and their count, and for each error rate a 95 % interval: the t interval of the mean over 2 or
more seeds, or one run's Wilson interval over its images (its summary.json's ci95_* keys). Failed,
diverged and unreadable runs are counted in the status columns and listed by folder in report.md, never
dropped.

Writes into --out (default: the first input folder):
  runs.csv                      one row per run: folder, status, configuration columns, seed, every metric
  report.csv                    one row per configuration, raw metric keys (`<key>`, `<key>_std`; error
                                rates also `<key>_ci_low`, `<key>_ci_high`)
  report.md                     the same tables for humans (error rates as `mean [low, high]`), the
                                problem runs, and the figures
  multiplier_<key>.{pdf,png}    test error and lipschitz/loss_grad_max against each swept reg.* multiplier
  robust_error.{pdf,png}        robust error against ε per attack (and the certified error), per config
  clean_vs_robust.{pdf,png}     robust error at one ε against test error, one point per config
  training_curves.{pdf,png}     test error and lipschitz/loss_grad_max per epoch, per config
  front.{pdf,png}, front.csv    with --front X,Y (default: the runs' first two `objectives`): each family's
                                non-dominated configurations in the (X, Y) plane, seeds' spread as error
                                bars, and their table (also a section of report.md)
  front_certified.{pdf,png,csv} the same against the certified error at the smallest ε, when runs have it
  compare.csv                   with --compare A B (repeatable): one row per pair and measure (clean,
                                robust and certified error at each ε): both error rates, the effect B − A
                                with its paired-bootstrap 95 % interval over images and seeds, the exact
                                McNemar p-value and its Holm adjustment, a verdict; also printed, and a
                                "Paired comparisons" section of report.md
Exit status 1 only when not a single run could be read; every unreadable run is named on stderr.

The package, one job per module (none imports a later one):
  runs.py       finding and reading run folders and multirun.yaml (a job's own record: tulip.runs.jobs)
  intervals.py  the error columns' 95 % intervals (tulip.stats)
  tables.py     runs.csv, configurations, aggregation over seeds (pandas), report.csv
  markdown.py   report.md
  plots.py      the figures
  pareto.py     the Pareto fronts (--front): non-dominated configurations, their figure and table
  compare.py    the paired comparisons (--compare): compare.csv and report.md's section
  doc_tables.py a CSV as one markdown table (--markdown), the docs' generated tables and their check
  cli.py        the command line (`main`)
"""


def main(argv=None) -> int:
    # Imported here, not at the top: whoever imports only tulip.report.runs (the reader of run folders)
    # must not pay for matplotlib and pandas on the way.
    from tulip.report.cli import main as run_main

    return run_main(argv)


__all__ = ["main"]
