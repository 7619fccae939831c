"""The schema: every group's bad value raises one ConfigError naming its dotted key, before anything runs;
every shipped option passes it; a new class's signature is its schema."""
import math
import pickle

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, TINY, compose_with_hydra
from tulip.config import validate
from tulip.schema import ConfigError, Iterations, NonNegative, checked, check_node
from tulip.train.regularizers import PGDBatch

GROUPS = ("model", "dataset", "optim", "scheduler", "regularizer", "attack")


def compose(*overrides: str):
    """The config with its `hydra` node, so that the launcher's and sweeper's keys are checked too."""
    return compose_with_hydra(*TINY, *overrides)


@pytest.mark.parametrize("overrides, key, value", [
    (["model.channels=[4,0]"], "model.channels", [4, 0]),
    (["model=cnn_4c3f", "model.channels=[4,8,16]"], "model.channels", [4, 8, 16]),
    (["model=wide_resnet", "model.depth=12"], "model.depth", 12),
    (["model=mlp", "model.tanh=1"], "model.tanh", 1),
    (["dataset.split_seed=-1"], "dataset.split_seed", -1),
    (["dataset.train_subset=0"], "dataset.train_subset", 0),
    (["dataset=cifar10", "dataset.augment=maybe"], "dataset.augment", "maybe"),
    (["reg.lip=nan"], "reg.lip", math.nan),
    (["reg.pgd.steps=0"], "reg.pgd.steps", 0),
    (["reg.pgd.norm=1"], "reg.pgd.norm", 1),
    (["reg.trades.beta=-1"], "reg.trades.beta", -1),  # read by two parts: named once, as itself
    (["reg.fd_order=3"], "reg.fd_order", 3),
    (["attack.n=0"], "attack.n", 0),
    (["attack.epsilons.l2=[0.5,-1]"], "attack.epsilons.l2", [0.5, -1]),
    (["attack=ddn", "attack.methods.ddn.steps=0"], "attack.methods.ddn.steps", 0),
    (["attack=apgd_ce_l2", "attack.methods.apgd_ce_l2.norm=l1"], "attack.methods.apgd_ce_l2.norm", "l1"),
    (["+attack.methods.typo=3"], "attack.methods.typo", 3),
    (["optim.momentum=1"], "optim.momentum", 1),
    (["optim=adam", "optim.betas=[0.9]"], "optim.betas", [0.9]),
    (["scheduler.milestones=[0,3]"], "scheduler.milestones", [0, 3]),
    (["scheduler=cosine", "scheduler.eta_min=-1"], "scheduler.eta_min", -1),
    (["scheduler=onecycle", "optim.lr=-1"], "optim.lr", -1),  # max_lr: ${optim.lr}
    (["eval.every=0"], "eval.every", 0),
    (["eval.bounds=yes"], "eval.bounds", "yes"),
    (["wandb.init_timeout_s=0"], "wandb.init_timeout_s", 0),
    (["wandb.mode=sometimes"], "wandb.mode", "sometimes"),
    (["hydra/launcher=local", "hydra.launcher.array_parallelism=0"], "hydra.launcher.array_parallelism", 0),
    (["hydra/sweeper=optuna", "hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials", 0),
    (["hydra/sweeper=optuna", "hydra.sweeper.directions=[up]"], "hydra.sweeper.directions", ["up"]),
    (["epochs=0"], "epochs", 0),
    (["threads=many"], "threads", "many"),
])
def test_a_bad_value_in_any_group_is_a_config_error_naming_its_dotted_key(overrides, key, value):
    with pytest.raises(ConfigError) as error:
        validate(compose(*overrides))
    assert error.value.key == key
    assert error.value.value == value or (isinstance(value, float) and math.isnan(error.value.value))
    assert str(error.value) == f"{key}={error.value.value!r} is invalid: expected {error.value.expected}"
    assert error.value.__cause__ is None


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize("group", GROUPS)
def test_every_shipped_option_passes(group):
    for option in options(group):
        validate(compose(f"{group}={option}"))
    for plugin in ("hydra/launcher=local", "hydra/sweeper=optuna"):
        validate(compose(plugin))


def test_a_group_option_with_another_options_interpolation_names_the_source_key():
    """An argument read through an interpolation is blamed on the key it comes from, whichever part reads it."""
    cfg = compose("regularizer=trades", "reg.trades.step_size=0")
    with pytest.raises(ConfigError) as error:
        check_node(cfg.reg.batches.trades, "reg.batches.trades")
    assert error.value.key == "reg.trades.step_size"


@checked()
def a_new_attack(steps: Iterations = 10, gamma: NonNegative = 0.1):
    return steps, gamma


def test_a_new_target_is_checked_through_its_own_signature():
    node = OmegaConf.create({"attack": {"methods": {"mine": {"_target_": f"{__name__}.a_new_attack", "gamma": -1}}}})
    with pytest.raises(ConfigError) as error:
        check_node(node.attack.methods.mine, "attack.methods.mine")
    assert error.value.key == "attack.methods.mine.gamma"
    with pytest.raises(ConfigError) as error:  # called directly: the argument is named
        a_new_attack(steps=0)
    assert error.value.key == "steps"
    assert a_new_attack(steps=3) == (3, 0.1)


def test_a_target_that_cannot_be_imported_is_named():
    with pytest.raises(ConfigError) as error:
        validate(compose("model._target_=tulip.nn.models.NoSuchNet"))
    assert error.value.key == "model._target_"


def test_a_part_called_directly_converts_what_the_schema_accepts():
    assert PGDBatch(eps=0.1, norm="LINF").attack.func.__name__ == "pgd_linf"
    assert PGDBatch(eps=0.1, norm=2).attack.func.__name__ == "pgd_l2"


def test_the_error_survives_pickling_as_a_sweep_job_sends_it():
    error = pickle.loads(pickle.dumps(ConfigError("reg.lip", -1.0, "a number >= 0")))
    assert (error.key, error.value, error.expected) == ("reg.lip", -1.0, "a number >= 0")
    assert str(error) == "reg.lip=-1.0 is invalid: expected a number >= 0"
    whole = pickle.loads(pickle.dumps(ConfigError("a run folder with another config")))
    assert str(whole) == "a run folder with another config" and whole.key is None
