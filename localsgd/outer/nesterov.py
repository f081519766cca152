"""DiLoCo's outer optimizer: SGD with Nesterov momentum on the pseudo-gradient (Douillard et al., arXiv 2311.08105).

Per outer step t (Douillard et al., arXiv 2311.08105, Algorithm 1), with x_t the round's start and x̄ the workers'
average after the round:

    Δ = x_t − x̄                      (pseudo-gradient: descending along it moves toward the workers)
    v ← μ v + Δ                       (torch.optim.SGD's buffer, dampening 0, first step v = Δ)
    x_{t+1} = x_t − lr (Δ + μ v)      (torch.optim.SGD with nesterov=True)

lr = 1, μ = 0 gives x_{t+1} = x̄ (plain local SGD). Defaults lr = 0.7, μ = 0.9 are DiLoCo's as used by
public implementations (torchft's DiLoCo, DistributedSim's nanoGPT example); the paper's
hyper-parameter table itself is unverified. The outer LR is constant: DiLoCo schedules only the inner LR.

The step runs in place: x̄'s storage holds Δ, then Δ + μ v, then x_{t+1}, with the same floating-point
operations in the same order as the three lines above (so the result is bit-identical to computing Δ
in a temporary), and x_t may be on another device, staged in pieces (:mod:`.base`, "Memory").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .base import CHUNK_NUMEL, OUTER, MomentumState, OuterOptimizer, check_chunk_numel, check_pairs, round_start_pieces


def nesterov_update_(x_t: torch.Tensor, x_bar: torch.Tensor, v: torch.Tensor, lr: float, mu: float) -> None:
    """One piece of the outer step, in place on same-device tensors: ``v`` ← μ v + Δ, ``x_bar`` ← x_{t+1}."""
    torch.sub(x_t, x_bar, out=x_bar)  # x̄ ← Δ = x_t − x̄
    v.mul_(mu).add_(x_bar)  # v ← μ v + Δ
    x_bar.add_(v, alpha=mu)  # x̄ ← Δ + μ v
    torch.add(x_t, x_bar, alpha=-lr, out=x_bar)  # x̄ ← x_t − lr (Δ + μ v)


class NesterovOuter(OuterOptimizer):
    """Outer SGD with Nesterov momentum in PyTorch's convention; ``inner_lr`` is ignored."""

    name = "nesterov"

    def __init__(self, lr: float = 0.7, momentum: float = 0.9, chunk_numel: int = CHUNK_NUMEL) -> None:
        super().__init__()
        cfg = NesterovConfig(lr=lr, momentum=momentum)
        bad = [f"{k}={v!r}: {why}" for k, v, why in cfg.problems()]
        if bad:
            raise ValueError("NesterovOuter: " + "; ".join(bad))
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.chunk_numel = check_chunk_numel(chunk_numel, "NesterovOuter")  # pieces of a host-resident x_t
        self._v = MomentumState()

    @torch.no_grad()
    def step(self, global_params: list[torch.Tensor], averaged: list[torch.Tensor], inner_lr: float) -> None:
        check_pairs(global_params, averaged, "NesterovOuter")
        v = self._v.get(averaged, "NesterovOuter")
        for x_t, x_bar, v_i in zip(global_params, averaged, v):
            x_bar_flat, v_flat = x_bar.view(-1), v_i.view(-1)
            for piece, x_t_piece in round_start_pieces(x_t, x_bar, self.chunk_numel):
                nesterov_update_(x_t_piece, x_bar_flat[piece], v_flat[piece], self.lr, self.momentum)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(lr=self.lr, momentum=self.momentum, momentum_buffers=self._v.state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._v.load(state["momentum_buffers"])

    def describe(self) -> str:
        return f"nesterov(lr={self.lr:g}, momentum={self.momentum:g})"


@OUTER.add
@dataclass
class NesterovConfig:
    """``outer=nesterov``: DiLoCo's outer SGD, ``lr`` 0.7 and Nesterov ``momentum`` 0.9 (module doc)."""

    name: str = "nesterov"
    lr: float = 0.7
    momentum: float = 0.9

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if not self.lr > 0:
            yield "lr", self.lr, "must be > 0"
        if not 0 <= self.momentum < 1:
            yield "momentum", self.momentum, "must be in [0, 1)"

    def build(self) -> OuterOptimizer:
        return NesterovOuter(lr=self.lr, momentum=self.momentum)
