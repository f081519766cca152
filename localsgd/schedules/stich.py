"""Stich's communication period (ICLR 2019, arXiv 1805.09767, §2, Corollary 2.3 discussion).

Local SGD keeps mini-batch SGD's rate while H = O(√(T/(K·b))) (T local steps per worker, K workers,
per-worker batch b), so we ship **H = max(1, ⌊c·√(T/(K·b))⌋)**, capped at ``H_max``, giving
R = ⌈T/H⌉ ≈ √(T·K·b)/c rounds. The constant ``c`` (default 1) is ours, not the paper's. The floor
is exact, with ``c`` the decimal as written (c = 0.29, T = 10⁴, K = b = 1 gives 29, where binary
floating point gave 28; :mod:`localsgd.schedules.exact`).

Optionally (``paper_lr: true``, strongly convex problems with known μ and L) the paper's Theorem 2.2
step size **η_t = 4/(μ(a+t))** with shift **a = max(16κ, H)**, κ = L/μ, and its output, the weighted
average **x̂_T = (1/S_T) Σ_{t<T} w_t x̄_t, w_t = (a+t)²**, S_T = Σ w_t (the constants are unverified
against the paper's full text, so both are config values with the
paper's defaults: ``lr_numerator`` = 4 and ``shift_kappa`` = 16). x̄_t exists only at syncs, but w_t is a
scalar, so Σ_t w_t x̄_t = (1/K) Σ_k Σ_t w_t x_t^k: each worker keeps its own weighted running sum and
one all-reduce at the end averages the sums, exactly (:class:`WeightedIterateAverage`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from .. import dist
from .base import SCHEDULES, RunInfo, SyncSchedule
from .exact import as_written, floor_root


class Stich(SyncSchedule):
    """Constant H = ⌊c·√(T/(K·b))⌋ derived from the run's budget."""

    name = "stich"

    def __init__(self, total_steps: int, workers: int, batch_size: int, c: float = 1.0,
                 H_max: int | None = None) -> None:
        super().__init__()
        if total_steps < 1 or workers < 1 or batch_size < 1 or c <= 0:
            raise ValueError("Stich needs total_steps, workers, batch_size >= 1 and c > 0")
        self.total_steps, self.workers, self.batch_size, self.c, self.H_max = total_steps, workers, batch_size, c, H_max
        self.H = stich_period(total_steps, workers, batch_size, c, H_max)

    def local_steps(self, round_index: int) -> int:
        return self.H

    def rounds(self) -> int:
        return -(-self.total_steps // self.H)

    def shift(self, mu: float, L: float, shift_kappa: float = 16.0) -> float:
        """a = max(16κ, H) with κ = L/μ (Corollary 2.3; the 16 is ``shift_kappa``)."""
        return max(shift_kappa * L / mu, self.H)

    def describe(self) -> str:
        return f"stich(H={self.H})"


def stich_period(total_steps: int, workers: int, batch_size: int, c: float = 1.0, H_max: int | None = None) -> int:
    """H = max(1, ⌊c·√(T/(K·b))⌋), capped at ``H_max``; exact: c·√x = √(c²·x) for c > 0."""
    h = max(1, floor_root(as_written(c) ** 2 * Fraction(total_steps, workers * batch_size), 2))
    return min(h, H_max) if H_max else h


def stich_lr(t: int, mu: float, a: float, numerator: float = 4.0) -> float:
    """η_t = 4 / (μ (a + t)), t the 0-based local step (the 4 is ``numerator``)."""
    return numerator / (mu * (a + t))


class WeightedIterateAverage:
    """Σ_t (a+t)² x_t kept per worker over flat parameter buffers; averaged over workers at the end."""

    def __init__(self, params: list[torch.Tensor], a: float) -> None:
        self.a = a
        self.sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        self.total_weight = 0.0
        self.steps = 0

    def weight(self, t: int) -> float:
        return (self.a + t) ** 2

    def accumulate(self, params: list[torch.Tensor], t: int) -> None:
        """Add w_t x_t, with x_t the parameters *before* local step t (0-based)."""
        w = self.weight(t)
        with torch.no_grad():
            for acc, p in zip(self.sums, params):
                acc.add_(p.detach().double(), alpha=w)
        self.total_weight += w
        self.steps += 1

    def finalize_into(self, params: list[torch.Tensor], group: Any = None) -> int:
        """Write x̂_T into ``params`` (one all-reduce per buffer); returns the payload bytes sent."""
        sent = 0
        with torch.no_grad():
            for acc, p in zip(self.sums, params):
                dist.all_reduce_sum_(acc, group=group, what="Stich weighted iterate average")
                sent += acc.numel() * acc.element_size()
                p.copy_((acc / (dist.group_size(group) * self.total_weight)).to(p.dtype))
        return sent

    def state_dict(self) -> dict[str, Any]:
        return {"a": self.a, "sums": [s.clone() for s in self.sums], "total_weight": self.total_weight,
                "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.a, self.total_weight, self.steps = float(state["a"]), float(state["total_weight"]), int(state["steps"])
        for acc, saved in zip(self.sums, state["sums"]):
            acc.copy_(saved)


@SCHEDULES.add
@dataclass
class StichConfig:
    """``schedule=stich``: H from T, K and b; ``c`` is a tuning constant (ours, default 1)."""

    name: str = "stich"
    c: float = 1.0
    H_max: int | None = None
    paper_lr: bool = False  # η_t = 4/(μ(a+t)) and the (a+t)²-weighted iterate average as the output
    mu: float = 0.0  # strong-convexity constant (needed with paper_lr)
    L: float = 0.0  # smoothness constant (needed with paper_lr)
    lr_numerator: float = 4.0  # η_t = lr_numerator/(μ(a+t)); Theorem 2.2's 4, unverified against the full text
    shift_kappa: float = 16.0  # a = max(shift_kappa·κ, H); Theorem 2.2's 16, unverified against the full text

    def build(self, run: RunInfo) -> SyncSchedule:
        return Stich(run.total_local_steps, run.world_size, run.batch_size, self.c, self.H_max)

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if not self.c > 0:
            yield "c", self.c, "must be > 0"
        if self.paper_lr and not (self.mu > 0 and self.L >= self.mu):
            yield "mu", (self.mu, self.L), "paper_lr needs mu > 0 and L >= mu"
        for key in ("lr_numerator", "shift_kappa"):
            if not getattr(self, key) > 0:
                yield key, getattr(self, key), "must be > 0"
        if self.H_max is not None and self.H_max < 1:
            yield "H_max", self.H_max, "must be >= 1 or null"
