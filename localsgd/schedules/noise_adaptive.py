"""Noise-adaptive local SGD: the round length H from the measured gradient noise scale and the batch.

Reproduction 3 (``benchmarks/batch_delay.py``, RESULTS §9.4) measured, at K = 16 on MNIST-1D and equal
samples and on two seed sets, what a communication delay H costs: 1.2–3.0× the samples of H = 1
while the global batch K·b is at or below the critical batch B_crit ≈ 1.2–2.8·B_simple (McCandlish
et al., arXiv 1812.06162, §2); 0.9–1.0× with H = 4 at K·b ≈ 5–7·B_simple; and at K·b ≈ 20–35·B_simple
H = 4 reached a loss (on 6 of 6 seeds) that H = 1 reached on 1 of 3 seeds at any LR. A delay is
cheap once the global batch has outgrown the noise scale, which is also when averaging K gradients
adds little over fewer of them. The rule
(ours, fitted to that grid, not from a paper) sets the next round's length from the ratio:

    H = clip(⌊√(K·b / B_simple)⌋, H_min, H_max)

so H = 1 while K·b < 4·B_simple, 2 from 4×, 4 from 16×. B_simple is measured by the trainer's
two-batch probe (McCandlish et al., App. A.1: B_small = b, B_big = K·b, the all-reduced gradient at
the first local step after an average, every ``measure_every_rounds`` rounds, EMA-smoothed) and
is the same on every rank, so every rank sets the same H (checked by the engine's fingerprint). An
estimate applies from the round after the one it was measured in; before the first usable estimate
(the first ``warmup_measurements`` are discarded) H = ``H_start``. B_simple grows as the loss falls
(McCandlish et al., Fig. 4), so at a fixed batch H shrinks over training; a growing batch
(``ramp``) raises it. The root is exact: the ratio is read at 12 significant digits
(:mod:`localsgd.schedules.exact`) and ⌊√x⌋ = isqrt(⌊x⌋).

Measured against fixed H on seeds the rule was not chosen on (RESULTS §9.4): the same samples as
H = 1 below the noise scale, within 1.05× of the best fixed H at K·b ≈ 6·B_simple with 2.2× fewer
rounds than H = 1, but 1.2–1.3× the samples at K·b ≈ B_crit and less reliable than H = 4 at
K·b ≈ 25·B_simple. It spares choosing H; it does not beat a well-chosen one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .base import SCHEDULES, RunInfo, SyncSchedule
from .exact import as_measured


def noise_adaptive_h(global_batch: int, b_simple: float, h_min: int, h_max: int) -> int | None:
    """clip(⌊√(global_batch / b_simple)⌋, h_min, h_max), or None for an unusable estimate (NaN, inf, <= 0)."""
    if not (math.isfinite(b_simple) and b_simple > 0):
        return None
    ratio = as_measured(global_batch) / as_measured(b_simple)
    return min(max(math.isqrt(math.floor(ratio)), h_min), h_max)


class NoiseAdaptive(SyncSchedule):
    """H from the all-reduced noise scale and the current global batch (module docstring)."""

    name = "noise_adaptive"
    observes_noise_scale = True  # the trainer (and the simulator) feed it B_simple

    def __init__(self, H_min: int = 1, H_max: int = 16, H_start: int = 1) -> None:  # noqa: N803
        super().__init__()
        if not 1 <= H_min <= H_start <= H_max:
            raise ValueError(f"noise_adaptive needs 1 <= H_min <= H_start <= H_max, got H_min={H_min}, "
                             f"H_start={H_start}, H_max={H_max}")
        self.H_min, self.H_max = int(H_min), int(H_max)
        self.H = int(H_start)
        self.history: list[tuple[int, float, int]] = []  # (step, B_simple, H set): what the run can plot

    def local_steps(self, round_index: int) -> int:
        return self.H

    def observe_noise_scale(self, b_simple: float, step: int, global_batch: int) -> None:
        """An all-reduced B_simple estimate at ``step`` with the round's global batch K·b."""
        h = noise_adaptive_h(int(global_batch), float(b_simple), self.H_min, self.H_max)
        if h is not None:
            self.H = h
            self.history.append((int(step), float(b_simple), h))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "H": self.H, "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.H = int(state["H"])
        self.history = [(int(s), float(b), int(h)) for s, b, h in state["history"]]

    def describe(self) -> str:
        return f"noise_adaptive(H in [{self.H_min}, {self.H_max}], now {self.H})"


@SCHEDULES.add
@dataclass
class NoiseAdaptiveConfig:
    """``schedule=noise_adaptive``: H = clip(⌊√(K·b / B_simple)⌋, H_min, H_max) from the measured noise
    scale (the probe's ``ema``, ``measure_every_rounds`` and ``warmup_measurements``, as ``ramp=noise_scale``)."""

    name: str = "noise_adaptive"
    H_min: int = 1
    H_max: int = 16
    H_start: int = 1  # before the first usable estimate
    ema: float = 0.95
    measure_every_rounds: int = 4  # one extra gradient all-reduce per measurement
    warmup_measurements: int = 2  # ours: the first estimates are kept out of the EMAs and decide nothing

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.H_min < 1:
            yield "H_min", self.H_min, "must be >= 1"
        elif self.H_max < self.H_min:
            yield "H_max", self.H_max, f"must be >= H_min={self.H_min}"
        elif not self.H_min <= self.H_start <= self.H_max:
            yield "H_start", self.H_start, f"must be in [H_min, H_max] = [{self.H_min}, {self.H_max}]"
        if not 0 <= self.ema < 1:
            yield "ema", self.ema, "must be in [0, 1)"
        if self.measure_every_rounds < 1:
            yield "measure_every_rounds", self.measure_every_rounds, "must be >= 1"
        if self.warmup_measurements < 0:
            yield "warmup_measurements", self.warmup_measurements, "must be >= 0"

    def build(self, run: RunInfo) -> SyncSchedule:
        return NoiseAdaptive(self.H_min, self.H_max, self.H_start)
