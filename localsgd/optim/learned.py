"""``optimizer=learned``: the meta-learned per-parameter MLP optimizer as a worker-loop plugin.

The rule is :mod:`localsgd.learned.lopt`: the supervised, per-parameter instance of Metz,
Maheswaranathan, Cheung & Sohl-Dickstein's learned learning procedure (ICLR 2019, arXiv 1804.00222),
following the ``MLPLOpt`` design of Metz et al. (ICML 2019, arXiv 1810.10180, §3), whose update is
p ← p − lr·step_mult·d·exp(exp_mult·μ) (arXiv 1810.10180, Eq. 1 form). This module only wires that rule
into the worker loop: the config, the plugin (which feeds the time features the global step) and its
builder. ``lr`` (default 1.0) is a user multiplier on the learned step; the cosine decay of that
multiplier is a tunable default of ours, not from the papers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..learned.lopt import LearnedOptimizer
from .base import OPTIMIZERS, Batch, StepContext, StepOutput
from .torch_optim import LRScheduleFields, TorchOptimizerPlugin


@OPTIMIZERS.add
@dataclass
class LearnedConfig(LRScheduleFields):
    """``optimizer=learned``: the bundled (or a given) meta-learned rule; ``lr`` multiplies its step.

    The LR-schedule fields mean what they mean for ``sgd``/``adamw`` (warm-up, then a decay), applied
    to that multiplier. The decay defaults to cosine (a tunable default of ours): the bundled rule was
    meta-trained on runs of at most 300 steps and does not shrink its own step over longer ones; on
    MNIST-1D at a constant multiplier the training loss turns upwards after about 500 steps.
    """

    name: str = "learned"
    lr: float = 1.0
    lr_decay: str = "cosine"
    checkpoint: str = ""  # empty: the checkpoint bundled with the package

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        yield from self._lr_problems()
        if self.checkpoint and not Path(self.checkpoint).is_file():
            yield "checkpoint", self.checkpoint, "must be a learned-optimizer checkpoint file (empty: the bundled one)"

    def build(self, model: nn.Module, total_steps: int) -> LearnedPlugin:
        return build_learned(self, list(model.parameters()), total_steps)


class LearnedPlugin(TorchOptimizerPlugin):
    """The worker-loop plugin of ``optimizer=learned``: one :class:`LearnedOptimizer`, the shared LR schedule.

    Before each step it sets the time features' step to the global step the trainer passes in, so they
    never depend on a per-rank counter (all workers agree, and a resumed worker continues exactly).
    θ is frozen and identical on every worker, so nothing is added to what the engine averages.
    """

    def train_step(self, model: nn.Module, batch: Batch | None, step: int, ctx: StepContext) -> StepOutput:
        for group in self.optimizers[0].param_groups:
            group["t"] = step
        return super().train_step(model, batch, step, ctx)


def build_learned(cfg: LearnedConfig, params: list[nn.Parameter], total_steps: int) -> LearnedPlugin:
    opt = LearnedOptimizer(params, lr=cfg.lr, checkpoint=cfg.checkpoint or None)
    return LearnedPlugin(opt, cfg, total_steps)
