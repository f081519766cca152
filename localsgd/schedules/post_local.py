"""Post-local SGD (Lin, Stich, Patel, Jaggi, ICLR 2020, arXiv 1808.07217, §3).

Phase 1 averages after every step (H = 1, mini-batch SGD by parameter averaging) until the switch
step t′; phase 2 is local SGD with period H. The paper switches at the first learning-rate decay;
``switch_step: -1`` (default) takes it from the optimizer's step-decay schedule. H = 16 is the
paper's CIFAR recommendation (unverified here), our default too.

Unlike PyTorch's ``PeriodicModelAverager(period, warmup_steps)``, whose first post-warm-up round is
one step long, every post-switch round here is exactly H steps: with t′ = 100, H = 4 we average after
steps 1..100 (1-based), then 104, 108, … (torch: 101, 105, …).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
from .base import SCHEDULES, RunInfo, SyncSchedule


class PostLocal(SyncSchedule):
    """H = 1 for the first ``switch_step`` steps, then H."""

    name = "post_local"

    def __init__(self, switch_step: int, H: int = 16) -> None:
        super().__init__()
        if switch_step < 0 or H < 1:
            raise ValueError(f"post_local needs switch_step >= 0 and H >= 1, got {switch_step}, {H}")
        self.switch_step, self.H = switch_step, H

    def local_steps(self, round_index: int) -> int:
        # Rounds before the switch are one step each, so round r < t' ends at step r + 1.
        return 1 if round_index < self.switch_step else self.H

    def describe(self) -> str:
        return f"post_local(switch={self.switch_step}, H={self.H})"


@SCHEDULES.add
@dataclass
class PostLocalConfig:
    """``schedule=post_local``: ``switch_step=-1`` switches at the first LR decay."""

    name: str = "post_local"
    H: int = 16
    switch_step: int = -1

    def build(self, run: RunInfo) -> SyncSchedule:
        switch = self.switch_step
        if switch == -1:
            if run.first_lr_decay_step is None:
                raise ConfigError("schedule.switch_step=-1 switches at the first LR decay, but the optimizer has "
                                  "none; set optimizer.lr_decay=step or an explicit schedule.switch_step")
            switch = run.first_lr_decay_step
        return PostLocal(switch, self.H)

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.H < 1:
            yield "H", self.H, "must be >= 1"
        if self.switch_step < -1:
            yield "switch_step", self.switch_step, "must be >= 0, or -1 for the first LR decay"
