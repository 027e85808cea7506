"""Registers uapt's launchers with Hydra, which only instantiates plugins under `hydra_plugins`.

The code lives in uapt.launch; `hydra/launcher=local_parallel` and `hydra/launcher=slurm`
(conf/hydra/launcher/) target these.
"""

from uapt.launch import LocalParallelLauncher as _LocalParallelLauncher
from uapt.launch import SlurmLauncher as _SlurmLauncher


class LocalParallelLauncher(_LocalParallelLauncher):
    """uapt.launch.LocalParallelLauncher under the name Hydra accepts."""


class SlurmLauncher(_SlurmLauncher):
    """uapt.launch.SlurmLauncher under the name Hydra accepts."""
