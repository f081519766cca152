"""Batch-size ramps, registered by the name used in ``configs/ramp/<name>.yaml``, and LR coupling.

``build(cfg, base_batch, total_steps, world_size=1)`` makes a :class:`BatchRamp` from its typed config:
``none``, ``step``, ``linear``, ``geometric``, ``phases`` (a batch and an LR per phase), ``smith`` (Smith et
al., ICLR 2018, arXiv 1711.00489) and
``noise_scale`` (ours, on McCandlish et al., arXiv 1812.06162, which needs the real ``world_size``).
Each config dataclass builds its ramp (``cfg.build(...)``) and registers itself in :data:`RAMPS`, so a
new ramp touches only its own file, ``configs/ramp/<name>.yaml`` and its test.
:meth:`BatchRamp.lr_scale` is the LR multiplier of a step: Goyal et al.'s linear scaling with the batch
(arXiv 1706.02677) unless the ramp says otherwise (``smith`` does not couple, ``noise_scale`` follows
McCandlish et al.'s eq. 2.6). :func:`coupled_lr` is Goyal's scaling with warm-up;
:class:`NoiseScaleEstimator` measures B_simple.
"""

from __future__ import annotations

from typing import Any

from .base import RAMPS, BatchRamp
from .geometric import GeometricRamp, GeometricRampConfig
from .goyal import coupled_lr
from .linear import LinearRamp, LinearRampConfig
from .noise_scale import (
    NoiseScaleEstimator,
    NoiseScaleFeed,
    NoiseScaleRamp,
    NoiseScaleRampConfig,
    mccandlish_lr_multiplier,
    two_batch_estimates,
)
from .none import ConstantBatch, NoneRampConfig
from .phases import PhasesRamp, PhasesRampConfig
from .smith import SmithRamp, SmithRampConfig
from .step import StepRamp, StepRampConfig

__all__ = [
    "RAMPS",
    "BatchRamp",
    "ConstantBatch",
    "GeometricRamp",
    "GeometricRampConfig",
    "LinearRamp",
    "LinearRampConfig",
    "NoiseScaleEstimator",
    "NoiseScaleFeed",
    "NoiseScaleRamp",
    "NoiseScaleRampConfig",
    "NoneRampConfig",
    "PhasesRamp",
    "PhasesRampConfig",
    "SmithRamp",
    "SmithRampConfig",
    "StepRamp",
    "StepRampConfig",
    "build",
    "coupled_lr",
    "mccandlish_lr_multiplier",
    "two_batch_estimates",
]


def build(cfg: Any, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
    """The ramp of ``cfg`` for a run with this per-worker base batch, local-step budget and worker count."""
    return RAMPS.build(cfg, base_batch, total_steps, world_size=world_size)
