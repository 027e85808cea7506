"""Registers uapt's launchers with Hydra, which only instantiates plugins under `hydra_plugins`.

The code lives in uapt.launch; `hydra/launcher=local_parallel` (conf/hydra/launcher/) targets this.
"""

from uapt.launch import LocalParallelLauncher as _LocalParallelLauncher


class LocalParallelLauncher(_LocalParallelLauncher):
    """uapt.launch.LocalParallelLauncher under the name Hydra accepts."""
