"""The certificates certify: no attack finds an adversarial inside a certified radius, and the guaranteed
Lipschitz bound is above every ratio ‖f(x)−f(x′)‖/‖x−x′‖ found, for every model family and for trained
models; the pairwise radius is never below the global one, and exact for a linear model. The same soundness through
the real training and final evaluation is tests/system/test_certified_evaluation.py."""
import pytest
import torch

from conftest import SHRINK, build_model_option
from tulip.evaluate import attacks, bounds
from tulip.evaluate.attacks import attack_distances
from tulip.data import mnist5k
from tulip.evaluate.final import evaluate_bounds
from tulip.nn.lipschitz import last_layer, layer_norm_bound
from tulip.nn.models import MLP
from tulip.train.loss import TrainingLoss
from tulip.train.loop import train_one_epoch


def certified(model, x, y):
    """(pairwise radii, global radii, K) of an eval-mode model on images x with labels y."""
    with torch.no_grad():
        logits = model(x)
    lipschitz = layer_norm_bound(model)
    global_radii = bounds.certified_radii(bounds.logit_margin(logits, y), lipschitz).float()
    last = last_layer(model)
    pairs = bounds.pair_lipschitz(last.weight, last.head_scale)
    pairwise = bounds.pairwise_radii(logits, y, last.feature_bound, pairs)
    return pairwise, global_radii, lipschitz


def assert_sound(model, x, y, radii, lipschitz, steps=20):
    """DDN and FMN never land inside a certified radius; K is above every ratio found."""
    for attack in (attacks.ddn(steps=steps), attacks.fmn_l2(steps=steps, binary_search_steps=5)):
        found = attack_distances(attack, model, x, y, [], len(x))["l2"]
        assert (found >= radii).all(), (found - radii).min()
    lower = bounds.lipschitz_lower_bound(model, x, batch_size=len(x), steps=10)
    assert 0 < lower <= lipschitz
    with torch.no_grad():
        for partner in (torch.rand_like(x), x + 1e-3 * torch.randn_like(x)):  # random and close pairs
            ratio = (model(x) - model(partner)).norm(dim=1) / (x - partner).flatten(1).norm(dim=1)
            assert ratio.max() <= lipschitz
    return lower


def test_pairwise_radius_by_hand():
    weight = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 3.0]], dtype=torch.float64)
    pairs = bounds.pair_lipschitz(weight)
    assert pairs[0, 1].item() == pytest.approx(2 ** 0.5) and pairs[0, 2].item() == pytest.approx(10 ** 0.5)
    logits = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    radii = bounds.pairwise_radii(logits, torch.tensor([0, 0, 2]), 2.0, pairs)
    # image 0: min(2 / (2·√2), 3 / (2·√10)); image 1 misclassified; image 2: f_2 < f_0
    assert radii.tolist() == pytest.approx([min(2 / (2 * 2 ** 0.5), 3 / (2 * 10 ** 0.5)), 0.0, 0.0])
    # two identical rows can never swap: that pair does not limit the radius
    same = bounds.pair_lipschitz(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64))
    assert bounds.pairwise_radii(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0]), 1.0, same).item() == \
        pytest.approx(2 / 2 ** 0.5)
    # with a head, a pair's constant covers every slope in [0, s]: scaled rows (1, 0), (0, 2), (0, 1.5)
    # give ‖(1, −2)‖ for classes 0, 1, but for 1, 2 the norm of (0, 2) alone exceeds ‖(0, 0.5)‖
    headed = bounds.pair_lipschitz(weight, torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64))
    assert headed[0, 1].item() == pytest.approx(5 ** 0.5) and headed[1, 2].item() == pytest.approx(2.0)


def test_pairwise_certificate_is_exact_for_a_linear_multiclass_model():
    """Logits W x + b: the smallest change of prediction is at the nearest hyperplane f_y = f_j, exactly
    min_j (f_y − f_j) / ‖w_y − w_j‖, the pairwise radius (K₋ = 1). DeepFool (exact on a linear model,
    2% overshoot) lands just beyond it; the global radius is smaller."""
    torch.manual_seed(0)
    model = MLP(1, 5, 8, hidden=[])
    with torch.no_grad():
        model.classifier.weight.mul_(0.3)
    model.eval()
    x = (0.5 + 0.03 * torch.randn(60, 1, 8, 8)).clamp(0, 1)  # the hyperplanes lie well inside [0, 1]^64
    y = model(x).argmax(1)
    pairwise, global_radii, _ = certified(model, x, y)
    assert (pairwise > 1.2 * global_radii).float().mean() > 0.5
    found = attack_distances(attacks.deepfool_l2(steps=20, overshoot=0.02), model, x, y, [], 60)["l2"]
    assert (found >= pairwise).all()
    assert (found / pairwise).max() < 1.05


@pytest.mark.parametrize("tanh", [False, True])
@pytest.mark.parametrize("name", list(SHRINK))
def test_certificate_is_sound_for_every_model_family(name, tanh):
    """Random weights, BatchNorm in eval mode with statistics from a few train-mode passes; labels are
    the model's own predictions, so every image has a positive radius that an attack could violate."""
    torch.manual_seed(0)
    model = build_model_option(name, [*SHRINK[name], f"model.tanh={str(tanh).lower()}"])
    with torch.no_grad():
        for _ in range(3):
            model(0.3 + 0.5 * torch.rand(32, 1, 28, 28))
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    x = torch.rand(12, 1, 28, 28)
    with torch.no_grad():
        y = model(x).argmax(1)
    pairwise, global_radii, lipschitz = certified(model, x, y)
    assert (pairwise > 0).all() and (pairwise >= global_radii * (1 - 1e-6)).all()
    assert_sound(model, x, y, pairwise, lipschitz)


@pytest.fixture(scope="module")
def digits():
    return mnist5k(val_size=0)


@pytest.mark.parametrize("name", ["cnn_small", "allcnn"])
def test_certificate_is_sound_for_trained_models(name, digits):
    torch.manual_seed(0)
    model = build_model_option(name, SHRINK[name])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    train_one_epoch(model, TrainingLoss(batches={}, penalties={}), optimizer, digits, batch_size=128, epoch=1,
                    progress=False)
    model.eval()
    x, y = digits.test_x[:48], digits.test_y[:48]
    pairwise, global_radii, lipschitz = certified(model, x, y)
    correct = model(x).argmax(1) == y
    assert correct.sum() >= 8  # one epoch of a narrow All-CNN gets about a quarter right, cnn_small 90 %
    assert (pairwise[correct] > 0).all() and (pairwise[~correct] == 0).all()
    assert (pairwise >= global_radii * (1 - 1e-6)).all()
    assert pairwise[correct].median() > global_radii[correct].median()
    assert_sound(model, x, y, pairwise, lipschitz, steps=30)


def test_a_model_without_a_last_linear_layer_gets_the_global_certificate():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5), torch.nn.ReLU()).eval()
    x = torch.rand(20, 1, 8, 8)
    y = model(x).argmax(1)
    assert last_layer(model, (1, 8, 8)) is None
    metrics, columns = evaluate_bounds(model, x, y, batch_size=8, epsilons_l2=[0.1])
    assert metrics["cert/pairwise"] == 0 and "cert/lipschitz_feature_upper" not in metrics
    assert columns["certified_l2"] == columns["certified_global_l2"]
    assert metrics["cert/median_l2"] == metrics["bounds/certified_median"]
