"""Communication schedules, registered by the name used in ``configs/schedule/<name>.yaml``.

``localsgd.schedules.Fixed(8)`` is the public entry point; ``build(cfg, ...)`` makes a schedule from
its typed config. ``ddp`` is not a schedule of LocalSGD but the gradient-averaging baseline the
trainer runs through the same loop.
"""

from __future__ import annotations

from typing import Any

from ..registry import Registry
from .base import SyncSchedule
from .fixed import DDPConfig, Fixed, FixedConfig, OneShot, OneShotConfig

__all__ = ["SyncSchedule", "Fixed", "OneShot", "SCHEDULES", "build", "RunInfo"]

SCHEDULES: Registry[SyncSchedule | None] = Registry("schedule")


class RunInfo:
    """What a schedule may know about the run when it is built (all equal on every rank)."""

    def __init__(self, total_local_steps: int, world_size: int, batch_size: int) -> None:
        self.total_local_steps = total_local_steps
        self.world_size = world_size
        self.batch_size = batch_size


@SCHEDULES.register("fixed", FixedConfig)
def _fixed(cfg: FixedConfig, run: RunInfo) -> SyncSchedule:
    return Fixed(cfg.H)


@SCHEDULES.register("one_shot", OneShotConfig)
def _one_shot(cfg: OneShotConfig, run: RunInfo) -> SyncSchedule:
    return OneShot()


@SCHEDULES.register("ddp", DDPConfig)
def _ddp(cfg: DDPConfig, run: RunInfo) -> None:
    return None  # the trainer wraps the model in DistributedDataParallel instead


def build(cfg: Any, run: RunInfo) -> SyncSchedule | None:
    return SCHEDULES.build(cfg, run)
