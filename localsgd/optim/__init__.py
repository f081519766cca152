"""Optimizer plugins of the worker loop, registered by the name used in ``configs/optimizer/``.

Each plugin's config dataclass builds it and registers itself in :data:`OPTIMIZERS` in its own file:
``sgd`` and ``adamw`` (:mod:`.torch_optim`), ``stn`` (:mod:`.stn`, on the Self-Tuning Network pieces of
:mod:`localsgd.stn`), ``learned`` (:mod:`.learned`) and ``metz_unsupervised`` (:mod:`.metz`, both on the
rules of :mod:`localsgd.learned`). Importing this package imports every plugin module, so the registry
is complete; the packages it builds on import nothing from it.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import OPTIMIZERS, OptimizerPlugin, StepContext, StepOptions, StepOutput, first_decay_step, lr_at
from .learned import LearnedConfig
from .metz import MetzUnsupervisedConfig
from .stn import StnConfig, StnPlugin, build_stn, linearized_forward
from .torch_optim import AdamWConfig, SGDConfig

__all__ = ["OPTIMIZERS", "OptimizerPlugin", "StepContext", "StepOptions", "StepOutput", "build", "lr_at",
           "first_decay_step", "AdamWConfig", "LearnedConfig", "MetzUnsupervisedConfig", "SGDConfig", "StnConfig",
           "StnPlugin", "build_stn", "linearized_forward"]


def build(cfg: Any, model: nn.Module, total_steps: int) -> OptimizerPlugin:
    """The plugin ``cfg`` selects, built by ``cfg.build(model, total_steps)`` via :data:`OPTIMIZERS`.

    Every plugin gets the model, not its parameters: STN and the Metz rule replace layers in place.
    """
    return OPTIMIZERS.build(cfg, model, total_steps)
