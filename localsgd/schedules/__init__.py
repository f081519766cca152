"""Communication schedules, registered by the name used in ``configs/schedule/<name>.yaml``.

``localsgd.schedules.Fixed(8)`` is the public entry point; ``build(cfg, ...)`` makes a schedule from
its typed config. ``ddp`` is not a schedule of LocalSGD but the gradient-averaging baseline the
trainer runs through the same loop.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from ..registry import Registry
from .adacomm import AdaComm, AdaCommConfig
from .base import SyncSchedule
from .fixed import DDPConfig, Fixed, FixedConfig, OneShot, OneShotConfig
from .hierarchical import Hierarchical, HierarchicalConfig
from .lupa import QSR, Lupa, LupaConfig, QSRConfig
from .patel_dieuleveut import AdaptivePD, PatelDieuleveut, PatelDieuleveutConfig
from .post_local import PostLocal, PostLocalConfig
from .stich import Stich, StichConfig

__all__ = ["SyncSchedule", "Fixed", "OneShot", "Stich", "PatelDieuleveut", "AdaptivePD", "PostLocal", "AdaComm",
           "Lupa", "QSR", "Hierarchical", "SCHEDULES", "build", "RunInfo"]

SCHEDULES: Registry[SyncSchedule | None] = Registry("schedule")


class RunInfo:
    """What a schedule may know about the run when it is built (all equal on every rank)."""

    def __init__(self, total_local_steps: int, world_size: int, batch_size: int,
                 first_lr_decay_step: int | None = None, local_world_size: int = 1) -> None:
        self.total_local_steps = total_local_steps
        self.world_size = world_size
        self.batch_size = batch_size
        self.first_lr_decay_step = first_lr_decay_step
        self.local_world_size = local_world_size


@SCHEDULES.register("fixed", FixedConfig)
def _fixed(cfg: FixedConfig, run: RunInfo) -> SyncSchedule:
    return Fixed(cfg.H)


@SCHEDULES.register("one_shot", OneShotConfig)
def _one_shot(cfg: OneShotConfig, run: RunInfo) -> SyncSchedule:
    return OneShot()


@SCHEDULES.register("ddp", DDPConfig)
def _ddp(cfg: DDPConfig, run: RunInfo) -> None:
    return None  # the trainer wraps the model in DistributedDataParallel instead


@SCHEDULES.register("stich", StichConfig)
def _stich(cfg: StichConfig, run: RunInfo) -> SyncSchedule:
    return Stich(run.total_local_steps, run.world_size, run.batch_size, cfg.c, cfg.H_max)


@SCHEDULES.register("patel_dieuleveut", PatelDieuleveutConfig)
def _patel_dieuleveut(cfg: PatelDieuleveutConfig, run: RunInfo) -> SyncSchedule:
    if cfg.adaptive:
        return AdaptivePD(max(1, round(cfg.N1)), cfg.N_min, cfg.N_max, cfg.loss_floor)
    return PatelDieuleveut(cfg.N1, cfg.beta, run.total_local_steps)


@SCHEDULES.register("post_local", PostLocalConfig)
def _post_local(cfg: PostLocalConfig, run: RunInfo) -> SyncSchedule:
    switch = cfg.switch_step
    if switch == -1:
        if run.first_lr_decay_step is None:
            raise ConfigError("schedule.switch_step=-1 switches at the first LR decay, but the optimizer has none; "
                              "set optimizer.lr_decay=step or an explicit schedule.switch_step")
        switch = run.first_lr_decay_step
    return PostLocal(switch, cfg.H)


@SCHEDULES.register("adacomm", AdaCommConfig)
def _adacomm(cfg: AdaCommConfig, run: RunInfo) -> SyncSchedule:
    return AdaComm(cfg.tau0, cfg.interval_steps, cfg.lr_power, cfg.tau_min, cfg.tau_max)


@SCHEDULES.register("lupa", LupaConfig)
def _lupa(cfg: LupaConfig, run: RunInfo) -> SyncSchedule:
    return Lupa(cfg.tau, cfg.rounds, run.total_local_steps)


@SCHEDULES.register("hierarchical", HierarchicalConfig)
def _hierarchical(cfg: HierarchicalConfig, run: RunInfo) -> SyncSchedule:
    return Hierarchical(cfg.H_group, cfg.H_global, cfg.group_size or run.local_world_size)


@SCHEDULES.register("qsr", QSRConfig)
def _qsr(cfg: QSRConfig, run: RunInfo) -> SyncSchedule:
    return QSR(cfg.H_base, cfg.alpha)


def build(cfg: Any, run: RunInfo) -> SyncSchedule | None:
    return SCHEDULES.build(cfg, run)
