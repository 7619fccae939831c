"""``mode=evaluate`` and ``mode=summary``: work on an existing run folder's best checkpoint.

- ``python run.py mode=evaluate run_dir=<path> 'attack=[ddn,pgd_l2]' eval.nn=true``: the final evaluation
  (tulip.evaluate.final) with this command line's attack and eval settings. Its results replace the run's
  earlier keys of the families it recomputes (``attack/*``, ``bounds/*`` with ``cert/*``, ``nn/*``) in summary.json, and
  their csv files.
- ``python run.py mode=summary run_dir=<path>``: what the original ``summary.py`` reported, recomputed on
  the best checkpoint and the whole test set, merged into summary.json as ``summary/*`` and printed.

Each logs a W&B run of its own (job type ``evaluate`` / ``summary``, tulip.runs.tracking) in the training
run's group: the evaluation's curves, its per-image table and the mode's metrics as its summary.
"""
import logging
import math
from typing import Callable

import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from tulip.runs import metric_keys
from tulip.config import TRAINING_STATE, ConfigError, resolve_device
from tulip.evaluate.final import Evaluation
from tulip.evaluate.measures import measure
from tulip.nn.perturbations import frozen_eval
from tulip.build import LoadedRun, load_run
from tulip.runs.folder import RunFolder, RunFolderError
from tulip.runs.status import STATUS, Status
from tulip.seeding import seed_everything
from tulip.runs.tracking import JOB_EVALUATE, JOB_SUMMARY, RunContext, Tracker

log = logging.getLogger(__name__)

# Config groups whose option fills a key of another name (conf/regularizer/* fills `reg`).
GROUP_KEYS = {"regularizer": "reg"}


def _load(cfg: DictConfig) -> LoadedRun:
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)  # random starts of the attacks
    return load_run(cfg.run_dir, device)


def _training_command(folder: RunFolder) -> str:
    """The command that trained `folder`, from Hydra's .hydra/overrides.yaml, pointed at the folder."""
    try:
        overrides = yaml.safe_load((folder.path / ".hydra" / "overrides.yaml").read_text()) or []
    except (OSError, yaml.YAMLError):
        overrides = ["<its overrides>"]
    kept = [o for o in overrides if isinstance(o, str) and not o.startswith("hydra.run.dir=")]
    return " ".join(["python run.py", *kept, f"hydra.run.dir={folder.path}"])


def _require_summary(folder: RunFolder) -> None:
    """mode=evaluate merges its keys into the training run's summary.json: without one (training was killed
    before its end, e.g. during its final evaluation) the merge would make a summary with no status and
    no best epoch. Refuse, saying how to finish the run first."""
    if not folder.summary_file.exists() and folder.checkpoint("best").exists():
        raise RunFolderError(
            f"{folder.path} has no summary.json: its training stopped before the end (or is still running). "
            f"Finish it first by rerunning its training command in that folder, `{_training_command(folder)}`: "
            f"it resumes from checkpoints/last.pt and runs the final evaluation; then mode=evaluate again")


def _training_choices(folder: RunFolder) -> dict[str, str]:
    """The config group choices of the job that trained `folder`, as Hydra recorded them in its
    .hydra/hydra.yaml; {} for a run trained outside Hydra (or a file that cannot be read: they only
    label the W&B run)."""
    try:
        recorded = yaml.safe_load((folder.path / ".hydra" / "hydra.yaml").read_text())
        choices = recorded["hydra"]["runtime"]["choices"]
        return {group: str(option) for group, option in choices.items() if option is not None}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return {}


def _tracker(cfg: DictConfig, run: LoadedRun, context: RunContext, job_type: str) -> Tracker:
    """The mode's W&B run. Its config and choices (tags) are the training run's, with this command's
    for what does not change what was trained (attack, eval, wandb, ...): the command's own defaults
    (regularizer=none, ...) would file it under the wrong configuration in a sweep's W&B workspace."""
    def from_command(key: str) -> bool:
        top = key.split("/")[0]
        return GROUP_KEYS.get(top, top) not in TRAINING_STATE

    trained = OmegaConf.to_container(run.cfg, resolve=True)
    command = OmegaConf.to_container(cfg, resolve=True)
    config = {**{k: v for k, v in trained.items() if not from_command(k)},
              **{k: v for k, v in command.items() if from_command(k)}}
    choices = {**{g: o for g, o in _training_choices(run.folder).items() if not from_command(g)},
               **{g: o for g, o in context.choices.items() if from_command(g)}}
    return Tracker(OmegaConf.create(config), run.folder, RunContext(list(context.overrides), choices), job_type)


def _tracked(tracker: Tracker, work: Callable[[], dict]) -> dict:
    """work()'s metrics; the mode's W&B run is finished either way (failed, on any exception)."""
    try:
        metrics = work()
    except BaseException:
        tracker.finish({}, failed=True)
        raise
    tracker.finish(metrics, failed=False)
    return metrics


def print_table(title: str, metrics: dict) -> None:
    width = max(len(key) for key in metrics)
    print(f"| {title:<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for key, value in metrics.items():
        print(f"| {key:<{width}} | {value if isinstance(value, str) else format(value, '.6g')} |")


def evaluate_run(cfg: DictConfig, evaluation: Evaluation, context: RunContext | None = None) -> dict[str, float]:
    """``mode=evaluate``: `evaluation` on ``run_dir``'s best checkpoint, merged into its summary.json."""
    if not evaluation.families:
        raise ConfigError("mode=evaluate has nothing to do: set attack=<name> (e.g. attack=[ddn,pgd_l2]), "
                          "eval.bounds=true and/or eval.nn=true")
    _require_summary(RunFolder(cfg.run_dir))
    run = _load(cfg)
    status = run.folder.read_summary().get(STATUS)  # a damaged summary.json stops here, before the work
    if status != Status.FINISHED:
        log.warning("%s: its training has not finished (summary.json status: %s); evaluating its best "
                    "checkpoint (epoch %d). Its training command finishes the run, whose own final evaluation "
                    "then replaces this one.", run.folder.path, status, run.checkpoint["epoch"])
    tracker = _tracker(cfg, run, context or RunContext(), JOB_EVALUATE)

    def evaluate() -> dict:
        metrics = evaluation(run.model, run.data, run.folder, tracker)
        run.folder.write_summary(metrics, merge=True, drop_prefixes=evaluation.families)
        return metrics
    metrics = _tracked(tracker, evaluate)
    print_table(f"evaluate {run.folder.path}", metrics)
    return metrics


def summary_statistics(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                       batch_size: int) -> dict[str, float]:
    """The original ``summary.py``'s statistics with Tulip's per-sample definitions: tulip.evaluate.measures.measure,
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


def summarize_run(cfg: DictConfig, context: RunContext | None = None) -> dict[str, float]:
    """``mode=summary``: summary statistics of ``run_dir``'s best checkpoint on the whole test set,
    merged into its summary.json under ``summary/...`` and printed as a table."""
    run = _load(cfg)
    tracker = _tracker(cfg, run, context or RunContext(), JOB_SUMMARY)  # reads summary.json: damaged, it stops here

    def summarize() -> dict:
        with frozen_eval(run.model):
            stats = summary_statistics(run.model, run.data.test_x, run.data.test_y, cfg.test_batch_size)
        metrics = {metric_keys.summary(key): value for key, value in stats.items()}
        metrics[metric_keys.summary("best_epoch")] = float(run.checkpoint["epoch"])
        run.folder.write_summary(metrics, merge=True)
        return metrics
    metrics = _tracked(tracker, summarize)
    print_table(f"summary {run.folder.path}", metrics)
    return metrics
