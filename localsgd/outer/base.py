"""The outer-optimizer interface: what happens to the averaged parameters at a sync.

Local SGD averages the workers' parameters at the end of each round. An *outer optimizer* turns that
average into the next round's starting point: plain local SGD takes the average as it is
(:class:`~localsgd.outer.average.AverageOuter`); SlowMo (Wang et al., ICLR 2020, arXiv 1910.00643)
and DiLoCo (Douillard et al., arXiv 2311.08105) treat the round's displacement
``Δ = x_t − x̄`` as a pseudo-gradient and take a momentum step along it.

Contract with the engine. At every sync, after the all-reduce average, the engine calls
``step(global_params, averaged, inner_lr)`` with one flat 1-D tensor per (device, dtype) group:
``global_params[i]`` holds x_t (what every worker started the round from) and ``averaged[i]`` holds
x̄ = (1/K) Σ_k x_k. The optimizer writes x_{t+1} into ``averaged`` in place; the engine then keeps a
copy of it as the next round's x_t (only when ``needs_global_copy`` is true). Every rank passes
bit-identical inputs (the averaged buffers are the result of one all-reduce, x_t was the previous
result), so the outer state evolves identically on every rank without any communication.

Memory. x_t may live on another device than x̄ (the engine may keep it on the host to save
accelerator memory); shapes and dtypes must match and the buffers must be contiguous. A step holds
nothing full-size beyond x_t, x̄ and the momentum buffer: x̄ itself holds the pseudo-gradient
Δ = x_t − x̄ while the update is computed, and a host-resident x_t comes over in pieces of at most
``chunk_numel`` elements through one reused staging buffer (:func:`round_start_pieces`).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

import torch

from ..registry import Registry

CHUNK_NUMEL = 1 << 22  # elements of x_t staged at a time from another device: 16 MiB of float32 (ours)


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


OUTER: Registry[OuterOptimizer] = Registry("outer")


def check_pairs(global_params: Sequence[torch.Tensor], averaged: Sequence[torch.Tensor], who: str) -> None:
    """Raise unless the two lists hold contiguous tensors of matching shape and dtype, pairwise.

    The devices may differ: x_t may be kept on the host while the parameters are on an accelerator.
    """
    if len(global_params) != len(averaged):
        raise ValueError(f"{who}: {len(global_params)} global buffers but {len(averaged)} averaged buffers")
    for i, (g, a) in enumerate(zip(global_params, averaged)):
        if g.shape != a.shape or g.dtype != a.dtype:
            raise ValueError(f"{who}: buffer {i} differs: global {tuple(g.shape)} {g.dtype} {g.device}, "
                             f"averaged {tuple(a.shape)} {a.dtype} {a.device}")
        if not (g.is_contiguous() and a.is_contiguous()):
            raise ValueError(f"{who}: buffer {i} is not contiguous; the engine's flat buffers always are")


def check_chunk_numel(chunk_numel: int, who: str) -> int:
    if int(chunk_numel) != chunk_numel or chunk_numel < 1:
        raise ValueError(f"{who} needs chunk_numel >= 1 (an integer), got {chunk_numel!r}")
    return int(chunk_numel)


def round_start_pieces(x_t: torch.Tensor, like: torch.Tensor, chunk_numel: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """``(piece, x_t.view(-1)[piece] on like's device)`` for consecutive pieces of at most ``chunk_numel``.

    On ``like``'s device already, the pieces are views. Otherwise each piece is copied into one staging
    buffer of at most ``chunk_numel`` elements, reused for every piece: a host-resident x_t never costs
    a full-size device copy. A piece is valid until the next one is produced.
    """
    flat = x_t.view(-1)
    n = flat.numel()
    staging = None
    if x_t.device != like.device:
        staging = torch.empty(min(chunk_numel, n), dtype=x_t.dtype, device=like.device)
    for start in range(0, n, chunk_numel):
        piece = slice(start, min(start + chunk_numel, n))
        if staging is None:
            yield piece, flat[piece]
        else:
            stage = staging[: piece.stop - piece.start]
            stage.copy_(flat[piece])  # blocking: the caller may overwrite x_t on the host right after
            yield piece, stage


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
