"""Registers uapt's launchers and tuning sweeper with Hydra, which only instantiates plugins under
`hydra_plugins`.

The code lives in uapt.launch and uapt.tune; `hydra/launcher=local_parallel`,
`hydra/launcher=slurm` and `hydra/sweeper=uapt_optuna` (conf/hydra/) target these names.
"""

from uapt.launch import LocalParallelLauncher as _LocalParallelLauncher
from uapt.launch import SlurmLauncher as _SlurmLauncher
from uapt.tune import StudiesSweeper as _StudiesSweeper


class LocalParallelLauncher(_LocalParallelLauncher):
    """uapt.launch.LocalParallelLauncher under the name Hydra accepts."""


class SlurmLauncher(_SlurmLauncher):
    """uapt.launch.SlurmLauncher under the name Hydra accepts."""


class StudiesSweeper(_StudiesSweeper):
    """uapt.tune.StudiesSweeper under the name Hydra accepts."""
