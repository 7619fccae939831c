"""Choices read the validation split only: the best epoch (best.pt, and the final evaluation of it) does
not move when the test labels are permuted (tests/support/permuted_test_labels.py); without a validation
split (dataset.val_size=0) the run chooses on the test set, as the original protocol did, and says so.
The same check for an Optuna study's proposals: tests/system/test_study.py."""
import json
import logging

import pytest
import torch

from support import permuted_test_labels
from conftest import compose_config
from tulip.main import run
from tulip.runs import metric_keys
from tulip.runs.folder import RunFolder

# Long enough for the validation and test errors to disagree on the best epoch: 4 epochs on 512 images,
# the final evaluation (DDN and the certificate) on 50 validation images, so that it depends on best.pt.
SELECTION_RUN = ["epochs=4", "dataset.test_subset=300", "attack=ddn", "attack.split=val", "attack.n=50",
                 "attack.methods.ddn.steps=10", "optim.lr=0.05"]


def train(run_dir, *overrides) -> dict:
    run(compose_config(*SELECTION_RUN, *overrides), run_dir)
    return json.loads((run_dir / "summary.json").read_text())


def best_weights(run_dir) -> dict:
    return RunFolder(run_dir).load_checkpoint("best", torch.device("cpu"))["model"]


def test_permuting_the_test_labels_changes_no_choice(tmp_path, monkeypatch):
    plain = train(tmp_path / "plain")
    permuted_test_labels.install(monkeypatch)
    permuted = train(tmp_path / "permuted")
    history = [json.loads(line) for line in (tmp_path / "permuted" / "metrics.jsonl").read_text().splitlines()]
    test_errors = [row[metric_keys.TEST_ERROR] for row in history]
    # the hook took effect: the test metrics are those of shuffled labels
    assert min(test_errors) > 50 and plain[metric_keys.TEST_ERROR] < 50
    assert plain[metric_keys.SELECTION] == permuted[metric_keys.SELECTION] == "val"
    assert plain[metric_keys.BEST_EPOCH] == permuted[metric_keys.BEST_EPOCH]
    # the lowest test error of the permuted run is at another epoch: a choice made on it would differ
    assert test_errors.index(min(test_errors)) + 1 != permuted[metric_keys.BEST_EPOCH]
    plain_weights, permuted_weights = best_weights(tmp_path / "plain"), best_weights(tmp_path / "permuted")
    assert all(torch.equal(plain_weights[name], permuted_weights[name]) for name in plain_weights)
    # every figure read from the validation split is the same, the final evaluation's included
    from_validation = [key for key in plain if key.startswith(("val/", "attack/", "cert/", "best/val"))
                       and not key.endswith("time_s")]
    assert metric_keys.robust_error("best", "l2", 1.0) in from_validation
    assert {k: plain[k] for k in from_validation} == {k: permuted[k] for k in from_validation}


def test_without_a_validation_split_the_test_set_chooses_and_the_run_says_so(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="tulip.train.loop"):
        summary = train(tmp_path / "run", "dataset.val_size=0", "attack.split=test", "objectives=[test/error_pct]")
    warnings = [r.getMessage() for r in caplog.records if "dataset.val_size=0" in r.getMessage()]
    assert len(warnings) == 1 and "chosen on the test set" in warnings[0]
    assert summary[metric_keys.SELECTION] == "test" and metric_keys.VAL_ERROR not in summary
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    test_errors = [row[metric_keys.TEST_ERROR] for row in history]
    assert summary[metric_keys.BEST_EPOCH] == test_errors.index(min(test_errors)) + 1
    assert summary[metric_keys.BEST_TEST_ERROR] == summary[metric_keys.LOWEST_TEST_ERROR] == min(test_errors)


def test_the_summary_keeps_the_chosen_epoch_and_the_lowest_test_error_apart(tmp_path):
    summary = train(tmp_path / "run")
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val_errors = [row[metric_keys.VAL_ERROR] for row in history]
    best = val_errors.index(min(val_errors))  # the first epoch of the lowest validation error
    assert summary[metric_keys.BEST_EPOCH] == best + 1
    assert summary[metric_keys.BEST_VAL_ERROR] == min(val_errors)
    assert summary[metric_keys.BEST_TEST_ERROR] == history[best][metric_keys.TEST_ERROR]
    assert summary[metric_keys.LOWEST_TEST_ERROR] == min(row[metric_keys.TEST_ERROR] for row in history)
    assert summary[metric_keys.ATTACKED_SPLIT] == "val" and summary[metric_keys.ATTACKED_IMAGES] == 50
    # every error rate over images carries its Wilson interval, which holds the rate
    for key in (metric_keys.TEST_ERROR, metric_keys.VAL_ERROR, metric_keys.BEST_TEST_ERROR,
                metric_keys.robust_error("best", "l2", 1.0), metric_keys.certified_error(1.0)):
        low, high = (summary[k] for k in metric_keys.interval_keys(key))
        assert low <= summary[key] <= high and high - low > 0, key


def test_a_certified_model_is_selected_on_its_validation_certified_error(tmp_path):
    """select=val/cert_error_pct_l2@<eps>: every epoch measures the pairwise certified error on the
    validation split, and best.pt is the epoch where it is lowest, which here is not the epoch of lowest
    validation error (the radius warms up from 1 % over half of the epochs)."""
    certified = "val/cert_error_pct_l2@0.3"
    run(compose_config("epochs=4", "model=aol_4c3f", "model.channels=[8,8]", "model.hidden=32", "regularizer=margin",
                       "reg.margin=0.5", "reg.radius_warmup.start=0.01", "reg.radius_warmup.until=0.5",
                       "optim=adam", "optim.lr=0.01", "eval.certify=[0.3,1]", f"select={certified}"), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    history = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all({certified, "val/cert_error_pct_l2@1"} <= set(row) for row in history)
    figures = [row[certified] for row in history]
    assert summary[metric_keys.BEST_EPOCH] == figures.index(min(figures)) + 1
    assert all(row[certified] >= row[metric_keys.VAL_ERROR] for row in history)  # misclassified count
    assert figures[-1] < figures[0]  # the margin loss certifies more as the radius grows


@pytest.mark.parametrize("overrides, message", [
    (["select=val/cert_error_pct_l2@0.3"], r"select='val/cert_error_pct_l2@0\.3' is invalid.*eval\.certify"),
    (["select=test/error_pct"], r"select='test/error_pct' is invalid: expected one of \['val/error_pct'\]"),
])
def test_select_names_a_validation_figure_the_run_measures(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        run(compose_config(*overrides), tmp_path)
