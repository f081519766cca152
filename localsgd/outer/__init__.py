"""Outer optimizers, registered by the name used in ``configs/outer/<name>.yaml``.

``build(cfg)`` makes one from its typed config: ``average`` (plain local SGD), ``slowmo``
(Wang et al., ICLR 2020, arXiv 1910.00643) and ``nesterov`` (DiLoCo, Douillard et al., arXiv 2311.08105).
The engine calls ``step(global_params, averaged, inner_lr)`` at every sync (see :mod:`.base`). Each
config dataclass builds its optimizer (``cfg.build()``) and registers itself in :data:`OUTER`, so a new
outer optimizer touches only its own file, ``configs/outer/<name>.yaml`` and its test.
"""

from __future__ import annotations

from typing import Any

from .average import AverageConfig, AverageOuter
from .base import OUTER, OuterOptimizer
from .nesterov import NesterovConfig, NesterovOuter
from .slowmo import SlowMoConfig, SlowMoOuter

__all__ = [
    "OUTER",
    "AverageConfig",
    "AverageOuter",
    "NesterovConfig",
    "NesterovOuter",
    "OuterOptimizer",
    "SlowMoConfig",
    "SlowMoOuter",
    "build",
]


def build(cfg: Any) -> OuterOptimizer:
    """The outer optimizer named by ``cfg.name``, built from ``cfg``."""
    return OUTER.build(cfg)
