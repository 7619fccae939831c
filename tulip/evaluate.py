"""Evaluation of a trained model: attacks, bounds, nearest neighbours, and the summary statistics.

Three entry points, all driven by the config:

- ``evaluate_trained(cfg, model, data, run_dir, tracker)``: called by training on the best checkpoint.
  Runs every attack in ``cfg.attack`` on the first ``attack.n`` test images, the bounds of
  tulip.bounds on the same images (when at least one attack is configured), the nearest-neighbour
  distances when ``eval.nn=true``; writes attacks.csv / nn.csv to the run folder and returns the
  metrics (``attack/*``, ``bounds/*``, ``nn/*``).
- ``evaluate_run(cfg)`` (``python run.py mode=evaluate run_dir=<path> attack=[ddn,pgd_l2] eval.nn=true``):
  the same on an existing run's best checkpoint, merged into its summary.json.
- ``summarize_run(cfg)`` (``python run.py mode=summary run_dir=<path>``): what the original
  ``summary.py`` reported, recomputed on the best checkpoint and the whole test set, written to
  summary.json as ``summary/*`` and printed.

Distances: 0 for an image the model already misclassifies, +inf where an attack failed. Medians are
over all evaluated images (so +inf when more than half survive every attack), means over the finite
distances, and ``error_pct_<norm>@<eps>`` is the percentage of images with distance ≤ eps.
"""
import csv
import logging
import math
import os
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, ListConfig

from tulip import bounds, neighbours
from tulip.attacks import NORMS, Attack, attack_distances
from tulip.config import ConfigError, resolve_device
from tulip.perturbations import frozen_eval

log = logging.getLogger(__name__)

SHARED_ATTACK_KEYS = ("n", "batch_size", "epsilons")


# --- config -----------------------------------------------------------------------------------------

def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def check_config(cfg: DictConfig) -> dict[str, Attack]:
    """Validate ``attack.*`` and ``eval.nn`` and build the configured attacks (name -> Attack).

    Cheap (no data, no model): call it before training so a typo fails in the first second.
    Raises ConfigError naming the offending key.
    """
    spec = cfg.attack
    if not (spec.n is None or _is_positive_int(spec.n)):
        raise ConfigError(f"attack.n={spec.n!r} is invalid: expected an integer >= 1 or null (all)")
    if not _is_positive_int(spec.batch_size):
        raise ConfigError(f"attack.batch_size={spec.batch_size!r} is invalid: expected an integer >= 1")
    for norm in NORMS:
        eps = spec.epsilons.get(norm)
        if not (isinstance(eps, ListConfig) and len(eps) > 0
                and all(isinstance(e, (int, float)) and not isinstance(e, bool) and e >= 0 for e in eps)):
            raise ConfigError(f"attack.epsilons.{norm}={eps!r} is invalid: expected a non-empty list "
                              f"of numbers >= 0")
    if not isinstance(cfg.eval.nn, bool):
        raise ConfigError(f"eval.nn={cfg.eval.nn!r} is invalid: expected true or false")
    attacks = {}
    for name, node in spec.items():
        if name in SHARED_ATTACK_KEYS:
            continue
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"attack.{name}={node!r} is invalid: expected an attack config "
                              f"(conf/attack/*.yaml) or one of attack.{{{','.join(SHARED_ATTACK_KEYS)}}}")
        try:
            attacks[name] = instantiate(node)
        except Exception as error:  # Hydra wraps the TypeError of a misspelt parameter
            raise ConfigError(f"attack.{name} is invalid: {error}") from error
    return attacks


# --- metrics ----------------------------------------------------------------------------------------

def _eps_key(eps: float) -> str:
    return f"{eps:g}"


def distance_metrics(prefix: str, distances: dict[str, torch.Tensor],
                     epsilons: DictConfig) -> dict[str, float]:
    """median/mean/robust-error metrics of per-image distances {norm: (n,)} under ``prefix``."""
    metrics = {}
    for norm, d in distances.items():
        # An attack's failures are the same images in every norm (no adversarial at all).
        metrics[f"{prefix}/failures"] = float(d.isinf().sum())
        finite = d[d.isfinite()].double()
        metrics[f"{prefix}/median_{norm}"] = d.median().item()
        metrics[f"{prefix}/mean_{norm}"] = finite.mean().item() if len(finite) else math.nan
        for eps in epsilons[norm]:
            metrics[f"{prefix}/error_pct_{norm}@{_eps_key(eps)}"] = 100.0 * (d <= eps).double().mean().item()
    return metrics


def _curve(metrics: dict, key: str, epsilons) -> list[list]:
    """Rows [eps, error %] of the robust-error curve stored as metrics ``<key>@<eps>``."""
    return [[float(eps), metrics[f"{key}@{_eps_key(eps)}"]] for eps in epsilons]


def _write_csv(path: Path, columns: dict[str, list]) -> None:
    """Columns of equal length to a CSV file (written atomically; floats as repr, so inf stays inf)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        writer.writerows(zip(*columns.values()))
    os.replace(tmp, path)


@torch.no_grad()
def _predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).cpu()


# --- attacks and bounds -----------------------------------------------------------------------------

def evaluate_attacks(attacks: dict[str, Attack], model, data, spec: DictConfig, run_dir: Path,
                     tracker) -> dict[str, float]:
    """Every attack, their per-image best and the bounds on the first ``spec.n`` test images."""
    n = len(data.test_y) if spec.n is None else min(spec.n, len(data.test_y))
    x, y = data.test_x[:n], data.test_y[:n]
    prediction = _predict(model, x, spec.batch_size)
    columns = {"index": list(range(n)), "label": y.tolist(), "prediction": prediction.tolist()}
    metrics = {"attack/n": float(n),
               "attack/clean_error_pct": 100.0 * (prediction != y.cpu()).double().mean().item()}
    best = {norm: torch.full((n,), torch.inf) for norm in NORMS}
    curves = []  # (W&B key, norm, [[eps, error_pct], ...])
    for name, attack in attacks.items():
        started = time.perf_counter()
        distances = attack_distances(attack, model, x, y, list(spec.epsilons[attack.norm]), spec.batch_size)
        elapsed = time.perf_counter() - started
        for norm in NORMS:
            columns[f"{name}_{norm}"] = distances[norm].tolist()
            best[norm] = torch.minimum(best[norm], distances[norm])
        found = distance_metrics(f"attack/{name}", {attack.norm: distances[attack.norm]}, spec.epsilons)
        found[f"attack/{name}/time_s"] = elapsed
        metrics.update(found)
        curves.append((f"attack/{name}/robust_error", attack.norm,
                       _curve(found, f"attack/{name}/error_pct_{attack.norm}", spec.epsilons[attack.norm])))
        log.info("attack %s (%s): median %.4g, %d failures, %.1fs", name, attack.norm,
                 found[f"attack/{name}/median_{attack.norm}"], found[f"attack/{name}/failures"], elapsed)
    # The best over all attacks, in every norm some attack works in (each adversarial counts in both).
    attacked_norms = sorted({attack.norm for attack in attacks.values()}, key=NORMS.index)
    metrics.update(distance_metrics("attack/best", {norm: best[norm] for norm in attacked_norms},
                                    spec.epsilons))
    for norm in NORMS:
        columns[f"best_{norm}"] = best[norm].tolist()
    for norm in attacked_norms:
        curves.append((f"attack/best/robust_error_{norm}", norm,
                       _curve(metrics, f"attack/best/error_pct_{norm}", spec.epsilons[norm])))

    bound_metrics, bound_columns = evaluate_bounds(model, x, y, spec)
    metrics.update(bound_metrics)
    columns.update(bound_columns)
    curves.append(("bounds/certified_error", "l2",
                   _curve(bound_metrics, "bounds/certified_error_pct", spec.epsilons.l2)))
    _write_csv(run_dir / "attacks.csv", columns)
    if tracker is not None:
        for key, norm, rows in curves:
            tracker.log_table(key, ["epsilon", "error_pct"], rows,
                              line=("epsilon", "error_pct", f"{key} ({norm})"))
    return metrics


def evaluate_bounds(model, x: torch.Tensor, y: torch.Tensor,
                    spec: DictConfig) -> tuple[dict[str, float], dict[str, list]]:
    """First-order and (smooth models) second-order estimates and the certificate, per image."""
    from tulip.measures import layer_norm_product  # the measures module owns the Lipschitz bound

    grads = bounds.loss_gradients(model, x, y, spec.batch_size)
    first = bounds.first_order_radii(grads.loss, grads.grad_norm)
    lipschitz = layer_norm_product(model)
    certified = bounds.certified_radii(grads.margin, lipschitz)
    metrics = {"bounds/grad_norm_max": grads.grad_norm.max().item(),
               "bounds/first_order_median": first.median().item(),
               "bounds/certified_median": certified.median().item(),
               "bounds/lipschitz_upper": float(lipschitz)}
    for eps in spec.epsilons.l2:
        # Certified at eps iff the radius exceeds eps; misclassified images (radius 0) always count.
        certified_error = 100.0 * (certified <= eps).double().mean().item()
        metrics[f"bounds/certified_error_pct@{_eps_key(eps)}"] = certified_error
    columns = {"first_order_l2": first.tolist(), "certified_l2": certified.tolist()}
    if bounds.is_smooth(model):
        curvature = bounds.hessian_norms(model, x, y, spec.batch_size)
        second = bounds.second_order_radii(grads.loss, grads.grad_norm, curvature.max().item())
        metrics["bounds/hessian_norm_max"] = curvature.max().item()
        metrics["bounds/second_order_median"] = second.median().item()
        columns["second_order_l2"] = second.tolist()
    else:
        log.info("bounds: skipping the second-order estimate: the model has piecewise-linear "
                 "activations (ReLU/max-pool), whose Hessian misses the curvature at the kinks")
    return metrics, columns


# --- nearest neighbours -----------------------------------------------------------------------------

def evaluate_neighbours(data, run_dir: Path) -> dict[str, float]:
    """Nearest differently-labelled training image of every test image, L2 and L∞; writes nn.csv."""
    columns = {"index": list(range(len(data.test_y))), "label": data.test_y.tolist()}
    metrics = {}
    for norm, nearest in (("l2", neighbours.nearest_l2), ("linf", neighbours.nearest_linf)):
        started = time.perf_counter()
        found = nearest(data.test_x, data.test_y, data.train_x, data.train_y)
        distance = found.distance.cpu()
        columns[norm] = distance.tolist()
        columns[f"{norm}_train_index"] = found.index.tolist()
        metrics.update({f"nn/{norm}_{key}": value for key, value in neighbours.summarize(distance).items()})
        log.info("nearest neighbours (%s): median %.4g, %.1fs", norm, metrics[f"nn/{norm}_median"],
                 time.perf_counter() - started)
    _write_csv(run_dir / "nn.csv", columns)
    return metrics


# --- entry points -----------------------------------------------------------------------------------

def evaluate_trained(cfg: DictConfig, model: torch.nn.Module, data, run_dir: Path,
                     tracker) -> dict[str, float]:
    """Attacks + bounds (if any attack is configured) and nearest neighbours (if ``eval.nn``) on a
    trained model; writes attacks.csv / nn.csv into ``run_dir`` and returns the metrics ({} if
    nothing is configured). ``tracker`` (or None) gets the robust-error curves as W&B tables."""
    attacks = check_config(cfg)
    metrics: dict[str, float] = {}
    run_dir = Path(run_dir)
    with frozen_eval(model):
        if attacks:
            metrics.update(evaluate_attacks(attacks, model, data, cfg.attack, run_dir, tracker))
        if cfg.eval.nn:
            metrics.update(evaluate_neighbours(data, run_dir))
    return metrics


def _merge_summary(run_dir: Path, metrics: dict, replaced_prefixes: tuple[str, ...] = ()) -> None:
    """Merge ``metrics`` into run_dir/summary.json (atomically), first dropping the keys under
    ``replaced_prefixes`` so that a re-evaluation leaves no stale attack results behind."""
    from tulip.tracking import finite_or_none, read_json, write_json_atomic

    path = run_dir / "summary.json"
    summary = read_json(path) if path.is_file() else {}
    summary = {k: v for k, v in summary.items() if not k.startswith(replaced_prefixes)}
    summary.update(finite_or_none(metrics))
    write_json_atomic(summary, path)


def _print_table(title: str, metrics: dict) -> None:
    width = max(len(key) for key in metrics)
    print(f"| {title:<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for key, value in metrics.items():
        print(f"| {key:<{width}} | {value:.6g} |")


def _load(cfg: DictConfig):
    from tulip.checkpoint import seed_everything
    from tulip.train import load_run

    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)  # random starts of the attacks
    return load_run(Path(cfg.run_dir), device)


def evaluate_run(cfg: DictConfig) -> dict[str, float]:
    """``mode=evaluate``: attacks/bounds/nearest neighbours on ``run_dir``'s best checkpoint, with the
    attack and eval settings of this command line. The results replace the run's earlier ``attack/*``,
    ``bounds/*`` (and, with eval.nn, ``nn/*``) keys of summary.json, attacks.csv and nn.csv."""
    attacks = check_config(cfg)
    if not attacks and not cfg.eval.nn:
        raise ConfigError("mode=evaluate has nothing to do: set attack=<name> (e.g. attack=[ddn,pgd_l2]) "
                          "and/or eval.nn=true")
    run = _load(cfg)
    run_dir = Path(cfg.run_dir)
    metrics = evaluate_trained(cfg, run.model, run.data, run_dir, tracker=None)
    # This evaluation's families replace the earlier ones (attacks.csv / nn.csv are rewritten too).
    replaced = (("attack/", "bounds/") if attacks else ()) + (("nn/",) if cfg.eval.nn else ())
    _merge_summary(run_dir, metrics, replaced)
    _print_table(f"evaluate {run_dir}", metrics)
    return metrics


def summary_statistics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       batch_size: int) -> dict[str, float]:
    """The original ``summary.py``'s statistics with Tulip's per-sample definitions (NOTES §1):
    tulip.measures.measure, plus the minimum confidence p₁ − p₂ over correctly classified images, the
    heuristic adversarial distance lower bound confidence / (2·weights/product_2inf) (not a
    certificate) and ‖w‖₂ over the weight tensors (conv/linear weights, not biases or BatchNorm)."""
    from tulip.measures import measure

    metrics = dict(measure(model, x, y, batch_size))
    with torch.no_grad():
        probabilities = torch.cat([model(x[i:i + batch_size]).softmax(1)
                                   for i in range(0, len(x), batch_size)])
    top2, classes = probabilities.topk(2, dim=1)
    correct = classes[:, 0] == y
    confidence = (top2[:, 0] - top2[:, 1])[correct]
    metrics["min_correct_confidence"] = confidence.min().item() if len(confidence) else math.nan
    metrics["adv_distance_lower_bound"] = (metrics["min_correct_confidence"]
                                           / (2 * metrics["weights/product_2inf"]))
    metrics["weights/l2_norm"] = math.sqrt(sum(float((p.detach() ** 2).sum())
                                               for p in model.parameters() if p.dim() > 1))
    return metrics


def summarize_run(cfg: DictConfig) -> dict[str, float]:
    """``mode=summary``: summary statistics of ``run_dir``'s best checkpoint on the whole test set,
    written to its summary.json under ``summary/...`` and printed as a table."""
    run = _load(cfg)
    with frozen_eval(run.model):
        stats = summary_statistics(run.model, run.data.test_x, run.data.test_y, cfg.test_batch_size)
    metrics = {f"summary/{key}": value for key, value in stats.items()}
    metrics["summary/best_epoch"] = float(run.checkpoint["epoch"])
    _merge_summary(Path(cfg.run_dir), metrics)
    _print_table(f"summary {cfg.run_dir}", metrics)
    return metrics
