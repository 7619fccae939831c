"""Every regularizer option trains through the training loop on mnist5k without NaN, and the Lipschitz
penalty does what it is for: a smaller loss gradient than no penalty, same seed and epochs."""
import json
import math

import pytest

from conftest import CONF_DIR, SHRINK, compose_config
from tulip.main import run

OPTIONS = sorted(p.stem for p in (CONF_DIR / "regularizer").glob("*.yaml") if not p.stem.startswith("_"))
# Options that train through a certificate need a model without BatchNorm.
CERTIFIED_TRAINING = {"gloro"}


def train_mnist5k(run_dir, *overrides):
    """Training and its per-epoch measurements: what these tests look at (the final bounds are not)."""
    return run(compose_config("dataset=mnist5k", "epochs=2", "attack=none", "eval.bounds=false",
                              "wandb.mode=disabled", *overrides, tiny=False), run_dir)


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


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_trains_on_mnist5k_without_nan(tmp_path, name):
    model = ["model=cnn_4c3f", *SHRINK["cnn_4c3f"]] if name in CERTIFIED_TRAINING else []
    metrics = train_mnist5k(tmp_path, f"regularizer={name}", "epochs=1", "dataset.train_subset=256",
                            "dataset.test_subset=100", *model)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["test/loss"])
