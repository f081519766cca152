"""Post-local SGD (Lin, Stich, Patel, Jaggi, ICLR 2020, arXiv 1808.07217, §3).

Phase 1 averages after every step (H = 1, mini-batch SGD by parameter averaging) until the switch
step t′; phase 2 is local SGD with period H. The paper switches at the first learning-rate decay;
``switch_step: -1`` (default) takes it from the optimizer's step-decay schedule
(``optimizer.lr_decay=step`` with milestones), and an optimizer without one (``none``, ``cosine``,
``poly``) switches at ``switch_fraction`` of the run (default 0.5, our choice: half mini-batch SGD,
half local SGD); an explicit ``switch_step`` wins over both. The switch step is named in
``describe()``, so it is in ``metrics.jsonl``'s final record and ``summary.json`` (``schedule``), and
logged when the schedule is built. H = 16 is the paper's CIFAR recommendation (unverified here), our
default too.

Unlike PyTorch's ``PeriodicModelAverager(period, warmup_steps)``, whose first post-warm-up round is
one step long, every post-switch round here is exactly H steps: with t′ = 100, H = 4 we average after
steps 1..100 (1-based), then 104, 108, … (torch: 101, 105, …).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .base import SCHEDULES, RunInfo, SyncSchedule

log = logging.getLogger(__name__)


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
    """``schedule=post_local``: ``switch_step=-1`` switches at the first LR decay, else at ``switch_fraction``."""

    name: str = "post_local"
    H: int = 16
    switch_step: int = -1  # -1: the first step-decay milestone, else switch_fraction of the run
    switch_fraction: float = 0.5  # of trainer.max_steps, when switch_step=-1 and the LR has no step decay

    def switch_at(self, run: RunInfo) -> tuple[int, str]:
        """The switch step t′ and why it is that one."""
        if self.switch_step != -1:
            return self.switch_step, "schedule.switch_step"
        if run.first_lr_decay_step is not None:
            return run.first_lr_decay_step, "the first LR decay milestone"
        return (int(self.switch_fraction * run.total_local_steps),
                f"schedule.switch_fraction={self.switch_fraction:g} of {run.total_local_steps} steps "
                "(the LR has no step decay)")

    def build(self, run: RunInfo) -> SyncSchedule:
        switch, why = self.switch_at(run)
        log.info("schedule=post_local: H=1 until step %d (%s), then H=%d", switch, why, self.H)
        return PostLocal(switch, self.H)

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.H < 1:
            yield "H", self.H, "must be >= 1"
        if self.switch_step < -1:
            yield "switch_step", self.switch_step, "must be >= 0, or -1 for the first LR decay (else switch_fraction)"
        if not 0.0 <= self.switch_fraction <= 1.0:
            yield "switch_fraction", self.switch_fraction, "must be in [0, 1] (of trainer.max_steps)"
