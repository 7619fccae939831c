"""tulip-report on job folders written by hand (the files a job leaves, with chosen numbers): the sweep
line of several inputs, Hydra's override syntax, runs.csv against a hand computation, and the figures'
size, fonts, order and styles. The report of a real multirun is in tests/system/test_report.py."""
import csv
import json
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT
from support.fake_runs import write_multirun, write_run
from tulip import report
from tulip.report.plots import DPI


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def method_run(folder: Path, method: str, seed: int, summary: dict, **kwargs) -> Path:
    return write_run(folder, [f"regularizer={method}", f"seed={seed}", "epochs=3"], summary,
                     choices={"regularizer": method}, config={"seed": seed, "epochs": 3}, **kwargs)


def test_sweep_line_lists_the_values_of_every_input(tmp_path):
    """Two sweep folders, each with some of the regularizers: the Sweep line names all of them, in the
    order first seen, and the tables follow that order, baseline first."""
    for name, methods in (("a", ["none", "lip"]), ("b", ["lip", "J2"])):
        write_multirun(tmp_path / name, ["epochs=3"], {"regularizer": ",".join(methods), "seed": "0,1"})
        for job, (method, seed) in enumerate((m, s) for m in methods for s in (0, 1)):
            method_run(tmp_path / name / str(job), method, seed, {"test/error_pct": 1.0 + job})
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    assert "Sweep (multirun.yaml): `epochs=3 regularizer=none,lip,J2 seed=0,1`" in markdown
    assert [row["regularizer"] for row in read_csv(out / "report.csv")] == ["none", "lip", "J2"]
    assert [row["seeds"] for row in read_csv(out / "report.csv")] == ["2", "4", "2"]


def test_overrides_are_read_with_hydras_parser(tmp_path):
    from tulip.launch.callbacks import collect_jobs
    from tulip.report.runs import parse_overrides, read_run, read_sweep, sweep_text

    overrides = ["+reg.extra=1", "~wandb.tags", "attack.epsilons.l2=[0.5,1.0]", "name='a=b, c'",
                 "++optim.nesterov=true", "reg.lip=1e-3", "hydra/launcher=submitit_local"]
    assert parse_overrides(overrides) == {
        "reg.extra": 1, "attack.epsilons.l2": "[0.5,1.0]", "name": "a=b, c", "optim.nesterov": "true",
        "reg.lip": 0.001, "hydra/launcher": "submitit_local"}
    # A quoted list is a string, spelled as the list is.
    assert parse_overrides(["attack.epsilons.l2='[0.5,1.0]'"]) == {"attack.epsilons.l2": "[0.5,1.0]"}

    sweep = tmp_path / "sweep"
    write_multirun(sweep, ["+reg.extra=1,2", "~wandb.tags", "name='a,b',c", "attack.epsilons.l2=[0.5,1.0]"],
                   {"+reg.extra": "3", "seed": "0,1"})  # the command line replaces the file's +reg.extra
    assert sweep_text(read_sweep([sweep])) == [
        "+reg.extra=1,2", "~wandb.tags", "name='a,b',c", "attack.epsilons.l2=[0.5,1.0]", "seed=0,1"]

    # One reader, one precedence: the job's summary.json record over .hydra/overrides.yaml (which a
    # relaunch into the same folder rewrites), for tulip-report and the end-of-sweep table alike.
    write_run(sweep / "0", ["reg.lip=0.1", "+reg.extra=1", "seed=0"], {"test/error_pct": 2.0},
              hydra_overrides=["reg.lip=0.5", "+reg.extra=2", "seed=0"])
    assert read_run(sweep / "0").overrides == {"reg.lip": 0.1, "reg.extra": 1, "seed": 0}
    assert collect_jobs(sweep)[0]["overrides"] == ["reg.lip=0.1", "+reg.extra=1", "seed=0"]
    (sweep / "0" / "summary.json").write_text(json.dumps({"status": "finished"}))  # no record of its own
    assert read_run(sweep / "0").overrides == {"reg.lip": 0.5, "reg.extra": 2, "seed": 0}
    assert collect_jobs(sweep)[0]["overrides"] == ["reg.lip=0.5", "+reg.extra=2", "seed=0"]


def test_runs_csv_and_the_grouped_table(tmp_path):
    """runs.csv: one row per run; report.csv: mean, sample std and counts over the finished runs,
    as computed by hand."""
    error, distance = "test/error_pct", "attack/ddn/median_l2"
    runs = [("none", 0, "finished", {error: 3.0, distance: 1.0}),
            ("none", 1, "finished", {error: 3.5, distance: 1.2}),
            ("none", 2, "finished", {error: 4.6, distance: None}),  # non-finite: summary.json has null
            ("lip", 0, "finished", {error: 5.0, distance: 2.0}),
            ("lip", 1, "finished", {error: 5.5}),  # no attack ran
            ("lip", 2, "failed", {error: 99.0, distance: 9.0})]  # not in the means
    runs[0][3]["wandb/run_path"] = "me/tulip/abc12345"  # its W&B run, to open it in the UI
    for job, (method, seed, status, summary) in enumerate(runs):
        method_run(tmp_path / "sweep" / str(job), method, seed, {"status": status, **summary})
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "sweep"), "--out", str(out),
                        "--metric", error, "--metric", distance]) == 0

    rows = read_csv(out / "runs.csv")
    assert len(rows) == len(runs)
    assert list(rows[0])[:6] == ["run", "wandb_run", "status", "regularizer", "epochs", "seed"]
    for row, (method, seed, status, summary) in zip(rows, runs):
        assert (row["regularizer"], row["seed"], row["status"]) == (method, str(seed), status)
        assert row["wandb_run"] == summary.get("wandb/run_path", "")
        assert row["epochs"] == "3"
        assert float(row[error]) == summary[error]
        assert row[distance] == ("" if distance not in summary else "nan" if summary[distance] is None
                                 else repr(summary[distance]))

    none, lip = read_csv(out / "report.csv")
    assert (none["regularizer"], none["seeds"], lip["regularizer"], lip["seeds"]) == ("none", "3", "lip", "2")
    assert (lip["n_finished"], lip["n_failed"], lip["status"]) == ("2", "1", "2 finished, 1 failed")
    for row, values in ((none, [3.0, 3.5, 4.6]), (lip, [5.0, 5.5])):
        assert float(row[error]) == pytest.approx(np.mean(values), rel=1e-12)
        assert float(row[f"{error}_std"]) == pytest.approx(np.std(values, ddof=1), rel=1e-12)
    assert none[distance] == "nan" and none[f"{distance}_std"] == "nan"  # the null run counts, as NaN
    assert (lip[distance], lip[f"{distance}_std"], lip[f"{distance}_n"]) == ("2.0", "", "1")
    # An error rate with its 95 % t interval over the 2 seeds (5.25 ± 12.706·0.25), other metrics ± std.
    assert "| lip | 2 | 5.25 [2.07, 8.43] | 2 (n=1) | 2 finished, 1 failed |" in (out / "report.md").read_text()



def test_error_columns_carry_their_95_percent_interval(tmp_path):
    """report.csv and report.md: the t interval of the mean over 3 seeds (scipy's), the run's own Wilson
    interval (its ci95_* keys) for a single seed, nothing for an older single run without those keys;
    the ci95_* keys stay in runs.csv and are never columns of their own."""
    from scipy import stats as scipy_stats
    from tulip.report.tables import read_report_csv

    error, robust = "test/error_pct", "attack/best/error_pct_l2@1"
    seeds = [2.5, 3.0, 3.3]
    runs = [("none", seed, {error: value, robust: 40.0 + seed, f"ci95_low/{error}": 0.0, f"ci95_high/{error}": 99.0})
            for seed, value in enumerate(seeds)]  # the seeds' own intervals: not the interval of their mean
    runs += [("lip", 0, {error: 4.0, robust: 30.0, f"ci95_low/{error}": 3.1, f"ci95_high/{error}": 5.2,
                         f"ci95_low/{robust}": 25.0, f"ci95_high/{robust}": 35.5}),
             ("J2", 0, {error: 5.0, robust: 20.0})]  # from before the ci95 keys
    for job, (method, seed, summary) in enumerate(runs):
        method_run(tmp_path / "sweep" / str(job), method, seed, summary)
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "sweep"), "--out", str(out), "--metric", error, "--metric", robust]) == 0

    assert f"ci95_low/{error}" in read_csv(out / "runs.csv")[0]
    rows = {row["regularizer"]: row for row in read_csv(out / "report.csv")}
    assert not [column for column in rows["none"] if column.startswith("ci95")]
    low, high = scipy_stats.t.interval(0.95, len(seeds) - 1, loc=np.mean(seeds), scale=scipy_stats.sem(seeds))
    none, lip, j2 = rows["none"], rows["lip"], rows["J2"]
    assert (float(none[f"{error}_ci_low"]), float(none[f"{error}_ci_high"])) == pytest.approx((low, high), rel=1e-12)
    assert (lip[f"{error}_ci_low"], lip[f"{error}_ci_high"]) == ("3.1", "5.2")
    assert (lip[f"{robust}_ci_low"], lip[f"{robust}_ci_high"]) == ("25.0", "35.5")
    assert (j2[f"{error}_ci_low"], j2[f"{error}_ci_high"]) == ("", "")
    markdown = (out / "report.md").read_text()
    assert "95 % interval: t over seeds, or Wilson over images for one seed" in markdown
    assert f"| none | 3 | 2.93 [{low:.2f}, {high:.2f}] |" in markdown
    assert "| lip | 1 | 4.00 [3.10, 5.20] |" in markdown and "| J2 | 1 | 5.00 |" in markdown
    assert "| lip | 1 | 30.00 [25.00, 35.50] |" in markdown  # the robust-error table

    # Read back, the interval columns are the metrics' intervals, not metrics.
    table, keys, metrics = read_report_csv(out / "report.csv")
    assert (keys, metrics) == (["regularizer"], [error, robust])
    read_back = dict(zip(table["regularizer"], table[f"{error}_ci_high"]))
    assert read_back["none"] == pytest.approx(high, rel=1e-12) and read_back["lip"] == 5.2
    assert np.isnan(read_back["J2"])


SWEEP_FILE = ROOT / "sweeps" / "regularizers.yaml"
EPSILONS = (0.5, 1, 1.5, 2, 2.5, 3)


def figures_made(monkeypatch) -> list:
    """Keeps the figures tulip.report.plots draws (instead of closing them), to look inside them."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    return figures


def panels(figure) -> list[str]:
    return [ax.get_title() for ax in figure.axes]


def legend_of(figure) -> list[str]:
    (legend,) = figure.legends  # one legend for the whole figure
    return [text.get_text() for text in legend.get_texts()]


def line_styles(figure) -> dict:
    """{label: (colour, line style)} of the figure's curves: error-bar plots and plain lines."""
    styles = {}
    for ax in figure.axes:
        lines = [(c.get_label(), c.lines[0]) for c in ax.containers if hasattr(c, "has_yerr")]
        lines += [(line.get_label(), line) for line in ax.get_lines() if not line.get_label().startswith("_")]
        for label, line in lines:
            styles.setdefault(label, (line.get_color(), line.get_linestyle()))
    return styles


def test_figures_fit_a_paper(tmp_path, monkeypatch, capsys):
    """The 14 regularizers of sweeps/regularizers.yaml x 2 seeds, one attack (DDN) and a certificate at
    100 % everywhere; the job folders in alphabetical order, not the sweep's."""
    import matplotlib.text

    methods = yaml.safe_load(SWEEP_FILE.read_text())["hydra"]["sweeper"]["params"]["regularizer"].split(",")
    assert len(methods) == 14 and methods[0] == "none"
    sweep = tmp_path / "sweep"
    write_multirun(sweep, ["epochs=3"], {"regularizer": ",".join(methods), "seed": "0,1"})
    for job, (method, seed) in enumerate((m, s) for m in sorted(methods) for s in (0, 1)):
        strength = methods.index(method) / 14
        summary = {"test/error_pct": 3 + strength + seed / 10, "lipschitz/loss_grad_max": 8 - 4 * strength}
        for eps in EPSILONS:
            robust = min(100.0, 100 * eps / 3 * (1 - strength / 2) + seed)
            for attack in ("ddn", "best"):  # the best of one attack is that attack
                summary[f"attack/{attack}/error_pct_l2@{eps:g}"] = robust
            summary[f"cert/error_pct_l2@{eps:g}"] = 100.0
        epochs = [{"epoch": e, "test/error_pct": 10 / e + strength,
                   "lipschitz/loss_grad_max": 5 + e + strength} for e in (1, 2, 3)]
        method_run(sweep / str(job), method, seed, summary, epochs=epochs)
    figures = figures_made(monkeypatch)
    out = tmp_path / "out"
    assert report.main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # Left out, and said so: the best over attacks (only DDN ran) and the certificate (100 % everywhere).
    assert "no 'best of all attacks (L2)' panel: only ddn ran" in printed
    assert "no 'certified (L2)' panel: every configuration is at 100 % at every ε" in printed

    robust, scatter, training = figures
    assert panels(robust) == ["attack ddn (L2)"]
    assert panels(scatter) == ["attack ddn (L2), ε = 1.5"]  # the median ε of the curve
    assert panels(training) == ["Test error per epoch", "Lipschitz estimate per epoch"]
    for figure in figures:
        # The sweep's order, baseline first, option names without `regularizer=`.
        assert legend_of(figure) == methods
        assert figure.get_size_inches()[0] == pytest.approx(7.0)
        small = [(t.get_text(), t.get_fontsize()) for t in figure.findobj(matplotlib.text.Text)
                 if t.get_text() and t.get_visible() and t.get_fontsize() < 8]
        assert not small, small
    for figure in (robust, training):  # one (colour, line style) per method
        lines = line_styles(figure)
        assert sorted(lines) == sorted(methods) and len(set(lines.values())) == len(methods)
    # Error bars over the 2 seeds: the test error of each configuration differs by 0.1 between them.
    (points,) = [c for c in scatter.axes[0].containers if c.get_label() == "none"]
    assert points.has_xerr

    for name in ("robust_error", "clean_vs_robust", "training_curves"):
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")
        with Image.open(out / f"{name}.png") as image:
            width, dpi = image.size[0], image.info["dpi"][0]
        assert width == pytest.approx(7 * dpi, rel=0.1) and dpi == pytest.approx(DPI, rel=0.01)
        assert f"]({name}.png)" in (out / "report.md").read_text()

    # The same figures again from either table alone (all but the training curves, which need
    # metrics.jsonl), in the same order.
    for table in ("runs.csv", "report.csv"):
        figures.clear()
        assert report.main(["--from-csv", str(out / table), "--out", str(tmp_path / table)]) == 0
        assert [panels(f) for f in figures] == [panels(robust), panels(scatter)]
        assert all(legend_of(f) == methods for f in figures)
        assert (tmp_path / table / "clean_vs_robust.pdf").exists()
    assert report.main(["--from-csv", str(out / "report.csv"), "--out", str(tmp_path / "x"),
                        "--epsilon", "0.7"]) == 2
    assert "--epsilon 0.7" in capsys.readouterr().err


def test_console_script_is_declared():
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("tulip-report") == "tulip.report:main"
