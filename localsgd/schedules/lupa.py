"""Linearly increasing periods (Haddadpour, Kamani, Mahdavi, Cadambe, "Local SGD with Periodic Averaging:
Tighter Analysis and Adaptive Synchronization", NeurIPS 2019, arXiv 1910.13598, adaptive LUPA-SGD) and
the quadratic synchronization rule (Gu, Lyu, Arora, Zhang, ICLR 2024, arXiv 2310.14423).

LUPA follows the authors' repository (github.com/mmkamani7/LUPA-SGD, ``main.py --adaptive`` and
``utils.SyncHook``): **α = 2T/((C+1)·C·τ)** and **τ_i = τ(1 + α·i)**, i = 0..C (T local steps, C
rounds, τ the base period ``--sync-step``). Their hook averages once before the first update, then
after τ_1, τ_2, ... further steps, each wait ending at the first whole step ≥ the previous sync + τ_i
(TensorFlow's ``SecondOrStepTimer``). So round i (1-based) lasts **⌈τ_i⌉** steps and τ_0 = τ sets
no round: the README run (T = 5469, τ = 91, C = 10) averages after steps 191, 481, 871, ... (gaps
191, 290, 390, ...). Our replicas start equal (the initial weights are broadcast), so that first
average is a no-op and not a round here: round r (0-based) lasts ⌈τ_{r+1}⌉ steps, and since
Σ_{i≤C} ⌈τ_i⌉ ≥ Cτ + T, C rounds cover T. The repository computes τ_i in floating point, we exactly
(⌈τ + 2T·i/((C+1)·C)⌉); where the float lands just above a whole τ_i we are one step shorter
(T = 1068, τ = 159, C = 3: τ_1 = 337 exactly, 337.00000000000006 in floats, so their first wait is
338). Before this change round r lasted round(τ_r) from r = 0 (gaps 91, 190, ...).

QSR: **H = max(H_base, ⌊(α/η)²⌋)** with η the learning rate the next round runs at (see
:meth:`SyncSchedule.observe`); the proportionality H ∝ 1/η² is the paper's, the max/floor form and the
defaults are ours (unverified). The floor is exact, α as written and η read at 12 significant digits
(:mod:`localsgd.schedules.exact`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .base import SCHEDULES, RunInfo, SyncSchedule
from .exact import as_measured, as_written


class Lupa(SyncSchedule):
    name = "lupa"

    def __init__(self, tau: int, rounds: int, total_steps: int) -> None:
        super().__init__()
        if tau < 1 or rounds < 1 or total_steps < 1:
            raise ValueError("lupa needs tau, rounds and total_steps >= 1")
        self.tau, self.C, self.T = tau, rounds, total_steps
        self.alpha = Fraction(2 * total_steps, (rounds + 1) * rounds * tau)  # exact

    def period(self, i: int) -> Fraction:
        """τ_i = τ(1 + α·i), exactly."""
        return self.tau * (1 + self.alpha * i)

    def local_steps(self, round_index: int) -> int:
        # The authors' hook waits ⌈τ_i⌉ steps after the i-th sync, starting from τ_1 (module docstring).
        return math.ceil(self.period(round_index + 1))

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
            # ``lr`` is the rate of the round about to start: an LR drop at this sync lengthens that round.
            # Exact: (0.3/0.05)² is 35.99999999999999 in floating point and must give 36.
            self.H = max(self.H_base, math.floor((as_written(self.alpha) / as_measured(lr)) ** 2))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "H": self.H}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.H = int(state["H"])

    def describe(self) -> str:
        return f"qsr(H_base={self.H_base}, alpha={self.alpha:g})"


@SCHEDULES.add
@dataclass
class LupaConfig:
    """``schedule=lupa``: base period ``tau`` and ``rounds`` C; T is trainer.max_steps."""

    name: str = "lupa"
    tau: int = 4
    rounds: int = 50

    def build(self, run: RunInfo) -> SyncSchedule:
        return Lupa(self.tau, self.rounds, run.total_local_steps)

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        for key in ("tau", "rounds"):
            if getattr(self, key) < 1:
                yield key, getattr(self, key), "must be >= 1"


@SCHEDULES.add
@dataclass
class QSRConfig:
    """``schedule=qsr``: H = max(H_base, ⌊(alpha/lr)²⌋)."""

    name: str = "qsr"
    H_base: int = 4
    alpha: float = 0.1

    def build(self, run: RunInfo) -> SyncSchedule:
        return QSR(self.H_base, self.alpha)

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.H_base < 1:
            yield "H_base", self.H_base, "must be >= 1"
        if not self.alpha > 0:
            yield "alpha", self.alpha, "must be > 0"
