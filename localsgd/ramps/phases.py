"""Phases: a piecewise-constant batch *and* learning rate, one pair per phase of the run.

The schedule format of "ImageNet in 18 minutes" (Bulatov, Howard et al., fast.ai / DIU, 2018), whose
training is a short list of phases, each with its own batch size and learning rate, where a batch ramp
with Goyal et al.'s linear scaling (arXiv 1706.02677, §2.1: multiply the LR by k when the batch grows
k-fold) ties the LR to the batch. Phase i starts at local step int(starts[i]·T) and runs
b = round(b₀·batch_factors[i]) samples per worker at lr·lr_factors[i]:

    b_t = round(b₀ · B_i),   γ_t = γ(t) · L_i,   i = the last phase with int(starts[i]·T) ≤ t.

``lr_factors`` is the whole LR story (``couples_lr`` is False, so the trainer's linear coupling never
multiplies it again); ``lr_factors = batch_factors`` *is* linear scaling, and anything below it is a
batch grown past what linear scaling would allow. The optimizer's own decay (``optimizer.lr_decay``)
multiplies on top.

``warmup = w > 0`` makes each phase after the first raise its LR factor linearly from the previous
phase's over its first n_i = max(1, round(w·len_i)) steps, Goyal et al.'s gradual warm-up (§2.2)
applied at every batch change, as the recipe's phases ramp their LR from one value to the next:

    γ_t = γ(t) · (L_{i−1} + (L_i − L_{i−1}) · min(1, (t − s_i + 1)/n_i)),   s_i = int(starts[i]·T).

Defaults (ours, not the recipe's): two phases, ×1 then ×4 at half the run, LR ×1 then ×2 (square-root
scaling in the second phase).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from .base import RAMPS, BatchRamp, check_step, milestone_steps, round_batch, stages_passed


class PhasesRamp(BatchRamp):
    name = "phases"
    couples_lr = False  # each phase names its own LR factor

    def __init__(self, base_batch: int, total_steps: int, starts: list[float], batch_factors: list[float],
                 lr_factors: list[float], warmup: float = 0.0) -> None:
        super().__init__(base_batch, total_steps)
        self.starts = milestone_steps(starts, total_steps)
        self.batches = [round_batch(self.base_batch * f) for f in batch_factors]
        self.lr_factors = [float(f) for f in lr_factors]
        ends = [*self.starts[1:], total_steps]
        self.warmup_steps = [0] + [max(1, round(warmup * (e - s))) if warmup > 0 else 0
                                   for s, e in zip(self.starts[1:], ends[1:])]

    def phase(self, step: int) -> int:
        return stages_passed(check_step(step), self.starts) - 1  # starts[0] is step 0: always passed

    def batch_size(self, step: int) -> int:
        return self.batches[self.phase(step)]

    def lr_factor(self, step: int) -> float:
        i = self.phase(step)
        n = self.warmup_steps[i]
        into = step - self.starts[i] + 1  # steps of phase i taken, this one included
        if into >= n:
            return self.lr_factors[i]
        before = self.lr_factors[i - 1]
        return before + (self.lr_factors[i] - before) * into / n

    def describe(self) -> str:
        parts = [f"step {s}: b={b}, lr x{f:g}" + (f" after {n} warm-up steps" if n else "")
                 for s, b, f, n in zip(self.starts, self.batches, self.lr_factors, self.warmup_steps)]
        return "phases(" + "; ".join(parts) + ")"


@RAMPS.add
@dataclass
class PhasesRampConfig:
    """``ramp=phases``: phase i from ``starts[i]`` (a fraction of the run): batch × ``batch_factors[i]``,
    LR × ``lr_factors[i]``, reached from the previous phase's LR over the first ``warmup`` of the phase."""

    name: str = "phases"
    starts: list[float] = field(default_factory=lambda: [0.0, 0.5])
    batch_factors: list[float] = field(default_factory=lambda: [1.0, 4.0])
    lr_factors: list[float] = field(default_factory=lambda: [1.0, 2.0])
    warmup: float = 0.0  # fraction of each later phase over which its LR factor rises from the previous one

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        starts = list(self.starts)
        if not starts or starts[0] != 0 or any(not 0 <= s < 1 for s in starts) or starts != sorted(set(starts)):
            yield "starts", starts, "must begin at 0 and increase strictly, fractions of the run in [0, 1)"
        for key in ("batch_factors", "lr_factors"):
            values = list(getattr(self, key))
            if len(values) != len(starts):
                yield key, values, f"must give one value per phase ({len(starts)} starts)"
            elif any(not v > 0 for v in values):
                yield key, values, "must be > 0"
        if not 0.0 <= self.warmup <= 1.0:
            yield "warmup", self.warmup, "must be in [0, 1] (a fraction of each phase; 0: no warm-up)"

    def build(self, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
        return PhasesRamp(base_batch, total_steps, list(self.starts), list(self.batch_factors), list(self.lr_factors),
                          self.warmup)
