"""The Lipschitz penalty does what it is for, on the whole of mnist5k's training set: a smaller loss
gradient than no penalty, same seed and epochs (a claim of the method: two full-size trainings)."""
import json
import math

import pytest

from conftest import train_mnist5k


@pytest.mark.slow
def test_lip_lowers_the_loss_gradient_on_mnist5k(tmp_path):
    """Same seed and epochs: the Lipschitz penalty gives a smaller max test-loss gradient than none."""
    plain = train_mnist5k(tmp_path / "none", "regularizer=none", "dataset.test_subset=300")
    lip = train_mnist5k(tmp_path / "lip", "regularizer=lip", "reg.lip=1.0", "dataset.test_subset=300")
    for name, metrics in (("none", plain), ("lip", lip)):
        assert json.loads((tmp_path / name / "summary.json").read_text())["status"] == "finished"
        assert math.isfinite(metrics["lipschitz/loss_grad_max"])
    assert lip["train/penalty_lip"] > 0
    assert lip["lipschitz/loss_grad_max"] < 0.5 * plain["lipschitz/loss_grad_max"]
