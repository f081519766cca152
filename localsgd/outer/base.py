"""The outer-optimizer interface: what happens to the averaged parameters at a sync.

Local SGD averages the workers' parameters at the end of each round. An *outer optimizer* turns that
average into the next round's starting point: plain local SGD takes the average as it is
(:class:`~localsgd.outer.average.AverageOuter`); SlowMo (Wang et al., ICLR 2020, arXiv 1910.00643)
and DiLoCo (Douillard et al., arXiv 2311.08105) treat the round's displacement
``Δ = x_t − x̄`` as a pseudo-gradient and take a momentum step along it
(``shared/design/schedules.md`` §7).

Contract with the engine. At every sync, after the all-reduce average, the engine calls
``step(global_params, averaged, inner_lr)`` with one flat 1-D tensor per (device, dtype) group:
``global_params[i]`` holds x_t (what every worker started the round from) and ``averaged[i]`` holds
x̄ = (1/K) Σ_k x_k. The optimizer writes x_{t+1} into ``averaged`` in place; the engine then keeps a
copy of it as the next round's x_t (only when ``needs_global_copy`` is true). Every rank passes
bit-identical inputs (the averaged buffers are the result of one all-reduce, x_t was the previous
result), so the outer state evolves identically on every rank without any communication.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch


class OuterOptimizer(abc.ABC):
    """Maps (x_t, x̄) to x_{t+1}, in place in x̄. Stateful (momentum) and checkpointable."""

    name: ClassVar[str] = "base"
    needs_global_copy: ClassVar[bool] = True  # does ``step`` read x_t? (False only for the identity)

    def __init__(self) -> None:
        self.steps = 0  # outer steps taken (completed syncs)

    @abc.abstractmethod
    def step(self, global_params: list[torch.Tensor], averaged: list[torch.Tensor], inner_lr: float) -> None:
        """Write x_{t+1} into ``averaged`` in place.

        ``global_params``: x_t, the parameters every worker started this round from.
        ``averaged``: (1/K) Σ_k x_k, the workers' parameters at the end of the round, same shapes.
        ``inner_lr``: the inner (base) learning rate γ_t of the round (SlowMo divides by it).
        """

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint holds outer optimizer {state.get('name')!r}, this run uses {self.name!r}")
        self.steps = int(state["steps"])

    def describe(self) -> str:
        return self.name


def check_pairs(global_params: Sequence[torch.Tensor], averaged: Sequence[torch.Tensor], who: str) -> None:
    """Raise unless the two lists hold tensors of matching shape, dtype and device, pairwise."""
    if len(global_params) != len(averaged):
        raise ValueError(f"{who}: {len(global_params)} global buffers but {len(averaged)} averaged buffers")
    for i, (g, a) in enumerate(zip(global_params, averaged)):
        if g.shape != a.shape or g.dtype != a.dtype or g.device != a.device:
            raise ValueError(f"{who}: buffer {i} differs: global {tuple(g.shape)} {g.dtype} {g.device}, "
                             f"averaged {tuple(a.shape)} {a.dtype} {a.device}")


def check_inner_lr(inner_lr: float, who: str) -> float:
    lr = float(inner_lr)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"{who} needs the round's inner learning rate > 0 (finite), got {inner_lr!r}")
    return lr


class MomentumState:
    """One momentum buffer per flat parameter buffer, created lazily like torch.optim's ``momentum_buffer``.

    Buffers have the dtype and device of the parameter buffer they follow (the torch.optim convention).
    """

    def __init__(self) -> None:
        self.buffers: list[torch.Tensor] | None = None

    def get(self, like: Sequence[torch.Tensor], who: str) -> list[torch.Tensor]:
        """The buffers, zeros on first use (v_0 = 0 makes the first update v_1 = Δ, as torch.optim does)."""
        if self.buffers is None:
            self.buffers = [torch.zeros_like(t) for t in like]
            return self.buffers
        if len(self.buffers) != len(like):
            raise ValueError(f"{who}: momentum holds {len(self.buffers)} buffers, parameters come in {len(like)}")
        for i, (m, t) in enumerate(zip(self.buffers, like)):
            if m.shape != t.shape:
                raise ValueError(f"{who}: momentum buffer {i} has shape {tuple(m.shape)}, "
                                 f"parameter buffer has {tuple(t.shape)}")
            if m.dtype != t.dtype or m.device != t.device:
                self.buffers[i] = m.to(device=t.device, dtype=t.dtype)  # e.g. restored from a CPU checkpoint
        return self.buffers

    def state(self) -> list[torch.Tensor] | None:
        return None if self.buffers is None else [b.detach().clone() for b in self.buffers]

    def load(self, buffers: list[torch.Tensor] | None) -> None:
        self.buffers = None if buffers is None else [torch.as_tensor(b).detach().clone() for b in buffers]
