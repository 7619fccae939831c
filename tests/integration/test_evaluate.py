"""Evaluation end to end: the session's tiny training run with attacks + nn (conftest.TRAINED_RUN), then
evaluate and summary modes on it (on copies: the shared run is read-only)."""
import csv
import json
import math
import shutil

import pytest
import torch

from conftest import TRAINED_RUN_L2_EPS, TRAINED_RUN_LINF_EPS, compose_config, copy_run
from tulip.config import ConfigError
from tulip.evaluate.final import build_evaluation
from tulip.main import run
from tulip.build import load_run
from tulip.runs.folder import RunFolder, RunFolderError

L2_EPS, LINF_EPS = TRAINED_RUN_L2_EPS, TRAINED_RUN_LINF_EPS


def read_csv(path) -> list[dict]:
    with open(path) as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def read_per_image(run_dir) -> list[dict]:
    """attacks.csv and bounds.csv side by side: one dict per evaluated image."""
    attacks, bounds = read_csv(run_dir / "attacks.csv"), read_csv(run_dir / "bounds.csv")
    assert [row["index"] for row in attacks] == [row["index"] for row in bounds]
    return [{**a, **b} for a, b in zip(attacks, bounds)]


@pytest.fixture
def trained(trained_run):
    """(folder, metrics) of one epoch of cnn_small on 512 mnist5k images, then ddn, pgd_l2, fgsm on 40 test
    images and nn: the session's run, read-only."""
    return trained_run.folder, trained_run.metrics


@pytest.fixture
def trained_copy(trained_run, tmp_path):
    """(folder, metrics) of a copy of the session's run, for a test that writes into it."""
    return copy_run(trained_run.folder, tmp_path / "run"), trained_run.metrics


def test_training_run_reports_every_key(trained):
    run_dir, metrics = trained
    expected = ["attack/n", "attack/clean_error_pct", "bounds/first_order_median", "bounds/certified_median",
                "cert/median_l2"]
    for name, norm, epsilons in (("ddn", "l2", L2_EPS), ("pgd_l2", "l2", L2_EPS), ("fgsm", "linf", LINF_EPS),
                                 ("best", "l2", L2_EPS), ("best", "linf", LINF_EPS)):
        expected += [f"attack/{name}/median_{norm}", f"attack/{name}/mean_{norm}", f"attack/{name}/failures"]
        expected += [f"attack/{name}/error_pct_{norm}@{eps:g}" for eps in epsilons]
    expected += [f"cert/error_pct_l2@{eps:g}" for eps in L2_EPS]
    expected += [f"nn/{norm}_{stat}" for norm in ("l2", "linf")
                 for stat in ("mean", "median", "data_lipschitz")]
    missing = [key for key in expected if key not in metrics]
    assert not missing, missing
    assert "bounds/second_order_median" not in metrics  # cnn_small has ReLUs: skipped
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished"
    assert not [key for key in expected if key not in summary]
    assert metrics["attack/n"] == 40
    assert metrics["attack/ddn/failures"] < 20 and metrics["attack/ddn/median_l2"] > 0


def test_attacks_csv_has_zero_for_misclassified_and_inf_for_failures(trained):
    run_dir, metrics = trained
    rows = read_per_image(run_dir)
    assert len(rows) == 40 and [row["index"] for row in rows] == list(range(40))
    columns = [f"{name}_{norm}" for name in ("ddn", "pgd_l2", "fgsm", "best") for norm in ("l2", "linf")]
    assert set(columns + ["label", "prediction", "first_order_l2", "certified_l2"]) <= set(rows[0])
    wrong = [row for row in rows if row["label"] != row["prediction"]]
    assert 100 * len(wrong) / 40 == pytest.approx(metrics["attack/clean_error_pct"])
    for row in wrong:
        assert all(row[c] == 0 for c in columns) and row["certified_l2"] == 0
    for row in rows:
        if row["label"] == row["prediction"]:
            assert all(row[c] > 0 for c in columns)  # never 0 for a correctly classified image
    fgsm_failed = [row for row in rows if math.isinf(row["fgsm_linf"])]
    assert len(fgsm_failed) == metrics["attack/fgsm/failures"] > 0
    assert all(math.isinf(row["fgsm_l2"]) for row in fgsm_failed)
    # The metrics are those of the per-image columns.
    ddn = torch.tensor([row["ddn_l2"] for row in rows])
    for eps in L2_EPS:
        expected = 100 * (ddn <= eps).double().mean().item()
        assert metrics[f"attack/ddn/error_pct_l2@{eps:g}"] == pytest.approx(expected)
    best = torch.tensor([row["best_l2"] for row in rows])
    assert (best <= ddn).all() and metrics["attack/best/median_l2"] == pytest.approx(best.median().item())


def test_no_attack_beats_the_certified_radius(trained):
    """Soundness on a trained small model: every adversarial found is at least the certified radius away."""
    rows = read_per_image(trained[0])
    assert sum(row["certified_l2"] > 0 for row in rows) >= 20
    for row in rows:
        for name in ("ddn", "pgd_l2", "fgsm", "best"):
            assert row[f"{name}_l2"] >= row["certified_l2"], (name, row)


def test_certificate_metrics_match_the_per_image_columns(trained):
    """Tightness = median over correctly classified images of best L2 attack / certified radius; the
    pairwise radius is never below the global one; K is above the largest ratio found."""
    run_dir, metrics = trained
    rows = [row for row in read_per_image(run_dir) if row["label"] == row["prediction"]]
    ratios = torch.tensor([row["best_l2"] / row["certified_l2"] for row in rows])
    assert metrics["cert/tightness"] == pytest.approx(ratios.median().item(), rel=1e-5)
    assert metrics["cert/tightness"] >= 1 and metrics["cert/pairwise"] == 1
    assert all(row["certified_l2"] >= row["certified_global_l2"] * (1 - 1e-6) for row in rows)
    assert metrics["cert/median_l2"] > metrics["bounds/certified_median"]
    assert metrics["cert/lipschitz_upper"] >= metrics["lipschitz/empirical_max"] > 0
    assert metrics["lipschitz/upper_over_lower"] == pytest.approx(
        metrics["cert/lipschitz_upper"] / metrics["lipschitz/empirical_max"])
    assert metrics["cert/lipschitz_feature_upper"] < metrics["cert/lipschitz_upper"]
    assert metrics["cert/lipschitz_upper"] == pytest.approx(metrics["cert/lipschitz_estimate"], rel=0.1)


def test_nn_csv(trained):
    run_dir, metrics = trained
    rows = read_csv(run_dir / "nn.csv")
    assert len(rows) == 200  # every test image of the tiny config
    l2 = torch.tensor([row["l2"] for row in rows])
    assert (l2 > 0).all() and metrics["nn/l2_median"] == pytest.approx(l2.median().item())
    assert metrics["nn/l2_data_lipschitz"] == pytest.approx(1 / l2.min().item())
    assert all(row["linf"] <= row["l2"] for row in rows)


def test_evaluate_mode_adds_attacks_to_an_existing_run(trained_copy):
    run_dir, _ = trained_copy
    before = json.loads((run_dir / "summary.json").read_text())
    metrics = run(compose_config("mode=evaluate", f"run_dir={run_dir}", "attack=deepfool_l2", "attack.n=20",
                                 "attack.methods.deepfool_l2.steps=50"))
    assert metrics["attack/deepfool_l2/failures"] == 0 and metrics["attack/n"] == 20
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["attack/deepfool_l2/median_l2"] == pytest.approx(metrics["attack/deepfool_l2/median_l2"])
    assert after["status"] == "finished" and after["test/error_pct"] == before["test/error_pct"]
    assert "attack/ddn/median_l2" in before and "attack/ddn/median_l2" not in after  # replaced, not stale
    assert after["nn/l2_median"] == before["nn/l2_median"]  # eval.nn=false: nn results kept
    rows = read_per_image(run_dir)
    assert len(rows) == 20 and "deepfool_l2_l2" in rows[0] and "certified_l2" in rows[0]
    assert after["cert/median_l2"] == pytest.approx(torch.tensor([r["certified_l2"] for r in rows]).median().item())


def test_evaluating_a_run_without_summary_refuses_and_says_how_to_finish_it(trained, tmp_path):
    """A run killed before its summary (say, during its final evaluation): mode=evaluate would merge its
    keys into a summary with no status and no best epoch, so it refuses, naming the command that
    finishes the run (tests/integration/test_train_loop.py follows that advice)."""
    shutil.copytree(trained[0] / "checkpoints", tmp_path / "checkpoints")
    with pytest.raises(RunFolderError, match="has no summary.json") as refused:
        run(compose_config("mode=evaluate", f"run_dir={tmp_path}", "attack=none", "attack.n=10"))
    assert f"hydra.run.dir={tmp_path}" in str(refused.value) and "resumes" in str(refused.value)
    assert not (tmp_path / "summary.json").exists()


def test_summary_mode_recomputes_the_original_statistics(trained_copy, capsys):
    run_dir, _ = trained_copy
    metrics = run(compose_config("mode=summary", f"run_dir={run_dir}"))
    loaded = load_run(run_dir, torch.device("cpu"))
    with torch.no_grad():
        probabilities = loaded.model(loaded.data.test_x).softmax(1)
    error = 100 * (probabilities.argmax(1) != loaded.data.test_y).double().mean().item()
    assert metrics["summary/test/error_pct"] == pytest.approx(error)
    top2 = probabilities.topk(2, dim=1).values
    correct = probabilities.argmax(1) == loaded.data.test_y
    confidence = (top2[:, 0] - top2[:, 1])[correct].min().item()
    assert metrics["summary/min_correct_confidence"] == pytest.approx(confidence, rel=1e-5)
    assert metrics["summary/adv_distance_lower_bound"] == pytest.approx(
        confidence / (2 * metrics["summary/weights/product_2inf"]), rel=1e-5)
    for key in ("lipschitz/loss_grad_max", "lipschitz/jacobian_2inf", "weights/product_spectral",
                "weights/layer_norm_product", "weights/l2_norm", "test/loss"):
        assert metrics[f"summary/{key}"] > 0, key
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["summary/test/error_pct"] == pytest.approx(error)
    assert "summary/weights/l2_norm" in capsys.readouterr().out  # the printed table


def test_bounds_have_their_own_switch(tmp_path):
    """Without any attack the bounds still run (eval.bounds defaults to on), on the first attack.n images."""
    metrics = run(compose_config("attack.n=30"), tmp_path)
    assert "cert/median_l2" in metrics and metrics["attack/split"] == "test"  # which images the bounds used
    assert not any(k.startswith("attack/") for k in metrics if k != "attack/split")
    assert len(read_csv(tmp_path / "bounds.csv")) == 30 and not (tmp_path / "attacks.csv").exists()


def test_tracker_gets_the_robust_error_curves(trained_copy):
    run_dir, _ = trained_copy

    class RecordingTracker:
        def __init__(self):
            self.tables = {}

        def log_table(self, key, columns, rows, line=None):
            self.tables[key] = (columns, rows, line)

    tracker = RecordingTracker()
    loaded = load_run(run_dir, torch.device("cpu"))
    cfg = compose_config("attack=fgsm", "attack.n=10", "attack.epsilons.linf=[0.1,0.3]")
    metrics = build_evaluation(cfg)(loaded.model, loaded.data, RunFolder(run_dir), tracker)
    assert set(tracker.tables) == {"attack/fgsm/robust_error", "attack/best/robust_error_linf",
                                   "cert/certified_error", "attack/per_image"}
    columns, rows, line = tracker.tables["attack/fgsm/robust_error"]
    assert columns == ["epsilon", "error_pct"] and line[:2] == ("epsilon", "error_pct")
    assert rows == [[0.1, metrics["attack/fgsm/error_pct_linf@0.1"]],
                    [0.3, metrics["attack/fgsm/error_pct_linf@0.3"]]]


def test_bad_run_folders(tmp_path, trained):
    with pytest.raises(FileNotFoundError, match="run_dir"):
        run(compose_config("mode=evaluate", f"run_dir={tmp_path}", "attack=ddn"))
    with pytest.raises(ConfigError, match="nothing to do"):
        run(compose_config("mode=evaluate", f"run_dir={trained[0]}", "eval.bounds=false"))
    # A checkpoint that does not fit the configured model: one clear error.
    (tmp_path / "checkpoints").mkdir()
    state = torch.load(trained[0] / "checkpoints" / "best.pt", weights_only=True)
    state["config"]["model"]["hidden"] = 17
    torch.save(state, tmp_path / "checkpoints" / "best.pt")
    with pytest.raises(ConfigError, match="does not fit"):
        run(compose_config("mode=summary", f"run_dir={tmp_path}"))
