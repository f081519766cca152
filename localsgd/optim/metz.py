"""``optimizer=metz_unsupervised``: the neuron-local unsupervised update rule of Metz, Maheswaranathan,
Cheung & Sohl-Dickstein, "Meta-Learning Update Rules for Unsupervised Representation Learning" (ICLR 2019,
arXiv 1804.00222), as a worker-loop plugin.

The rule θ, its base model and its meta-objective are :mod:`localsgd.learned.unsupervised`; this module
wires them into the worker loop. The MLP's hidden layers become the paper's base layers
z = standardize_batch(x Wᵀ) + b with backward weights V; the first ``pretrain_steps`` apply the frozen rule
(step 5 of that module's docstring, p ← p(1 − lr) − lr·Δp, labels unused), then SGD trains with labels
(``finetune``: every layer or only the readout). Tunable defaults, not paper constants: ``pretrain_steps``
100, ``rule_lr`` 1e-3 (the value the bundled θ was meta-trained with; the released code uses 1e-4) and the
supervised phase's lr 0.05 with momentum 0.9.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from ..learned.unsupervised import BaseNet, MetzRule, StandardizedLinear, load_rule
from .base import OPTIMIZERS, Batch, OptimizerPlugin, StepContext, StepOutput, require_batch
from .torch_optim import LRScheduleFields, supervised_step


@OPTIMIZERS.add
@dataclass
class MetzUnsupervisedConfig(LRScheduleFields):
    """``optimizer=metz_unsupervised``: ``pretrain_steps`` of the frozen rule, then SGD with labels.

    The LR schedule fields (``lr``, warm-up, decay, inherited from ``optimizer=sgd``'s) and ``momentum``
    apply to the supervised phase, whose schedule starts at step ``pretrain_steps``; the rule's steps use
    ``rule_lr`` (batch-ramp LR coupling does not apply to them).
    """

    name: str = "metz_unsupervised"
    checkpoint: str = ""  # empty: the bundled localsgd/learned/checkpoints/metz_unsupervised.pt
    pretrain_steps: int = 100  # the bundled θ helps most after 50–100 steps on held-out digits (benchmark curve)
    rule_lr: float = 1e-3  # the bundled θ was meta-trained with this step; another value leaves its regime
    # all: ordinary supervised training of W, b and the readout from the rule's weights (V is then unused);
    # readout: a linear probe on the frozen learned features.
    finetune: str = "all"
    momentum: float = 0.9
    init_seed: int = 0  # the Metz re-initialisation of the hidden layers; identical on every rank
    lr: float = 0.05

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        yield from self._lr_problems()
        if self.pretrain_steps < 0:
            yield "pretrain_steps", self.pretrain_steps, "must be >= 0"
        if not 0 < self.rule_lr < 1:
            yield "rule_lr", self.rule_lr, "must be in (0, 1)"
        if self.finetune not in ("readout", "all"):
            yield "finetune", self.finetune, "must be readout or all"
        if not 0 <= self.momentum < 1:
            yield "momentum", self.momentum, "must be in [0, 1)"
        if self.checkpoint and not Path(self.checkpoint).is_file():
            yield "checkpoint", self.checkpoint, "is not a file (leave empty for the bundled rule)"

    def build(self, model: nn.Module, total_steps: int) -> MetzUnsupervisedPlugin:
        """Rebuild the MLP's hidden layers in place as the rule's base layers and build the plugin."""
        return build_metz_unsupervised(self, model, total_steps)


def _linear_positions(model: nn.Module) -> list[int]:
    seq = getattr(model, "net", None)
    positions = [i for i, m in enumerate(seq) if isinstance(m, nn.Linear)] if isinstance(seq, nn.Sequential) else []
    if len(positions) < 2:
        raise ConfigError("optimizer=metz_unsupervised needs model=mlp with at least one hidden layer "
                          "(e.g. model.hidden=[64,64,32]); the rule updates the hidden layers")
    return positions


def attach_metz_layers(model: nn.Module, seed: int) -> tuple[list[StandardizedLinear], nn.Linear]:
    """Turn a ``localsgd.models.MLP`` into the Metz base model in place: hidden Linear -> StandardizedLinear.

    Returns the hidden layers (the rule's W, b, V) and the classification readout (the last Linear). The
    new layers are drawn from ``seed`` alone, so every rank builds the same ones without a broadcast.
    """
    positions = _linear_positions(model)
    seq: nn.Sequential = model.net  # type: ignore[assignment]
    generator = torch.Generator().manual_seed(seed)
    hidden: list[StandardizedLinear] = []
    for i in positions[:-1]:
        old = seq[i]
        layer = StandardizedLinear(old.in_features, old.out_features, generator).to(old.weight.device)
        seq[i] = layer
        hidden.append(layer)
    return hidden, seq[positions[-1]]  # type: ignore[return-value]


def build_metz_unsupervised(cfg: MetzUnsupervisedConfig, model: nn.Module, total_steps: int
                            ) -> MetzUnsupervisedPlugin:
    _linear_positions(model)  # a wrong model is reported before the checkpoint is read
    rule, _ = load_rule(cfg.checkpoint or None)
    hidden, readout = attach_metz_layers(model, cfg.init_seed)
    rule.to(device=readout.weight.device)
    return MetzUnsupervisedPlugin(cfg, rule, hidden, readout, total_steps)


class MetzUnsupervisedPlugin(OptimizerPlugin):
    """Unsupervised pre-training with the frozen rule θ, then supervised SGD (``finetune``)."""

    def __init__(self, cfg: MetzUnsupervisedConfig, rule: MetzRule, hidden: list[StandardizedLinear],
                 readout: nn.Linear, total_steps: int) -> None:
        self.cfg, self.rule, self.hidden, self.readout = cfg, rule, hidden, readout
        self.total_steps = total_steps
        params: list[nn.Parameter] = list(readout.parameters())
        if cfg.finetune == "all":
            params = [p for layer in hidden for p in (layer.weight, layer.bias)] + params
        self.optimizers = [torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)]

    def lr(self, step: int) -> float:
        c = self.cfg
        if step < c.pretrain_steps:
            return c.rule_lr
        return c.lr_at_step(step - c.pretrain_steps, max(1, self.total_steps - c.pretrain_steps))

    def base_net(self) -> BaseNet:
        return BaseNet([m.weight for m in self.hidden], [m.bias for m in self.hidden],
                       [m.backward_weight for m in self.hidden])

    def train_step(self, model: nn.Module, batch: Batch | None, step: int, ctx: StepContext) -> StepOutput:
        x, y = require_batch(batch, step)
        if not model.training:
            model.train()
        if step < self.cfg.pretrain_steps:
            return self._rule_step(model, x, y, ctx)
        opt = self.optimizers[0]
        lr = ctx.lr_override if ctx.lr_override is not None else self.lr(step) * ctx.lr_scale
        for group in opt.param_groups:
            group["lr"] = lr
        return supervised_step(model, opt, (x, y), ctx)

    @torch.no_grad()
    def _rule_step(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> StepOutput:
        net = self.base_net()
        new = self.rule.step(net, x.flatten(1).to(net.weights[0].dtype), self.cfg.rule_lr)
        # In place: LocalSGD has re-pointed the parameters into its flat buffers.
        for old, fresh in zip(net.tensors(), new.tensors()):
            old.copy_(fresh)
        # Labels only for the log line: the loss of the (not yet trained) readout, not used by the update.
        logits = model(x)
        return StepOutput(ctx.loss_fn(logits, y).detach(), int(y.shape[0]), logits, y)
