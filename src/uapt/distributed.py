"""Data parallelism on existing engines: torchrun sets the environment, torch.distributed runs.

    torchrun --nproc_per_node=2 -m uapt.train ...     # or: uapt-train trainer.nproc=2 ...

Ranks split every global micro-batch in order; only rank 0 writes records, W&B and checkpoints.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def under_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> World:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU); a no-op otherwise."""
    if not under_torchrun():
        return World()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def all_sum(values: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        values = values.clone()
        dist.all_reduce(values)
    return values


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def relaunch_with_torchrun(nproc: int, argv: list[str], env: dict[str, str] | None = None) -> int:
    """`uapt-train trainer.nproc=N`: run this same command under torchrun with N processes
    (`env`: variables added to this process's environment)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "uapt.train",
        *argv,
    ]
    return subprocess.call(command, env={**os.environ, **(env or {})})
