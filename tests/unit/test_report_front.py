"""`tulip-report --front`: Pareto fronts of a multi-objective study, per family and across families.

The study is written by hand, in the files a job of hydra/sweeper=optuna leaves (summary.json with its
overrides, .hydra/{overrides,hydra,config}.yaml): two families (lip, J2) in multirun/study/<family>/,
trials with the sampler's long floats, the Pareto-optimal ones re-run with seed=1 and seed=2. The
numbers are chosen so that the fronts are known: a dominated point, a tie on one objective, two equal
points, a failed run, and a certified front that differs from the robust one.
"""
import csv
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest
import yaml
from PIL import Image

from support.fake_runs import write_multirun, write_run
from tulip import report
from tulip.report.pareto import find_metric, front_axes, non_dominated
from tulip.report.plots import DPI, WIDTH

CLEAN, ROBUST = "test/error_pct", "attack/best/error_pct_l2@1"
CERTIFIED = "cert/error_pct_l2@0.3"  # the smallest ε: the one --front uses
OBJECTIVES = [CLEAN, ROBUST]
# family -> {name: (the searched value, per seed: (clean, robust, certified at 0.3))}; seeds 0, 1, 2
STUDY = {
    "lip": {
        "A": (0.0011, [(1.0, 50, 90), (1.2, 52, 92), (1.1, 51, 88)]),  # front (3 seeds)
        "B": (0.044303752452182654, [(2.0, 30, 60), (2.2, 31, 61), (2.4, 35, 59)]),  # front (3 seeds)
        "C": (0.3, [(2.5, 40, 50)]),  # dominated by B; on the certified front
        "D": (0.9, [(3.0, 32, 70)]),  # B's robust error, more clean error: dominated by B
        "E": (1.5, [(4.0, 20, 65)]),  # front
        "F": (2.0, [(4.0, 20, 65)]),  # E's numbers exactly: neither dominates, both on the front
    },
    "J2": {
        "G": (0.01, [(1.0, 60, 95)]),  # front; the lowest clean error of all
        "H": (0.1, [(3.0, 25, 55), (3.0, 27, 56), (3.3, 29, 54)]),  # front (3 seeds)
        "I": (1.0, [(5.0, 30, 40)]),  # dominated by H; on the certified front
    },
}
FAMILY = {name: family for family, configs in STUDY.items() for name in configs}
ROBUST_FRONTS = {"J2": ["G", "H"], "lip": ["A", "B", "E", "F"], "all": ["G", "A", "B", "H", "E", "F"]}
CERTIFIED_FRONTS = {"J2": ["G", "H", "I"], "lip": ["A", "B", "C"], "all": ["G", "A", "B", "C", "I"]}


def key_of(family: str) -> str:
    return "reg.J2" if family == "J2" else "reg.lip"


def write_study(root, objectives=OBJECTIVES) -> dict:
    """multirun/study/<family>/<job>/ as the Optuna sweeper leaves it. Returns {name: [job folders]}."""
    folders = {}
    for family, configs in STUDY.items():
        sweep = root / family
        write_multirun(sweep, [], {key_of(family): "tag(log,interval(1e-3,3))"})
        (sweep / "pareto_front.yaml").write_text(yaml.safe_dump({"objectives": objectives, "front": []}))
        (sweep / "optuna.db").write_bytes(b"")
        job = 0
        trials = [(name, value, 0, numbers) for name, (value, seeds) in configs.items()
                  for numbers in seeds[:1]]
        reruns = [(name, value, seed, numbers) for name, (value, seeds) in configs.items()
                  for seed, numbers in enumerate(seeds) if seed]
        for name, value, seed, (clean, robust, certified) in trials + reruns:
            # the trial's own overrides; a re-run adds its seed (the trial ran with the config's 0)
            overrides = [f"{key_of(family)}={value!r}"] + ([f"seed={seed}"] if seed else [])
            reg = {"lip": 0.1, "J2": 0.01, key_of(family)[4:]: value}
            summary = {CLEAN: clean, ROBUST: robust, "attack/best/error_pct_l2@0.5": robust - 10,
                       CERTIFIED: certified, "cert/error_pct_l2@0.5": certified + 5}
            folder = write_run(sweep / str(job), overrides, summary, choices={"regularizer": family},
                               config={"seed": seed, "objectives": objectives, "reg": reg})
            folders.setdefault(name, []).append(str(folder))
            job += 1
    # A trial whose job failed: in no mean and on no front.
    failed = write_run(root / "lip" / "99", ["reg.lip=0.5"], {"status": "failed", CLEAN: 0.1, ROBUST: 0.1},
                       choices={"regularizer": "lip"}, config={"seed": 0, "objectives": objectives})
    folders["failed"] = [str(failed)]
    return folders


def expected(name: str, column: int) -> tuple[float, float]:
    """(mean, sample std) over a configuration's seeds, computed here; std NaN for one seed."""
    values = np.array([numbers[column] for numbers in STUDY[FAMILY[name]][name][1]], dtype=float)
    return values.mean(), values.std(ddof=1) if values.size > 1 else math.nan


def read_rows(path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def check_front_csv(path, fronts: dict, folders: dict | None):
    """The csv holds exactly the fronts, in order (families in table order, then `all`), with the
    configurations' means and stds over their seeds."""
    rows = read_rows(path)
    want = [(front, name) for front in ("J2", "lip", "all") for name in fronts[front]]
    assert len(rows) == len(want)
    assert list(rows[0])[:6] == ["front", "family", "reg.J2", "reg.lip", "seeds", CLEAN]
    for row, (front, name) in zip(rows, want):
        family = FAMILY[name]
        value, seeds = STUDY[family][name]
        assert (row["front"], row["family"], row["seeds"]) == (front, family, str(len(seeds)))
        assert float(row[key_of(family)]) == value  # full precision: the override can be re-run as is
        assert row["reg.lip" if family == "J2" else "reg.J2"] == ""  # the other family's key
        for column, metric in enumerate((CLEAN, ROBUST, CERTIFIED)):
            mean, std = expected(name, column)
            assert float(row[metric]) == pytest.approx(mean, rel=1e-12), (name, metric)
            if len(seeds) == 1:
                assert row[f"{metric}_std"] == ""
            else:
                assert float(row[f"{metric}_std"]) == pytest.approx(std, rel=1e-12), (name, metric)
        if folders is not None:
            assert row["runs"].split("; ") == folders[name]


def front_section(markdown: str) -> list[str]:
    """The table rows of report.md's Pareto section, first (robust) table."""
    section = markdown.split("## Pareto fronts")[1].split("### ")[1]
    return [line for line in section.splitlines() if line.startswith("| ") and "---" not in line][1:]


def test_non_dominated_keeps_ties_and_drops_dominated_points():
    points = [(1.0, 5.0), (2.0, 3.0), (2.0, 3.0), (3.0, 3.0), (2.5, 4.0), (4.0, 1.0), (1.0, 6.0)]
    # (2, 3) twice: equal points do not dominate each other; (3, 3): same y as (2, 3), larger x;
    # (2.5, 4): worse on both than (2, 3); (1, 6): same x as (1, 5), larger y.
    assert non_dominated(points) == [True, True, True, False, False, True, False]
    assert non_dominated([]) == [] and non_dominated([(7.0, 7.0)]) == [True]


def test_axes_from_objectives_or_the_option():
    metrics = [CLEAN, ROBUST, CERTIFIED]
    assert front_axes("", [OBJECTIVES + ["lipschitz/loss_grad_max"]] * 2, metrics) == (CLEAN, ROBUST)
    # `objectives` may spell ε as 1.0 where summary.json writes 1
    assert find_metric("attack/best/error_pct_l2@1.0", metrics) == ROBUST
    assert front_axes(f"{CLEAN},{CERTIFIED}", None, metrics) == (CLEAN, CERTIFIED)
    errors = {"": [[CLEAN]],  # one objective
              f"{CLEAN}": [OBJECTIVES],  # one key
              f"{CLEAN},test/eror_pct": [OBJECTIVES]}  # a key no run has
    for requested, objectives in errors.items():
        with pytest.raises(ValueError, match="--front X,Y"):
            front_axes(requested, objectives, metrics)
    with pytest.raises(ValueError, match="different objectives"):
        front_axes("", [OBJECTIVES, [ROBUST, CLEAN]], metrics)
    with pytest.raises(ValueError, match="csv does not record"):
        front_axes("", None, metrics)


def test_fronts_of_a_study(tmp_path, monkeypatch, capsys):
    folders = write_study(tmp_path / "study")
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figures, to look inside them
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "study"), "--out", str(out), "--front"]) == 0
    printed = capsys.readouterr().out
    assert "front: configurations on the front: J2 2 of 3, lip 4 of 6, all 6 of 9" in printed

    check_front_csv(out / "front.csv", ROBUST_FRONTS, folders)
    check_front_csv(out / "front_certified.csv", CERTIFIED_FRONTS, folders)

    # report.md: the same rows, means ± std as in the other tables, the swept values to 3 digits
    rows = front_section((out / "report.md").read_text())
    assert len(rows) == sum(map(len, ROBUST_FRONTS.values()))
    mean, std = expected("B", 0)
    assert rows[3].startswith(f"| lip | lip |  | 0.0443 | 3 | {mean:.4g} ± {std:.2g} |")
    assert rows[3].endswith(f"| {'; '.join(folders['B'])} |")
    assert rows[1].startswith(f"| J2 | J2 | 0.1 |  | 3 | {expected('H', 0)[0]:.4g} ± ")
    assert [row.split(" | ")[0][2:] for row in rows] == [f for f, names in ROBUST_FRONTS.items() for _ in names]
    markdown = (out / "report.md").read_text()
    assert "](front.png)" in markdown and "](front_certified.png)" in markdown

    for name in ("front", "front_certified"):
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF")
        with Image.open(out / f"{name}.png") as image:
            assert image.size[0] == round(WIDTH * DPI)
            assert np.asarray(image.convert("L")).std() > 10, f"{name} looks blank"
    # The robust figure: each family's front as points with the seeds' std as error bars.
    robust, certified = [f for f in figures if f.axes[0].get_title().startswith("Pareto front per regularizer")]
    assert "certified error" in certified.axes[0].get_ylabel() and "robust error" in robust.axes[0].get_ylabel()
    fronts = {c.get_label(): c for c in robust.axes[0].containers if hasattr(c, "has_yerr")}
    assert sorted(fronts) == ["J2", "lip"]
    x, y = fronts["lip"].lines[0].get_data()
    assert list(x) == pytest.approx([expected(n, 0)[0] for n in ROBUST_FRONTS["lip"]])
    assert list(y) == pytest.approx([expected(n, 1)[0] for n in ROBUST_FRONTS["lip"]])
    assert fronts["lip"].has_yerr and fronts["lip"].has_xerr  # A and B have 3 seeds


def test_fronts_from_csv(tmp_path, capsys):
    folders = write_study(tmp_path / "study")
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "study"), "--out", str(out)]) == 0
    assert not (out / "front.csv").exists()  # only with --front
    axes = f"{CLEAN},{ROBUST}"
    # runs.csv knows each run's folder; report.csv only the configurations
    assert report.main(["--from-csv", str(out / "runs.csv"), "--out", str(tmp_path / "runs"),
                        "--front", axes]) == 0
    check_front_csv(tmp_path / "runs" / "front.csv", ROBUST_FRONTS, folders)
    check_front_csv(tmp_path / "runs" / "front_certified.csv", CERTIFIED_FRONTS, folders)
    assert (tmp_path / "runs" / "front.png").exists()
    rows = front_section((tmp_path / "runs" / "front.md").read_text())
    assert len(rows) == sum(map(len, ROBUST_FRONTS.values()))
    assert report.main(["--from-csv", str(out / "report.csv"), "--out", str(tmp_path / "rep"),
                        "--front", axes]) == 0
    check_front_csv(tmp_path / "rep" / "front.csv", ROBUST_FRONTS, None)
    # a csv does not record the objectives: the axes must be named
    capsys.readouterr()
    assert report.main(["--from-csv", str(out / "report.csv"), "--out", str(tmp_path / "x"), "--front"]) == 2
    assert "--front X,Y" in capsys.readouterr().err


def test_missing_objectives_is_a_clear_error(tmp_path, capsys):
    write_study(tmp_path / "study", objectives=[CLEAN])  # a single-objective sweep
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "study"), "--out", str(out), "--front"]) == 2
    error = capsys.readouterr().err
    assert "fewer than 2 objectives" in error and "--front X,Y" in error
    assert not out.exists()  # nothing written
    # named axes need no objectives; a key no run has is named
    assert report.main([str(tmp_path / "study"), "--out", str(out), "--front", f"{CLEAN},{ROBUST}"]) == 0
    check_front_csv(out / "front.csv", ROBUST_FRONTS, None)
    assert report.main([str(tmp_path / "study"), "--out", str(out), "--front", f"{CLEAN},cert/typo@1"]) == 2
    assert "cert/typo@1" in capsys.readouterr().err
    # `--front FOLDER` would read the folder as the axes: refused, saying where --front goes
    with pytest.raises(SystemExit):
        report.main(["--front", str(tmp_path / "study")])
    assert "after the folders" in capsys.readouterr().err


def test_the_figure_frames_the_fronts_and_counts_what_it_leaves_out():
    from tulip.report.pareto import zoom
    fig, ax = plt.subplots()
    front = [np.array([3.0, 4.0]), np.array([20.0, 10.0])]
    candidates = [np.array([3.0, 4.0, 4.5, 85.0]), np.array([20.0, 10.0, 12.0, 90.0])]  # a diverged run
    zoom(ax, front, candidates, (True, True))
    (x_low, x_high), (y_low, y_high) = ax.get_xlim(), ax.get_ylim()
    assert x_low < 3.0 and 4.0 < x_high < 4.5 and y_low < 10.0 and 20.0 < y_high < 90
    assert [t.get_text() for t in ax.texts] == ["2 configurations beyond the axes"]
    ax.texts[0].remove()
    zoom(ax, [np.array([50.0, 99.0]), np.array([99.0, 50.0])], front, (True, True))
    assert ax.get_xlim()[1] <= 101 and ax.get_ylim()[1] <= 101  # a % axis ends near 100
    plt.close(fig)
