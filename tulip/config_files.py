"""Where Tulip's Hydra config (config.yaml and its option groups) is read from.

A checkout has one set of config files: the top-level conf/ that users edit and run.py reads. An
installed Tulip (a plain `pip install .`, no checkout around it) carries a copy of them as the package
data tulip/conf, which the wheel build maps from conf/ (setup.py). Everything else that composes the
config - `python -m tulip.run`, the benchmarks - asks `config_dir()`, so it reads what run.py would.
"""
from importlib import resources
from pathlib import Path

CONFIG_NAME = "config"
# A checkout: conf/ beside the tulip/ package and run.py. Both are required, so that a stray conf/ in
# site-packages (another distribution's) is never taken for Tulip's.
CHECKOUT = Path(__file__).resolve().parents[1]


def checkout_conf(checkout: Path = CHECKOUT) -> Path | None:
    conf = checkout / "conf"
    return conf if (conf / f"{CONFIG_NAME}.yaml").is_file() and (checkout / "run.py").is_file() else None


def packaged_conf() -> Path:
    return Path(str(resources.files("tulip") / "conf"))


def config_dir(checkout: Path = CHECKOUT, packaged: Path | None = None) -> Path:
    """The checkout's conf/ when Tulip runs from a checkout (editable install included), else the copy
    installed with the package."""
    found = checkout_conf(checkout)
    if found is not None:
        return found
    packaged = packaged_conf() if packaged is None else packaged
    if (packaged / f"{CONFIG_NAME}.yaml").is_file():
        return packaged
    raise FileNotFoundError(f"no Tulip config: neither {checkout / 'conf'} (a checkout) nor {packaged} (an "
                            f"installed package) holds {CONFIG_NAME}.yaml; reinstall Tulip")
