"""Batch-size ramps, registered by the name used in ``configs/ramp/<name>.yaml``, and LR coupling.

``build(cfg, base_batch, total_steps, world_size=1)`` makes a :class:`BatchRamp` from its typed config:
``none``, ``step``, ``linear``, ``geometric``, ``smith`` (Smith et al., ICLR 2018, arXiv 1711.00489) and
``noise_scale`` (ours, on McCandlish et al., arXiv 1812.06162, which needs the real ``world_size``).
:func:`coupled_lr` is Goyal et al.'s linear scaling with warm-up (arXiv 1706.02677);
:class:`NoiseScaleEstimator` measures B_simple.
"""

from __future__ import annotations

from typing import Any

from ..registry import Registry
from .base import BatchRamp, check_b_max
from .geometric import GeometricRamp, GeometricRampConfig
from .goyal import coupled_lr
from .linear import LinearRamp, LinearRampConfig
from .noise_scale import NoiseScaleEstimator, NoiseScaleRamp, NoiseScaleRampConfig, two_batch_estimates
from .none import ConstantBatch, NoneRampConfig
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
    "NoiseScaleRamp",
    "NoiseScaleRampConfig",
    "NoneRampConfig",
    "SmithRamp",
    "SmithRampConfig",
    "StepRamp",
    "StepRampConfig",
    "build",
    "coupled_lr",
    "two_batch_estimates",
]

RAMPS: Registry[BatchRamp] = Registry("ramp")


@RAMPS.register("none", NoneRampConfig)
def _none(cfg: NoneRampConfig, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
    return ConstantBatch(base_batch, total_steps)


@RAMPS.register("step", StepRampConfig)
def _step(cfg: StepRampConfig, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
    check_b_max("step", cfg.b_max, base_batch)
    return StepRamp(base_batch, total_steps, list(cfg.milestones), cfg.factor, cfg.b_max)


@RAMPS.register("linear", LinearRampConfig)
def _linear(cfg: LinearRampConfig, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
    return LinearRamp(base_batch, total_steps, cfg.b_start, cfg.b_end, cfg.start, cfg.end)


@RAMPS.register("geometric", GeometricRampConfig)
def _geometric(cfg: GeometricRampConfig, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
    check_b_max("geometric", cfg.b_max, base_batch)
    return GeometricRamp(base_batch, total_steps, cfg.factor, cfg.every_steps, cfg.b_max)


@RAMPS.register("smith", SmithRampConfig)
def _smith(cfg: SmithRampConfig, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
    check_b_max("smith", cfg.b_max, base_batch)
    return SmithRamp(base_batch, total_steps, list(cfg.milestones), cfg.decay_factor, cfg.b_max)


@RAMPS.register("noise_scale", NoiseScaleRampConfig)
def _noise_scale(cfg: NoiseScaleRampConfig, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
    check_b_max("noise_scale", cfg.b_max, base_batch)
    return NoiseScaleRamp(base_batch, total_steps, world_size, cfg.b_min, cfg.b_max, cfg.max_growth,
                          cfg.warmup_measurements)


def build(cfg: Any, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
    """The ramp of ``cfg`` for a run with this per-worker base batch, local-step budget and worker count."""
    return RAMPS.build(cfg, base_batch, total_steps, world_size=world_size)
