"""Communication schedules, registered by the name used in ``configs/schedule/<name>.yaml``.

``localsgd.schedules.Fixed(8)`` is the public entry point; ``build(cfg, run)`` makes a schedule from
its typed config (each config dataclass builds its own schedule and registers itself in
:data:`SCHEDULES` in its own file). ``ddp`` is not a schedule of LocalSGD but the gradient-averaging
baseline the trainer runs through the same loop.
"""

from __future__ import annotations

from typing import Any

from .adacomm import AdaComm, AdaCommConfig
from .base import SCHEDULES, RunInfo, SyncSchedule
from .ddp import DDPConfig
from .fixed import Fixed, FixedConfig, OneShot, OneShotConfig
from .hierarchical import Hierarchical, HierarchicalConfig
from .lupa import QSR, Lupa, LupaConfig, QSRConfig
from .noise_adaptive import NoiseAdaptive, NoiseAdaptiveConfig
from .patel_dieuleveut import AdaptivePD, PatelDieuleveut, PatelDieuleveutConfig
from .post_local import PostLocal, PostLocalConfig
from .stich import Stich, StichConfig

# Importing a schedule's module registers its config; the configs are public for typed use.
__all__ = ["SyncSchedule", "Fixed", "OneShot", "Stich", "PatelDieuleveut", "AdaptivePD", "PostLocal", "AdaComm",
           "Lupa", "QSR", "Hierarchical", "NoiseAdaptive", "SCHEDULES", "build", "RunInfo",
           "AdaCommConfig", "DDPConfig", "FixedConfig", "HierarchicalConfig", "LupaConfig", "NoiseAdaptiveConfig",
           "OneShotConfig", "PatelDieuleveutConfig", "PostLocalConfig", "QSRConfig", "StichConfig"]


def build(cfg: Any, run: RunInfo) -> SyncSchedule | None:
    """The schedule ``cfg`` selects (``None`` for ``ddp``): ``cfg.build(run)`` via :data:`SCHEDULES`."""
    return SCHEDULES.build(cfg, run)
