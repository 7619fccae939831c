"""Where Hydra finds Tulip's local launcher (hydra/launcher=local): Hydra loads plugins only from the
`hydra_plugins` namespace package, by the module their class is defined in. The launcher itself is
tulip.launch.launcher."""
from tulip.launch.launcher import LocalLauncher as _LocalLauncher


class LocalLauncher(_LocalLauncher):
    __doc__ = _LocalLauncher.__doc__
