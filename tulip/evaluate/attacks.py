"""Adversarial attacks for evaluation: Foolbox 3 attacks, run batched on the model's device.

Every attack turns a set of test images into per-image adversarial distances, in L2 and in L∞
(the norms of the adversarial perturbation it found):

- 0 for an image the model already misclassifies (it is not attacked at all);
- the norm of the perturbation found, for an image the attack turned adversarial;
- +inf where the attack found nothing. The original code recorded failures as 0, which made them
  indistinguishable from misclassified images.

Two kinds of attacks:

- minimisation attacks (DDN, C&W, DeepFool, FMN, Boundary) search for the smallest adversarial
  perturbation in their norm, with no budget;
- fixed-ε attacks (FGSM, PGD) only try each budget ε in ``attack.epsilons.<norm>``; an image's
  adversarial is the one found at the smallest ε that succeeds, so its distance is at most that ε.

The original ran Foolbox 1.x one image per call; Foolbox 3 attacks take a batch (see
``python -m tulip.bench attacks`` for what that buys). Each attack below is a small factory: its
docstring names the paper, the norm and the defaults (which conf/attack/<name>.yaml repeats, so every
parameter can be overridden, e.g. ``attack.methods.ddn.steps=100``); its signature's types (tulip.schema)
are the arguments' schema, checked before training and on every call.
"""
import sys

import foolbox
import torch
from tqdm import tqdm

from tulip.nn.perturbations import frozen_eval
from tulip.runs.metric_keys import NORMS
from tulip.schema import Iterations, NonNegative, Positive, Switch, checked


def perturbation_norms(delta: torch.Tensor) -> dict[str, torch.Tensor]:
    """L2 and L∞ norms of each perturbation in a batch: (B, ...) -> {"l2": (B,), "linf": (B,)}."""
    flat = delta.flatten(1)
    return {"l2": flat.norm(p=2, dim=1), "linf": flat.abs().amax(dim=1)}


class FoolboxAttack:
    """A Foolbox 3 attack and the norm (``"l2"`` or ``"linf"``) it minimises or is budgeted in."""

    def __init__(self, foolbox_attack: foolbox.attacks.Attack, norm: str):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.foolbox_attack = foolbox_attack
        self.norm = norm

    def adversarials(self, fmodel: foolbox.PyTorchModel, x: torch.Tensor, y: torch.Tensor,
                     epsilons: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """Attack a batch x (B, C, H, W) with labels y (B,); returns (adversarial (B, C, H, W),
        success (B,) bool)."""
        raise NotImplementedError

    def distances(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float],
                  batch_size: int) -> dict[str, torch.Tensor]:
        """Per-image adversarial distances of this attack: see :func:`attack_distances`."""
        return attack_distances(self, model, x, y, epsilons, batch_size)


class MinimizationAttack(FoolboxAttack):
    """Searches for the smallest adversarial perturbation; ``epsilons`` is not used."""

    def adversarials(self, fmodel, x, y, epsilons):
        # epsilons=None: no budget, no early stop; Foolbox checks success on the returned images.
        _, adversarial, success = self.foolbox_attack(fmodel, x, y, epsilons=None)
        return adversarial, success


class FixedEpsilonAttack(FoolboxAttack):
    """Tries every budget in ``epsilons``; keeps the adversarial of the smallest ε that succeeds."""

    def adversarials(self, fmodel, x, y, epsilons):
        _, clipped, success = self.foolbox_attack(fmodel, x, y, epsilons=sorted(epsilons))
        # success: (E, B); clipped: E tensors (B, C, H, W). argmax finds the first True of each column.
        first_success = success.int().argmax(dim=0)
        adversarial = torch.stack(clipped)[first_success, torch.arange(len(x), device=x.device)]
        return adversarial, success.any(dim=0)


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1)


def attack_distances(attack: FoolboxAttack, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     epsilons: list[float], batch_size: int) -> dict[str, torch.Tensor]:
    """Run ``attack`` on images x (N, C, H, W) in [0, 1] with labels y (N,), ``batch_size`` at a time
    on the model's device, with the model in eval mode and its parameters frozen (restored after).

    Returns {"l2": (N,), "linf": (N,)} float CPU tensors: 0 for images the model already gets wrong,
    the norm of the adversarial perturbation found, +inf where the attack failed. ``epsilons`` are the
    budgets for a fixed-ε attack, in its norm.
    """
    device = next(model.parameters()).device
    distances = {norm: torch.zeros(len(x)) for norm in NORMS}
    with frozen_eval(model):  # eval mode: BatchNorm statistics must not couple the images of a batch
        fmodel = foolbox.PyTorchModel(model, bounds=(0.0, 1.0), device=device)
        # A bar on a terminal only (as in training); a log gets tulip.evaluate.final's line per attack.
        batches = tqdm(range(0, len(x), batch_size), desc=type(attack.foolbox_attack).__name__,
                       leave=False, disable=not sys.stderr.isatty())
        for start in batches:
            xb = x[start:start + batch_size].to(device)
            yb = y[start:start + batch_size].to(device)
            # Only correctly classified images are attacked; the others keep distance 0.
            correct = (_predict(model, xb) == yb).nonzero().squeeze(1)
            if len(correct) == 0:
                continue
            adversarial, success = attack.adversarials(fmodel, xb[correct], yb[correct], epsilons)
            norms = perturbation_norms(adversarial - xb[correct])
            for norm in NORMS:
                found = torch.where(success, norms[norm], torch.full_like(norms[norm], torch.inf))
                distances[norm][start + correct.cpu()] = found.float().cpu()
    return distances


# --- The attacks (Hydra targets of conf/attack/*.yaml) -------------------------------------------

@checked()
def fgsm(random_start: Switch = False) -> FixedEpsilonAttack:
    """FGSM, the fast gradient sign method (Goodfellow, Shlens & Szegedy, ICLR 2015, arXiv
    1412.6572). L∞, fixed ε: one step x + ε·sign(∇ℓ). Default: random_start=False."""
    return FixedEpsilonAttack(foolbox.attacks.LinfFastGradientAttack(
        random_start=random_start), "linf")


@checked()
def pgd_linf(steps: Iterations = 40, rel_stepsize: Positive = 1 / 30,
             random_start: Switch = True) -> FixedEpsilonAttack:
    """L∞ projected gradient descent (Madry et al., ICLR 2018, arXiv 1706.06083). L∞, fixed ε.
    Defaults: steps=40, step size rel_stepsize·ε with rel_stepsize=0.0333, random_start=True."""
    return FixedEpsilonAttack(foolbox.attacks.LinfProjectedGradientDescentAttack(
        steps=steps, rel_stepsize=rel_stepsize, random_start=random_start), "linf")


@checked()
def pgd_l2(steps: Iterations = 50, rel_stepsize: Positive = 0.025, random_start: Switch = True) -> FixedEpsilonAttack:
    """L2 projected gradient descent (Madry et al., ICLR 2018, arXiv 1706.06083). L2, fixed ε.
    Defaults: steps=50, step size rel_stepsize·ε with rel_stepsize=0.025, random_start=True."""
    return FixedEpsilonAttack(foolbox.attacks.L2ProjectedGradientDescentAttack(
        steps=steps, rel_stepsize=rel_stepsize, random_start=random_start), "l2")


@checked()
def ddn(steps: Iterations = 50, init_epsilon: Positive = 1.0, gamma: NonNegative = 0.05) -> MinimizationAttack:
    """Decoupled Direction and Norm (Rony et al., CVPR 2019, arXiv 1811.09600). L2, minimisation.
    Defaults: steps=50, init_epsilon=1.0 (initial norm), gamma=0.05 (norm change per step)."""
    return MinimizationAttack(foolbox.attacks.DDNAttack(
        steps=steps, init_epsilon=init_epsilon, gamma=gamma), "l2")


@checked()
def cw_l2(binary_search_steps: Iterations = 5, steps: Iterations = 100, stepsize: Positive = 0.01,
          confidence: NonNegative = 0.0, initial_const: Positive = 0.001) -> MinimizationAttack:
    """Carlini & Wagner L2 attack (IEEE S&P 2017, arXiv 1608.04644). L2, minimisation.
    Defaults: binary_search_steps=5 (over the constant c), steps=100 (Adam steps per c),
    stepsize=0.01, confidence=0, initial_const=0.001. Foolbox's own defaults (9, 10000) are far slower."""
    return MinimizationAttack(foolbox.attacks.L2CarliniWagnerAttack(
        binary_search_steps=binary_search_steps, steps=steps, stepsize=stepsize, confidence=confidence,
        initial_const=initial_const),
        "l2")


@checked()
def deepfool_l2(steps: Iterations = 50, candidates: Iterations = 10,
                overshoot: NonNegative = 0.02) -> MinimizationAttack:
    """DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016, arXiv 1511.04599). L2, minimisation
    by repeated linearisation of the decision boundary. Defaults: steps=50, candidates=10 (classes
    considered), overshoot=0.02."""
    return MinimizationAttack(foolbox.attacks.L2DeepFoolAttack(
        steps=steps, candidates=candidates, overshoot=overshoot), "l2")


@checked()
def deepfool_linf(steps: Iterations = 50, candidates: Iterations = 10,
                  overshoot: NonNegative = 0.02) -> MinimizationAttack:
    """DeepFool (Moosavi-Dezfooli, Fawzi & Frossard, CVPR 2016, arXiv 1511.04599), L∞ variant.
    L∞, minimisation. Defaults: steps=50, candidates=10, overshoot=0.02."""
    return MinimizationAttack(foolbox.attacks.LinfDeepFoolAttack(
        steps=steps, candidates=candidates, overshoot=overshoot), "linf")


@checked()
def fmn_l2(steps: Iterations = 100, max_stepsize: Positive = 1.0, gamma: NonNegative = 0.05,
           binary_search_steps: Iterations = 10) -> MinimizationAttack:
    """Fast Minimum-Norm attack (Pintor et al., NeurIPS 2021, arXiv 2102.12827). L2, minimisation.
    Defaults: steps=100, max_stepsize=1.0, gamma=0.05 (norm step), binary_search_steps=10."""
    return MinimizationAttack(foolbox.attacks.L2FMNAttack(
        steps=steps, max_stepsize=max_stepsize, gamma=gamma, binary_search_steps=binary_search_steps), "l2")


@checked()
def fmn_linf(steps: Iterations = 100, max_stepsize: Positive = 1.0, gamma: NonNegative = 0.05,
             binary_search_steps: Iterations = 10) -> MinimizationAttack:
    """Fast Minimum-Norm attack (Pintor et al., NeurIPS 2021, arXiv 2102.12827). L∞, minimisation.
    Defaults: steps=100, max_stepsize=1.0, gamma=0.05, binary_search_steps=10."""
    return MinimizationAttack(foolbox.attacks.LInfFMNAttack(
        steps=steps, max_stepsize=max_stepsize, gamma=gamma, binary_search_steps=binary_search_steps), "linf")


@checked()
def boundary(steps: Iterations = 1000, spherical_step: Positive = 0.01, source_step: Positive = 0.01,
             step_adaptation: Positive = 1.5) -> MinimizationAttack:
    """Boundary attack (Brendel, Rauber & Bethge, ICLR 2018, arXiv 1712.04248). L2, minimisation,
    decision-based (uses only predicted labels): starts from a blended-noise adversarial and walks
    along the boundary towards the image. Defaults: steps=1000 (Foolbox: 25000), spherical_step=0.01,
    source_step=0.01, step_adaptation=1.5. Images whose noise start is not adversarial count as
    failures."""
    return MinimizationAttack(foolbox.attacks.BoundaryAttack(
        steps=steps, spherical_step=spherical_step, source_step=source_step, step_adaptation=step_adaptation), "l2")

