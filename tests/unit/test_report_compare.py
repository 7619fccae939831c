"""`tulip-report --compare A B` on job folders written by hand: per-image files of known content, three
configurations × three seeds (`lip` a fourth, unpaired). `none` and `lip` differ by a wide margin; `J2`
has exactly `none`'s per-image results. The printed and csv numbers must be what tulip.stats computes
from the boolean arrays built here by hand, and what cannot be paired must be refused by name."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest

from support.fake_runs import write_per_image, write_run
from tulip import report
from tulip.stats import holm, mcnemar_exact, paired_bootstrap, paired_ratio

IMAGES = 300
EPSILONS = (0.5, 1.0)
LABELS = np.random.default_rng(0).integers(0, 10, IMAGES)
# configuration -> (clean error rate, scale of the attacks' distances, seeds)
METHODS = {"none": (0.30, 0.6, (0, 1, 2)), "lip": (0.10, 1.5, (0, 1, 2, 3)), "J2": (0.30, 0.6, (0, 1, 2))}


def per_image(method: str, seed: int) -> dict:
    """One run's per-image results; J2's are none's, drawn from the same generator."""
    clean, scale, _ = METHODS[method]
    rng = np.random.default_rng([seed, 0 if method == "J2" else list(METHODS).index(method)])
    misclassified = rng.random(IMAGES) < clean
    # float32 values, as the evaluation writes them
    ddn = np.where(misclassified, 0.0, rng.exponential(scale, IMAGES)).astype(np.float32).astype(float)
    ddn[rng.random(IMAGES) < 0.02] = np.inf  # the attack failed
    best = (ddn * rng.uniform(0.7, 1.0, IMAGES)).astype(np.float32).astype(float)
    certified = (best * rng.uniform(0.1, 0.5, IMAGES)).astype(np.float32).astype(float)
    # at exactly ε, as a fixed-ε attack finds them: wrong at that ε (distance ≤ ε), and not certified
    on_eps = ~misclassified & (rng.random(IMAGES) < 0.1)
    ddn[on_eps], best[on_eps], certified[on_eps] = 1.0, 1.0, 0.5
    prediction = np.where(misclassified, (LABELS + 1) % 10, LABELS)
    return {"prediction": prediction, "ddn_l2": ddn, "best_l2": best, "certified_l2": np.minimum(certified, 9.0)}


def wrong_by_hand(results: dict, measure: str) -> np.ndarray:
    """Which images a run gets wrong under a measure, straight from the definitions."""
    if measure == "attack/clean_error_pct":
        return results["prediction"] != LABELS
    curve, eps = measure.split("@")
    column = {"attack/ddn/error_pct_l2": "ddn_l2", "attack/best/error_pct_l2": "best_l2",
              "cert/error_pct_l2": "certified_l2"}[curve]
    return results[column] <= float(eps)


MEASURES = (["attack/clean_error_pct"] + [f"attack/{a}/error_pct_l2@{e:g}" for a in ("ddn", "best") for e in EPSILONS]
            + [f"cert/error_pct_l2@{e:g}" for e in EPSILONS])


def write_job(folder: Path, method: str, seed: int, split: str | None = "test", overrides=(),
              figures: dict | None = None) -> Path:
    results = per_image(method, seed)
    summary = {m: 100.0 * wrong_by_hand(results, m).mean() for m in MEASURES} | (figures or {})
    summary["test/error_pct"] = summary["attack/clean_error_pct"]
    if split is not None:
        summary["attack/split"] = split
    write_run(folder, [f"regularizer={method}", f"seed={seed}", *overrides], summary,
              choices={"regularizer": method}, config={"seed": seed})
    # the L∞ columns of an L2 attack are there and infinite, as tulip.evaluate.final writes them: their
    # ε are in no summary key, so they are no measure
    inf = np.full(IMAGES, np.inf).tolist()
    return write_per_image(folder, LABELS.tolist(), results["prediction"].tolist(),
                           {"ddn_l2": results["ddn_l2"].tolist(), "ddn_linf": inf,
                            "best_l2": results["best_l2"].tolist(), "best_linf": inf},
                           certified=results["certified_l2"].tolist())


def write_sweep(root: Path) -> dict:
    """{(method, seed): job folder}"""
    jobs = [(method, seed) for method, (_, _, seeds) in METHODS.items() for seed in seeds]
    return {job: write_job(root / str(number), *job) for number, job in enumerate(jobs)}


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_comparison_is_what_tulip_stats_gives_on_the_arrays(tmp_path, capsys):
    write_sweep(tmp_path / "sweep")
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "sweep"), "--out", str(out), "--compare", "none", "lip",
                        "--compare", "regularizer=none", "regularizer=J2"]) == 0
    printed = capsys.readouterr().out
    rows = read_csv(out / "compare.csv")
    assert [(r["comparison"], r["measure"]) for r in rows] == [(n, m) for n in ("1", "2") for m in MEASURES]

    expected_p = []
    for row in rows:
        a, b = ("none", "lip") if row["comparison"] == "1" else ("none", "J2")
        seeds = (0, 1, 2)  # lip's seed 3 has no partner
        wrong_a = np.array([wrong_by_hand(per_image(a, s), row["measure"]) for s in seeds])
        wrong_b = np.array([wrong_by_hand(per_image(b, s), row["measure"]) for s in seeds])
        effect, low, high = paired_bootstrap(wrong_a, wrong_b)
        only_a, only_b, p_value = mcnemar_exact(wrong_a.ravel(), wrong_b.ravel())
        assert float(row["a_error_pct"]) == pytest.approx(100 * wrong_a.mean(), abs=1e-12)
        assert float(row["b_error_pct"]) == pytest.approx(100 * wrong_b.mean(), abs=1e-12)
        assert float(row["effect_pct"]) == pytest.approx(effect, abs=1e-12)
        interval = (float(row["effect_pct_ci_low"]), float(row["effect_pct_ci_high"]))
        assert interval == pytest.approx((low, high), abs=1e-12)
        assert float(row["effect_pct_ci_low"]) <= float(row["effect_pct"]) <= float(row["effect_pct_ci_high"])
        assert (int(row["only_a"]), int(row["only_b"])) == (only_a, only_b)
        assert float(row["p_mcnemar"]) == pytest.approx(p_value, rel=1e-12)
        assert (row["images"], row["seed_pairs"], row["seeds"]) == (str(IMAGES), "3", "0 1 2")
        expected_p.append(p_value)
    # Holm over every measure of both comparisons
    assert [float(r["p_holm"]) for r in rows] == pytest.approx(holm(expected_p), rel=1e-12)

    # none -> lip: a third of the errors: every measure significantly lower
    clear = [r for r in rows if r["comparison"] == "1"]
    assert all(r["verdict"] == "B lower" and float(r["effect_pct_ci_high"]) < 0 and float(r["p_holm"]) < 1e-6
               for r in clear), clear
    # none -> J2: the same results: no difference at all
    same = [r for r in rows if r["comparison"] == "2"]
    assert all(r["verdict"] == "no measurable difference" and float(r["effect_pct"]) == 0 and
               (r["effect_pct_ci_low"], r["effect_pct_ci_high"], r["p_mcnemar"]) == ("0.0", "0.0", "1.0") for r in same)

    # The readable table: the effect with its interval, the verdict, the pairs used and the seed left out.
    first = clear[0]
    effect = (f"{float(first['effect_pct']):+.2f} [{float(first['effect_pct_ci_low']):+.2f}, "
              f"{float(first['effect_pct_ci_high']):+.2f}]")
    line = next(line for line in printed.splitlines() if line.startswith("attack/clean_error_pct") and effect in line)
    assert line.endswith("B lower") and f" {IMAGES} " in line
    assert "Comparison 1: A = regularizer=none, B = regularizer=lip; 3 seed pairs (seed 0 1 2)" in printed
    assert "left out, finished in B only: seed 3" in printed
    markdown = (out / "report.md").read_text()
    assert "## Paired comparisons" in markdown and f"| {effect} |" in markdown
    assert "| no measurable difference |" in markdown


def test_whole_run_figures_are_compared_as_ratios_paired_by_seed(tmp_path):
    """A Lipschitz estimate of each run: B / A over the seed pairs (tulip.stats.paired_ratio), in the same
    Holm adjustment as the error rates."""
    estimates = {"none": [10.0, 12.0, 11.0], "lip": [3.0, 4.0, 3.3]}
    for number, (method, seed) in enumerate((m, s) for m in estimates for s in range(3)):
        write_job(tmp_path / "sweep" / str(number), method, seed,
                  figures={"lipschitz/loss_grad_max": estimates[method][seed]})
    out = tmp_path / "out"
    assert report.main([str(tmp_path / "sweep"), "--out", str(out), "--compare", "none", "lip"]) == 0
    [row] = read_csv(out / "compare_figures.csv")
    ratio, low, high, p_value = paired_ratio(estimates["none"], estimates["lip"])
    assert row["measure"] == "lipschitz/loss_grad_max" and row["seed_pairs"] == "3"
    assert [float(row[k]) for k in ("ratio", "ratio_ci_low", "ratio_ci_high", "p_paired_t")] == pytest.approx(
        [ratio, low, high, p_value], rel=1e-12)
    assert float(row["a_mean"]) == pytest.approx(float(np.exp(np.log(estimates["none"]).mean())))
    assert float(row["ratio_ci_high"]) < 1 and row["verdict"] == "B lower"
    error_rows = read_csv(out / "compare.csv")
    adjusted = holm([float(r["p_mcnemar"]) for r in error_rows] + [p_value])
    assert float(row["p_holm"]) == pytest.approx(adjusted[-1], rel=1e-12)
    assert "B / A [95 % interval]" in (out / "report.md").read_text()


def test_key_value_filters_choose_among_configurations(tmp_path, capsys):
    """Two lip configurations (reg.lip 0.1 and 1): `lip` alone is ambiguous and says which it matches;
    filters on override keys select one."""
    sweep = tmp_path / "sweep"
    for number, (method, seed, multiplier) in enumerate([("none", 0, None), ("lip", 0, 0.1), ("lip", 0, 1)]):
        write_job(sweep / str(number), method, seed, overrides=[f"reg.lip={multiplier}"] if multiplier else [])
    assert report.main([str(sweep), "--out", str(tmp_path / "a"), "--compare", "none", "lip"]) == 2
    error = capsys.readouterr().err
    assert "--compare lip: matches 2 configurations" in error and "reg.lip=0.1" in error and "reg.lip=1" in error
    assert not (tmp_path / "a").exists()  # refused before anything is written

    assert report.main([str(sweep), "--out", str(tmp_path / "b"), "--compare", "regularizer=none",
                        "regularizer=lip,reg.lip=0.1"]) == 0
    (row, *_) = read_csv(tmp_path / "b" / "compare.csv")
    assert (row["b"], row["b_configuration"], row["seed_pairs"]) == (
        "regularizer=lip,reg.lip=0.1", "regularizer=lip, reg.lip=0.1", "1")
    capsys.readouterr()


@pytest.mark.parametrize("selection", ["nosuch", "regularizer=nosuch", "reg.lip=0.5"])
def test_a_selection_matching_nothing_is_named_with_what_exists(tmp_path, capsys, selection):
    write_sweep(tmp_path / "sweep")
    assert report.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out"), "--compare", "none",
                        selection]) == 2
    error = capsys.readouterr().err
    assert f"--compare {selection}: no run matches it" in error
    assert "the configurations are: regularizer=none; regularizer=J2; regularizer=lip" in error  # table order


def damaged_sweep(root: Path) -> dict:
    jobs = {}
    for number, (method, seed) in enumerate([("none", 0), ("none", 1), ("lip", 0), ("lip", 1)]):
        jobs[method, seed] = write_job(root / str(number), method, seed)
    return jobs


def run_compare(tmp_path, capsys) -> str:
    assert report.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out"), "--compare", "none", "lip"]) == 2
    assert not (tmp_path / "out" / "compare.csv").exists()
    return capsys.readouterr().err


def test_different_images_are_refused(tmp_path, capsys):
    """A label that differs for one index: the two files are not of the same images."""
    jobs = damaged_sweep(tmp_path / "sweep")
    path = jobs["lip", 1] / "attacks.csv"
    lines = path.read_text().splitlines()
    index, label, rest = lines[5].split(",", 2)
    lines[5] = ",".join([index, str((int(label) + 1) % 10), rest])
    path.write_text("\n".join(lines) + "\n")
    error = run_compare(tmp_path, capsys)
    assert f"{jobs['none', 0] / 'attacks.csv'} and {path}: image {index} has label" in error
    assert "not the same images" in error


def test_runs_evaluated_on_different_splits_are_not_paired(tmp_path, capsys):
    jobs = damaged_sweep(tmp_path / "sweep")
    summary_file = jobs["lip", 1] / "summary.json"
    summary = json.loads(summary_file.read_text())
    summary_file.write_text(json.dumps({**summary, "attack/split": "val"}))
    error = run_compare(tmp_path, capsys)
    assert f"{jobs['none', 1]} (attack/split=test) and {jobs['lip', 1]} (attack/split=val)" in error


def test_a_missing_split_means_the_test_set(tmp_path, capsys):
    jobs = damaged_sweep(tmp_path / "sweep")
    summary_file = jobs["lip", 1] / "summary.json"
    summary = json.loads(summary_file.read_text())
    del summary["attack/split"]  # a run from before the key
    summary_file.write_text(json.dumps(summary))
    assert report.main([str(tmp_path / "sweep"), "--out", str(tmp_path / "out"), "--compare", "none", "lip"]) == 0
    assert read_csv(tmp_path / "out" / "compare.csv")[0]["seed_pairs"] == "2"
    capsys.readouterr()


@pytest.mark.parametrize("missing", ["attacks.csv", "bounds.csv"])
def test_a_missing_per_image_file_names_the_run_and_the_file(tmp_path, capsys, missing):
    jobs = damaged_sweep(tmp_path / "sweep")
    (jobs["none", 1] / missing).unlink()
    error = run_compare(tmp_path, capsys)
    assert f"{jobs['none', 1]}: no {missing}" in error


@pytest.mark.parametrize("effect, low, high, p_holm, expected", [
    (1.0, 0.5, 1.5, 0.01, "B higher"),
    (-1.0, -1.5, -0.5, 0.01, "B lower"),
    (1.0, 0.0, 2.0, 0.001, "no measurable difference"),  # the interval reaches 0
    (1.0, 0.5, 1.5, 0.05, "no measurable difference"),  # significant before Holm, not after
])
def test_a_difference_needs_both_the_interval_and_the_adjusted_p(effect, low, high, p_holm, expected):
    from tulip.report.compare import Row, verdict

    row = Row(1, "a", "b", "a", "b", "attack/clean_error_pct", 10.0, 10.0 + effect, effect, low, high, 5, 9,
              p_holm / 4, p_holm, 100, 3, "0 1 2")
    assert verdict(row) == expected
