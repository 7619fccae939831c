"""AutoAttack (Croce & Hein, ICML 2020, arXiv 2003.01690), from the authors' reference code (pyautoattack).

The standard AutoAttack is an ensemble of four attacks, each at one fixed budget ε: APGD-CE, APGD-T
(targeted, DLR loss), FAB-T (targeted) and Square (score-based, no gradients). Here each member is
its own attack under ``attack.methods`` (``attack=autoattack_l2`` pulls in all four), so the evaluation
writes ``attack/<member>/...`` for each and ``attack/best/...`` for the ensemble: an image is broken
at ε when any member breaks it, which is AutoAttack's robust error.

The reference attacks one ε per call; a member tries every ε of ``attack.epsilons.<norm>``, smallest
first, and attacks at a larger ε only the images still robust, with the semantics of
tulip.evaluate.attacks.FixedEpsilonAttack: 0 for an image the model already misclassifies, the norms of the
adversarial found at the smallest ε that succeeds, +inf where none does. Tulip checks every
adversarial itself (misclassified, within ε, inside [0, 1]); anything else is a failure.

Each member below is a small factory: its docstring names the paper and the defaults, which are the
reference's ``version='standard'`` settings and which conf/attack/<member>_<norm>.yaml repeats; its
signature's types (tulip.schema) are the arguments' schema.
"""
import logging
import sys
from typing import Any, Callable

import torch
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack
from tqdm import tqdm

from tulip.evaluate.attacks import perturbation_norms
from tulip.nn.perturbations import frozen_eval
from tulip.runs.metric_keys import NORMS
from tulip.schema import AttackNorm, Iterations, Seed, Switch, checked

log = logging.getLogger(__name__)

REFERENCE_NORMS = {"l2": "L2", "linf": "Linf"}  # Tulip's norm names -> the reference's
# The reference projects onto the ε-ball in float32, so ‖δ‖ may exceed ε by rounding.
RELATIVE_TOLERANCE, ABSOLUTE_TOLERANCE = 1e-5, 1e-6

# (model, ε, number of classes, device) -> a reference attack object with perturb(x, y) -> adversarials
Build = Callable[[torch.nn.Module, float, int, torch.device], Any]


class AutoAttackMember:
    """One member of the ensemble in one norm; satisfies tulip.evaluate.final.Attack."""

    def __init__(self, norm: str, build: Build, name: str = "autoattack"):
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        self.norm = norm
        self.build = build
        self.name = name  # for the progress bar

    def within(self, delta: torch.Tensor, eps: float) -> torch.Tensor:
        """(B,) bool: is each perturbation within ε in this member's norm (up to float rounding)?"""
        return perturbation_norms(delta)[self.norm] <= eps * (1 + RELATIVE_TOLERANCE) + ABSOLUTE_TOLERANCE

    def adversarials(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                     eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Attack a batch x, y (on the model's device) at one ε; returns (adversarial (B, ...),
        success (B,) bool), success as Tulip verifies it, not as the reference reports it."""
        with torch.no_grad():
            classes = model(x[:1]).shape[1]
        adversarial = self.build(model, eps, classes, x.device).perturb(x, y).detach()
        with torch.no_grad():
            fooled = model(adversarial).argmax(1) != y
        inside = (adversarial >= 0).flatten(1).all(1) & (adversarial <= 1).flatten(1).all(1)
        return adversarial, fooled & inside & self.within(adversarial - x, eps)

    def distances(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float],
                  batch_size: int) -> dict[str, torch.Tensor]:
        """{"l2": (N,), "linf": (N,)} float CPU tensors: 0 already misclassified, the norms of the
        adversarial at the smallest successful ε of ``epsilons``, +inf failed (see the module doc)."""
        device = next(model.parameters()).device
        distances = {norm: torch.zeros(len(x)) for norm in NORMS}
        budgets = sorted({float(eps) for eps in epsilons if eps > 0})  # at ε = 0 nothing can be found
        # The reference reseeds torch's global generators on every call; the caller's streams are kept.
        with frozen_eval(model), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            # A bar on a terminal only (as in training); a log gets tulip.evaluate.final's line per member.
            batches = tqdm(range(0, len(x), batch_size), desc=f"{self.name} {self.norm}", leave=False,
                           disable=not sys.stderr.isatty())
            for start in batches:
                xb, yb = x[start:start + batch_size].to(device), y[start:start + batch_size].to(device)
                with torch.no_grad():
                    left = (model(xb).argmax(1) == yb).nonzero().squeeze(1)  # only these are attacked
                for norm in NORMS:
                    distances[norm][start + left.cpu()] = torch.inf
                for eps in budgets:
                    if len(left) == 0:
                        break
                    adversarial, success = self.adversarials(model, xb[left], yb[left], eps)
                    norms = perturbation_norms(adversarial[success] - xb[left[success]])
                    # Within ε up to rounding: counted at ε (the evaluation's robust error is d ≤ ε).
                    norms[self.norm] = norms[self.norm].clamp(max=eps)
                    for norm in NORMS:
                        distances[norm][start + left[success].cpu()] = norms[norm].float().cpu()
                    left = left[~success]
        return distances


# --- The members (Hydra targets of conf/attack/{apgd_ce,apgd_t,fab_t,square}_{l2,linf}.yaml) ----------

@checked()
def apgd_ce(norm: AttackNorm, n_iter: Iterations = 100, n_restarts: Iterations = 1, rho: float = 0.75,
            seed: Seed = 0) -> AutoAttackMember:
    """APGD-CE: Auto-PGD on the cross-entropy loss (Croce & Hein, ICML 2020, arXiv 2003.01690).
    L2 or L∞ (``norm``), fixed ε; step size adapted from 2ε, no step-size parameter. Defaults (the
    reference standard version): n_iter=100, n_restarts=1, rho=0.75 (step-halving threshold), seed=0."""
    reference_norm = REFERENCE_NORMS[norm]
    return AutoAttackMember(norm, lambda model, eps, classes, device: APGDAttack(
        model, n_iter=n_iter, norm=reference_norm, n_restarts=n_restarts, eps=eps, seed=seed, loss="ce",
        rho=rho, device=device, logger=log), "apgd_ce")


@checked()
def apgd_t(norm: AttackNorm, n_iter: Iterations = 100, n_restarts: Iterations = 1, n_target_classes: Iterations = 9,
           rho: float = 0.75, seed: Seed = 0) -> AutoAttackMember:
    """APGD-T: Auto-PGD on the targeted DLR loss (Croce & Hein, ICML 2020, arXiv 2003.01690). L2 or
    L∞, fixed ε; tries the n_target_classes most likely wrong classes in turn (at most classes − 1).
    Defaults (the reference standard version): n_iter=100, n_restarts=1, n_target_classes=9,
    rho=0.75, seed=0."""
    reference_norm = REFERENCE_NORMS[norm]

    def build(model, eps, classes, device):
        return APGDAttack_targeted(model, n_iter=n_iter, norm=reference_norm, n_restarts=n_restarts, eps=eps,
                                   seed=seed, rho=rho, n_target_classes=min(n_target_classes, classes - 1),
                                   device=device, logger=log)
    return AutoAttackMember(norm, build, "apgd_t")


@checked()
def fab_t(norm: AttackNorm, n_iter: Iterations = 100, n_restarts: Iterations = 1, n_target_classes: Iterations = 9,
          alpha_max: float = 0.1, eta: float = 1.05, beta: float = 0.9, seed: Seed = 0) -> AutoAttackMember:
    """FAB-T: targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020, arXiv 1907.02044). L2
    or L∞; a minimum-norm attack whose adversarial counts at ε when its norm is ≤ ε; tries the
    n_target_classes most likely wrong classes in turn (at most classes − 1). Defaults (the reference
    standard version): n_iter=100, n_restarts=1, n_target_classes=9, alpha_max=0.1, eta=1.05
    (overshoot), beta=0.9 (backward step), seed=0."""
    reference_norm = REFERENCE_NORMS[norm]
    return AutoAttackMember(norm, lambda model, eps, classes, device: FABAttack_PT(
        model, norm=reference_norm, n_restarts=n_restarts, n_iter=n_iter, eps=eps, alpha_max=alpha_max,
        eta=eta, beta=beta, seed=seed, targeted=True, device=device,
        n_target_classes=min(n_target_classes, classes - 1)), "fab_t")


@checked()
def square(norm: AttackNorm, n_queries: Iterations = 5000, n_restarts: Iterations = 1, p_init: float = 0.8,
           rescale_schedule: Switch = False, seed: Seed = 0) -> AutoAttackMember:
    """Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, arXiv 1912.00049). L2 or
    L∞, fixed ε; score-based random search (no gradients: a check against gradient masking).
    Defaults (the reference standard version): n_queries=5000, n_restarts=1, p_init=0.8 (initial
    square size), rescale_schedule=False (the p schedule is not stretched to n_queries), seed=0."""
    reference_norm = REFERENCE_NORMS[norm]
    return AutoAttackMember(norm, lambda model, eps, classes, device: SquareAttack(
        model, norm=reference_norm, n_queries=n_queries, eps=eps, p_init=p_init, n_restarts=n_restarts,
        seed=seed, resc_schedule=rescale_schedule, device=device), "square")
