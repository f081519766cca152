"""Growing local-step phases (Patel & Dieuleveut, NeurIPS 2019, arXiv 1904.11325) and an adaptive variant.

After the t-th communication (t = 1, 2, …) workers run **N_t = ⌈N₁·t^β⌉** local steps; the last
round is truncated by the step budget, so Σ N_t covers it exactly and the round count C is the
smallest with Σ_{t≤C} N_t ≥ T. With β = 1 and N₁ = 1, C(C+1)/2 ≥ T. The paper's exact N_t law is
unverified against the paper's full text (its §§3–4): ``N1`` and ``beta`` are knobs with defaults 1.
The ceiling is exact for N₁ and β as written (N₁ = 1.1 gives N_50 = 55, where binary floating point
gave 56; :mod:`localsgd.schedules.exact`).

``adaptive`` (ours, after the paper's intuition that the allowed delay grows as the iterate nears the
optimum): the next phase length grows in inverse proportion to the all-reduced training loss above a
floor, N = clip(⌈N₁·(F₁ − F_floor)/(F_r − F_floor)⌉, N_min, N_max), never shrinking; the loss gaps
are read at 12 significant digits, so the ceiling is that of the decimals they stand for.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .base import SCHEDULES, RunInfo, SyncSchedule
from .exact import as_exponent, as_measured, as_written, ceil_scaled_power


class PatelDieuleveut(SyncSchedule):
    """N_t = ⌈N₁·t^β⌉ local steps in round t (1-based)."""

    name = "patel_dieuleveut"

    def __init__(self, N1: float = 1.0, beta: float = 1.0, total_steps: int | None = None) -> None:
        super().__init__()
        if N1 <= 0 or beta < 0:
            raise ValueError(f"patel_dieuleveut needs N1 > 0 and beta >= 0, got N1={N1}, beta={beta}")
        self.N1, self.beta, self.total_steps = N1, beta, total_steps
        # N_t depends on t alone, and an exact ceiling of a fractional power costs up to milliseconds:
        # each round's length is computed once (the sync asks for it twice, rounds() for every round).
        self._n1, self._beta = as_written(N1), as_exponent(beta)
        self._lengths: dict[int, int] = {}

    def local_steps(self, round_index: int) -> int:
        n = self._lengths.get(round_index)
        if n is None:
            n = self._lengths[round_index] = max(1, ceil_scaled_power(self._n1, Fraction(round_index + 1), self._beta))
        return n

    def rounds(self, total_steps: int | None = None) -> int:
        """Smallest C with Σ_{t≤C} N_t ≥ total steps (the last round truncated)."""
        total = total_steps if total_steps is not None else self.total_steps
        if total is None:
            raise ValueError("rounds() needs the step budget")
        covered, r = 0, 0
        while covered < total:
            covered += self.local_steps(r)
            r += 1
        return r

    def describe(self) -> str:
        return f"patel_dieuleveut(N1={self.N1:g}, beta={self.beta:g})"


SMALLEST_GAP = Fraction(1, 10**12)  # a loss at or below the floor counts as this far above it


class AdaptivePD(SyncSchedule):
    """Phase length inversely proportional to the all-reduced loss above ``loss_floor``."""

    name = "patel_dieuleveut_adaptive"

    def __init__(self, N1: int = 1, N_min: int = 1, N_max: int = 1024, loss_floor: float = 0.0) -> None:
        super().__init__()
        if not 1 <= N_min <= N1 <= N_max:
            raise ValueError(f"need 1 <= N_min <= N1 <= N_max, got {N_min}, {N1}, {N_max}")
        self.N1, self.N_min, self.N_max, self.loss_floor = N1, N_min, N_max, loss_floor
        self.first_gap: float | None = None
        self.current = N1

    def local_steps(self, round_index: int) -> int:
        return self.N1 if round_index == 0 else self.current

    def observe(self, *, step: int, loss: float | None = None, lr: float | None = None) -> None:
        if loss is None:
            return
        # The gap in exact decimals: 0.6 − 0.5 is 0.1, where binary subtraction gives 0.09999999999999998.
        gap = max(as_measured(loss) - as_written(self.loss_floor), SMALLEST_GAP)
        if self.first_gap is None:
            self.first_gap = float(gap)  # a float, so the checkpoint holds plain types
        proposed = math.ceil(self.N1 * as_measured(self.first_gap) / gap)
        self.current = max(self.current, min(self.N_max, max(self.N_min, proposed)))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "first_gap": self.first_gap, "current": self.current}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.first_gap, self.current = state["first_gap"], int(state["current"])

    def describe(self) -> str:
        return f"patel_dieuleveut_adaptive(N1={self.N1}, N_max={self.N_max})"


@SCHEDULES.add
@dataclass
class PatelDieuleveutConfig:
    """``schedule=patel_dieuleveut``: N_t = ⌈N1·t^beta⌉, or ``adaptive: true`` for the loss-driven variant."""

    name: str = "patel_dieuleveut"
    N1: float = 1.0
    beta: float = 1.0
    adaptive: bool = False
    N_min: int = 1
    N_max: int = 1024
    loss_floor: float = 0.0

    def build(self, run: RunInfo) -> SyncSchedule:
        if self.adaptive:
            return AdaptivePD(max(1, round(self.N1)), self.N_min, self.N_max, self.loss_floor)
        return PatelDieuleveut(self.N1, self.beta, run.total_local_steps)

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if not self.N1 > 0:
            yield "N1", self.N1, "must be > 0"
        if self.beta < 0:
            yield "beta", self.beta, "must be >= 0"
        if self.adaptive and not 1 <= self.N_min <= self.N1 <= self.N_max:
            yield "N_min", (self.N_min, self.N1, self.N_max), "need 1 <= N_min <= N1 <= N_max"
