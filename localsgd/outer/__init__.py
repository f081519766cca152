"""Outer optimizers, registered by the name used in ``configs/outer/<name>.yaml``.

``build(cfg)`` makes one from its typed config: ``average`` (plain local SGD), ``slowmo``
(Wang et al., ICLR 2020, arXiv 1910.00643) and ``nesterov`` (DiLoCo, Douillard et al., arXiv 2311.08105).
The engine calls ``step(global_params, averaged, inner_lr)`` at every sync (see :mod:`.base`).
"""

from __future__ import annotations

from typing import Any

from ..registry import Registry
from .average import AverageConfig, AverageOuter
from .base import OuterOptimizer
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

OUTER: Registry[OuterOptimizer] = Registry("outer")


@OUTER.register("average", AverageConfig)
def _average(cfg: AverageConfig) -> OuterOptimizer:
    return AverageOuter()


@OUTER.register("slowmo", SlowMoConfig)
def _slowmo(cfg: SlowMoConfig) -> OuterOptimizer:
    return SlowMoOuter(alpha=cfg.alpha, beta=cfg.beta)


@OUTER.register("nesterov", NesterovConfig)
def _nesterov(cfg: NesterovConfig) -> OuterOptimizer:
    return NesterovOuter(lr=cfg.lr, momentum=cfg.momentum)


def build(cfg: Any) -> OuterOptimizer:
    return OUTER.build(cfg)
