"""DiLoCo's outer optimizer: SGD with Nesterov momentum on the pseudo-gradient (Douillard et al., arXiv 2311.08105).

Per outer step t (``shared/design/schedules.md`` §7.2), with x_t the round's start and x̄ the workers'
average after the round:

    Δ = x_t − x̄                      (pseudo-gradient: descending along it moves toward the workers)
    v ← μ v + Δ                       (torch.optim.SGD's buffer, dampening 0, first step v = Δ)
    x_{t+1} = x_t − lr (Δ + μ v)      (torch.optim.SGD with nesterov=True)

lr = 1, μ = 0 gives x_{t+1} = x̄ (plain local SGD). Defaults lr = 0.7, μ = 0.9 are DiLoCo's as used by
public implementations (torchft's DiLoCo, DistributedSim's nanoGPT example); the paper's
hyper-parameter table itself is unverified. The outer LR is constant: DiLoCo schedules only the inner LR.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .base import MomentumState, OuterOptimizer, check_pairs


class NesterovOuter(OuterOptimizer):
    """Outer SGD with Nesterov momentum in PyTorch's convention; ``inner_lr`` is ignored."""

    name = "nesterov"

    def __init__(self, lr: float = 0.7, momentum: float = 0.9) -> None:
        super().__init__()
        cfg = NesterovConfig(lr=lr, momentum=momentum)
        bad = [f"{k}={v!r}: {why}" for k, v, why in cfg.problems()]
        if bad:
            raise ValueError("NesterovOuter: " + "; ".join(bad))
        self.lr = float(lr)
        self.momentum = float(momentum)
        self._v = MomentumState()

    @torch.no_grad()
    def step(self, global_params: list[torch.Tensor], averaged: list[torch.Tensor], inner_lr: float) -> None:
        check_pairs(global_params, averaged, "NesterovOuter")
        v = self._v.get(averaged, "NesterovOuter")
        mu = self.momentum
        for x_t, x_bar, v_i in zip(global_params, averaged, v):
            delta = torch.sub(x_t, x_bar)  # Δ = x_t − x̄
            v_i.mul_(mu).add_(delta)  # v ← μ v + Δ
            delta.add_(v_i, alpha=mu)  # Δ + μ v
            x_bar.copy_(x_t).add_(delta, alpha=-self.lr)  # x_{t+1} = x_t − lr (Δ + μ v)
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
