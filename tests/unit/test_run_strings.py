"""Strings that carry structure, each defined once: run statuses, metric keys, attacks.csv columns,
the job's last line; and the one eval-mode and one input-gradient implementation they all use."""
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import build_model_option
from tulip.nn.models import eval_mode, linearized
from tulip.nn.perturbations import frozen_eval, input_grad, loss_input_grad
from tulip.report.runs import read_attack_curves
from tulip.runs import metric_keys
from tulip.runs.folder import RunFolder
from tulip.runs.result import counted, result_line
from tulip.runs.status import Status


def test_statuses_are_the_strings_summary_json_holds():
    assert json.loads(json.dumps({"status": Status.FINISHED})) == {"status": "finished"}
    assert [str(status) for status in Status] == ["finished", "failed", "diverged"]
    assert "diverged" == Status.DIVERGED and {"failed": 1}[Status.FAILED] == 1


def test_fixed_keys_are_scalar_keys_and_exclude_names_that_are_not_numbers():
    assert metric_keys.TEST_ERROR in metric_keys.FIXED_KEYS and metric_keys.BEST_EPOCH in metric_keys.FIXED_KEYS
    assert all(metric_keys.is_scalar_key(key) for key in metric_keys.FIXED_KEYS)
    for not_a_number in (metric_keys.ATTACK_PER_IMAGE, metric_keys.CERT_CURVE, metric_keys.WANDB_RUN_ID,
                         metric_keys.CERTIFIED_ERROR_STEM, metric_keys.ATTACK_PREFIX, metric_keys.EPOCH):
        assert not_a_number not in metric_keys.FIXED_KEYS


@pytest.mark.parametrize("attack", ["ddn", "pgd_l2", "autoattack_linf", "best", "deepfool_linf"])
@pytest.mark.parametrize("norm", metric_keys.NORMS)
def test_distance_columns_read_back_as_written(attack, norm):
    """An attack whose name ends like a norm (pgd_l2) still parses back to its own name."""
    column = metric_keys.distance_column(attack, norm)
    assert metric_keys.parse_distance_column(column) == (attack, norm)


@pytest.mark.parametrize("column", ["index", "label", "prediction", *metric_keys.BOUNDS_COLUMNS, "ddn_l1"])
def test_other_columns_are_not_attack_distances(column):
    assert metric_keys.parse_distance_column(column) is None


def test_distance_column_refuses_an_unknown_norm():
    with pytest.raises(ValueError, match="norm must be one of"):
        metric_keys.distance_column("ddn", "l1")


def test_attack_curves_are_rebuilt_from_the_written_columns(tmp_path):
    """attacks.csv as the evaluation writes it (two attacks, the best, the image columns) and the
    certificate in bounds.csv give back every robust-error curve."""
    folder = RunFolder(tmp_path)
    distances = {"pgd_l2": [0.0, 0.4, float("inf"), 2.0], "ddn": [0.0, 0.3, 0.6, 1.5]}
    columns = {"index": [0, 1, 2, 3], "label": [1, 2, 3, 4], "prediction": [0, 2, 3, 4]}
    for name, values in distances.items():
        for norm in metric_keys.NORMS:
            columns[metric_keys.distance_column(name, norm)] = values
    folder.write_csv("attacks", columns)
    folder.write_csv("bounds", {metric_keys.CERTIFIED_COLUMN: [0.0, 0.1, 0.2, 0.3],
                                metric_keys.FIRST_ORDER_COLUMN: [9.0, 9.0, 9.0, 9.0]})
    config = {"attack": {"epsilons": {"l2": [0.5, 1.0], "linf": [0.5]}}}
    curves = read_attack_curves(tmp_path, config)
    assert curves[metric_keys.robust_error("pgd_l2", "l2", 0.5)] == 50.0
    assert curves[metric_keys.robust_error("ddn", "linf", 0.5)] == 50.0
    assert curves[metric_keys.certified_error(0.5)] == 100.0
    assert not any("first_order" in key or "index" in key for key in curves)


def test_counted_says_one_job_and_two_jobs():
    assert (counted(1, "job"), counted(2, "job"), counted(0, "CPU")) == ("1 job", "2 jobs", "0 CPUs")


def test_result_line_of_a_diverged_offline_run(tmp_path):
    folder = RunFolder(tmp_path)
    folder.write_summary({"status": "diverged", "epoch": 3, "error": "loss became NaN/Inf at epoch 3, step 7"})
    (folder.wandb_dir / "offline-run-20260101_000000-abcdefgh").mkdir(parents=True)
    line = result_line("train", folder)
    assert line.startswith("run diverged at epoch 3: loss became NaN/Inf")
    assert f"`wandb sync {folder.wandb_dir}/offline-run-*`" in line and f"`tulip-report {tmp_path}`" in line


def test_result_line_of_a_folder_without_summary(tmp_path):
    assert result_line("train", RunFolder(tmp_path)).startswith("run without a summary.json; run folder")


def model_with_a_frozen_part():
    """A training model whose BatchNorm a user froze in eval mode (as when fine-tuning)."""
    model = build_model_option("cnn_small", ["model.channels=[4,8]", "model.hidden=16"]).train()
    frozen = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    frozen.eval()
    return model, frozen


@pytest.mark.parametrize("context", [eval_mode, frozen_eval, linearized])
def test_every_eval_context_restores_each_modules_own_mode(context):
    model, frozen = model_with_a_frozen_part()
    modes = {name: m.training for name, m in model.named_modules()}
    with context(model):
        assert not any(m.training for m in model.modules())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not frozen.training and model.training


def test_input_grad_rows_are_the_per_sample_gradients():
    """In eval mode the rows of ∇_x Σ_i ℓ_i are the gradients of each sample alone."""
    model, _ = model_with_a_frozen_part()
    model.eval()
    torch.manual_seed(0)
    x, y = torch.rand(5, 1, 28, 28), torch.randint(0, 10, (5,))
    one_at_a_time = torch.cat([loss_input_grad(model, x[i:i + 1], y[i:i + 1]) for i in range(5)])
    torch.testing.assert_close(loss_input_grad(model, x, y), one_at_a_time)
    xg = x.clone().requires_grad_(True)
    losses = F.cross_entropy(model(xg), y, reduction="none")
    torch.testing.assert_close(input_grad(losses, xg), one_at_a_time)
