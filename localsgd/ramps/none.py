"""No ramp: b_t = b_0 (the trainer's ``batch_size``) at every step, LR factor 1. No constants."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .base import RAMPS, BatchRamp, check_step


class ConstantBatch(BatchRamp):
    """The fixed per-worker batch."""

    name = "none"
    constant = True

    def batch_size(self, step: int) -> int:
        check_step(step)
        return self.base_batch

    def describe(self) -> str:
        return f"none(b={self.base_batch})"


@RAMPS.add
@dataclass
class NoneRampConfig:
    """``ramp=none``: keep the trainer's batch size throughout."""

    name: str = "none"

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        return iter(())

    def build(self, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
        return ConstantBatch(base_batch, total_steps)
