"""Step ramp: multiply the batch by ``factor`` at each milestone, capped at ``b_max``.

The step-wise batch increase of Smith, Kindermans, Ying & Le (ICLR 2018, arXiv 1711.00489) without
the LR coupling (see ``smith`` for the version that preserves the noise scale):
b_t = min(b_max, round(b_0 · factor^k)), k = number of milestones reached by step t.

Defaults (ours, not from a paper): milestones 0.5 and 0.75 of the run (the optimizers' step-decay
defaults), factor 2, no cap.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .base import (
    RAMPS,
    BatchRamp,
    b_max_problems,
    check_b_max,
    check_step,
    fraction_problems,
    grown_batch,
    milestone_steps,
    stages_passed,
)


class StepRamp(BatchRamp):
    name = "step"

    def __init__(self, base_batch: int, total_steps: int, milestones: list[float], factor: float,
                 b_max: int | None) -> None:
        super().__init__(base_batch, total_steps)
        self.milestones = milestone_steps(milestones, total_steps)
        self.factor = float(factor)
        self.b_max = b_max

    def batch_size(self, step: int) -> int:
        k = stages_passed(check_step(step), self.milestones)
        return grown_batch(self.base_batch, self.factor, k, self.b_max)

    def describe(self) -> str:
        return f"step(b0={self.base_batch}, x{self.factor:g} at steps {self.milestones}, b_max={self.b_max})"


@RAMPS.add
@dataclass
class StepRampConfig:
    """``ramp=step``: batch × ``factor`` at each milestone (fractions of the total steps), capped at ``b_max``."""

    name: str = "step"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    factor: float = 2.0
    b_max: int | None = None  # None: no cap

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        yield from fraction_problems("milestones", self.milestones)
        if not self.factor >= 1:
            yield "factor", self.factor, "must be >= 1 (the batch never shrinks)"
        yield from b_max_problems(self.b_max)

    def build(self, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
        check_b_max(self.name, self.b_max, base_batch)
        return StepRamp(base_batch, total_steps, list(self.milestones), self.factor, self.b_max)
