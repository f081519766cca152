"""Geometric ramp: multiply the batch by ``factor`` every ``every_steps`` steps, capped at ``b_max``.

b_t = min(b_max, round(b_0 · factor^⌊t / every_steps⌋)): a smooth version of the batch increases of
Smith et al. (ICLR 2018, arXiv 1711.00489) and of the dynamic batch sizes in fast.ai's "ImageNet in
18 minutes" (Howard, Shaw & Bulatov, fast.ai blog post, Aug 2018). Defaults (ours, not from a paper):
factor 2 every 1000 steps, b_max 1024.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .base import RAMPS, BatchRamp, b_max_problems, check_b_max, check_step, grown_batch


class GeometricRamp(BatchRamp):
    name = "geometric"

    def __init__(self, base_batch: int, total_steps: int, factor: float, every_steps: int, b_max: int) -> None:
        super().__init__(base_batch, total_steps)
        self.factor = float(factor)
        self.every_steps = int(every_steps)
        self.b_max = int(b_max)

    def batch_size(self, step: int) -> int:
        return grown_batch(self.base_batch, self.factor, check_step(step) // self.every_steps, self.b_max)

    def describe(self) -> str:
        return f"geometric(b0={self.base_batch}, x{self.factor:g} every {self.every_steps}, b_max={self.b_max})"


@RAMPS.add
@dataclass
class GeometricRampConfig:
    """``ramp=geometric``: batch × ``factor`` every ``every_steps`` local steps, capped at ``b_max``."""

    name: str = "geometric"
    factor: float = 2.0
    every_steps: int = 1000
    b_max: int = 1024

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if not self.factor >= 1:
            yield "factor", self.factor, "must be >= 1 (the batch never shrinks)"
        if self.every_steps < 1:
            yield "every_steps", self.every_steps, "must be >= 1"
        yield from b_max_problems(self.b_max, required=True)

    def build(self, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
        check_b_max(self.name, self.b_max, base_batch)
        return GeometricRamp(base_batch, total_steps, self.factor, self.every_steps, self.b_max)
