"""AdaComm (Wang & Joshi, SysML 2019, arXiv 1810.08313): average rarely early, more often later.

At the start of each interval l (``interval_steps`` local steps stand in for the paper's wall-clock
interval T₀):  **τ_l = ⌈√((F_l/F₀)·(η₀/η_l)^p)·τ₀⌉**, clipped to [τ_min, τ_max], where F is the
training loss all-reduced at the sync (one scalar riding on the agreement check) and η the LR.
Defaults are not taken from the paper: τ₀ = 20 is unverified against it; ``lr_power`` p = 1 follows
PaddlePaddle's adaptive_localsgd; F₀ and η₀ are the values observed at the first sync.

η_l is the learning rate :meth:`AdaComm.observe` receives, the one the next round's first step runs
at, so a 10x LR decay at an interval boundary sets τ for the round that starts with the decayed LR.
(η₀ is therefore the LR of the second round; it equals the first round's unless the LR changes at the
first sync.) The ceiling is exact, F and η read at 12 significant digits (:mod:`localsgd.schedules.exact`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from .base import SCHEDULES, RunInfo, SyncSchedule
from .exact import as_exponent, as_measured, ceil_root


def adacomm_tau(loss_ratio: float | Fraction, lr_ratio: float | Fraction, tau0: int, lr_power: float,
                tau_min: int, tau_max: int | None) -> int:
    """τ = clip(⌈√(loss_ratio · lr_ratio^p) · τ₀⌉) with loss_ratio = F_l/F₀ and lr_ratio = η₀/η_l.

    Exact: with p = a/b, τ₀·√(loss_ratio · lr_ratio^p) = (τ₀^(2b) · loss_ratio^b · lr_ratio^a)^(1/(2b)).
    Float ratios are read at 12 significant digits; Fractions (ratios of measured values) are kept.
    """
    power = as_exponent(lr_power)
    a, b = power.numerator, power.denominator
    radicand = Fraction(tau0) ** (2 * b) * max(as_measured(loss_ratio), Fraction(0)) ** b * as_measured(lr_ratio) ** a
    tau = ceil_root(radicand, 2 * b)
    tau = max(tau_min, tau)
    return min(tau, tau_max) if tau_max else tau


class AdaComm(SyncSchedule):
    name = "adacomm"

    def __init__(self, tau0: int = 20, interval_steps: int = 1000, lr_power: float = 1.0, tau_min: int = 1,
                 tau_max: int | None = None) -> None:
        super().__init__()
        if tau0 < 1 or interval_steps < 1 or tau_min < 1:
            raise ValueError("adacomm needs tau0, interval_steps and tau_min >= 1")
        self.tau0, self.interval_steps, self.lr_power = tau0, interval_steps, lr_power
        self.tau_min, self.tau_max = tau_min, tau_max
        self.tau = tau0
        self.F0: float | None = None
        self.lr0: float | None = None
        self.next_update = interval_steps

    def local_steps(self, round_index: int) -> int:
        return self.tau

    def observe(self, *, step: int, loss: float | None = None, lr: float | None = None) -> None:
        if loss is None:
            return
        if self.F0 is None:
            self.F0, self.lr0 = loss, lr
            return
        if step >= self.next_update:
            # ``lr`` is the rate of the round about to start, so an LR decay now shapes that round.
            lr_ratio = as_measured(self.lr0) / as_measured(lr) if (lr and self.lr0) else Fraction(1)
            loss_ratio = as_measured(loss) / as_measured(self.F0)
            self.tau = adacomm_tau(loss_ratio, lr_ratio, self.tau0, self.lr_power, self.tau_min, self.tau_max)
            self.next_update = step + self.interval_steps

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tau": self.tau, "F0": self.F0, "lr0": self.lr0,
                "next_update": self.next_update}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.tau, self.F0, self.lr0 = int(state["tau"]), state["F0"], state["lr0"]
        self.next_update = int(state["next_update"])

    def describe(self) -> str:
        return f"adacomm(tau0={self.tau0})"


@SCHEDULES.add
@dataclass
class AdaCommConfig:
    """``schedule=adacomm`` (defaults unverified against the paper; see the module docstring)."""

    name: str = "adacomm"
    tau0: int = 20
    interval_steps: int = 1000
    lr_power: float = 1.0
    tau_min: int = 1
    tau_max: int | None = None

    def build(self, run: RunInfo) -> SyncSchedule:
        return AdaComm(self.tau0, self.interval_steps, self.lr_power, self.tau_min, self.tau_max)

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        for key in ("tau0", "interval_steps", "tau_min"):
            if getattr(self, key) < 1:
                yield key, getattr(self, key), "must be >= 1"
        if self.tau_max is not None and self.tau_max < self.tau_min:
            yield "tau_max", self.tau_max, "must be >= tau_min or null"
