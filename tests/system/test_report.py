"""tulip-report on a real small multirun, the way a user runs it (`python -m tulip.report`): the table equals
the runs' summaries, the plots are images, problem runs are listed, bad input gives a clear message, and
every option the docs use exists.

The multirun is the session's (conftest.TINY_MULTIRUN: 3 Lipschitz multipliers x 2 seeds, 1 epoch on a
subset of mnist5k, with a minimisation attack; reg.lip=-1 fails its two jobs for real). Broken runs are
added next to a copy of it the way they appear in practice: a summary.json cut mid-write and a diverged
run. The report of job folders written by hand is tests/unit/test_report_tables.py.
"""
import csv
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import ROOT
from support.docs import PAGES, commands
from tulip import report
from tulip.report.plots import DPI, WIDTH


def run_report(*args) -> subprocess.CompletedProcess:
    """`python -m tulip.report ARGS`, the way a user runs it."""
    return subprocess.run([sys.executable, "-m", "tulip.report", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def job_overrides(job: Path) -> dict:
    return dict(o.split("=", 1) for o in yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text()))


def copy_without_checkpoints(source: Path, target: Path) -> Path:
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    return target


@pytest.fixture(scope="module")
def multirun(tiny_multirun, tmp_path_factory) -> Path:
    """A copy of the session's multirun with a truncated and a diverged run added."""
    assert tiny_multirun.command.returncode == 1, "the reg.lip=-1 jobs should fail the multirun command"
    assert "reg.lip" in tiny_multirun.command.stderr, tiny_multirun.command.stderr[-3000:]
    sweep_dir = tmp_path_factory.mktemp("multirun")
    shutil.copytree(tiny_multirun.folder, sweep_dir, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    jobs = sorted(p for p in sweep_dir.iterdir() if p.name.isdigit())
    assert len(jobs) == 6
    status = {j: json.loads((j / "summary.json").read_text())["status"] for j in jobs}
    finished = [j for j in jobs if status[j] == "finished"]
    assert sorted(job_overrides(j)["reg.lip"] for j in finished) == ["0", "0", "0.1", "0.1"]
    # the jobs that could not start say so in their own summary.json
    assert sorted(job_overrides(j)["reg.lip"] for j in jobs if status[j] == "failed") == ["-1", "-1"]

    # A copy of a finished run killed while writing summary.json (half a JSON document).
    broken = copy_without_checkpoints(finished[0], sweep_dir / "truncated")
    text = (broken / "summary.json").read_text()
    (broken / "summary.json").write_text(text[: len(text) // 2])
    # A copy of another that diverged; its (absurd) numbers must not enter the means.
    diverged = copy_without_checkpoints(finished[1], sweep_dir / "diverged")
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

    # report.md shows the same numbers, rounded: an error rate as its mean and 95 % interval over seeds
    markdown = (out / "report.md").read_text()
    for row in rows[1:]:
        mean, low, high = (float(row[f"test/error_pct{suffix}"]) for suffix in ("", "_ci_low", "_ci_high"))
        line = next(line for line in markdown.splitlines() if line.startswith(f"| lip | {row['reg.lip']} | 2 |"))
        assert f"| {mean:.2f} [{low:.2f}, {high:.2f}] |" in line


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
    broken = copy_without_checkpoints(multirun / "truncated", tmp_path / "broken")
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
    run = copy_without_checkpoints(source, tmp_path / "run")
    original = json.loads((run / "summary.json").read_text())
    curves = {k: v for k, v in original.items() if "error_pct" in k and "@" in k and not k.startswith("ci95_")}
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


def test_every_report_option_the_docs_use_exists():
    exe = shutil.which("tulip-report")
    command = [exe] if exe else [sys.executable, "-m", "tulip.report"]
    help_text = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True).stdout
    used = {word.split("=")[0] for page in PAGES for args in commands(page.read_text(), "tulip-report")
            for word in args if word.startswith("--")}
    used |= set(re.findall(r"`(--[a-z][\w-]*)", (ROOT / "docs" / "report.md").read_text()))
    assert {"--out", "--from-csv"} <= used
    missing = sorted(option for option in used if not re.search(rf"(^|\s){re.escape(option)}\b", help_text))
    assert not missing, missing


@pytest.mark.slow  # trains a real 2-configuration x 3-seed sweep
def test_a_real_two_by_three_sweep_gets_intervals_and_a_paired_comparison(tmp_path):
    """The statistics on real runs: every error column of report.csv has its 95 % interval (t over the 3
    seeds), and `--compare none lip` pairs the runs by seed and their attacked test digits by index."""
    from support.jobs import TINY_JOB, output_of, run_tulip

    sweep = tmp_path / "sweep"
    result = run_tulip(["-m", *TINY_JOB, "wandb.mode=disabled", "regularizer=none,lip", "seed=0,1,2",
                        "attack=ddn", "attack.n=60", "attack.methods.ddn.steps=10",
                        f"hydra.sweep.dir={sweep}"], tmp_path, 600)
    assert result.returncode == 0, output_of(result)
    out = tmp_path / "report"
    made = run_report(sweep, "--out", out, "--compare", "none", "lip")
    assert made.returncode == 0, made.stderr
    report_rows = read_csv(out / "report.csv")
    assert len(report_rows) == 2 and all(row["seeds"] == "3" for row in report_rows)
    errors = [key for key in report_rows[0] if "error_pct" in key and not key.endswith(("_std", "_ci_low", "_ci_high"))]
    assert "test/error_pct" in errors and "attack/best/error_pct_l2@1" in errors
    for row in report_rows:
        for key in errors:
            low, high = float(row[f"{key}_ci_low"]), float(row[f"{key}_ci_high"])
            assert low <= float(row[key]) <= high, (row["regularizer"], key)
    compared = read_csv(out / "compare.csv")
    assert {row["measure"] for row in compared} >= {"attack/clean_error_pct", "attack/best/error_pct_l2@1"}
    for row in compared:
        assert (row["images"], row["seed_pairs"]) == ("60", "3")
        assert float(row["effect_pct_ci_low"]) <= float(row["effect_pct"]) <= float(row["effect_pct_ci_high"])
        assert 0 <= float(row["p_mcnemar"]) <= float(row["p_holm"]) <= 1
    assert "B − A [95 % interval]" in made.stdout and "McNemar p" in made.stdout
