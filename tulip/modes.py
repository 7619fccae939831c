"""``mode=evaluate`` and ``mode=summary``: work on an existing run folder's best checkpoint.

- ``python run.py mode=evaluate run_dir=<path> 'attack=[ddn,pgd_l2]' eval.nn=true``: the final evaluation
  (tulip.evaluation) with this command line's attack and eval settings. Its results replace the run's
  earlier keys of the families it recomputes (``attack/*``, ``bounds/*`` with ``cert/*``, ``nn/*``) in summary.json, and
  their csv files.
- ``python run.py mode=summary run_dir=<path>``: what the original ``summary.py`` reported, recomputed on
  the best checkpoint and the whole test set, merged into summary.json as ``summary/*`` and printed.
"""
import math

import torch
from omegaconf import DictConfig

from tulip import metric_keys
from tulip.config import ConfigError, resolve_device
from tulip.evaluation import Evaluation
from tulip.measures import measure
from tulip.perturbations import frozen_eval
from tulip.run_folder import LoadedRun, load_run
from tulip.seeding import seed_everything


def _load(cfg: DictConfig) -> LoadedRun:
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)  # random starts of the attacks
    return load_run(cfg.run_dir, device)


def print_table(title: str, metrics: dict) -> None:
    width = max(len(key) for key in metrics)
    print(f"| {title:<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for key, value in metrics.items():
        print(f"| {key:<{width}} | {value:.6g} |")


def evaluate_run(cfg: DictConfig, evaluation: Evaluation) -> dict[str, float]:
    """``mode=evaluate``: `evaluation` on ``run_dir``'s best checkpoint, merged into its summary.json."""
    if not evaluation.families:
        raise ConfigError("mode=evaluate has nothing to do: set attack=<name> (e.g. attack=[ddn,pgd_l2]), "
                          "eval.bounds=true and/or eval.nn=true")
    run = _load(cfg)
    run.folder.read_summary()  # a damaged summary.json stops here, not after the evaluation's work
    metrics = evaluation(run.model, run.data, run.folder)
    run.folder.write_summary(metrics, merge=True, drop_prefixes=evaluation.families)
    print_table(f"evaluate {run.folder.path}", metrics)
    return metrics


def summary_statistics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       batch_size: int) -> dict[str, float]:
    """The original ``summary.py``'s statistics with Tulip's per-sample definitions: tulip.measures.measure,
    plus the minimum confidence p₁ − p₂ over correctly classified images, the heuristic adversarial
    distance lower bound confidence / (2·weights/product_2inf) (not a certificate) and ‖w‖₂ over the
    weight tensors (conv/linear weights, not biases or BatchNorm)."""
    metrics = dict(measure(model, x, y, batch_size))
    with torch.no_grad():
        probabilities = torch.cat([model(x[i:i + batch_size]).softmax(1) for i in range(0, len(x), batch_size)])
    top2, classes = probabilities.topk(2, dim=1)
    correct = classes[:, 0] == y
    confidence = (top2[:, 0] - top2[:, 1])[correct]
    metrics["min_correct_confidence"] = confidence.min().item() if len(confidence) else math.nan
    metrics["adv_distance_lower_bound"] = (metrics["min_correct_confidence"]
                                           / (2 * metrics[metric_keys.PRODUCT_2INF]))
    metrics["weights/l2_norm"] = math.sqrt(sum(float((p.detach() ** 2).sum())
                                               for p in model.parameters() if p.dim() > 1))
    return metrics


def summarize_run(cfg: DictConfig) -> dict[str, float]:
    """``mode=summary``: summary statistics of ``run_dir``'s best checkpoint on the whole test set,
    merged into its summary.json under ``summary/...`` and printed as a table."""
    run = _load(cfg)
    with frozen_eval(run.model):
        stats = summary_statistics(run.model, run.data.test_x, run.data.test_y, cfg.test_batch_size)
    metrics = {metric_keys.summary(key): value for key, value in stats.items()}
    metrics[metric_keys.summary("best_epoch")] = float(run.checkpoint["epoch"])
    run.folder.write_summary(metrics, merge=True)
    print_table(f"summary {run.folder.path}", metrics)
    return metrics
