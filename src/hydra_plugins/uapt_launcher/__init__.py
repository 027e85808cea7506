"""Registers uapt's plugins with Hydra, which only finds plugins under `hydra_plugins`.

The code lives in uapt.launch, uapt.tune and uapt.sweeps: `hydra/launcher=local_parallel`,
`hydra/launcher=slurm` and `hydra/sweeper=uapt_optuna` (conf/hydra/) target these names, and the
config groups sweep, variant and tuned come from the top-level sweeps/ folder. The modules are
imported, not their classes: Hydra registers every plugin class it finds in this namespace, and
a search path plugin imported by name would be registered twice.
"""

from uapt import launch as _launch
from uapt import sweeps as _sweeps
from uapt import tune as _tune


class LocalParallelLauncher(_launch.LocalParallelLauncher):
    """uapt.launch.LocalParallelLauncher under the name Hydra accepts."""


class SlurmLauncher(_launch.SlurmLauncher):
    """uapt.launch.SlurmLauncher under the name Hydra accepts."""


class StudiesSweeper(_tune.StudiesSweeper):
    """uapt.tune.StudiesSweeper under the name Hydra accepts."""


class SweepsConfigSource(_sweeps.SweepsConfigSource):
    """uapt.sweeps.SweepsConfigSource under the name Hydra accepts."""


class SweepsSearchPath(_sweeps.SweepsSearchPath):
    """uapt.sweeps.SweepsSearchPath under the name Hydra accepts."""
