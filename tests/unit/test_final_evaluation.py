"""The final evaluation (tulip.evaluate.final) without a trained run: its config checks, the default attack,
an evaluation with nothing configured, and the second-order estimate of a smooth model. On a trained run:
tests/integration/test_evaluate.py."""
import pytest
import torch

from conftest import compose_config
from tulip.config import ConfigError
from tulip.data import load_dataset
from tulip.evaluate.final import build_evaluation, evaluate_bounds
from tulip.runs.folder import RunFolder


def test_second_order_estimate_for_a_smooth_model():
    """Linear layer + bounded tanh head: smooth, so the second-order estimate is reported; with the
    largest Hessian norm C > 0 it is below the image's own first-order radius (−ℓ)₊/‖∇ℓ‖."""
    from tulip.evaluate import bounds
    from tulip.nn.models import MLP

    torch.manual_seed(0)
    model = MLP(1, 10, 28, hidden=[], tanh=True).eval()
    x, y = torch.rand(16, 1, 28, 28), torch.arange(16) % 10
    metrics, columns = evaluate_bounds(model, x, y, batch_size=16, epsilons_l2=[0.5, 1.0])
    assert metrics["bounds/hessian_norm_max"] > 0
    grads = bounds.loss_gradients(model, x, y, 16)
    own_first_order = (-grads.loss).clamp_min(0) / grads.grad_norm
    second = torch.tensor(columns["second_order_l2"])
    assert (second <= own_first_order + 1e-6).all() and (second > 0).any()
    assert metrics["bounds/second_order_median"] == pytest.approx(second.median().item())


def test_nothing_configured_returns_nothing_and_writes_nothing(tmp_path):
    cfg = compose_config("eval.bounds=false")  # and attack=none, eval.nn=false
    evaluation = build_evaluation(cfg)
    assert evaluation.families == ()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    assert evaluation(model, load_dataset(cfg.dataset, torch.device("cpu")), RunFolder(tmp_path)) == {}
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("override, key", [
    ("attack.n=0", "attack.n"),
    ("attack.batch_size=0", "attack.batch_size"),
    ("attack.epsilons.l2=[]", "attack.epsilons.l2"),
    ("attack.epsilons.linf=[-0.1]", "attack.epsilons.linf"),
    ("+attack.methods.ddn.stepz=3", "attack.methods.ddn"),
    ("attack.methods.ddn.steps=nan", "attack.methods.ddn.steps=nan"),
    ("attack.methods.ddn.steps=-1", "attack.methods.ddn.steps=-1"),
    ("attack.methods.ddn.gamma=inf", "attack.methods.ddn.gamma=inf"),
    ("+attack.methods.typo=3", "attack.methods.typo"),
    ("+attack.typo=3", "attack.typo"),
    ("eval.nn=maybe", "eval.nn"),
    ("eval.bounds=1", "eval.bounds"),
])
def test_bad_attack_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build_evaluation(compose_config("attack=ddn", override))


def test_default_attack_option_is_a_quick_ddn():
    cfg = compose_config("attack=default")
    assert cfg.attack.n == 200 and cfg.attack.methods.ddn._target_ == "tulip.evaluate.attacks.ddn"
    assert set(build_evaluation(cfg).attacks) == {"ddn"}
    assert build_evaluation(compose_config("attack=none")).attacks == {}
