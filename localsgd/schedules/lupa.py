"""Linearly increasing periods (Haddadpour et al., NeurIPS 2019, arXiv 1910.13598, LUPA-SGD adaptive)
and the quadratic synchronization rule (Gu, Lyu, Arora, Zhang, ICLR 2024, arXiv 2310.14423).

LUPA, as in the authors' repository: **α = 2T/((C+1)·C·τ)**, **τ_i = τ(1 + α·i)** for round i = 0..C
(T local steps, C rounds, τ the base period); periods are rounded to whole steps.
QSR: **H = max(H_base, ⌊(α/η)²⌋)** with η the current learning rate; the proportionality H ∝ 1/η² is
the paper's, the max/floor form and the defaults are ours (unverified).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .base import SyncSchedule


class Lupa(SyncSchedule):
    name = "lupa"

    def __init__(self, tau: int, rounds: int, total_steps: int) -> None:
        super().__init__()
        if tau < 1 or rounds < 1 or total_steps < 1:
            raise ValueError("lupa needs tau, rounds and total_steps >= 1")
        self.tau, self.C, self.T = tau, rounds, total_steps
        self.alpha = 2 * total_steps / ((rounds + 1) * rounds * tau)

    def period(self, i: int) -> float:
        return self.tau * (1 + self.alpha * i)

    def local_steps(self, round_index: int) -> int:
        return max(1, round(self.period(round_index)))

    def describe(self) -> str:
        return f"lupa(tau={self.tau}, C={self.C})"


class QSR(SyncSchedule):
    name = "qsr"

    def __init__(self, H_base: int = 4, alpha: float = 0.1) -> None:
        super().__init__()
        if H_base < 1 or alpha <= 0:
            raise ValueError("qsr needs H_base >= 1 and alpha > 0")
        self.H_base, self.alpha = H_base, alpha
        self.H = H_base

    def local_steps(self, round_index: int) -> int:
        return self.H

    def observe(self, *, step: int, loss: float | None = None, lr: float | None = None) -> None:
        if lr:
            # + 1e-9: (0.3/0.05)**2 is 35.99999999999999 in floating point and must give 36
            self.H = max(self.H_base, math.floor((self.alpha / lr) ** 2 + 1e-9))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "H": self.H}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.H = int(state["H"])

    def describe(self) -> str:
        return f"qsr(H_base={self.H_base}, alpha={self.alpha:g})"


@dataclass
class LupaConfig:
    """``schedule=lupa``: base period ``tau`` and ``rounds`` C; T is trainer.max_steps."""

    name: str = "lupa"
    tau: int = 4
    rounds: int = 50

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        for key in ("tau", "rounds"):
            if getattr(self, key) < 1:
                yield key, getattr(self, key), "must be >= 1"


@dataclass
class QSRConfig:
    """``schedule=qsr``: H = max(H_base, ⌊(alpha/lr)²⌋)."""

    name: str = "qsr"
    H_base: int = 4
    alpha: float = 0.1

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.H_base < 1:
            yield "H_base", self.H_base, "must be >= 1"
        if not self.alpha > 0:
            yield "alpha", self.alpha, "must be > 0"
