"""Tulip's entry point: `python run.py [overrides]`, `python run.py -m [sweep overrides]`.

All the work is in tulip.main.run; the Hydra app that hands it the config is tulip.run.main, which an
installed Tulip also starts as `python -m tulip.run`. It returns what Hydra sweepers minimise: the
metrics the config's `objectives` names (test/error_pct by default), one float or a tuple, NaN for a
diverged run.
"""
from tulip.run import main

if __name__ == "__main__":
    main()
