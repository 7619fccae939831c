"""Foolbox attack wrappers: distances are real adversarial norms, 0 for misclassified, +inf on failure."""
import inspect

import foolbox
import pytest
import torch
from hydra.utils import get_method, instantiate

from support.attacks import ATTACK_NAMES, attack_config
from tulip.evaluate import attacks
from tulip.evaluate.attacks import attack_distances, perturbation_norms
from tulip.runs.metric_keys import NORMS

# Small step counts: these tests check the plumbing, not attack strength.
FAST = {"pgd_linf": {"steps": 10, "rel_stepsize": 0.2}, "pgd_l2": {"steps": 10, "rel_stepsize": 0.2},
        "ddn": {"steps": 20}, "cw_l2": {"binary_search_steps": 3, "steps": 20, "stepsize": 0.05},
        "deepfool_l2": {"steps": 10}, "deepfool_linf": {"steps": 10}, "fmn_l2": {"steps": 20},
        "fmn_linf": {"steps": 20}, "boundary": {"steps": 50}, "fgsm": {}}
EPSILONS = {"l2": [0.5, 1.0, 2.0, 4.0], "linf": [0.05, 0.1, 0.3, 0.6]}


def test_attack_options_are_the_documented_ten():
    assert set(ATTACK_NAMES) == {"fgsm", "pgd_linf", "pgd_l2", "ddn", "cw_l2", "deepfool_l2",
                                 "deepfool_linf", "fmn_l2", "fmn_linf", "boundary"}


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_yaml_lists_every_parameter_with_the_documented_default(name):
    cfg = attack_config(name)
    factory = get_method(cfg.pop("_target_"))
    assert factory.__name__ == name
    signature = inspect.signature(factory)
    assert set(cfg) == set(signature.parameters), "every parameter overridable as attack.<name>.<key>"
    for key, value in cfg.items():
        assert value == pytest.approx(signature.parameters[key].default), key
    assert "arXiv" in factory.__doc__ and "Default" in factory.__doc__  # paper and defaults named


@pytest.mark.parametrize("name", ATTACK_NAMES)
def test_distances_are_real_adversarial_norms(name, model_and_images):
    model, x, y = model_and_images
    cfg = attack_config(name) | FAST[name]
    attack = instantiate(cfg)
    epsilons = EPSILONS[attack.norm]
    distances = attack_distances(attack, model, x, y, epsilons, batch_size=10)
    for norm in NORMS:
        assert distances[norm].shape == (len(x),)
        assert distances[norm][:3].tolist() == [0.0, 0.0, 0.0]  # already misclassified
        assert (distances[norm][3:] > 0).all()  # never 0 for a correctly classified image
    native = distances[attack.norm]
    assert native[3:].isfinite().sum() >= 10, native  # the attack works on most images
    assert (native.isinf() == distances["l2"].isinf()).all()  # failure is norm-independent
    if isinstance(attack, attacks.FixedEpsilonAttack):
        assert (native[native.isfinite()] <= max(epsilons) * (1 + 1e-5)).all()
    # The adversarials behind the distances: misclassified, and at exactly those norms.
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
    torch.manual_seed(0)
    adversarial, success = attack.adversarials(fmodel, x[3:], y[3:], epsilons)
    assert (model(adversarial[success]).argmax(1) != y[3:][success]).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    if name in {"deepfool_l2", "deepfool_linf", "fgsm"}:  # deterministic: same result again
        norms = perturbation_norms(adversarial - x[3:])
        for norm in NORMS:
            expected = torch.where(success, norms[norm], torch.inf)
            torch.testing.assert_close(distances[norm][3:], expected, rtol=1e-3, atol=1e-6)


def test_failure_is_inf_not_zero(model_and_images):
    model, x, y = model_and_images
    distances = attack_distances(attacks.fgsm(), model, x, y, [1e-6], batch_size=100)
    assert distances["linf"][:3].tolist() == [0.0, 0.0, 0.0]
    assert distances["linf"][3:].isinf().all() and distances["l2"][3:].isinf().all()


def test_fixed_epsilon_distance_is_the_adversarial_at_the_smallest_successful_eps(model_and_images):
    model, x, y = model_and_images
    epsilons = [0.02, 0.05, 0.1, 0.2]
    shuffled = [0.1, 0.02, 0.2, 0.05]  # the order given does not matter
    distances = attack_distances(attacks.fgsm(), model, x, y, shuffled, batch_size=100)["linf"]
    fmodel = foolbox.PyTorchModel(model, bounds=(0, 1))
    _, _, success = foolbox.attacks.LinfFastGradientAttack()(fmodel, x[3:], y[3:], epsilons=epsilons)
    for i in range(len(x) - 3):
        succeeded = [eps for eps, ok in zip(epsilons, success[:, i]) if ok]
        if succeeded:  # FGSM moves every pixel by eps (less only where clipped at 0 or 1)
            assert distances[3 + i].item() == pytest.approx(succeeded[0], rel=1e-5)
        else:
            assert distances[3 + i].item() == float("inf")


def test_batched_equals_one_image_per_call(model_and_images):
    model, x, y = model_and_images
    attack = attacks.deepfool_l2(steps=10)  # deterministic
    batched = attack_distances(attack, model, x, y, [], batch_size=len(x))
    single = attack_distances(attack, model, x, y, [], batch_size=1)
    for norm in NORMS:
        torch.testing.assert_close(batched[norm], single[norm], rtol=1e-3, atol=1e-6)


def test_bad_norm_is_rejected():
    with pytest.raises(ValueError, match="norm"):
        attacks.FoolboxAttack(foolbox.attacks.DDNAttack(), "l1")
