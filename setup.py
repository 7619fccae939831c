"""Packaging beyond what setup.cfg can declare: the top-level conf/ shipped inside the package.

conf/ stays where users edit it, beside run.py; a wheel carries it as the package tulip.conf (its
files as package data), where tulip.config_files finds it when there is no checkout. setup.cfg's
package finder cannot add a package that has no folder of its own, so the packages are listed here.
"""
from setuptools import find_namespace_packages, setup

# find_namespace: hydra_plugins is a namespace package shared with other Hydra plugins (no __init__.py);
# hydra_plugins.tulip_*: Hydra looks for sweepers and launchers only there (they hold the classes of
# hydra/sweeper=optuna and hydra/launcher=local)
PACKAGES = find_namespace_packages(include=["tulip", "tulip.*", "hydra_plugins.tulip_sweeper",
                                            "hydra_plugins.tulip_launcher"])

setup(
    packages=[*PACKAGES, "tulip.conf"],
    package_dir={"tulip.conf": "conf"},
    package_data={"tulip.conf": ["**/*.yaml"]},
)
