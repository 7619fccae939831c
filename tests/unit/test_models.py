"""Every model option composes from the real Hydra config, trains, and linearizes to an affine map."""
import pytest
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException

from conftest import CONF_DIR, SHRINK, build_model_option, compose_config
from tulip.nn.models import Classifier, Nonlinearity, linearized

MODELS = ["mlp", "cnn_small", "cnn_4c3f", "aol_4c3f", "sll", "allcnn", "resnet18", "wide_resnet", "resnext34_2x32"]
SHAPES = {"mnist5k": (1, 28, 28, 10), "cifar": (3, 32, 32, 10)}


def build(name, overrides=(), shape=SHAPES["mnist5k"]):
    channels, size, _, classes = shape
    return build_model_option(name, overrides, channels, size, classes)


def test_every_model_option_is_shipped_with_target_and_tanh_off():
    assert sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml")) == sorted(MODELS)
    for name in MODELS:
        cfg = compose_config(f"model={name}", tiny=False)
        assert cfg.model._target_.startswith(("tulip.nn.models.", "tulip.nn.one_lipschitz."))
        assert cfg.model.tanh is False


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("name", MODELS)
def test_model_forward_backward(name, shape):
    torch.manual_seed(0)
    model = build(name, SHRINK[name], shape)
    assert isinstance(model, Classifier) and model.tanh_scale is None
    x = torch.rand(4, *shape[:3])
    logits = model(x)
    assert logits.shape == (4, shape[3])
    F.cross_entropy(logits, torch.arange(4)).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_bounded_head(name):
    torch.manual_seed(0)
    model = build(name, [*SHRINK[name], "model.tanh=true"])
    assert model.tanh_scale is not None and model.tanh_scale.item() == 1.0
    logits = model(torch.rand(8, 1, 28, 28))
    # t*tanh(z/|t|) with t = 1 lies strictly inside (-1, 1)
    assert logits.abs().max() < 1
    F.cross_entropy(logits, torch.arange(8) % 10).backward()
    assert model.tanh_scale.grad is not None and model.tanh_scale.grad != 0
    model.eval()
    with torch.no_grad():
        model.tanh_scale.fill_(-2.0)
        bounded = model(torch.rand(8, 1, 28, 28))
    assert bounded.abs().max() < 2


def test_full_size_parameter_counts():
    """The default configs are the published architectures (counts of the CIFAR-10 versions)."""
    count = lambda m: sum(p.numel() for p in m.parameters())
    cifar = SHAPES["cifar"]
    # kuangliu/pytorch-cifar ResNet18: 11,173,962 parameters
    assert count(build("resnet18", shape=cifar)) == 11_173_962
    # WRN-28-10: 36.5M in Zagoruyko & Komodakis (ours: BN after instead of before each conv)
    assert abs(count(build("wide_resnet", shape=cifar)) - 36.5e6) < 0.1e6
    resnext = build("resnext34_2x32", shape=cifar)
    convs = [m for m in resnext.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in resnext.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs) + len(linears) == 34
    assert sum(c.groups == 2 for c in convs) == 15
    # GloRo's 4C3F on MNIST ('same' padding, no BatchNorm): 4 convs, 3 dense layers
    four_c_three_f = build("cnn_4c3f")
    assert count(four_c_three_f) == 1_974_762
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in four_c_three_f.modules())


def test_bad_hyperparameters_name_the_key():
    # Hydra wraps the model's ValueError in an InstantiationException carrying its message
    with pytest.raises(InstantiationException, match="model.depth"):
        build("wide_resnet", ["model.depth=12"])
    with pytest.raises(InstantiationException, match="model.channels"):
        build("cnn_small", ["model.channels=[4,0]"])


def trained(name, overrides=(), steps=3):
    """A shrunk model after a few SGD steps, so BatchNorm statistics and weights are nontrivial."""
    torch.manual_seed(0)
    model = build(name, [*SHRINK[name], *overrides])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        x = torch.rand(16, 1, 28, 28)
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (16,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("tanh", [False, True])
@pytest.mark.parametrize("name", MODELS)
def test_linearized_is_affine_and_restored(name, tanh):
    model = trained(name, [f"model.tanh={str(tanh).lower()}"])
    if tanh:
        with torch.no_grad():
            model.tanh_scale.fill_(-0.5)  # the linearization is sign(t) * z
    model.train()
    x1, x2, x3 = torch.rand(3, 5, 1, 28, 28, dtype=torch.float64)
    model.double()
    with torch.no_grad():
        model.eval()
        nonlinear = model(x1)
        model.train()
        state = {k: v.clone() for k, v in model.state_dict().items()}
        with linearized(model) as linear:
            assert not model.training and not any(m.training for m in model.modules())
            f1, f2, f3 = linear(x1), linear(x2), linear(x3)
            # affine: f(a x1 + b x2 + c x3) = a f1 + b f2 + c f3 whenever a + b + c = 1
            combined = linear(0.3 * x1 + 1.5 * x2 - 0.8 * x3)
            torch.testing.assert_close(combined, 0.3 * f1 + 1.5 * f2 - 0.8 * f3, rtol=1e-9, atol=1e-9)
        assert not torch.allclose(f1, nonlinear)  # the nonlinearities really were switched off
        # restored: train mode everywhere, nonlinear again, nothing learned or tracked meanwhile
        assert all(m.training for m in model.modules())
        assert not any(m.linear for m in model.modules() if isinstance(m, Nonlinearity))
        for key, value in model.state_dict().items():
            assert torch.equal(value, state[key]), key
        model.eval()
        torch.testing.assert_close(model(x1), nonlinear)


def test_linearized_restores_after_error():
    model = trained("cnn_small")
    model.train()
    with pytest.raises(RuntimeError, match="boom"):
        with linearized(model):
            raise RuntimeError("boom")
    assert model.training
    assert not any(m.linear for m in model.modules() if isinstance(m, Nonlinearity))
