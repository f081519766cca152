"""Linear ramp: b_t goes linearly from ``b_start`` to ``b_end`` over the steps [start·T, end·T].

A linear batch warm-up of the kind large-batch recipes use before the full batch (cf. Goyal et al.'s gradual
warm-up, arXiv 1706.02677, and Smith et al.'s batch increases, ICLR 2018, arXiv 1711.00489).
b_t = round(b_start + (b_end − b_start)·clip((t − s)/(e − s), 0, 1)),
s = int(start·T), e = int(end·T); when e = s the batch jumps at s.

Defaults (ours): b_start = the trainer's batch size, b_end = 256, ramp over the first half of the run.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .base import RAMPS, BatchRamp, check_step, round_batch


class LinearRamp(BatchRamp):
    name = "linear"

    def __init__(self, base_batch: int, total_steps: int, b_start: int | None, b_end: int, start: float,
                 end: float) -> None:
        super().__init__(base_batch, total_steps)
        self.b_start = self.base_batch if b_start is None else int(b_start)
        self.b_end = int(b_end)
        if self.b_start < 1 or self.b_end < self.b_start:
            raise ValueError(f"ramp 'linear': needs 1 <= b_start <= b_end, got b_start={self.b_start}, "
                             f"b_end={self.b_end}")
        self.start_step = int(start * total_steps)
        self.end_step = int(end * total_steps)

    def batch_size(self, step: int) -> int:
        step = check_step(step)
        if step < self.start_step:
            return self.b_start
        if step >= self.end_step:
            return self.b_end
        frac = (step - self.start_step) / (self.end_step - self.start_step)
        return round_batch(self.b_start + (self.b_end - self.b_start) * frac)

    def describe(self) -> str:
        return f"linear({self.b_start}->{self.b_end} over steps {self.start_step}..{self.end_step})"


@RAMPS.add
@dataclass
class LinearRampConfig:
    """``ramp=linear``: ``b_start`` (None: the trainer's batch size) to ``b_end`` over [start, end] of the run."""

    name: str = "linear"
    b_start: int | None = None
    b_end: int = 256
    start: float = 0.0
    end: float = 0.5

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.b_start is not None and self.b_start < 1:
            yield "b_start", self.b_start, "must be >= 1 (or null for the trainer's batch size)"
        if self.b_end < 1:
            yield "b_end", self.b_end, "must be >= 1"
        elif self.b_start is not None and self.b_end < self.b_start:
            yield "b_end", self.b_end, f"must be >= b_start={self.b_start} (the batch never shrinks)"
        if not 0 <= self.start <= 1:
            yield "start", self.start, "must be a fraction of the total steps in [0, 1]"
        if not 0 <= self.end <= 1:
            yield "end", self.end, "must be a fraction of the total steps in [0, 1]"
        elif self.end < self.start:
            yield "end", self.end, f"must be >= start={self.start}"

    def build(self, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
        return LinearRamp(base_batch, total_steps, self.b_start, self.b_end, self.start, self.end)
