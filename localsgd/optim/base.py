"""The optimizer-plugin interface of the worker loop.

A plugin owns the torch optimizers of one worker and performs one local training step. Plain SGD and
AdamW are the first plugins; Self-Tuning Networks (several torch optimizers, alternating training and
validation batches, hyperparameters averaged with the weights) and learned update rules (per-parameter
state) fit behind the same interface: ``train_step`` may draw validation batches through the
:class:`StepContext`, ``uses_train_batch`` lets a step go without a training batch (so it consumes no
training data), ``averaged_tensors`` adds tensors to what ``LocalSGD`` averages, and ``optimizers``
exposes every torch optimizer to the optimizer-state policy and to checkpoints.

Each plugin's config dataclass builds it (``cfg.build(model, total_steps)``) and registers itself in
:data:`OPTIMIZERS`, in the plugin's own file, under the name used in ``configs/optimizer/``. The
registry lives here, beside the interface, so that every plugin file can import it without a cycle.

The learning-rate schedule (linear warm-up, then constant, cosine, step, polynomial or inverse-time decay) is a pure
function of the local step, which is the same on every rank. The polynomial decay γ_k = ν·k^(−α),
α ∈ (½, 1), is the large step size Patel & Dieuleveut pair with growing communication intervals
(NeurIPS 2019, arXiv 1904.11325); k counts steps after warm-up.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..registry import Registry

Batch = tuple[torch.Tensor, torch.Tensor]
"""One minibatch: inputs and integer class targets (or regression targets)."""


@dataclass
class StepOutput:
    """What one local step reports (detached; reduced by the trainer only when it logs)."""

    loss: torch.Tensor
    count: int
    logits: torch.Tensor | None = None  # for the training accuracy, computed only when logged
    targets: torch.Tensor | None = None


@dataclass
class StepOptions:
    """How the plain supervised step runs, beyond one forward and backward in fp32 (``trainer.*`` keys).

    * ``micro_batches`` (``trainer.grad_accum_steps``): the batch is split into this many parts, each
      forward/backward alone, their gradients summed with weights ``n_i / n`` (the parts' shares of the
      targets), so the step equals one step on the whole batch while holding one part's activations.
    * ``autocast_dtype`` (``trainer.precision``): the forward runs under ``torch.autocast`` in bf16 or fp16;
      the parameters, their gradients and the optimizer state stay fp32, and the fp32 weights are what
      local SGD averages (mixed precision as in Micikevicius et al., ICLR 2018, arXiv 1710.03740).
    * ``scaler``: fp16's loss scaling (a ``torch.amp.GradScaler``), unscaled before clipping.
    * ``grad_clip``: clip the global gradient norm to this value (Pascanu et al., ICML 2013), 0: off.
    """

    micro_batches: int = 1
    autocast_dtype: torch.dtype | None = None
    device_type: str = "cpu"
    grad_clip: float = 0.0
    scaler: Any = None

    @classmethod
    def build(cls, precision: str, grad_accum_steps: int, grad_clip: float,
              device: torch.device) -> StepOptions | None:
        """The options of ``trainer.*``, or None for the plain fp32 step (the loop's fast path)."""
        if precision == "fp32" and grad_accum_steps == 1 and grad_clip == 0:
            return None
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
        if dtype is torch.float16 and device.type != "cuda":
            raise ValueError("trainer.precision=fp16 needs CUDA (its GradScaler); use bf16 on CPU")
        scaler = torch.amp.GradScaler("cuda") if dtype is torch.float16 else None
        return cls(grad_accum_steps, dtype, device.type, float(grad_clip), scaler)


@dataclass
class StepContext:
    """What a plugin may use besides the training batch."""

    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    next_val_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None
    # Multiplies the schedule's LR: batch-ramp LR factor x linear scaling with the current batch.
    lr_scale: float = 1.0
    # Replaces the schedule's LR entirely when set (e.g. Stich's η_t = 4/(μ(a+t))).
    lr_override: float | None = None
    # Called between backward and the optimizer step when set (the noise-scale measurement).
    after_backward: Callable[[nn.Module], None] | None = None
    # Precision, accumulation and clipping of the plain supervised step; None: one fp32 forward/backward.
    options: StepOptions | None = None


def require_batch(batch: Batch | None, step: int) -> Batch:
    """``batch``, for a plugin that trains on every step; an error naming the step if it is None."""
    if batch is None:
        raise ValueError(f"local step {step}: this optimizer plugin trains on a batch at every step "
                         "(uses_train_batch is True), but train_step got batch=None")
    return batch


def lr_at(step: int, base_lr: float, *, warmup_steps: int, decay: str, total_steps: int,
          milestones: Sequence[float], factor: float, power: float = 0.75, t0: float = 100.0) -> float:
    """Learning rate before optimizer step ``step`` (0-based): warm-up, then constant/cosine/step/poly/inverse_time.

    ``milestones`` are fractions of ``total_steps`` at which step decay multiplies by ``factor``;
    ``poly`` gives base_lr·k^(−power) with k = 1, 2, … counted from the end of the warm-up;
    ``inverse_time`` gives base_lr/(1 + k/t0) with k = 0, 1, … counted from the end of the warm-up (the
    c/(a + t) step size of Stich's analysis, ICLR 2019, arXiv 1805.09767, Theorem 2.2, with a = t0 and
    c = base_lr·t0).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if decay == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    if decay == "step":
        passed = sum(1 for m in milestones if step >= int(m * total_steps))
        return base_lr * factor**passed
    if decay == "poly":
        return base_lr * (step - warmup_steps + 1) ** -power
    if decay == "inverse_time":
        return base_lr / (1.0 + (step - warmup_steps) / t0)
    return base_lr


def first_decay_step(decay: str, total_steps: int, milestones: Sequence[float]) -> int | None:
    """The first step at which the LR schedule decays (post-local SGD switches there)."""
    if decay == "step" and milestones:
        return int(min(milestones) * total_steps)
    return None


class OptimizerPlugin(abc.ABC):
    """One worker's optimizer(s) and local step."""

    optimizers: list[torch.optim.Optimizer]
    # Fraction of the training set the trainer holds out as per-worker validation shards, served
    # through ``StepContext.next_val_batch`` (0: the plugin needs no validation data).
    validation_fraction: float = 0.0
    # ``LocalSGD(pre_average=...)``: called with the process group right before each average.
    pre_average: Callable[[Any], None] | None = None

    def uses_train_batch(self, step: int) -> bool:
        """Whether local step ``step`` (0-based) trains on a batch of training data (default: every step).

        When False the trainer draws no batch from its sampler, so the step consumes no training data
        (neither the data cursor nor the logged ``samples`` move), and :meth:`train_step` gets
        ``batch=None``; STN's hyper steps, which use only validation batches, are the example. It must be
        a pure function of ``step`` (the same on every rank, and after a resume).
        """
        return True

    @abc.abstractmethod
    def train_step(self, model: nn.Module, batch: Batch | None, step: int, ctx: StepContext) -> StepOutput:
        """Run one local optimizer step at local step ``step`` (0-based) and report its loss.

        ``batch`` is None exactly when :meth:`uses_train_batch` returns False for ``step``.
        """

    @abc.abstractmethod
    def lr(self, step: int) -> float:
        """Learning rate used at local step ``step``."""

    def averaged_tensors(self) -> list[torch.Tensor]:
        """Extra tensors LocalSGD averages with the parameters (e.g. STN hyperparameters)."""
        return []

    def log_values(self) -> dict[str, float]:
        """Extra figures for the trainer's ``train`` records (e.g. STN's current hyperparameters)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for opt, s in zip(self.optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)


OPTIMIZERS: Registry[OptimizerPlugin] = Registry("optimizer")
"""Optimizer configs by name; each entry's ``build(model, total_steps)`` returns its :class:`OptimizerPlugin`."""
