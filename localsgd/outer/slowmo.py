"""SlowMo: slow momentum at every sync (Wang, Tantia, Ballas, Rabbat, ICLR 2020, arXiv 1910.00643, Alg. 1).

With x_t the round's start, x̄ the workers' average after the round and γ_t the base (inner) learning
rate (the paper's Algorithm 1; the update is the one fairscale's SlowMo implementation
performs):

    u_{t+1} = β u_t + (x_t − x̄) / γ_t
    x_{t+1} = x_t − α γ_t u_{t+1}

α = 1, β = 0 gives x_{t+1} = x̄ (the base algorithm, plain local SGD). Dividing by γ_t and multiplying
back makes the momentum "base-LR aware": u is measured in gradient units, so an LR decay during
training does not inflate the old momentum relative to new displacements.

Defaults: α = 1.0 is the paper's slow learning rate without tuning. β = 0.5 is ours: it is the typical
value in fairscale's documentation and fairseq's tuned default for ≤ 64 GPUs (fairseq uses
β = 0.0 for ≤ 16 GPUs, 0.2 for ≤ 32, 0.5 for ≤ 64, 0.6 above; tuned on WMT En-De, per the comment in
fairseq's config); the paper's own grid is unverified. Set β from the number of workers.

The step runs in place: x̄'s storage holds x_t − x̄ until u is updated, then x_{t+1}, with the same
floating-point operations in the same order as the two lines above (bit-identical to computing the
displacement in a temporary), and x_t may be on another device, staged in pieces (:mod:`.base`, "Memory").
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .base import (
    CHUNK_NUMEL,
    OUTER,
    MomentumState,
    OuterOptimizer,
    check_chunk_numel,
    check_inner_lr,
    check_pairs,
    round_start_pieces,
)


def slowmo_update_(x_t: torch.Tensor, x_bar: torch.Tensor, u: torch.Tensor, alpha: float, beta: float,
                   gamma: float) -> None:
    """One piece of the outer step, in place on same-device tensors: ``u`` ← u_{t+1}, ``x_bar`` ← x_{t+1}."""
    torch.sub(x_t, x_bar, out=x_bar)  # x̄ ← x_t − x̄
    u.mul_(beta).add_(x_bar, alpha=1.0 / gamma)  # u ← β u + (x_t − x̄)/γ
    torch.add(x_t, u, alpha=-alpha * gamma, out=x_bar)  # x̄ ← x_t − α γ u


class SlowMoOuter(OuterOptimizer):
    """Heavy-ball slow momentum on the round's displacement, scaled by the base LR γ_t (``inner_lr``)."""

    name = "slowmo"

    def __init__(self, alpha: float = 1.0, beta: float = 0.5, chunk_numel: int = CHUNK_NUMEL) -> None:
        super().__init__()
        cfg = SlowMoConfig(alpha=alpha, beta=beta)
        bad = [f"{k}={v!r}: {why}" for k, v, why in cfg.problems()]
        if bad:
            raise ValueError("SlowMoOuter: " + "; ".join(bad))
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.chunk_numel = check_chunk_numel(chunk_numel, "SlowMoOuter")  # pieces of a host-resident x_t
        self._u = MomentumState()

    @torch.no_grad()
    def step(self, global_params: list[torch.Tensor], averaged: list[torch.Tensor], inner_lr: float) -> None:
        check_pairs(global_params, averaged, "SlowMoOuter")
        gamma = check_inner_lr(inner_lr, "SlowMoOuter")
        u = self._u.get(averaged, "SlowMoOuter")
        for x_t, x_bar, u_i in zip(global_params, averaged, u):
            x_bar_flat, u_flat = x_bar.view(-1), u_i.view(-1)
            for piece, x_t_piece in round_start_pieces(x_t, x_bar, self.chunk_numel):
                slowmo_update_(x_t_piece, x_bar_flat[piece], u_flat[piece], self.alpha, self.beta, gamma)
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(alpha=self.alpha, beta=self.beta, momentum_buffers=self._u.state())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._u.load(state["momentum_buffers"])

    def describe(self) -> str:
        return f"slowmo(alpha={self.alpha:g}, beta={self.beta:g})"


@OUTER.add
@dataclass
class SlowMoConfig:
    """``outer=slowmo``: slow learning rate ``alpha`` and slow momentum ``beta`` (β = 0.5 is ours, see module doc)."""

    name: str = "slowmo"
    alpha: float = 1.0
    beta: float = 0.5

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if not self.alpha > 0:
            yield "alpha", self.alpha, "must be > 0"
        if not 0 <= self.beta < 1:
            yield "beta", self.beta, "must be in [0, 1)"

    def build(self) -> OuterOptimizer:
        return SlowMoOuter(alpha=self.alpha, beta=self.beta)
