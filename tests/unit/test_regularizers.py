"""Training objectives (tulip.train.regularizers) composed from the real Hydra config: exact penalties, limits,
eval-mode perturbations, bad input, and the benchmarks' twins. Training with each option on mnist5k is
tests/integration/test_regularizers_training.py."""
import copy
import inspect
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra.utils import get_class
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_config as compose_run_config
from tulip.schema import ConfigError
from tulip.train.loss import build_loss
from tulip.nn.perturbations import frozen_eval, l2_direction, loss_input_grad, pgd_l2, pgd_linf
from tulip.train import regularizers

OPTIONS = sorted(p.stem for p in (CONF_DIR / "regularizer").glob("*.yaml") if not p.stem.startswith("_"))


def compose_config(*overrides):
    return compose_run_config(*overrides, tiny=False)


def loss_fn(**reg):
    """The training loss of the real config with these reg.* values: loss_fn(lip=0.3, pgd={"eps": 0.1})."""
    overrides = []
    for key, value in reg.items():
        for sub, v in (value.items() if isinstance(value, dict) else [("", value)]):
            overrides.append(f"reg.{key}{'.' if sub else ''}{sub}={'inf' if v == math.inf else v}")
    return build_loss(compose_config(*overrides).reg)


def small_cnn(num_classes=10, batch_norm=True):
    """A dummy MNIST-shaped CNN with BatchNorm (RobustBench-style test model); without it, certifiable."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2), nn.BatchNorm2d(4) if batch_norm else nn.Identity(),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 13 * 13, num_classes))


# Options that train through a certificate need a model without BatchNorm.
CERTIFIED_TRAINING = {"gloro", "gloro_trades", "margin"}


def smooth_mlp(dtype=torch.float64):
    """A tiny smooth model (no batch statistics), for gradchecks and first-order limits."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def mnist_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def smooth_batch(n=5):
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 4, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def single_sample_grads(model, x, y):
    """The reference: g_i from a loop of single-sample backward passes."""
    grads = []
    for i in range(len(x)):
        xi = x[i:i + 1].clone().requires_grad_(True)
        grads.append(torch.autograd.grad(F.cross_entropy(model(xi), y[i:i + 1]), xi)[0])
    return torch.cat(grads)


def norms(v, p):
    return torch.linalg.vector_norm(v.flatten(1), ord=p, dim=1)


# ---------------------------------------------------------------------------------------------------
# Exact penalties

@pytest.mark.parametrize("p", [2, 1, math.inf])
def test_lip_penalty_equals_loop_of_single_sample_gradients(p):
    torch.manual_seed(0)
    model, (x, y) = small_cnn().double().eval(), mnist_batch()
    x = x.double()
    out = loss_fn(lip=0.3, lip_norm=p)(model, x, y)
    expected = 0.3 * norms(single_sample_grads(model, x, y), p).max()
    torch.testing.assert_close(out.logs["train/penalty_lip"], expected)
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x), y) + expected)
    assert not out.logs["train/penalty_lip"].requires_grad


@pytest.mark.parametrize("p", [2, 1, math.inf])
def test_lip_penalty_gradient_wrt_weights_passes_gradcheck(p):
    """The penalty is a function of the weights through ∇_x ℓ (double backprop): gradcheck it."""
    model, (x, y) = smooth_mlp(), smooth_batch()
    names = [n for n, _ in model.named_parameters()]
    built = loss_fn(lip=1.0, lip_norm=p)

    class Functional(nn.Module):  # the model, with the weights gradcheck perturbs
        def forward(self, z):
            return torch.func.functional_call(model, self.params, (z,))

    def penalty(*weights):
        f = Functional()
        f.params = dict(zip(names, weights))
        return built(f, x, y).loss - F.cross_entropy(f(x), y)

    weights = tuple(w.detach().clone().requires_grad_(True) for w in model.parameters())
    assert torch.autograd.gradcheck(penalty, weights, fast_mode=True)


def test_lip_is_evaluated_on_the_batch_actually_trained_on():
    torch.manual_seed(0)
    model, (x, y) = small_cnn().double().eval(), mnist_batch()
    x = x.double()
    out = loss_fn(lip=1.0, J2=0.5)(model, x, y)
    x_train = x + 0.5 * l2_direction(loss_input_grad(model, x, y))
    torch.testing.assert_close(out.logits, model(x_train))
    expected = norms(single_sample_grads(model, x_train, y), 2).max()
    torch.testing.assert_close(out.logs["train/penalty_lip"], expected)


def test_gradnorm_is_exact_half_mean_squared_norm():
    torch.manual_seed(0)
    model, (x, y) = small_cnn().double().eval(), mnist_batch()
    x = x.double()
    out = loss_fn(gradnorm=0.2)(model, x, y)
    expected = 0.2 * norms(single_sample_grads(model, x, y), 2).square().mean() / 2
    torch.testing.assert_close(out.logs["train/penalty_gradnorm"], expected)


def test_decay_covers_weights_not_biases_nor_batchnorm():
    model, (x, y) = small_cnn(), mnist_batch()
    with torch.no_grad():
        model[1].weight.fill_(3.0)  # BatchNorm scale: must not count
    out = loss_fn(decay=0.5)(model, x, y)
    expected = 0.5 * (model[0].weight.square().sum() + model[4].weight.square().sum())
    torch.testing.assert_close(out.logs["train/penalty_decay"], expected.detach())
    plain = F.cross_entropy(model(x), y)
    untouched = [model[0].bias, model[1].weight, model[1].bias, model[4].bias]
    with_decay, without = torch.autograd.grad(out.loss, untouched), torch.autograd.grad(plain, untouched)
    for a, b in zip(with_decay, without):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------------
# First-order limits

@pytest.mark.parametrize("key, p, scale", [("J1", 1, 1 / 4), ("J2", 2, 1.0), ("Jinf", math.inf, 1.0)])
def test_perturbed_loss_tends_to_gradient_norm(key, p, scale):
    """(ℓ(x + εv) − ℓ(x))/ε → ‖g‖₁/√N, ‖g‖₂, ‖g‖∞ (N = 16 here, √N = 4), error O(ε)."""
    model, (x, y) = smooth_mlp(), smooth_batch()
    clean = F.cross_entropy(model(x), y)
    limit = scale * norms(single_sample_grads(model, x, y), p).mean()
    errors = []
    for eps in (1e-2, 1e-3, 1e-4):
        slope = (loss_fn(**{key: eps})(model, x, y).loss - clean) / eps
        errors.append(abs(slope.item() - limit.item()) / limit.item())
    assert errors[-1] < 1e-3
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("fd_order", [1, 2])
def test_gradnorm_fd_tends_to_gradnorm(fd_order):
    model, (x, y) = smooth_mlp(), smooth_batch()
    exact = loss_fn(gradnorm=1.0)(model, x, y)
    exact_grads = torch.autograd.grad(exact.loss, list(model.parameters()))
    errors = []
    for h in (1e-2, 1e-3, 1e-4):
        fd = loss_fn(gradnorm_fd=1.0, h=h, fd_order=fd_order)(model, x, y)
        fd_grads = torch.autograd.grad(fd.loss, list(model.parameters()))
        rel = (fd.logs["train/penalty_gradnorm_fd"] / exact.logs["train/penalty_gradnorm"] - 1).abs()
        grad_rel = max(((a - b).norm() / b.norm()).item() for a, b in zip(fd_grads, exact_grads))
        errors.append(max(rel.item(), grad_rel))
    assert errors[-1] < 1e-3
    assert errors[0] > errors[1] > errors[2]


@pytest.mark.parametrize("fd_norm, p, scale", [(1, 1, 1 / 4), (math.inf, math.inf, 1.0)])
def test_gradnorm_fd_direction_picks_the_norm(fd_norm, p, scale):
    model, (x, y) = smooth_mlp(), smooth_batch()
    out = loss_fn(gradnorm_fd=1.0, h=1e-5, fd_order=2, fd_norm=fd_norm)(model, x, y)
    expected = (scale * norms(single_sample_grads(model, x, y), p)).square().mean() / 2
    torch.testing.assert_close(out.logs["train/penalty_gradnorm_fd"], expected, rtol=1e-6, atol=0)


# ---------------------------------------------------------------------------------------------------
# Perturbations: eval mode, frozen weights, no clamping; PGD trains on the adversarial batch

@pytest.mark.parametrize("key", ["J1", "J2", "Jinf"])
def test_one_step_perturbation_uses_eval_mode_and_is_not_clamped(key):
    torch.manual_seed(0)
    model, (x, y) = small_cnn().train(), mnist_batch()
    model(x)  # give BatchNorm running statistics that differ from this batch's
    x = torch.ones_like(x)  # every entry at the top of [0, 1]
    built = loss_fn(**{key: 5.0})
    with frozen_eval(model):
        g = loss_input_grad(model, x, y)
    before = model[1].num_batches_tracked.clone()
    x_train, _ = built.batch(model, x, y)
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert model[1].num_batches_tracked == before  # no train-mode forward pass
    direction = {"J1": torch.sign, "J2": lambda v: v, "Jinf": lambda v: v}[key]
    assert (direction(x_train - x).flatten(1) * g.flatten(1)).sum(1).gt(0).all()  # ascent along g
    if key == "J1":  # 5/√784 in every entry the loss depends on (the stride-2 conv skips the last row)
        step = (x_train - x).abs()
        assert (torch.isclose(step, torch.tensor(5.0 / 28)) | (step == 0)).all() and (step > 0).any()
    else:
        torch.testing.assert_close(norms(x_train - x, 2), torch.full((len(x),), 5.0))
    assert x_train.max() > 1  # no clamping
    if key == "J2":
        torch.testing.assert_close(x_train, x + 5.0 * l2_direction(g))


def test_pgd_trains_on_the_adversarial_batch_only():
    torch.manual_seed(0)
    model, (x, y) = small_cnn().double().train(), mnist_batch()
    x = x.double()
    built = loss_fn(pgd=dict(eps=0.1, steps=3, step_size=0.05, random_start=False))
    with frozen_eval(model):  # before the objective's train-mode pass moves the running statistics
        x_adv = pgd_linf(lambda z: F.cross_entropy(model(z), y, reduction="none"), x, eps=0.1, steps=3,
                         step_size=0.05, random_start=False)
    out = built(model, x, y)
    torch.testing.assert_close(out.logits, model(x_adv))  # train mode: same batch, same statistics
    torch.testing.assert_close(out.loss, F.cross_entropy(model(x_adv), y))
    assert not torch.allclose(x_adv, x)


def test_trades_matches_the_reference_training_step():
    """TRADES' own order: x′ in eval mode first, then CE(f(x)) + β·KL(f(x) ‖ f(x′)) in train mode."""
    torch.manual_seed(0)
    model, (x, y) = small_cnn().double(), mnist_batch()
    reference = copy.deepcopy(model)
    x = x.double()
    torch.manual_seed(1)
    out = loss_fn(trades=dict(beta=6.0, eps=0.2, steps=5, step_size=0.05))(model, x, y)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))

    torch.manual_seed(1)
    reference.eval()
    with torch.no_grad():
        p_clean = F.softmax(reference(x), 1)
    x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0, 1)  # Tulip's PGD starts inside [0, 1]
    for _ in range(5):
        x_adv.requires_grad_(True)
        kl = F.kl_div(F.log_softmax(reference(x_adv), 1), p_clean, reduction="sum")
        x_adv = x_adv.detach() + 0.05 * torch.autograd.grad(kl, x_adv)[0].sign()
        x_adv = torch.min(torch.max(x_adv, x - 0.2), x + 0.2).clamp(0, 1)
    reference.train()
    logits = reference(x)
    robust = 6.0 * F.kl_div(F.log_softmax(reference(x_adv), 1), F.softmax(logits, 1), reduction="batchmean")
    loss = F.cross_entropy(logits, y) + robust
    torch.testing.assert_close(out.loss, loss)
    torch.testing.assert_close(out.logs["train/penalty_trades"], robust.detach())
    torch.testing.assert_close(out.logits, logits)  # the clean batch is the one trained on
    for mine, theirs in zip(grads, torch.autograd.grad(loss, list(reference.parameters()))):
        torch.testing.assert_close(mine, theirs)
    assert robust > 0


def test_trades_l2_adversary_is_l2_pgd_on_the_kl_divergence():
    """reg.trades.norm=2: x′ is L2 PGD on KL(f(x) ‖ f(x′)) from x + 0.001·N(0, 1), inside the L2 ball of ε."""
    torch.manual_seed(0)
    model, (x, y) = small_cnn().double().train(), mnist_batch()
    x = x.double()
    torch.manual_seed(1)
    x_clean, x_adv = loss_fn(trades=dict(beta=1.0, eps=1.5, steps=4, step_size=0.5, norm=2)).batch(model, x, y)
    torch.manual_seed(1)
    with frozen_eval(model):
        p_clean = F.softmax(model(x), 1)
        expected = pgd_l2(lambda z: F.kl_div(F.log_softmax(model(z), 1), p_clean, reduction="none").sum(1), x,
                          eps=1.5, steps=4, step_size=0.5, start=x + 0.001 * torch.randn_like(x))
    assert x_clean is x
    torch.testing.assert_close(x_adv, expected)
    assert norms(x_adv - x, 2).max() <= 1.5 + 1e-9 and (x_adv - x).abs().max() > 0.031  # beyond L∞'s default


# ---------------------------------------------------------------------------------------------------
# The real Hydra config: every option composes and trains; overrides; bad input

def test_every_option_sets_every_key_with_the_none_defaults():
    base = compose_config().reg
    for name in OPTIONS:
        reg = compose_config(f"regularizer={name}").reg
        assert set(reg) == set(base), name
        assert set(reg.pgd) == set(base.pgd) and set(reg.trades) == set(base.trades), name
        assert reg.decay == 0 and reg.lip_norm == 2, name
        assert (reg.lip > 0) == name.startswith("lip"), name


def test_part_defaults_match_the_flat_defaults():
    """A part built directly (Python) behaves as the config's default: every argument that reads a flat
    reg.* key defaults to that key's value in _base.yaml."""
    reg = compose_config("regularizer=none").reg
    checked = 0
    for group in ("batches", "penalties"):
        for name, node in reg[group].items():
            signature = inspect.signature(get_class(node._target_)).parameters
            raw = OmegaConf.to_container(node, resolve=False)
            for argument, value in node.items():
                if argument != "_target_" and str(raw[argument]).startswith("${reg."):
                    assert signature[argument].default == pytest.approx(value), f"reg.{group}.{name}.{argument}"
                    checked += 1
    assert checked >= 15


def test_options_combine_like_their_plus_files():
    for name in [o for o in OPTIONS if "+" in o]:
        listed = compose_config(f"regularizer=[{name.replace('+', ',')}]").reg
        assert OmegaConf.to_container(listed) == OmegaConf.to_container(compose_config(f"regularizer={name}").reg)


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_composes_and_trains_without_nan(name):
    torch.manual_seed(0)
    built = build_loss(compose_config(f"regularizer={name}", "reg.decay=1e-4").reg)
    model, (x, y) = small_cnn(batch_norm=name not in CERTIFIED_TRAINING), mnist_batch(16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    start = [p.detach().clone() for p in model.parameters()]
    for _ in range(3):
        model.train()
        out = built(model, x, y)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        assert torch.isfinite(out.loss) and out.logits.shape == (16, 10)
        assert all(torch.isfinite(v) and not v.requires_grad for v in out.logs.values())
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(not torch.equal(a, b) for a, b in zip(start, model.parameters()))
    expected = {"train/penalty_decay"}
    expected |= {f"train/penalty_{k}" for k in ("lip", "gradnorm", "gradnorm_fd", "trades", "gloro", "margin")
                 if k in name.split("+")}
    expected |= {"train/penalty_gloro"} if name == "gloro_trades" else set()
    assert set(out.logs) == expected


def test_paper_recipe_overrides():
    cfg = compose_config("regularizer=lip+J2", "reg.lip=0.1", "reg.J2=0.01", "reg.decay=5e-4")
    built = build_loss(cfg.reg)
    assert (built.batch.eps, built.batch.direction) == (0.01, l2_direction)
    assert [name for name, _ in built.penalties] == ["train/penalty_lip", "train/penalty_decay"]
    assert built.penalties[0][1].lam == 0.1 and built.penalties[1][1].lam == 5e-4
    linf = build_loss(compose_config("regularizer=lip", "reg.lip_norm=inf").reg)
    assert linf.penalties[0][1].norm == math.inf


@pytest.mark.parametrize("overrides, keys", [
    (["reg.lip=-0.1"], ["reg.lip"]),
    (["regularizer=J2", "reg.J2=-1"], ["reg.J2"]),
    (["reg.decay=-1e-4"], ["reg.decay"]),
    (["reg.gradnorm_fd=-1"], ["reg.gradnorm_fd"]),
    (["regularizer=pgd_linf", "reg.pgd.eps=-0.1"], ["reg.pgd.eps"]),
    (["regularizer=pgd_linf", "reg.pgd.steps=0"], ["reg.pgd.steps"]),
    (["regularizer=pgd_l2", "reg.pgd.step_size=0"], ["reg.pgd.step_size"]),
    (["regularizer=trades", "reg.trades.steps=0"], ["reg.trades.steps"]),
    (["regularizer=trades", "reg.trades.step_size=-0.01"], ["reg.trades.step_size"]),
    (["regularizer=trades", "reg.trades.beta=-1"], ["reg.trades.beta"]),
    (["reg.lip_norm=3"], ["reg.lip_norm"]),
    (["reg.lip_norm=two"], ["reg.lip_norm"]),
    (["regularizer=gradnorm_fd", "reg.fd_norm=0"], ["reg.fd_norm"]),
    (["regularizer=pgd_linf", "reg.pgd.norm=1"], ["reg.pgd.norm"]),
    (["regularizer=gradnorm_fd", "reg.fd_order=3"], ["reg.fd_order"]),
    (["regularizer=gradnorm_fd", "reg.h=0"], ["reg.h"]),
    (["regularizer=J1", "reg.J2=0.01"], ["reg.J1", "reg.J2"]),
    (["regularizer=lip+pgd_linf", "reg.Jinf=0.1"], ["reg.Jinf", "reg.pgd.eps"]),
    (["regularizer=trades", "reg.J2=0.01"], ["reg.J2", "reg.trades.beta"]),
    (["+reg.pgd.epsilon=0.1"], ["reg.pgd.epsilon"]),
])
def test_bad_input_is_a_config_error_naming_the_keys(overrides, keys):
    with pytest.raises(ConfigError) as error:
        build_loss(compose_config(*overrides).reg)
    assert all(key in str(error.value) for key in keys), str(error.value)


@pytest.mark.parametrize("part, arguments, name", [
    (regularizers.LipschitzPenalty, dict(lam=-1), "lam"),
    (regularizers.LipschitzPenalty, dict(norm=3), "norm"),
    (regularizers.GradientStepBatch, dict(eps=-1), "eps"),
    (regularizers.PGDBatch, dict(eps=0.1, steps=0), "steps"),
    (regularizers.PGDBatch, dict(eps=0.1, norm=1), "norm"),
    (regularizers.TradesBatch, dict(beta=1, step_size=0), "step_size"),
    (regularizers.FiniteDifferencePenalty, dict(lam=1, order=3), "order"),
    (regularizers.FiniteDifferencePenalty, dict(lam=1, h=0), "h"),
    (regularizers.WeightDecayPenalty, dict(lam=float("nan")), "lam"),
])
def test_parts_called_directly_raise_a_config_error_naming_the_argument(part, arguments, name):
    with pytest.raises(ConfigError) as error:
        part(**arguments)
    assert error.value.key == name and str(error.value).startswith(f"{name}=")


@pytest.mark.parametrize("name", OPTIONS)
def test_every_option_has_a_benchmark_twin_computing_the_same_loss(name):
    """`python -m tulip.bench regularizers` times each option against a hand-written twin registered for
    the option: the twin must exist and compute the same training loss from the same random draws."""
    from tulip.bench.regularizers import hand_written

    twin = hand_written(name)
    assert twin is not None, f"add {name!r} to HAND_WRITTEN in tulip/bench/regularizers.py"
    reg = compose_config(f"regularizer={name}").reg
    model, (x, y) = small_cnn(batch_norm=name not in CERTIFIED_TRAINING).double().train(), mnist_batch()
    x = x.double()
    twin_model = copy.deepcopy(model)  # a train-mode step moves BatchNorm's running statistics
    torch.manual_seed(0)
    ours = build_loss(reg)(model, x, y).loss
    torch.manual_seed(0)
    theirs = twin(twin_model, x, y, reg)
    torch.testing.assert_close(ours, theirs)


def test_memory_benchmark_counts_every_free_of_a_cpu_step():
    """`python -m tulip.bench memory`'s CPU peak: the running sum of the profiler's allocation records.
    A block the step allocates and frees counts while it lives; state replaced every step (allocated by
    the previous step, before the measured one) must show its free, or the step would seem to keep it."""
    from tulip.bench.memory import cpu_step_peak

    kept = [torch.empty(3 << 20, dtype=torch.uint8)]

    def step():  # in MiB above the start: a 1, new state 1 + 3 (the old one still lives), old freed 1, b 3
        a = torch.empty(1 << 20, dtype=torch.uint8)
        kept[0] = torch.empty(3 << 20, dtype=torch.uint8)
        b = torch.empty(2 << 20, dtype=torch.uint8)
        del a, b
    # a dropped free of the old state would read (6 MiB, 3 MiB)
    assert cpu_step_peak(step) == (4 << 20, 0)


def test_memory_benchmark_sees_the_double_backprop_graph_of_lip():
    """On cnn_small and real mnist5k digits: the plain step's peak is positive, and lip's is larger,
    since double backprop keeps the input gradient's graph alive through the backward pass."""
    from tulip.bench.memory import measure

    peaks, skipped, _ = measure(["none", "lip", "pgd_linf"], "cnn_small", batch_size=16, rounds=1)
    assert not skipped
    none, lip, pgd = (peaks[name][0] for name in ("none", "lip", "pgd_linf"))
    assert none > 0 and pgd > 0
    assert lip > 1.5 * none


def test_the_regularizer_benchmark_times_cifar_shaped_batches(capsys):
    """--shape gives the model and the random batch other images: the CIFAR study's cost estimate."""
    from tulip.bench.regularizers import main
    main(["--only", "J2", "--rounds", "1", "--warmup", "0", "--batch-size", "4", "--threads", "1",
          "--shape", "3,32,32", "--model", "cnn_small"])
    table = capsys.readouterr().out
    assert "| J2 |" in table and "| none |" in table and "batch 4" in table
