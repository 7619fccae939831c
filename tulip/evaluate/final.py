"""The final evaluation of a trained model: attacks, bounds and nearest neighbours.

``build_evaluation(cfg)`` checks ``attack.*`` and ``eval.*`` and builds the attacks once, before
training starts (a typo fails in the first second, not after hours of training). The ``Evaluation`` it
returns is handed to training, which calls it on the best checkpoint, and to ``mode=evaluate``:

    evaluation(model, data, folder, tracker) -> {"attack/...", "bounds/...", "nn/...": float}

It evaluates the first ``attack.n`` images (all when null) of the split ``attack.split``: the test set,
or the validation split for a sweep whose objectives are robust errors (the choice of a configuration
must not read the test set). ``attack/split`` records which. Every error rate carries its Wilson 95 %
interval over those images (``ci95_low/<key>``, ``ci95_high/<key>``).

- every attack of ``attack.methods`` (the ``attack=[ddn,pgd_l2]`` group) and the per-image best over
  them; per-image distances go to attacks.csv and to W&B as one table. Distances are 0 for an image
  the model already misclassifies and +inf where an attack failed; medians are over all evaluated images
  (so +inf when more than half survive every attack), means over the finite distances, and the robust
  error at ε is the % of images at distance ≤ ε, for every ε of ``attack.epsilons.<norm>``;
- with ``eval.bounds`` (default on) the lower bounds and certificates of tulip.evaluate.bounds on the same images
  (bounds.csv): the pairwise certificate with the guaranteed Lipschitz bounds of tulip.nn.lipschitz, its
  tightness against the best L2 attack when one ran, and a searched lower bound on the Lipschitz constant;
- with ``eval.nn`` the nearest differently-labelled training image of every test image (nn.csv).
"""
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from tulip.evaluate import bounds, neighbours
from tulip.evaluate.bounds import LowerBoundSearch, error_curve
from tulip.evaluate.measures import error_intervals

from tulip.runs import metric_keys
from tulip.config import AttackKeys, ConfigError, EvalKeys
from tulip.data import Data
from tulip.nn.lipschitz import last_layer, layer_norm_bound, layer_norm_estimate
from tulip.runs.metric_keys import NORMS
from tulip.nn.perturbations import frozen_eval
from tulip.runs.folder import RunFolder
from tulip.schema import check_node, source_key

log = logging.getLogger(__name__)


class Attack(Protocol):
    """What the evaluation needs of an attack (tulip.evaluate.attacks builds them from conf/attack/*.yaml)."""
    norm: str  # "l2" or "linf": the norm it minimises or is budgeted in

    def distances(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epsilons: list[float],
                  batch_size: int) -> dict[str, torch.Tensor]:
        """{"l2": (N,), "linf": (N,)}: 0 already misclassified, the adversarial's norm, +inf failed."""


class TableLogger(Protocol):
    """What the evaluation needs of its W&B run (tulip.runs.tracking.Tracker): its per-image tables."""
    def log_table(self, key: str, columns: list[str], rows: list[list],
                  line: tuple[str, str, str] | None = None) -> None: ...


@dataclass(frozen=True)
class AttackSettings:
    """The settings every attack shares (``attack.split``, ``attack.n``, ``attack.batch_size``,
    ``attack.epsilons``)."""
    split: str  # "test" or "val": the images attacked
    n: int | None  # the first n images of the split; None: all
    batch_size: int  # images per attack call
    epsilons: dict[str, list[float]]  # norm -> budgets of the robust-error curve


def _attack_settings(spec: DictConfig) -> AttackSettings:
    return AttackSettings(spec.split, spec.n, spec.batch_size,
                          {norm: [float(e) for e in spec.epsilons[norm]] for norm in NORMS})


def _build_attacks(methods: DictConfig) -> dict[str, Attack]:
    attacks = {}
    for name, node in methods.items():
        key = f"attack.methods.{name}"
        try:
            # a partial, so that the factory's own ConfigError arrives unwrapped by Hydra
            attacks[name] = instantiate(node, _partial_=True)()
        except ConfigError as error:  # a factory's argument: name its full key
            if error.key is None or error.key not in node:
                raise
            raise ConfigError(source_key(node, error.key, f"{key}.{error.key}"), error.value,
                              error.expected) from None
        except Exception as error:  # noqa: BLE001 - a misspelt parameter, a target that cannot be built
            raise ConfigError(key, node.get("_target_"), f"an attack Hydra can build ({error})") from None
    return attacks


# --- distances to metrics ----------------------------------------------------------------------------

def distance_metrics(name: str, distances: dict[str, torch.Tensor],
                     epsilons: dict[str, list[float]]) -> dict[str, float]:
    """median/mean/failures/robust-error metrics of an attack's per-image distances {norm: (n,)}."""
    metrics = {}
    for norm, d in distances.items():
        # An attack's failures are the same images in every norm (no adversarial at all).
        metrics[metric_keys.attack_failures(name)] = float(d.isinf().sum())
        finite = d[d.isfinite()].double()
        metrics[metric_keys.attack_median(name, norm)] = d.median().item()
        metrics[metric_keys.attack_mean(name, norm)] = finite.mean().item() if len(finite) else float("nan")
        for eps in epsilons[norm]:
            metrics[metric_keys.robust_error(name, norm, eps)] = 100.0 * (d <= eps).double().mean().item()
    return metrics


def _log_curve(tracker: TableLogger | None, key: str, norm: str, rows: list[list[float]]) -> None:
    if tracker is not None:
        tracker.log_table(key, ["epsilon", "error_pct"], rows, line=("epsilon", "error_pct", f"{key} ({norm})"))


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).cpu()


# --- the three evaluations ---------------------------------------------------------------------------

def evaluate_attacks(attacks: dict[str, Attack], model, x: torch.Tensor, y: torch.Tensor,
                     settings: AttackSettings, folder: RunFolder, tracker: TableLogger | None,
                     columns: dict[str, list]) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Every attack and the per-image best over them on images x, y; writes attacks.csv.
    Returns (metrics, {norm: (n,) the per-image best distance})."""
    columns = dict(columns)
    prediction = torch.tensor(columns["prediction"])
    metrics = {metric_keys.ATTACKED_IMAGES: float(len(y)),
               metric_keys.ATTACKED_CLEAN_ERROR: 100.0 * (prediction != y.cpu()).double().mean().item()}
    best = {norm: torch.full((len(y),), torch.inf) for norm in NORMS}
    for name, attack in attacks.items():
        started = time.perf_counter()
        distances = attack.distances(model, x, y, settings.epsilons[attack.norm], settings.batch_size)
        elapsed = time.perf_counter() - started
        for norm in NORMS:
            columns[metric_keys.distance_column(name, norm)] = distances[norm].tolist()
            best[norm] = torch.minimum(best[norm], distances[norm])
        metrics.update(distance_metrics(name, {attack.norm: distances[attack.norm]}, settings.epsilons))
        metrics[metric_keys.attack_time(name)] = elapsed
        _log_curve(tracker, f"attack/{name}/robust_error", attack.norm,
                   error_curve(distances[attack.norm], settings.epsilons[attack.norm]))
        log.info("attack %s (%s): median %.4g, %d failures, %.1fs", name, attack.norm,
                 metrics[metric_keys.attack_median(name, attack.norm)],
                 metrics[metric_keys.attack_failures(name)], elapsed)
    # The best over all attacks, in every norm some attack works in (each adversarial counts in both).
    attacked_norms = [norm for norm in NORMS if any(attack.norm == norm for attack in attacks.values())]
    metrics.update(distance_metrics(metric_keys.BEST_ATTACK, {norm: best[norm] for norm in attacked_norms},
                                    settings.epsilons))
    for norm in NORMS:
        columns[metric_keys.distance_column(metric_keys.BEST_ATTACK, norm)] = best[norm].tolist()
    for norm in attacked_norms:
        _log_curve(tracker, f"attack/best/robust_error_{norm}", norm,
                   error_curve(best[norm], settings.epsilons[norm]))
    folder.write_csv("attacks", columns)
    if tracker is not None:  # attacks.csv as one W&B table, to sort and filter images in the UI
        tracker.log_table(metric_keys.ATTACK_PER_IMAGE, list(columns), [list(row) for row in zip(*columns.values())])
    return metrics, best


def evaluate_bounds(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, epsilons_l2: list[float],
                    lower_bound: LowerBoundSearch = LowerBoundSearch()) -> tuple[dict[str, float], dict[str, list]]:
    """First-order and (smooth models) second-order estimates, the certificates and the Lipschitz
    bounds, per image: (metrics, per-image columns). ``certified_l2`` is the certified radius."""
    grads = bounds.loss_gradients(model, x, y, batch_size)
    first = bounds.first_order_radii(grads.loss, grads.grad_norm)
    lipschitz = layer_norm_bound(model, x.shape[1:])
    global_radii = bounds.certified_radii(grads.margin, lipschitz)
    certified, metrics = _certificate(model, x.shape[1:], grads.logits, y, global_radii)
    lower = bounds.lipschitz_lower_bound(model, x, batch_size, steps=lower_bound.steps, images=lower_bound.images)
    metrics.update({metric_keys.BOUNDS_GRAD_NORM_MAX: grads.grad_norm.max().item(),
                    metric_keys.BOUNDS_FIRST_ORDER_MEDIAN: first.median().item(),
                    metric_keys.BOUNDS_CERTIFIED_MEDIAN: global_radii.median().item(),
                    metric_keys.CERT_MEDIAN: certified.median().item(),
                    metric_keys.CERT_LIPSCHITZ_UPPER: float(lipschitz),
                    metric_keys.CERT_LIPSCHITZ_ESTIMATE: layer_norm_estimate(model, x.shape[1:]),
                    metric_keys.LIPSCHITZ_EMPIRICAL_MAX: lower,
                    metric_keys.LIPSCHITZ_UPPER_OVER_LOWER: lipschitz / lower if lower > 0 else float("inf")})
    # Certified at eps iff the radius exceeds eps; misclassified images (radius 0) always count.
    metrics.update({metric_keys.certified_error(eps): error for eps, error in error_curve(certified, epsilons_l2)})
    columns = {metric_keys.FIRST_ORDER_COLUMN: first.tolist(), metric_keys.CERTIFIED_COLUMN: certified.tolist(),
               metric_keys.CERTIFIED_GLOBAL_COLUMN: global_radii.tolist()}
    if bounds.is_smooth(model):
        curvature = bounds.hessian_norms(model, x, y, batch_size)
        second = bounds.second_order_radii(grads.loss, grads.grad_norm, curvature.max().item())
        metrics[metric_keys.BOUNDS_HESSIAN_NORM_MAX] = curvature.max().item()
        metrics[metric_keys.BOUNDS_SECOND_ORDER_MEDIAN] = second.median().item()
        columns[metric_keys.SECOND_ORDER_COLUMN] = second.tolist()
    else:
        log.info("bounds: skipping the second-order estimate: the model has piecewise-linear "
                 "activations (ReLU/max-pool), whose Hessian misses the curvature at the kinks")
    log.info("certificate: median radius %.4g (global form %.4g), K = %.4g (estimate %.4g), largest "
             "ratio found %.4g", metrics[metric_keys.CERT_MEDIAN], metrics[metric_keys.BOUNDS_CERTIFIED_MEDIAN],
             lipschitz, metrics[metric_keys.CERT_LIPSCHITZ_ESTIMATE], lower)
    return metrics, columns


def _certificate(model, input_shape, logits: torch.Tensor, y: torch.Tensor,
                 global_radii: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The pairwise certified radii (n,) from the (n, C) logits where the model ends in a linear layer
    (tulip.nn.lipschitz.last_layer), else the global ones; and the metrics that say which."""
    last = last_layer(model, input_shape)
    if last is None:
        log.info("certificate: the model does not end in a linear layer: global form m/(√2·K)")
        return global_radii, {metric_keys.CERT_PAIRWISE: 0.0}
    radii = bounds.last_layer_radii(last, logits, y.cpu())
    return radii, {metric_keys.CERT_PAIRWISE: 1.0, metric_keys.CERT_FEATURE_LIPSCHITZ_UPPER: last.feature_bound}


def evaluate_neighbours(data: Data, folder: RunFolder) -> dict[str, float]:
    """Nearest differently-labelled training image of every test image, L2 and L∞; writes nn.csv."""
    columns = {"index": list(range(len(data.test_y))), "label": data.test_y.tolist()}
    metrics = {}
    for norm, nearest in (("l2", neighbours.nearest_l2), ("linf", neighbours.nearest_linf)):
        started = time.perf_counter()
        found = nearest(data.test_x, data.test_y, data.train_x, data.train_y)
        distance = found.distance.cpu()
        columns[norm] = distance.tolist()
        columns[f"{norm}_train_index"] = found.index.tolist()
        metrics.update({metric_keys.neighbours(norm, stat): value
                        for stat, value in neighbours.summarize(distance).items()})
        log.info("nearest neighbours (%s): median %.4g, %.1fs", norm,
                 metrics[metric_keys.neighbours(norm, "median")], time.perf_counter() - started)
    folder.write_csv("nn", columns)
    return metrics


# --- built once, run on the best checkpoint ---------------------------------------------------------

@dataclass(frozen=True)
class Evaluation:
    attacks: dict[str, Attack]  # name -> attack, in the order of the config
    settings: AttackSettings
    bounds: bool  # eval.bounds
    neighbours: bool  # eval.nn
    lower_bound: LowerBoundSearch = LowerBoundSearch()  # eval.lower_bound

    @property
    def families(self) -> tuple[str, ...]:
        """The metric families this evaluation writes (mode=evaluate replaces exactly these)."""
        return ((metric_keys.ATTACK_PREFIX,) if self.attacks else ()) + \
            (metric_keys.BOUNDS_FAMILIES if self.bounds else ()) + \
            ((metric_keys.NN_PREFIX,) if self.neighbours else ())

    def __call__(self, model: torch.nn.Module, data: Data, folder: RunFolder,
                 tracker: TableLogger | None = None) -> dict[str, float]:
        """Evaluate `model` (its mode and requires_grad are restored afterwards); {} if nothing is on."""
        metrics: dict[str, float] = {}
        x, y = data.split(self.settings.split)
        if len(y) == 0:
            raise ConfigError("attack.split", self.settings.split, "a split with images: test, as this dataset "
                              "has no validation split (dataset.val_size=0)")
        n = len(y) if self.settings.n is None else min(self.settings.n, len(y))
        x, y = x[:n], y[:n]
        with frozen_eval(model):
            if self.attacks or self.bounds:
                images = {"index": list(range(n)), "label": y.tolist(),
                          "prediction": _predict(model, x, self.settings.batch_size).tolist()}
            if self.attacks:
                started = time.perf_counter()
                found, best = evaluate_attacks(self.attacks, model, x, y, self.settings, folder, tracker, images)
                metrics.update(found)
                metrics[metric_keys.ATTACK_TIME] = time.perf_counter() - started
            if self.bounds:
                started = time.perf_counter()
                found, columns = evaluate_bounds(model, x, y, self.settings.batch_size, self.settings.epsilons["l2"],
                                                  self.lower_bound)
                metrics.update(found)
                folder.write_csv("bounds", {**images, **columns})
                certified = torch.tensor(columns[metric_keys.CERTIFIED_COLUMN])
                _log_curve(tracker, metric_keys.CERT_CURVE, "l2", error_curve(certified, self.settings.epsilons["l2"]))
                if any(attack.norm == "l2" for attack in self.attacks.values()):
                    correct = torch.tensor(images["prediction"]) == y.cpu()
                    metrics[metric_keys.CERT_TIGHTNESS] = bounds.tightness(best["l2"], certified, correct)
                metrics[metric_keys.BOUNDS_TIME] = time.perf_counter() - started
            if self.neighbours:
                started = time.perf_counter()
                metrics.update(evaluate_neighbours(data, folder))
                metrics[metric_keys.NN_TIME] = time.perf_counter() - started
        metrics.update(error_intervals(metrics, n, [key for key in metrics if metric_keys.is_error_rate(key)]))
        if self.attacks or self.bounds:
            metrics[metric_keys.ATTACKED_SPLIT] = self.settings.split  # text: which images, not a number
        return metrics


def build_evaluation(cfg: DictConfig) -> Evaluation:
    """Check ``attack.*`` and ``eval.*`` against their schema (tulip.config.AttackKeys, EvalKeys: what
    `validate` checks in a run) and build the attacks; raises ConfigError naming the key.

    Cheap (no data, no model): called before training.
    """
    shared = {"split", "n", "batch_size", "epsilons", "methods"}
    unknown = sorted(set(cfg.attack) - shared)
    if unknown:
        raise ConfigError(f"attack.{unknown[0]}", cfg.attack[unknown[0]],
                          f"no such key: an attack setting is one of attack.{{{','.join(sorted(shared))}}} "
                          f"(attacks themselves are chosen with attack=<option> and set with "
                          f"attack.methods.<name>.<param>)")
    check_node(cfg.attack, "attack", AttackKeys)
    check_node(cfg.eval, "eval", EvalKeys)
    return Evaluation(attacks=_build_attacks(cfg.attack.methods), settings=_attack_settings(cfg.attack),
                      bounds=cfg.eval.bounds, neighbours=cfg.eval.nn,
                      lower_bound=LowerBoundSearch(**cfg.eval.lower_bound))
