"""Tulip's entry point: `python run.py [overrides]`, `python run.py -m [sweep overrides]`.

All the work is in tulip.main.run; this file only hands it Hydra's config. The return value (test
error, NaN for a diverged run) is what Hydra sweepers minimise.
"""
import hydra
from omegaconf import DictConfig

from tulip.main import run


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    metrics = run(cfg)
    return metrics.get("test/error_pct", float("nan"))


if __name__ == "__main__":
    main()
