"""Increase the batch instead of decaying the LR (Smith, Kindermans, Ying, Le, ICLR 2018, arXiv 1711.00489).

A step-decay LR schedule multiplies the LR by ``decay_factor`` f < 1 at each milestone. Smith et al.
keep the SGD noise scale g ≈ ε·N/B (Smith & Le 2017, arXiv 1710.06451) by multiplying the batch by 1/f
instead (as the paper's abstract states); when the batch reaches its maximum they fall back to decaying ε.

Here, after k milestones the noise-scale target is f^k (relative to step 0) and

    b_k = min(b_max, ⌊b_0 / f^k⌋)          (exact when b_0/f^k is an integer; floored otherwise)
    lr_factor_k = f^k · b_k / b_0          (1 while the batch absorbs the whole decay)

so lr·N/b = lr_0·f^k·N/b_0 at every step: exactly the original schedule's noise scale, both while the
batch grows (lr_factor = 1) and after b_max is reached, when the batch is raised as far as b_max
allows and the LR decays by the remaining factor. Flooring keeps lr_factor <= 1. The trainer must
multiply the optimizer's LR by ``lr_factor`` and configure the optimizer *without* its own step decay.
Linear LR-batch coupling would undo the point of the ramp, so ``couples_lr`` is False and
``lr_scale`` is ``lr_factor`` whatever the trainer's ``lr_batch_coupling``.

Defaults (ours): milestones 0.5 and 0.75 with f = 0.1, the optimizers' step-decay defaults. The
paper's CIFAR-10 Wide-ResNet schedule (f = 0.2, i.e. batch × 5, at epochs 60, 120, 160; initial
B = 128, ε = 0.1) is unverified against the paper's text; it is a config, not a default.
"""

from __future__ import annotations

import math
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
    milestone_steps,
    stages_passed,
)

_INTEGER_RTOL = 1e-9  # b_0/f^k within this relative distance of an integer counts as that integer (fp noise)


class SmithRamp(BatchRamp):
    name = "smith"
    couples_lr = False  # the batch grows *instead of* the LR changing; its own lr_factor is the whole LR story

    def __init__(self, base_batch: int, total_steps: int, milestones: list[float], decay_factor: float,
                 b_max: int | None) -> None:
        super().__init__(base_batch, total_steps)
        if not 0 < decay_factor <= 1:
            raise ValueError(f"ramp 'smith': decay_factor must be in (0, 1], got {decay_factor!r}")
        self.milestones = milestone_steps(milestones, total_steps)
        self.decay_factor = float(decay_factor)
        self.b_max = b_max
        self._stages = [self._stage(k) for k in range(len(self.milestones) + 1)]

    def _stage(self, k: int) -> tuple[int, float, bool]:
        """(b_k, lr_factor_k, whether b_max capped the batch) after ``k`` milestones."""
        target = self.decay_factor**k  # the LR-decay schedule's factor after k milestones
        exact = self.base_batch / target
        near = round(exact)
        integral = abs(exact - near) <= _INTEGER_RTOL * exact
        b = near if integral else math.floor(exact)
        if self.b_max is not None and b > self.b_max:
            return self.b_max, target * self.b_max / self.base_batch, True
        return b, (1.0 if integral else target * b / self.base_batch), False

    def stage(self, step: int) -> int:
        """Milestones reached at ``step``."""
        return stages_passed(check_step(step), self.milestones)

    def batch_size(self, step: int) -> int:
        return self._stages[self.stage(step)][0]

    def lr_factor(self, step: int) -> float:
        return self._stages[self.stage(step)][1]

    def switch_step(self) -> int | None:
        """The first step at which b_max caps the batch and the LR starts to decay, or None."""
        for m, (_, _, capped) in zip(self.milestones, self._stages[1:]):
            if capped:
                return m
        return None

    def describe(self) -> str:
        return (f"smith(b0={self.base_batch}, x{1 / self.decay_factor:g} at steps {self.milestones}, "
                f"b_max={self.b_max})")


@RAMPS.add
@dataclass
class SmithRampConfig:
    """``ramp=smith``: the LR step-decay schedule (``milestones``, ``decay_factor``) turned into batch growth."""

    name: str = "smith"
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])
    decay_factor: float = 0.1
    b_max: int | None = None  # None: never fall back to LR decay

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        yield from fraction_problems("milestones", self.milestones)
        if not 0 < self.decay_factor <= 1:
            yield "decay_factor", self.decay_factor, "must be in (0, 1] (the LR-decay factor the batch replaces)"
        yield from b_max_problems(self.b_max)

    def build(self, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
        check_b_max(self.name, self.b_max, base_batch)
        return SmithRamp(base_batch, total_steps, list(self.milestones), self.decay_factor, self.b_max)
