"""Tulip's entry point: `python run.py [overrides]`, `python run.py -m [sweep overrides]`.

All the work is in tulip.main.run; this file only hands it Hydra's config. The return value is what
Hydra sweepers minimise: the metrics the config's `objectives` names (test/error_pct by default), one
float or a tuple, NaN for a diverged run.
"""
import hydra
from omegaconf import DictConfig

from tulip.config import objective_values
from tulip.main import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | tuple[float, ...]:
    return objective_values(run(cfg), cfg.objectives)


if __name__ == "__main__":
    main()
