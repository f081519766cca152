"""Optimizer plugins of the worker loop, registered by the name used in ``configs/optimizer/``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import Registry
from .base import OptimizerPlugin, StepContext, StepOutput, first_decay_step, lr_at
from .torch_optim import AdamWConfig, SGDConfig, build_adamw, build_sgd

__all__ = ["OPTIMIZERS", "OptimizerPlugin", "StepContext", "StepOutput", "build", "lr_at", "first_decay_step"]

OPTIMIZERS: Registry[OptimizerPlugin] = Registry("optimizer")
OPTIMIZERS.register("sgd", SGDConfig)(build_sgd)
OPTIMIZERS.register("adamw", AdamWConfig)(build_adamw)


def build(cfg: Any, model: nn.Module, total_steps: int) -> OptimizerPlugin:
    return OPTIMIZERS.build(cfg, list(model.parameters()), total_steps)
