"""AutoAttack members: real adversarials at every ε, the ensemble through the evaluation, early errors."""
import inspect
from dataclasses import replace

import pytest
import torch
from hydra.utils import get_method, instantiate

from conftest import compose_config
from support.attacks import ATTACK_DIR, ATTACK_NAMES, NOT_ATTACKS, attack_config
from tulip.evaluate import attacks, autoattack
from tulip.runs import metric_keys
from tulip.evaluate.attacks import perturbation_norms
from tulip.config import ConfigError
from tulip.data import mnist5k
from tulip.evaluate.final import build_evaluation
from tulip.main import run
from tulip.runs.metric_keys import NORMS
from tulip.runs.folder import RunFolder

FACTORIES = ("apgd_ce", "apgd_t", "fab_t", "square")
MEMBERS = [f"{factory}_{norm}" for factory in FACTORIES for norm in NORMS]
ENSEMBLES = [f"autoattack{speed}_{norm}" for speed in ("", "_fast") for norm in NORMS]
# Shrunk settings: these tests check the plumbing and the verification, not attack strength.
FAST = {"apgd_ce": {"n_iter": 10}, "apgd_t": {"n_iter": 10, "n_target_classes": 2},
        "fab_t": {"n_iter": 10, "n_target_classes": 2}, "square": {"n_queries": 100}}
EPSILONS = {"l2": [0.5, 1.0, 3.0], "linf": [0.05, 0.1, 0.2]}


def member(name: str, **overrides) -> autoattack.AutoAttackMember:
    """conf/attack/<name>.yaml, shrunk, and overrides."""
    return instantiate(attack_config(name) | FAST[name.rsplit("_", 1)[0]] | overrides)


def test_every_attack_option_is_foolbox_a_member_or_an_ensemble():
    options = {p.stem for p in ATTACK_DIR.glob("*.yaml")}
    assert options == set(ATTACK_NAMES) | set(MEMBERS) | set(ENSEMBLES) | NOT_ATTACKS
    assert not set(ATTACK_NAMES) & set(MEMBERS)


@pytest.mark.parametrize("name", MEMBERS)
def test_yaml_lists_every_parameter_with_the_documented_default(name):
    cfg = attack_config(name)
    factory = get_method(cfg.pop("_target_"))
    assert f"{factory.__name__}_{cfg['norm']}" == name  # the option name is the factory's and the norm
    signature = inspect.signature(factory)
    assert set(cfg) == set(signature.parameters), "every parameter overridable as attack.methods.<name>.<key>"
    for key, value in cfg.items():
        if key != "norm":  # the one parameter without a default
            assert value == pytest.approx(signature.parameters[key].default), key
    assert "arXiv" in factory.__doc__ and "Default" in factory.__doc__  # paper and defaults named


def assert_real(attack, model, x, y, adversarial, success, eps):
    """The successes are misclassified, within ε in the member's norm, inside [0, 1]."""
    assert (model(adversarial[success]).argmax(1) != y[success]).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    norms = perturbation_norms(adversarial - x)[attack.norm][success]
    assert (norms <= eps * (1 + 1e-5) + 1e-6).all(), norms


@pytest.mark.parametrize("name", MEMBERS)
def test_distances_are_real_adversarial_norms(name, model_and_images):
    model, x, y = model_and_images
    attack = member(name)
    epsilons = EPSILONS[attack.norm]
    distances = attack.distances(model, x, y, epsilons, batch_size=10)
    for norm in NORMS:
        assert distances[norm].shape == (len(x),) and distances[norm].device.type == "cpu"
        assert distances[norm][:3].tolist() == [0.0, 0.0, 0.0]  # already misclassified
        assert (distances[norm][3:] > 0).all()  # never 0 for a correctly classified image
    native = distances[attack.norm]
    assert native[3:].isfinite().sum() >= 10, native  # it works on most images at ε = max
    assert (native.isinf() == distances["l2"].isinf()).all()  # failure is norm-independent
    assert (native[native.isfinite()] <= max(epsilons)).all()
    # At one ε, in one batch, the distances are the norms of the adversarials the member returns
    # (every reference class reseeds, so the same call gives the same adversarials).
    eps = epsilons[1]
    adversarial, success = attack.adversarials(model, x[3:], y[3:], eps)
    assert_real(attack, model, x[3:], y[3:], adversarial, success, eps)
    assert success.sum() >= 5
    at_eps = attack.distances(model, x, y, [eps], batch_size=len(x))
    norms = perturbation_norms(adversarial - x[3:])
    norms[attack.norm] = norms[attack.norm].clamp(max=eps)
    for norm in NORMS:
        expected = torch.where(success, norms[norm], torch.inf)
        torch.testing.assert_close(at_eps[norm][3:], expected, rtol=1e-5, atol=1e-6)


def test_a_claimed_success_that_is_not_adversarial_counts_as_a_failure(model_and_images):
    model, x, y = model_and_images

    class Cheat:  # the reference's result replaced: clean images, out-of-range images, a too-large step
        def __init__(self, model, eps, classes, device):
            self.eps = eps

        def perturb(self, x, y):
            adversarial = x.clone()
            adversarial[0] = x[0] + 2 * self.eps  # far outside the budget (and [0, 1])
            adversarial[1] = torch.where(x[1] > 0.5, x[1] - 2, x[1] + 2)  # outside [0, 1]
            return adversarial

    distances = autoattack.AutoAttackMember("linf", Cheat).distances(model, x, y, [0.1, 0.3], batch_size=10)
    assert distances["linf"][:3].tolist() == [0.0, 0.0, 0.0] and distances["linf"][3:].isinf().all()


def test_failure_is_inf_and_eps_zero_finds_nothing(model_and_images):
    model, x, y = model_and_images
    attack = member("apgd_ce_linf")
    for epsilons in ([1e-6], [0.0]):
        distances = attack.distances(model, x, y, epsilons, batch_size=100)
        assert distances["linf"][:3].tolist() == [0.0, 0.0, 0.0]
        assert distances["linf"][3:].isinf().all() and distances["l2"][3:].isinf().all()


def test_distance_is_the_adversarial_at_the_smallest_successful_eps(model_and_images):
    # FAB-T with one restart has no random start: it gives each image the same result in any batch.
    model, x, y = model_and_images
    attack = member("fab_t_l2")
    epsilons = [0.5, 1.0, 2.0]
    combined = attack.distances(model, x, y, [2.0, 0.5, 1.0], batch_size=10)  # any order
    alone = {eps: attack.distances(model, x, y, [eps], batch_size=10) for eps in epsilons}
    for i in range(3, len(x)):
        succeeded = [eps for eps in epsilons if alone[eps]["l2"][i].isfinite()]
        expected = alone[succeeded[0]] if succeeded else alone[epsilons[-1]]
        for norm in NORMS:
            assert combined[norm][i].item() == pytest.approx(expected[norm][i].item(), rel=1e-4), (i, norm)


@pytest.mark.parametrize("norm", NORMS)
def test_the_ensemble_breaks_every_image_any_member_breaks(norm, model_and_images, tmp_path):
    model, x, y = model_and_images
    data = replace(mnist5k(train_subset=100, val_size=0), test_x=x, test_y=y)
    shrink = [f"attack.methods.{name}_{norm}.{key}={value}" for name in ("apgd_ce", "apgd_t", "fab_t")
              for key, value in FAST[name].items()]
    cfg = compose_config(f"attack=autoattack_fast_{norm}", *shrink, "eval.bounds=false")
    metrics = build_evaluation(cfg)(model, data, RunFolder(tmp_path))
    names = [f"{name}_{norm}" for name in ("apgd_ce", "apgd_t", "fab_t")]
    for eps in cfg.attack.epsilons[norm]:
        best = metrics[metric_keys.robust_error(metric_keys.BEST_ATTACK, norm, eps)]
        members = [metrics[metric_keys.robust_error(name, norm, eps)] for name in names]
        assert best >= max(members) and best >= 100 * 3 / len(y)  # at least the misclassified
    assert metrics[metric_keys.robust_error(metric_keys.BEST_ATTACK, norm, max(cfg.attack.epsilons[norm]))] > 50


@pytest.fixture(scope="module")
def trained_model_and_test_images(model_and_images):
    """The fixture's model on 100 test images (finer than its 24 for a 1-point comparison)."""
    model, _, _ = model_and_images
    digits = mnist5k(train_subset=100, val_size=0)
    return model, digits.test_x[:100], digits.test_y[:100]


def test_apgd_ce_finds_at_least_as_many_adversarials_as_foolbox_pgd_50(trained_model_and_test_images):
    model, x, y = trained_model_and_test_images
    epsilons = [0.5, 1.0, 1.5, 2.0]
    torch.manual_seed(0)
    pgd = attacks.pgd_l2(steps=50).distances(model, x, y, epsilons, batch_size=100)["l2"]
    apgd = autoattack.apgd_ce("l2").distances(model, x, y, epsilons, batch_size=100)["l2"]
    for eps in epsilons:
        within = eps * (1 + 1e-5)  # both project onto the ε-ball in float32
        pgd_error, apgd_error = (100 * (d <= within).double().mean().item() for d in (pgd, apgd))
        assert apgd_error >= pgd_error - 1.0, (eps, apgd_error, pgd_error)


def test_the_standard_options_compose_with_the_reference_settings():
    cfg = compose_config("attack=[autoattack_l2,autoattack_linf]", "attack.n=500")
    assert cfg.attack.n == 500
    assert list(cfg.attack.methods) == [f"{name}_{norm}" for norm in NORMS for name in FACTORIES]
    for norm in NORMS:
        methods = cfg.attack.methods
        assert all(methods[f"{name}_{norm}"].norm == norm for name in FACTORIES)
        assert methods[f"apgd_ce_{norm}"].n_iter == methods[f"apgd_t_{norm}"].n_iter == 100
        assert methods[f"fab_t_{norm}"].n_iter == 100
        assert methods[f"apgd_t_{norm}"].n_target_classes == methods[f"fab_t_{norm}"].n_target_classes == 9
        assert methods[f"square_{norm}"].n_queries == 5000
        assert all(methods[f"{name}_{norm}"].n_restarts == 1 for name in FACTORIES)
    evaluation = build_evaluation(cfg)  # cheap: builds the members, runs nothing
    assert {name: a.norm for name, a in evaluation.attacks.items()} == \
        {f"{name}_{norm}": norm for norm in NORMS for name in FACTORIES}
    fast = compose_config("attack=autoattack_fast_l2").attack.methods
    assert list(fast) == ["apgd_ce_l2", "apgd_t_l2", "fab_t_l2"]  # no Square
    assert all(fast[name].n_iter == 20 for name in fast)


@pytest.mark.parametrize("override, message", [
    ("attack.methods.apgd_ce_l2.norm=l1", r"^attack\.methods\.apgd_ce_l2\.norm='l1' is invalid: expected l2 \| linf"),
    ("attack.methods.apgd_t_l2.n_iter=0", r"^attack\.methods\.apgd_t_l2\.n_iter=0 is invalid"),
    ("attack.methods.fab_t_l2.n_target_classes=-1", r"^attack\.methods\.fab_t_l2\.n_target_classes=-1 is invalid"),
    ("attack.methods.square_l2.n_queries=0", r"^attack\.methods\.square_l2\.n_queries=0 is invalid"),
    ("attack.methods.apgd_ce_l2.n_restarts=1.5", r"^attack\.methods\.apgd_ce_l2\.n_restarts=1\.5 is invalid"),
])
def test_a_bad_value_fails_before_training_naming_the_key(override, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        run(compose_config("attack=autoattack_l2", override), tmp_path)
    assert not RunFolder(tmp_path).checkpoint("last").exists()  # no epoch was trained
