"""`run(cfg)`: what `python run.py` does, callable from tests, sweeps and notebooks.

It checks the config, then trains (mode=train) or evaluates an existing run folder
(mode=evaluate, mode=summary), and returns the metrics as a dict. A diverged run returns NaN
metrics instead of raising, so a sweep goes on with its other jobs.
"""
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from tulip.config import validate
from tulip.evaluate import check_config as check_evaluation_config
from tulip.tracking import RunContext


def hydra_context() -> tuple[Path | None, RunContext]:
    """The job's output folder and overrides, when running under Hydra."""
    if not HydraConfig.initialized():
        return None, RunContext()
    hydra_cfg = HydraConfig.get()
    choices = {group: str(option) for group, option in hydra_cfg.runtime.choices.items()
               if option is not None}
    multirun = hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN"
    context = RunContext(overrides=list(hydra_cfg.overrides.task), choices=choices,
                         sweep_dir=str(hydra_cfg.sweep.dir) if multirun else None)
    output_dir = OmegaConf.select(hydra_cfg, "runtime.output_dir")
    return (Path(output_dir) if output_dir else None), context


def run(cfg: DictConfig, run_dir: Path | str | None = None,
        context: RunContext | None = None) -> dict:
    """Run one job. `run_dir` and `context` default to what Hydra provides."""
    validate(cfg)
    check_evaluation_config(cfg)  # attack.* / eval.* errors before training, not after it
    hydra_dir, hydra_ctx = hydra_context()
    context = context or hydra_ctx
    if cfg.mode == "evaluate":
        from tulip.evaluate import evaluate_run

        return evaluate_run(cfg)
    if cfg.mode == "summary":
        from tulip.evaluate import summarize_run

        return summarize_run(cfg)
    run_dir = Path(run_dir) if run_dir is not None else hydra_dir
    if run_dir is None:
        raise ValueError("run(cfg) outside Hydra needs run_dir")
    from tulip.train import train

    return train(cfg, run_dir, context)
