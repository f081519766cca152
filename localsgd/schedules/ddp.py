"""The DDP baseline (``schedule=ddp``): PyTorch DistributedDataParallel, gradients all-reduced every step.

Not a schedule of LocalSGD: there is no round to end, so it builds no :class:`SyncSchedule` but a
communicator of its own (:class:`localsgd.ddp.DDPBaseline`, through ``build_communicator``, the
capability the trainer looks for). It sits in the schedule group because it is the other answer
to the question a schedule answers (who communicates, and when).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError
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

    def build(self, run: RunInfo) -> Any:
        raise ConfigError("schedule=ddp is the DDP baseline, not a LocalSGD schedule: it builds a communicator "
                          "(DDPConfig.build_communicator(model)); pick a LocalSGD schedule, e.g. schedule=fixed")

    def build_communicator(self, model: Any) -> Any:
        """The DDP baseline wrapping ``model``: train through its ``step_model``."""
        from ..ddp import DDPBaseline  # the communicator layer sits above the schedules

        return DDPBaseline(model, self.bucket_cap_mb, self.stop_check_every)

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.bucket_cap_mb <= 0:
            yield "bucket_cap_mb", self.bucket_cap_mb, "must be > 0"
        if self.stop_check_every < 1:
            yield "stop_check_every", self.stop_check_every, "must be >= 1"
