"""Plain SGD (momentum, Nesterov, weight decay; Sutskever et al., ICML 2013) and AdamW
(Loshchilov & Hutter, ICLR 2019, arXiv 1711.05101) as worker-loop plugins.

Both use torch's own optimizers, one cross-entropy step per call, and the warm-up/decay schedule of
``optim.base.lr_at``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from .base import OPTIMIZERS, Batch, OptimizerPlugin, StepContext, StepOptions, StepOutput, lr_at, require_batch

LR_DECAYS = ("none", "cosine", "step", "poly", "inverse_time")


@dataclass
class LRScheduleFields:
    lr: float = 0.05
    warmup_steps: int = 0
    lr_decay: str = "none"  # none | cosine | step | poly | inverse_time
    decay_milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    decay_factor: float = 0.1
    # poly: lr·k^(−decay_power) (Patel & Dieuleveut's γ_k = ν k^(−α), α in (1/2, 1); 0.75 is ours)
    decay_power: float = 0.75
    # inverse_time: lr/(1 + k/decay_t0) (Stich's c/(a + t), a = decay_t0)
    decay_t0: float = 100.0

    def lr_at_step(self, step: int, total_steps: int) -> float:
        """This schedule's LR before optimizer step ``step`` (0-based) of a ``total_steps`` run."""
        return lr_at(step, self.lr, warmup_steps=self.warmup_steps, decay=self.lr_decay, total_steps=total_steps,
                     milestones=self.decay_milestones, factor=self.decay_factor, power=self.decay_power,
                     t0=self.decay_t0)

    def _lr_problems(self) -> Iterator[tuple[str, Any, str]]:
        if not self.lr > 0:
            yield "lr", self.lr, "must be > 0"
        if self.warmup_steps < 0:
            yield "warmup_steps", self.warmup_steps, "must be >= 0"
        if self.lr_decay not in LR_DECAYS:
            yield "lr_decay", self.lr_decay, f"must be one of {LR_DECAYS}"
        if any(not 0 < m <= 1 for m in self.decay_milestones):
            yield "decay_milestones", list(self.decay_milestones), "must be fractions of max_steps in (0, 1]"
        if not 0 < self.decay_factor <= 1:
            yield "decay_factor", self.decay_factor, "must be in (0, 1]"
        if self.lr_decay == "poly" and not 0.5 < self.decay_power < 1:
            yield "decay_power", self.decay_power, "must be in (0.5, 1) (Patel & Dieuleveut's α)"
        if self.lr_decay == "inverse_time" and not self.decay_t0 > 0:
            yield "decay_t0", self.decay_t0, "must be > 0 (steps until the LR halves)"


@OPTIMIZERS.add
@dataclass
class SGDConfig(LRScheduleFields):
    """``optimizer=sgd``."""

    name: str = "sgd"
    plain_step: ClassVar[bool] = True  # the trainer.precision / grad_accum_steps / grad_clip step
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    dampening: float = 0.0

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        yield from self._lr_problems()
        if not 0 <= self.momentum < 1:
            yield "momentum", self.momentum, "must be in [0, 1)"
        if self.weight_decay < 0:
            yield "weight_decay", self.weight_decay, "must be >= 0"
        if self.nesterov and (self.momentum == 0 or self.dampening != 0):
            yield "nesterov", self.nesterov, "needs momentum > 0 and dampening = 0"

    def build(self, model: nn.Module, total_steps: int) -> OptimizerPlugin:
        return build_sgd(self, list(model.parameters()), total_steps)


@OPTIMIZERS.add
@dataclass
class AdamWConfig(LRScheduleFields):
    """``optimizer=adamw``."""

    name: str = "adamw"
    plain_step: ClassVar[bool] = True
    lr: float = 1e-3
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.01

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        yield from self._lr_problems()
        for key in ("beta1", "beta2"):
            if not 0 <= getattr(self, key) < 1:
                yield key, getattr(self, key), "must be in [0, 1)"
        if not self.eps > 0:
            yield "eps", self.eps, "must be > 0"
        if self.weight_decay < 0:
            yield "weight_decay", self.weight_decay, "must be >= 0"

    def build(self, model: nn.Module, total_steps: int) -> OptimizerPlugin:
        return build_adamw(self, list(model.parameters()), total_steps)


class TorchOptimizerPlugin(OptimizerPlugin):
    """A single torch optimizer driven by the shared LR schedule."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: LRScheduleFields, total_steps: int) -> None:
        self.optimizers = [optimizer]
        self.cfg = cfg
        self.total_steps = total_steps
        self._last_lr = float("nan")  # the LR last written into the param groups
        # A constant schedule is looked up once: the step's bookkeeping runs with the caches cold
        # (the backward pass has just evicted them), so every call saved on it shows.
        self._fixed_lr = cfg.lr if cfg.warmup_steps == 0 and cfg.lr_decay == "none" else None

    def lr(self, step: int) -> float:
        if self._fixed_lr is not None:
            return self._fixed_lr
        return self.cfg.lr_at_step(step, self.total_steps)

    def train_step(self, model: nn.Module, batch: Batch | None, step: int, ctx: StepContext) -> StepOutput:
        opt = self.optimizers[0]
        lr = ctx.lr_override if ctx.lr_override is not None else self.lr(step) * ctx.lr_scale
        if lr != self._last_lr:
            for group in opt.param_groups:
                group["lr"] = lr
            self._last_lr = lr
        if not model.training:  # the call walks every module: skip it on the hot path
            model.train()
        return supervised_step(model, opt, require_batch(batch, step), ctx)


def supervised_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch, ctx: StepContext) -> StepOutput:
    """One cross-entropy step: forward, backward, the after-backward hook, ``opt.step()``."""
    if ctx.options is not None:
        return optioned_step(model, opt, batch, ctx, ctx.options)
    x, y = batch
    logits = model(x)
    loss = ctx.loss_fn(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if ctx.after_backward is not None:
        ctx.after_backward(model)
    opt.step()
    return StepOutput(loss.detach(), int(y.shape[0]), logits.detach(), y)


def build_sgd(cfg: SGDConfig, params: list[nn.Parameter], total_steps: int) -> OptimizerPlugin:
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          weight_decay=cfg.weight_decay, dampening=cfg.dampening)
    return TorchOptimizerPlugin(opt, cfg, total_steps)


def build_adamw(cfg: AdamWConfig, params: list[nn.Parameter], total_steps: int) -> OptimizerPlugin:
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    return TorchOptimizerPlugin(opt, cfg, total_steps)


def optioned_step(model: nn.Module, opt: torch.optim.Optimizer, batch: Batch, ctx: StepContext,
                  options: StepOptions) -> StepOutput:
    """:func:`supervised_step` with micro-batches, autocast, loss scaling and clipping (:class:`StepOptions`).

    Each micro-batch's mean loss is weighted by its share of the batch's targets before its backward pass,
    so the summed gradient is the whole batch's mean gradient. Under DistributedDataParallel, all
    micro-batches but the last skip the gradient all-reduce (``no_sync``), which then carries their sum.
    """
    x, y = batch
    xs, ys = x.tensor_split(options.micro_batches), y.tensor_split(options.micro_batches)
    total = y.numel()
    opt.zero_grad(set_to_none=True)
    no_sync = getattr(model, "no_sync", None)
    scaler = options.scaler
    loss_sum, logits = None, []
    for i, (xi, yi) in enumerate(zip(xs, ys, strict=True)):
        with torch.autocast(options.device_type, dtype=options.autocast_dtype or torch.float32,
                            enabled=options.autocast_dtype is not None):
            out = model(xi)
            part = ctx.loss_fn(out, yi) * (yi.numel() / total)
        with no_sync() if no_sync is not None and i < len(xs) - 1 else contextlib.nullcontext():
            (scaler.scale(part) if scaler is not None else part).backward()
        loss_sum = part.detach() if loss_sum is None else loss_sum + part.detach()
        logits.append(out.detach())
    if scaler is not None:
        scaler.unscale_(opt)  # true gradients for the hook and the clipping
    if ctx.after_backward is not None:
        ctx.after_backward(model)
    if options.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], options.grad_clip)
    if scaler is not None:
        scaler.step(opt)  # skipped when the scaled gradients overflowed
        scaler.update()
    else:
        opt.step()
    assert loss_sum is not None
    return StepOutput(loss_sum, int(y.shape[0]), torch.cat(logits) if len(logits) > 1 else logits[0], y)
