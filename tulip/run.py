"""`python -m tulip.run [overrides]` and the checkout's `python run.py [overrides]`: Tulip's Hydra app.

It hands tulip.main.run the config `tulip.config_files.config_dir()` finds (the checkout's conf/, else
the copy installed with the package) and returns what sweepers minimise. run.py only calls it; the
benchmarks start Tulip through it, so they work from any install.
"""
import hydra
from omegaconf import DictConfig

from tulip.config import objective_values
from tulip.config_files import CONFIG_NAME, config_dir
from tulip.main import run


@hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=CONFIG_NAME)
def main(cfg: DictConfig) -> float | tuple[float, ...]:
    return objective_values(run(cfg), cfg.objectives)


if __name__ == "__main__":
    main()
