"""The DDP baseline (``schedule=ddp``): PyTorch DistributedDataParallel, gradients all-reduced every step.

Not a schedule of LocalSGD: there is no round to end, so it builds no :class:`SyncSchedule` and the
trainer runs the model wrapped in DistributedDataParallel instead. It sits in the schedule group
because it is the other answer to the question a schedule answers (who communicates, and when).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .base import SCHEDULES, RunInfo


@SCHEDULES.add
@dataclass
class DDPConfig:
    """``schedule=ddp``: the baseline, PyTorch DistributedDataParallel (gradient all-reduce each step)."""

    name: str = "ddp"
    bucket_cap_mb: float = 25.0
    # DDP has no round boundary to carry a stop flag: every this many steps a 1-element MAX all-reduce
    # lets a preemption signal seen by any rank stop all of them at the same step (ours).
    stop_check_every: int = 10

    def build(self, run: RunInfo) -> None:
        return None  # no schedule: the trainer wraps the model in DistributedDataParallel instead

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.bucket_cap_mb <= 0:
            yield "bucket_cap_mb", self.bucket_cap_mb, "must be > 0"
        if self.stop_check_every < 1:
            yield "stop_check_every", self.stop_check_every, "must be >= 1"
