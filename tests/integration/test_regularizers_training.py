"""Every regularizer option trains through the training loop on mnist5k without NaN."""
import json
import math

import pytest

from conftest import CONF_DIR, SHRINK, train_mnist5k

OPTIONS = sorted(p.stem for p in (CONF_DIR / "regularizer").glob("*.yaml") if not p.stem.startswith("_"))
# Options that train through a certificate need a certifiable model: without BatchNorm, or 1-Lipschitz.
CERTIFIED_TRAINING = {"gloro": ["model=cnn_4c3f", *SHRINK["cnn_4c3f"]],
                      "gloro_trades": ["model=cnn_4c3f", *SHRINK["cnn_4c3f"], "model/activation=minmax"],
                      "margin": ["model=aol_4c3f", *SHRINK["aol_4c3f"]]}


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_trains_on_mnist5k_without_nan(tmp_path, name):
    model = CERTIFIED_TRAINING.get(name, [])
    metrics = train_mnist5k(tmp_path, f"regularizer={name}", "epochs=1", "dataset.train_subset=256",
                            "dataset.test_subset=100", *model)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "finished"
    assert math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["test/loss"])
