"""Stich's communication period (ICLR 2019, arXiv 1805.09767, §2, Corollary 2.3 discussion).

Local SGD keeps mini-batch SGD's rate while H = O(√(T/(K·b))) (T local steps per worker, K workers,
per-worker batch b), so we ship **H = max(1, ⌊c·√(T/(K·b))⌋)**, capped at ``H_max``, giving
R = ⌈T/H⌉ ≈ √(T·K·b)/c rounds. The constant ``c`` (default 1) is ours, not the paper's; the
paper's step size η_t = 4/(μ(a+t)) and (a+t)²-weighted iterate average are not implemented here yet.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .base import SyncSchedule


class Stich(SyncSchedule):
    """Constant H = ⌊c·√(T/(K·b))⌋ derived from the run's budget."""

    name = "stich"

    def __init__(self, total_steps: int, workers: int, batch_size: int, c: float = 1.0,
                 H_max: int | None = None) -> None:
        super().__init__()
        if total_steps < 1 or workers < 1 or batch_size < 1 or c <= 0:
            raise ValueError("Stich needs total_steps, workers, batch_size >= 1 and c > 0")
        self.total_steps, self.workers, self.batch_size, self.c, self.H_max = total_steps, workers, batch_size, c, H_max
        h = max(1, int(c * math.sqrt(total_steps / (workers * batch_size))))
        self.H = min(h, H_max) if H_max else h

    def local_steps(self, round_index: int) -> int:
        return self.H

    def rounds(self) -> int:
        return -(-self.total_steps // self.H)

    def describe(self) -> str:
        return f"stich(H={self.H})"


@dataclass
class StichConfig:
    """``schedule=stich``: H from T, K and b; ``c`` is a tuning constant (ours, default 1)."""

    name: str = "stich"
    c: float = 1.0
    H_max: int | None = None

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if not self.c > 0:
            yield "c", self.c, "must be > 0"
        if self.H_max is not None and self.H_max < 1:
            yield "H_max", self.H_max, "must be >= 1 or null"
