"""Every option of every config group composes; bad values fail early, naming the key."""
import json

import pytest
import torch
from hydra.errors import MissingConfigException
from hydra.utils import instantiate
from hydra.errors import ConfigCompositionException

from conftest import CONF_DIR, compose_config
from tulip.config import ConfigError
from tulip.data import load_dataset
from tulip.main import run
from tulip.train import build_model

GROUPS = ("model", "dataset", "regularizer", "attack")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    assert options(group), f"conf/{group} is empty"
    for option in options(group):
        cfg = compose_config(f"{group}={option}")
        assert cfg is not None


def test_every_model_and_regularizer_instantiates_on_mnist5k():
    cfg = compose_config()
    data = load_dataset(cfg.dataset, torch.device("cpu"))
    for option in options("model"):
        model = build_model(compose_config(f"model={option}"), data, torch.device("cpu"))
        assert model(data.test_x[:2]).shape == (2, 10), option
    for option in options("regularizer"):
        objective = instantiate(compose_config(f"regularizer={option}").reg)
        assert callable(objective), option


def test_unknown_group_option_lists_the_options():
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as error:
        compose_config("model=no_such_net")
    assert "cnn_small" in str(error.value)


@pytest.mark.parametrize("override, key", [
    ("epochs=0", "epochs"),
    ("batch_size=0", "batch_size"),
    ("test_batch_size=-1", "test_batch_size"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-0.1", "optim.lr"),
    ("optim.momentum=1.5", "optim.momentum"),
    ("device=tpu", "device"),
    ("wandb.mode=sometimes", "wandb.mode"),
    ("mode=evaluate", "run_dir"),
    ("batch_size=100000", "batch_size"),
])
def test_bad_values_fail_before_any_output(override, key, tmp_path):
    cfg = compose_config(override)
    with pytest.raises(ConfigError) as error:
        run(cfg, tmp_path / "run")
    assert str(error.value).startswith(f"{key}=")
    # nothing trained, nothing claims success: a training job's folder only says why it failed
    assert not (tmp_path / "run" / "checkpoints").exists()
    if cfg.mode == "train":
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["status"] == "failed" and key in summary["error"]
    else:
        assert not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_cuda_without_cuda_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="device='cuda'.*CUDA is not available"):
        run(compose_config("device=cuda"), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()
