"""Every option of every config group composes; bad values fail early, naming the key."""
import json

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_config
from tulip.config import ConfigError
from tulip.data import load_dataset
from tulip.main import run
from tulip.build import build_model

GROUPS = ("model", "dataset", "optim", "scheduler", "regularizer", "attack")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def own_values(group: str, option: str) -> tuple[str, dict]:
    """(package, values) of conf/<group>/<option>.yaml: what the option itself sets, and where."""
    path = CONF_DIR / group / f"{option}.yaml"
    header = path.read_text().splitlines()[0]
    package = header.split("@package", 1)[1].strip() if "@package" in header else group
    values = OmegaConf.to_container(OmegaConf.load(path))
    values.pop("defaults", None)
    return package, values


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes_with_its_own_values(group):
    assert options(group), f"conf/{group} is empty"
    for option in options(group):
        cfg = compose_config(f"{group}={option}", tiny=False)
        package, values = own_values(group, option)
        assert_contains(OmegaConf.to_container(OmegaConf.select(cfg, package)), values, f"{group}={option}")


def assert_contains(composed: dict, values: dict, where: str):
    for key, value in values.items():
        if isinstance(value, dict):
            assert_contains(composed[key], value, f"{where}: {key}")
        else:
            assert composed[key] == value, (where, key)


def test_every_model_instantiates_on_mnist5k():
    cfg = compose_config()
    data = load_dataset(cfg.dataset, torch.device("cpu"))
    for option in options("model"):
        model = build_model(compose_config(f"model={option}"), data, torch.device("cpu"))
        assert model(data.test_x[:2]).shape == (2, 10), option


@pytest.mark.parametrize("optim", options("optim"))
@pytest.mark.parametrize("scheduler", options("scheduler"))
def test_every_optimizer_and_schedule_builds_and_steps(optim, scheduler):
    cfg = compose_config(f"optim={optim}", f"scheduler={scheduler}", "epochs=4")
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = instantiate(cfg.optim)([weight])
    schedule = instantiate(cfg.scheduler)(optimizer)
    assert type(optimizer).__name__ == cfg.optim._target_.rsplit(".", 1)[1]
    rates = []
    for _ in range(cfg.epochs):  # one optimizer step and one schedule step per epoch, as training does
        rates.append(optimizer.param_groups[0]["lr"])
        weight.sum().backward()
        optimizer.step()
        schedule.step()
    assert not torch.equal(weight.detach(), torch.ones(3))
    expected_first = cfg.optim.lr / (cfg.scheduler.div_factor if scheduler == "onecycle" else 1)
    assert rates[0] == pytest.approx(expected_first)
    assert (len(set(rates)) == 1) == (scheduler in ("constant", "multistep"))  # milestones 5, 7 > 4 epochs


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
    ("scheduler.gamma=0", "scheduler.gamma"),
    ("scheduler.milestones=[0,3]", "scheduler.milestones"),
    ("device=tpu", "device"),
    ("wandb.mode=sometimes", "wandb.mode"),
    ("mode=evaluate", "run_dir"),
    ("batch_size=100000", "batch_size"),
    # beyond a sign: non-finite, huge and wrongly typed values (tests/unit/test_fuzz.py draws many more)
    ("optim.lr=inf", "optim.lr"),
    ("optim.lr=1e300", "optim.lr"),
    ("scheduler.gamma=inf", "scheduler.gamma"),
    ("scheduler.milestones=5", "scheduler.milestones"),
    ("epochs=1000000000000", "epochs"),
    ("seed=-1", "seed"),
    ("wandb.init_timeout_s=0", "wandb.init_timeout_s"),
    ("eval.every=0", "eval.every"),
    ("eval.n=0", "eval.n"),
    ("wandb.finish_timeout_s=-1", "wandb.finish_timeout_s"),
    ("threads=0", "threads"),
    ("threads=many", "threads"),
    ("precision=fp16", "precision"),
    ("precision=bfloat16", "precision"),
    ("channels_last=yes", "channels_last"),
    ("channels_last=1", "channels_last"),
    ("compile=auto", "compile"),
    ("compile=1", "compile"),
])
def test_bad_values_fail_before_any_output(override, key, tmp_path):
    cfg = compose_config(override)
    with pytest.raises(ConfigError) as error:
        run(cfg, tmp_path / "run")
    assert error.value.key == key and str(error.value).startswith(f"{key}=")
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


def test_an_optimizer_argument_outside_its_schema_names_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^optim\.betas=\[1\.5, 0\.999\] is invalid: expected two numbers"):
        run(compose_config("optim=adam", "optim.betas=[1.5,0.999]"), tmp_path / "run")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"


def test_an_optimizer_argument_torch_rejects_names_the_group(tmp_path):
    with pytest.raises(ConfigError, match=r"^optim='torch.optim.Adam' is invalid: expected arguments that "
                                          r"torch.optim.Adam accepts .*foo") as error:
        run(compose_config("optim=adam", "+optim.foo=1"), tmp_path / "run")
    assert error.value.key == "optim" and error.value.__cause__ is None
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "failed"
