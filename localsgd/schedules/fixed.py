"""Constant communication period H (local SGD as in Stich, ICLR 2019, arXiv 1805.09767, Alg. 1).

Workers average after optimizer steps H, 2H, 3H, ... (1-based). H = 1 is mini-batch SGD with
parameter (rather than gradient) averaging; ``OneShot`` is one-shot averaging, the other extreme of
Patel & Dieuleveut (NeurIPS 2019, arXiv 1904.11325): no sync until ``LocalSGD.finalize()``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import SyncSchedule


class Fixed(SyncSchedule):
    """Average every ``H`` local steps."""

    name = "fixed"

    def __init__(self, H: int) -> None:  # noqa: N803 - H is the paper's symbol
        super().__init__()
        if int(H) != H or H < 1:
            raise ValueError(f"Fixed schedule needs an integer H >= 1, got {H!r}")
        self.H = int(H)

    def local_steps(self, round_index: int) -> int:
        return self.H

    def describe(self) -> str:
        return f"fixed(H={self.H})"


class OneShot(SyncSchedule):
    """Never average during training; only ``finalize()`` averages (one-shot averaging)."""

    name = "one_shot"

    def local_steps(self, round_index: int) -> int:
        return 2**62

    def describe(self) -> str:
        return "one_shot"


@dataclass
class FixedConfig:
    """``schedule=fixed``: average every ``H`` local steps."""

    name: str = "fixed"
    H: int = 8

    def problems(self):
        if self.H < 1:
            yield "H", self.H, "must be >= 1"


@dataclass
class OneShotConfig:
    """``schedule=one_shot``: average only at the end of training."""

    name: str = "one_shot"

    def problems(self):
        return iter(())


@dataclass
class DDPConfig:
    """``schedule=ddp``: the baseline, PyTorch DistributedDataParallel (gradient all-reduce each step)."""

    name: str = "ddp"
    bucket_cap_mb: float = 25.0
    # DDP has no round boundary to carry a stop flag: every this many steps a 1-element MAX all-reduce
    # lets a preemption signal seen by any rank stop all of them at the same step (ours).
    stop_check_every: int = 10

    def problems(self):
        if self.bucket_cap_mb <= 0:
            yield "bucket_cap_mb", self.bucket_cap_mb, "must be > 0"
        if self.stop_check_every < 1:
            yield "stop_check_every", self.stop_check_every, "must be >= 1"
