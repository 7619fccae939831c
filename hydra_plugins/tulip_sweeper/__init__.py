"""Where Hydra finds Tulip's Optuna sweeper: Hydra loads plugins only from the `hydra_plugins`
namespace package, by the module their class is defined in. The sweeper itself is tulip.launch.sweeper."""
from tulip.launch.sweeper import OptunaSweeper as _OptunaSweeper


class OptunaSweeper(_OptunaSweeper):
    __doc__ = _OptunaSweeper.__doc__
