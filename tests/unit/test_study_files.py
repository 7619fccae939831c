"""hydra/sweeper=optuna without a sweep: the search-space grammar, the objectives and their checks, and
the study's sweep files. The real studies are in tests/system/test_study.py."""
import json
import math

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from conftest import compose_config, compose_with_hydra
from support.jobs import SWEEPS
from support.study import OBJECTIVES
from tulip.config import ConfigError, objective_values, reads_test_set, validate
from tulip.launch.sweeper import distribution, search_space

FAMILIES = ["lip", "J1", "J2", "lip+J2", "gradnorm_fd", "pgd_l2", "trades", "gloro"]


# --- the search space and the objectives ------------------------------------------------------------

def parse(text):
    return OverridesParser.create().parse_overrides([text])[0]


def test_search_space_grammar_gives_optuna_distributions():
    assert distribution(parse("reg.lip=tag(log,interval(1e-3,1))")) == FloatDistribution(1e-3, 1, log=True)
    assert distribution(parse("reg.J2=interval(0,0.5)")) == FloatDistribution(0, 0.5)
    assert distribution(parse("epochs=tag(int,interval(1,8))")) == IntDistribution(1, 8)
    assert distribution(parse("epochs=range(2,10,2)")) == IntDistribution(2, 8, step=2)
    assert distribution(parse("model=cnn_small,mlp")) == CategoricalDistribution(["cnn_small", "mlp"])
    assert distribution(parse("reg.lip=0.1")) is None
    with pytest.raises(ValueError, match="reg.lip.*integers"):
        distribution(parse("reg.lip=range(0.5,2)"))


def test_command_line_ranges_replace_the_sweep_files():
    space, fixed = search_space({"reg.lip": "tag(log,interval(1e-3,1))", "seed": 3},
                                ["reg.lip=interval(0,2)", "epochs=2"])
    assert space == {"reg.lip": FloatDistribution(0, 2)}
    assert sorted(fixed) == ["epochs=2", "seed=3"]


def test_run_returns_the_objectives_in_order_and_nan_for_missing_ones():
    metrics = {"test/error_pct": 3.0, "attack/best/error_pct_l2@1": 40.0}
    assert objective_values(metrics, ["test/error_pct"]) == 3.0
    assert objective_values(metrics, ["attack/best/error_pct_l2@1.0", "test/error_pct"]) == (40.0, 3.0)
    assert math.isnan(objective_values(metrics, ["test/error_pct", "cert/median_l2"])[1])


@pytest.mark.parametrize("objectives, message", [
    ("[test/eror_pct]", "objectives.*metric keys"),
    ("[]", "objectives.*metric keys"),
    ("[attack/pgd/error_pct_l2@1]", "objectives.*an attack of this run"),
    ("[attack/best/error_pct_l2@0.7]", r"objectives.*attack.epsilons.l2"),
])
def test_objectives_that_cannot_be_produced_fail_before_training(objectives, message):
    cfg = compose_config(f"objectives={objectives}", "attack=ddn", "attack.split=val")
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
    validate(compose_config("objectives=[val/error_pct,attack/best/error_pct_l2@1.0,attack/ddn/median_l2]",
                            "attack=ddn", "attack.split=val"))


@pytest.mark.parametrize("objective, settings", [
    ("test/error_pct", []),
    ("best/test_error_pct", []),
    ("test/lowest_error_pct", []),
    ("lipschitz/loss_grad_max", []),  # measured on test images every epoch
    ("attack/best/error_pct_l2@1", ["attack.split=test"]),
    ("cert/error_pct_l2@1", ["attack.split=test"]),
])
def test_an_objective_read_from_the_test_set_is_refused_while_there_is_a_validation_split(objective, settings):
    cfg = compose_config(f"objectives=[{objective}]", "attack=ddn", *settings)
    assert reads_test_set(objective, cfg)
    with pytest.raises(ConfigError, match=f"objectives='{objective}'.*validation split"):
        validate(cfg)
    # without a validation split the test set is all there is: the original protocol, allowed
    validate(compose_config(f"objectives=[{objective}]", "attack=ddn", "dataset.val_size=0", *settings))


def test_validation_objectives_and_data_free_figures_are_allowed():
    cfg = compose_config("attack=ddn", "attack.split=val")
    for key in ("val/error_pct", "best/val_error_pct", "attack/best/error_pct_l2@1", "cert/error_pct_l2@1",
                "weights/layer_norm_product", "train/loss"):
        assert not reads_test_set(key, cfg), key
    assert list(compose_config().objectives) == ["val/error_pct"]  # the default reads validation only


def test_attacking_the_validation_split_needs_one():
    with pytest.raises(ConfigError, match="attack.split='val'.*dataset.val_size=0"):
        validate(compose_config("attack.split=val", "dataset.val_size=0"))


# --- the study's sweep files ---------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_has_a_study_file_searching_its_multipliers_in_log_scale(family):
    cfg = compose_with_hydra(config_dir=SWEEPS, config_name=f"study_{family}")
    assert cfg.hydra.runtime.choices.regularizer == family
    assert cfg.hydra.sweeper._target_ == "hydra_plugins.tulip_sweeper.OptunaSweeper"
    assert list(cfg.objectives) == OBJECTIVES and 0.3 in cfg.attack.epsilons.l2
    space, fixed = search_space(dict(cfg.hydra.sweeper.params), [])
    assert space and not fixed
    assert all(isinstance(d, FloatDistribution) and d.log for d in space.values())
    for key, dist in space.items():  # the searched keys are this family's multipliers
        assert key.startswith("reg.")
        cfg_at_low = compose_with_hydra(f"{key}={dist.low}", config_dir=SWEEPS, config_name=f"study_{family}")
        validate(cfg_at_low)
    assert list(cfg.hydra.sweeper.reseed) == []  # seeds come once a configuration is chosen (study_final)
    assert cfg.attack.split == "val" and not any(reads_test_set(key, cfg) for key in cfg.objectives)
    if family == "gloro":
        assert cfg.hydra.runtime.choices.model == "cnn_4c3f"  # certified training needs no BatchNorm


def test_paper_cifar10_study_is_the_paper_recipe_searched_on_slurm_gpu():
    grid = compose_with_hydra(config_dir=SWEEPS, config_name="paper_cifar10")
    cfg = compose_with_hydra(config_dir=SWEEPS, config_name="paper_cifar10_study")
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm_gpu"
    assert cfg.hydra.runtime.choices["hydra/sweeper"] == "optuna"
    for key in ("model", "dataset", "regularizer"):
        assert cfg.hydra.runtime.choices[key] == grid.hydra.runtime.choices[key]
    assert (cfg.epochs, cfg.reg.decay, cfg.model.tanh) == (grid.epochs, grid.reg.decay, grid.model.tanh) == (200, 5e-4, True)
    validate(cfg)  # its robust-error objective is on the attack's curve
    space, _ = search_space(dict(cfg.hydra.sweeper.params), [])
    assert set(space) == {"reg.lip", "reg.J2"} and all(d.log for d in space.values())
    assert space["reg.lip"].low <= 7.8125e-4 <= space["reg.lip"].high  # the paper's own multiplier


def test_the_final_study_file_judges_a_chosen_configuration_on_the_test_set_with_five_seeds():
    cfg = compose_with_hydra("regularizer=J2", "reg.J2=1.5", config_dir=SWEEPS, config_name="study_final")
    validate(cfg)
    assert cfg.attack.split == "test" and cfg.attack.n is None  # all 1,000 test digits
    assert list(cfg.objectives) == ["val/error_pct"]  # it chooses nothing
    assert cfg.hydra.sweeper.params.seed == "0,1,2,3,4"
    study = compose_with_hydra(config_dir=SWEEPS, config_name="study_J2")
    for key in ("epochs", "batch_size", "dataset", "model", "optim", "scheduler", "eval"):
        assert cfg[key] == study[key], key  # trained and measured as the search's trials were


# --- the study's choices, from its committed results -----------------------------------------------

RESULTS = SWEEPS / "results"
CLEAN_BUDGET = 1.0  # points of validation error above `none`'s mean that a chosen configuration may cost


def chosen_by_the_rule(search, baseline_val_errors) -> dict:
    """docs/study.md's rule, on validation numbers only: per method, the trial with the lowest validation
    robust error at L2 1 among those within CLEAN_BUDGET of `none`'s mean validation error; for gloro
    (certified training) the lowest validation certified error at L2 0.3."""
    budget = sum(baseline_val_errors) / len(baseline_val_errors) + CLEAN_BUDGET
    chosen = {}
    for method, trials in search.groupby("regularizer"):
        if method == "gloro":
            chosen[method] = trials.sort_values("cert/error_pct_l2@0.3", kind="stable").iloc[0]
        else:
            within = trials[trials["best/val_error_pct"] <= budget]
            chosen[method] = within.sort_values("attack/best/error_pct_l2@1", kind="stable").iloc[0]
    return chosen


def test_the_study_chose_each_configuration_by_its_rule_on_validation_numbers():
    import pandas as pd

    search = pd.read_csv(RESULTS / "study_search_runs.csv")
    final = pd.read_csv(RESULTS / "study_final_runs.csv")
    # the search ran study_<method>.yaml (attack.split=val, tested above); the final runs chose on validation
    # and were judged on the test set
    for summary in (RESULTS / "study_runs").glob("*/*/summary.json"):
        recorded = json.loads(summary.read_text())
        assert (recorded["selection"], recorded["attack/split"]) == ("val", "test"), summary
    baseline = final[final.regularizer == "none"]["best/val_error_pct"].tolist()
    assert len(baseline) == 5
    for method, trial in chosen_by_the_rule(search[search.status == "finished"], baseline).items():
        runs = final[final.regularizer == method]
        assert sorted(runs.seed) == [0, 1, 2, 3, 4], method
        for key in (k for k in search.columns if k.startswith("reg.") and pd.notna(trial[k])):
            if search.loc[search.regularizer == method, key].nunique() > 1:  # a searched multiplier
                assert (runs[key] == trial[key]).all(), (method, key)
