"""Optimizer plugins of the worker loop, registered by the name used in ``configs/optimizer/``."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..registry import Registry
from ..stn.plugin import StnConfig, build_stn
from .base import OptimizerPlugin, StepContext, StepOutput, first_decay_step, lr_at
from .learned import LearnedConfig, build_learned
from .metz import MetzUnsupervisedConfig, build_metz_unsupervised
from .torch_optim import AdamWConfig, SGDConfig, build_adamw, build_sgd

__all__ = ["OPTIMIZERS", "OptimizerPlugin", "StepContext", "StepOutput", "build", "lr_at", "first_decay_step"]

OPTIMIZERS: Registry[OptimizerPlugin] = Registry("optimizer")
OPTIMIZERS.register("sgd", SGDConfig)(build_sgd)
OPTIMIZERS.register("adamw", AdamWConfig)(build_adamw)
OPTIMIZERS.register("stn", StnConfig)(build_stn)
OPTIMIZERS.register("metz_unsupervised", MetzUnsupervisedConfig)(build_metz_unsupervised)
OPTIMIZERS.register("learned", LearnedConfig)(build_learned)


def build(cfg: Any, model: nn.Module, total_steps: int) -> OptimizerPlugin:
    entry = OPTIMIZERS.get(cfg.name)
    if getattr(entry.build, "takes_model", False):  # e.g. STN, which replaces the model's layers in place
        return entry.build(cfg, model, total_steps)
    return entry.build(cfg, list(model.parameters()), total_steps)
