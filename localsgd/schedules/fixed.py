"""Constant communication period H (local SGD as in Stich, ICLR 2019, arXiv 1805.09767, Alg. 1).

Workers average after optimizer steps H, 2H, 3H, ... (1-based). H = 1 is mini-batch SGD with
parameter (rather than gradient) averaging; ``OneShot`` is one-shot averaging, the other extreme of
Patel & Dieuleveut (NeurIPS 2019, arXiv 1904.11325): no sync until ``LocalSGD.finalize()``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .base import SCHEDULES, RunInfo, SyncSchedule


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


@SCHEDULES.add
@dataclass
class FixedConfig:
    """``schedule=fixed``: average every ``H`` local steps."""

    name: str = "fixed"
    H: int = 8

    def build(self, run: RunInfo) -> SyncSchedule:
        return Fixed(self.H)

    def problems(self):
        if self.H < 1:
            yield "H", self.H, "must be >= 1"


@SCHEDULES.add
@dataclass
class OneShotConfig:
    """``schedule=one_shot``: average only at the end of training."""

    name: str = "one_shot"

    def build(self, run: RunInfo) -> SyncSchedule:
        return OneShot()

    def problems(self):
        return iter(())

