"""GloRo certified training: the ⊥-augmented loss as defined, a differentiable K₋ that converges to the
layers' true norms, state that resumes exactly, and clear errors for models it cannot certify."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import SHRINK, build_model_option, compose_config, dense_matrix
from tulip.train.gloro import PowerIterationNorms, certifiable_layers
from tulip.main import run
from tulip.train.loss import build_loss

SMALL_4C3F = SHRINK["cnn_4c3f"]


def dense_operator_norm(layer, shape) -> float:
    """Exact spectral norm of a conv/linear layer's linear part on inputs of `shape` (1, ...)."""
    matrix = dense_matrix(lambda v: PowerIterationNorms._apply(layer.double(), v), shape[1:])
    layer.float()
    return torch.linalg.matrix_norm(matrix, ord=2).item()


def test_layer_norms_converge_to_the_exact_operator_norms():
    torch.manual_seed(0)
    model = build_model_option("cnn_4c3f", SMALL_4C3F, size=12)
    body, head = certifiable_layers(model)
    assert head is model.classifier and len(body) == 6  # 4 convs (two of stride 2), 2 dense layers
    norms = PowerIterationNorms(body, model.input_shape)
    norms.iterate(300)
    exact = [dense_operator_norm(layer, shape) for layer, shape in zip(body, norms.shapes)]
    estimated = [PowerIterationNorms._apply(layer, v).norm().item() for layer, v in zip(body, norms.vectors)]
    assert estimated == pytest.approx(exact, rel=1e-3)
    assert norms.product().item() == pytest.approx(math.prod(exact), rel=1e-2)
    assert norms.product().requires_grad  # it trains the weights


def test_penalty_is_the_extra_loss_of_the_bot_augmented_logits():
    torch.manual_seed(0)
    model = build_model_option("cnn_4c3f", SMALL_4C3F)
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    loss_fn = build_loss(compose_config("regularizer=gloro", "reg.gloro=0.5", tiny=False).reg, model)
    out = loss_fn(model, x, y)
    penalty = dict(loss_fn.penalties)["train/penalty_gloro"]
    # the reference, written out: ⊥ = max over i ≠ predicted j of f_i + ε K₋ ‖w_i − w_j‖
    logits, w = model(x), model.classifier.weight
    k = penalty.norms.product()
    j = logits.argmax(1)
    bot = torch.stack([max(logits[b, i] + 0.5 * k * (w[i] - w[j[b]]).norm() for i in range(10) if i != j[b])
                       for b in range(16)])
    expected = F.cross_entropy(torch.cat([logits, bot[:, None]], 1), y)
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.logs["train/penalty_gloro"], (expected - F.cross_entropy(logits, y)).detach(),
                               rtol=1e-4, atol=1e-6)
    assert out.logs["train/penalty_gloro"] > 0
    grads = torch.autograd.grad(out.loss, [model.conv0.conv.weight, model.classifier.weight])
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_zero_radius_is_plain_cross_entropy_and_combines_with_other_penalties():
    model = build_model_option("cnn_4c3f", SMALL_4C3F)
    off = build_loss(compose_config("regularizer=gloro", "reg.gloro=0", tiny=False).reg, model)
    assert off.penalties == []
    both = build_loss(compose_config("regularizer=[gloro,lip]", "reg.decay=1e-4", tiny=False).reg, model)
    assert [name for name, _ in both.penalties] == ["train/penalty_lip", "train/penalty_decay",
                                                    "train/penalty_gloro"]


@pytest.mark.parametrize("overrides, message", [
    (["regularizer=gloro", "reg.gloro=-0.1"], r"reg\.gloro=-0\.1 is invalid"),
    (["regularizer=gloro"], r"reg\.gloro=0\.3 is invalid: expected a model that is a chain .* CNNSmall contains ConvBN"),
    (["regularizer=gloro", "model=cnn_4c3f", "model.tanh=true"], r"reg\.gloro=0\.3 is invalid: .*BoundedHead"),
])
def test_a_model_or_radius_it_cannot_certify_fails_before_training(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        run(compose_config(*overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"
