"""tulip-report on a real small multirun: the table equals the runs' summaries, the plots are images,
problem runs are listed, bad input gives a clear message.

The multirun (2 Lipschitz multipliers x 2 seeds, 1 epoch on a subset of mnist5k, with a minimisation
attack) is built once per module by the real `python run.py -m`; broken runs are added next to it the
way they appear in practice: a summary.json cut mid-write and a diverged run.

The fast tests at the end write job folders by hand (the files a job leaves, with chosen numbers): the
sweep line of several inputs, Hydra's override syntax, runs.csv against a hand computation, and the
figures' size, fonts, order and styles.
"""
import csv
import json
import math
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tulip import report
from tulip.report.plots import DPI, WIDTH

REPO = Path(__file__).resolve().parents[2]
# reg.lip=-1 is rejected by the config check: those two jobs fail for real, before writing a summary.
SWEEP = ["regularizer=lip", "reg.lip=0,0.1,-1", "seed=0,1", "epochs=1", "wandb.mode=disabled",
         "dataset.train_subset=512", "dataset.test_subset=100", "attack=ddn", "attack.n=30",
         "attack.methods.ddn.steps=10"]
# One BLAS/OpenMP thread: on the shared 2-core machine two threads per process make torch's SVD and
# convolutions many times slower under load (measured: a 1-epoch job 16 s -> 1 s).
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_report(*args) -> subprocess.CompletedProcess:
    """`python -m tulip.report ARGS`, the way a user runs it."""
    return subprocess.run([sys.executable, "-m", "tulip.report", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def job_overrides(job: Path) -> dict:
    return dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))


def copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    return target


@pytest.fixture(scope="module")
def multirun(tmp_path_factory) -> Path:
    sweep_dir = tmp_path_factory.mktemp("multirun")
    built = subprocess.run([sys.executable, "run.py", "-m", *SWEEP, f"hydra.sweep.dir={sweep_dir}"],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert built.returncode == 1, "the reg.lip=-1 jobs should fail the multirun command"
    assert "reg.lip" in built.stderr, built.stderr[-3000:]
    jobs = sorted(p for p in sweep_dir.iterdir() if p.name.isdigit())
    assert len(jobs) == 6
    status = {j: json.loads((j / "summary.json").read_text())["status"] for j in jobs}
    finished = [j for j in jobs if status[j] == "finished"]
    assert sorted(job_overrides(j)["reg.lip"] for j in finished) == ["0", "0", "0.1", "0.1"]
    # the jobs that could not start say so in their own summary.json
    assert sorted(job_overrides(j)["reg.lip"] for j in jobs if status[j] == "failed") == ["-1", "-1"]

    # A copy of a finished run killed while writing summary.json (half a JSON document).
    broken = copy_run(finished[0], sweep_dir / "truncated")
    text = (broken / "summary.json").read_text()
    (broken / "summary.json").write_text(text[: len(text) // 2])
    # A copy of another that diverged; its (absurd) numbers must not enter the means.
    diverged = copy_run(finished[1], sweep_dir / "diverged")
    summary = json.loads((diverged / "summary.json").read_text())
    summary.update({"status": "diverged", "test/error_pct": 1e6, "lipschitz/loss_grad_max": 1e6})
    (diverged / "summary.json").write_text(json.dumps(summary))
    return sweep_dir


@pytest.fixture(scope="module")
def made(multirun, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = run_report(multirun, "--out", out)
    return result, out


def finished_summaries(multirun: Path) -> dict:
    """reg.lip value -> summaries of its finished runs, read independently of tulip.report."""
    groups = {}
    for summary_file in multirun.glob("*/summary.json"):
        try:
            summary = json.loads(summary_file.read_text())
        except json.JSONDecodeError:
            continue
        if summary["status"] == "finished":
            groups.setdefault(float(job_overrides(summary_file.parent)["reg.lip"]), []).append(summary)
    return groups


def assert_matches(cell: str, expected: float, key: str):
    if math.isnan(expected):
        assert cell == "nan", key
    else:
        assert float(cell) == pytest.approx(expected, rel=1e-9, abs=1e-12), key


@pytest.mark.slow  # the fixture trains a real sweep
def test_table_equals_the_runs_summaries(multirun, made):
    result, out = made
    assert result.returncode == 0, result.stderr
    rows = read_csv(out / "report.csv")
    groups = finished_summaries(multirun)
    assert [float(row["reg.lip"]) for row in rows] == [-1.0, 0.0, 0.1]
    assert [row["seeds"] for row in rows] == ["0", "2", "2"]
    assert all(row["regularizer"] == "lip" for row in rows)

    header = rows[0].keys()
    for key in ("test/error_pct", "lipschitz/loss_grad_max", "lipschitz/jacobian_2inf",
                "weights/product_2inf", "weights/product_spectral", "weights/layer_norm_product",
                "attack/ddn/median_l2", "attack/ddn/error_pct_l2@0.5", "cert/error_pct_l2@0.5"):
        assert key in header and f"{key}_std" in header, key

    metrics = [k for k in header if f"{k}_std" in header]
    for row in rows[1:]:
        summaries = groups[float(row["reg.lip"])]
        for key in metrics:
            # summary.json stores a non-finite value as null: it must show as nan, not vanish.
            values = np.array([math.nan if s[key] is None else s[key] for s in summaries if key in s],
                              dtype=float)
            assert values.size == 2, key
            assert_matches(row[key], values.mean(), key)
            assert_matches(row[f"{key}_std"], values.std(ddof=1), key)
    assert all(rows[0][key] == "" for key in metrics)  # reg.lip=-1: no finished run, no numbers

    # report.md shows the same numbers, rounded, as mean ± std.
    markdown = (out / "report.md").read_text()
    for row in rows[1:]:
        mean, std = float(row["test/error_pct"]), float(row["test/error_pct_std"])
        assert f"| lip | {row['reg.lip']} | 2 | {mean:.4g} ± {std:.2g} |" in markdown


@pytest.mark.slow  # the fixture trains a real sweep
def test_failed_and_broken_runs_are_listed_not_dropped(multirun, made):
    result, out = made
    failed = [job for job in multirun.iterdir() if job.name.isdigit()
              and json.loads((job / "summary.json").read_text())["status"] == "failed"]
    assert len(failed) == 2
    assert str(multirun / "truncated") in result.stderr  # unreadable: named on stderr too

    markdown = (out / "report.md").read_text()
    problems = markdown.split("## Failed, diverged and unreadable runs")[1].split("## Plots")[0]
    for job in failed:
        seed = job_overrides(job)["seed"]
        assert f"| `{job}` | failed | {seed} | regularizer=lip, reg.lip=-1 | epoch=0, error=" in problems
        assert "reg.lip" in problems.split(f"`{job}`")[1].splitlines()[0]  # the error names the key
    assert f"`{multirun / 'truncated'}` | unreadable" in problems and "not valid JSON" in problems
    assert f"`{multirun / 'diverged'}` | diverged" in problems
    assert problems.count("| `") == 4  # exactly the four problem runs, not the finished ones

    rows = {float(row["reg.lip"]): row for row in read_csv(out / "report.csv")}
    lip_of = {name: float(job_overrides(multirun / name)["reg.lip"]) for name in ("truncated", "diverged")}
    assert rows[-1.0]["n_failed"] == "2" and rows[-1.0]["status"] == "2 failed"
    assert rows[lip_of["truncated"]]["n_unreadable"] == "1"
    assert rows[lip_of["diverged"]]["n_diverged"] == "1"
    assert sum(int(row["n_finished"]) for row in rows.values()) == 4


@pytest.mark.slow  # the fixture trains a real sweep
def test_plots_are_images_of_the_expected_size(made):
    _, out = made
    header = read_csv(out / "report.csv")[0].keys()
    # The table keeps every curve (ddn, the best over attacks, the certificate); the figure leaves out
    # the best over attacks, which repeats ddn's panel when ddn is the only attack.
    curves = {k.split("@")[0] for k in header if "error_pct" in k and "@" in k}
    assert curves == {"attack/ddn/error_pct_l2", "attack/best/error_pct_l2", "cert/error_pct_l2"}
    markdown = (out / "report.md").read_text()
    for name in ("multiplier_reg.lip", "training_curves", "robust_error", "clean_vs_robust"):
        assert (out / f"{name}.pdf").read_bytes().startswith(b"%PDF"), name
        with Image.open(out / f"{name}.png") as image:
            image.verify()  # a complete, decodable PNG
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG"
            pixels = np.asarray(image.convert("L"))
        assert pixels.shape[1] == round(WIDTH * DPI), name
        assert pixels.std() > 10, f"{name} looks blank"
        assert f"]({name}.png)" in markdown


def test_no_runs_is_an_error_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_report(empty)
    assert result.returncode == 1
    assert str(empty) in result.stderr and "no run" in result.stderr
    assert not (empty / "report.md").exists()


@pytest.mark.slow  # the fixture trains a real sweep
def test_only_unreadable_runs_is_an_error(multirun, tmp_path):
    broken = copy_run(multirun / "truncated", tmp_path / "broken")
    result = run_report(broken)
    assert result.returncode == 1
    assert str(broken) in result.stderr and "not valid JSON" in result.stderr
    assert not (broken / "report.md").exists()


@pytest.mark.slow  # the fixture trains a real sweep
def test_by_and_metric_options_on_run_folders(multirun, tmp_path, capsys):
    # Two run folders instead of the multirun; grouped by reg.lip; one replacing and one extra column.
    groups = {}
    for job in sorted(multirun.glob("[0-9]*/summary.json")):
        if json.loads(job.read_text())["status"] == "finished":
            groups.setdefault(job_overrides(job.parent)["reg.lip"], job.parent)
    jobs = list(groups.values())
    assert len(jobs) == 2
    assert report.main([*map(str, jobs), "--out", str(tmp_path), "--by", "reg.lip",
                        "--metric", "test/error_pct", "--metric", "+train/loss"]) == 0
    rows = read_csv(tmp_path / "report.csv")
    header = list(rows[0].keys())
    assert header[0] == "reg.lip"
    assert [k for k in header if f"{k}_std" in header] == ["test/error_pct", "train/loss"]
    summaries = {float(lip): json.loads((job / "summary.json").read_text()) for lip, job in groups.items()}
    for row in rows:  # one run per configuration: the value itself, no std
        summary = summaries[float(row["reg.lip"])]
        assert float(row["train/loss"]) == pytest.approx(summary["train/loss"], rel=1e-12)
        assert row["seeds"] == "1" and row["test/error_pct_std"] == ""
    assert "2/2 runs read, 2 configurations" in capsys.readouterr().out
    assert (tmp_path / "robust_error.png").exists()  # the plots do not depend on the table's columns

    # A grouping key no run has, and a column no run has: named, not silently empty.
    assert report.main([str(multirun), "--out", str(tmp_path / "typo"), "--by", "regulariser"]) == 2
    assert "--by regulariser" in capsys.readouterr().err
    assert report.main([*map(str, jobs), "--out", str(tmp_path / "x"), "--metric", "+test/eror_pct"]) == 0
    assert "--metric test/eror_pct" in capsys.readouterr().err


def write_columns(path: Path, columns: dict[str, list]):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values()))


@pytest.mark.slow  # the fixture trains a real sweep
def test_robust_error_from_attacks_csv(multirun, tmp_path):
    """A summary without the curve keys: the curves are recomputed from the per-image distances, the
    attacks' from attacks.csv and the certificate's from bounds.csv (older runs: from attacks.csv)."""
    source = next(p for p in multirun.glob("[0-9]*/summary.json")
                  if json.loads(p.read_text())["status"] == "finished").parent
    run = copy_run(source, tmp_path / "run")
    original = json.loads((run / "summary.json").read_text())
    curves = {k: v for k, v in original.items() if "error_pct" in k and "@" in k}
    stripped = {k: v for k, v in original.items() if k not in curves}
    (run / "summary.json").write_text(json.dumps(stripped))
    assert {"attack/ddn/error_pct_l2@1", "cert/error_pct_l2@1"} <= curves.keys()
    attacks, bounds = read_csv(run / "attacks.csv"), read_csv(run / "bounds.csv")
    assert "certified_l2" in bounds[0] and "certified_l2" not in attacks[0]

    def check(out: Path):
        assert report.main([str(run), "--out", str(out)]) == 0
        row = read_csv(out / "report.csv")[0]
        for key, value in curves.items():
            assert float(row[key]) == pytest.approx(value, abs=1e-9), key
        # the image columns and the first/second-order estimates are not attacks
        assert not [k for k in row if k.startswith(("attack/index", "attack/label", "attack/prediction",
                                                    "attack/first_order", "attack/second_order"))]
        assert (out / "robust_error.png").exists()

    check(tmp_path / "out")
    # An older run: one attacks.csv held the bounds' columns too, and there was no bounds.csv.
    merged = {k: [row[k] for row in attacks] for k in attacks[0]}
    merged.update({k: [row[k] for row in bounds] for k in bounds[0]})
    write_columns(run / "attacks.csv", merged)
    (run / "bounds.csv").unlink()
    check(tmp_path / "old")
    # Without the certified radii there is no certified curve to rebuild.
    del merged["certified_l2"]
    write_columns(run / "attacks.csv", merged)
    assert report.main([str(run), "--out", str(tmp_path / "none")]) == 0
    header = read_csv(tmp_path / "none" / "report.csv")[0]
    assert not [k for k in header if k.startswith("cert/error_pct")]


# --- fake run folders: the files a job leaves, with chosen numbers and no training ---------------------


def write_run(folder: Path, overrides: list[str], summary: dict, choices: dict | None = None,
              config: dict | None = None, epochs: list[dict] | None = None,
              hydra_overrides: list[str] | None = None) -> Path:
    """A job folder as Hydra and tulip.train.loop leave it: .hydra/{overrides,hydra,config}.yaml, summary.json
    with its own record of the overrides, metrics.jsonl."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(hydra_overrides or overrides))
    hydra = {"hydra": {"runtime": {"choices": choices or {}}}}
    (folder / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
    (folder / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config or {}))
    summary = {"status": "finished", "overrides": overrides, **summary}
    (folder / "summary.json").write_text(json.dumps(summary))
    if epochs:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(record) + "\n" for record in epochs))
    return folder


def write_multirun(root: Path, task: list[str], params: dict):
    """multirun.yaml: the command line's task overrides and the sweep config's sweeper params."""
    root.mkdir(parents=True, exist_ok=True)
    hydra = {"overrides": {"task": task}, "sweeper": {"params": params}}
    (root / "multirun.yaml").write_text(yaml.safe_dump({"hydra": hydra}))


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
    assert "| lip | 2 | 5.25 ± 0.35 | 2 (n=1) | 2 finished, 1 failed |" in (out / "report.md").read_text()


SWEEP_FILE = REPO / "sweeps" / "regularizers.yaml"
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
