"""Choices read the validation split only: the best epoch (best.pt, and the final evaluation of it) does
not move when the test labels are permuted (tests/support/permuted_test_labels.py); without a validation
split (dataset.val_size=0) the run chooses on the test set, as the original protocol did, and says so.
The same check for an Optuna study's proposals: tests/system/test_study.py."""
import json
import logging

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
