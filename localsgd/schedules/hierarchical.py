"""Hierarchical local SGD (Lin, Stich, Patel, Jaggi, ICLR 2020, arXiv 1808.07217, §3 and App.).

Workers average within their group (e.g. the GPUs of one node, over the fast link) every ``H_group``
local steps, and across all workers every ``H_global`` steps, a multiple of ``H_group``; so there
are T/H_global global syncs over the slow link. PyTorch's
``HierarchicalModelAverager(period_group_size_dict={4: 8, 16: 16})`` expresses the same two levels
(groups of 8 average every 4 steps, all 16 every 16). Rounds here are the group rounds; the engine
asks :meth:`Hierarchical.is_global` which process group a sync uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .base import SCHEDULES, RunInfo, SyncSchedule


class Hierarchical(SyncSchedule):
    """Group average every ``H_group`` steps, global average every ``H_global`` steps."""

    name = "hierarchical"

    def __init__(self, H_group: int, H_global: int, group_size: int) -> None:
        super().__init__()
        if H_group < 1 or H_global < H_group or H_global % H_group:
            raise ValueError(f"hierarchical needs 1 <= H_group and H_global a multiple of H_group, "
                             f"got H_group={H_group}, H_global={H_global}")
        if group_size < 1:
            raise ValueError(f"hierarchical needs group_size >= 1, got {group_size}")
        self.H_group, self.H_global, self.group_size = H_group, H_global, group_size

    def local_steps(self, round_index: int) -> int:
        return self.H_group

    def is_global(self, step: int) -> bool:
        """Whether the sync after local step ``step`` averages over every worker."""
        return step % self.H_global == 0

    def describe(self) -> str:
        return f"hierarchical(H_group={self.H_group}, H_global={self.H_global}, group_size={self.group_size})"


@SCHEDULES.add
@dataclass
class HierarchicalConfig:
    """``schedule=hierarchical``: groups of ``group_size`` consecutive ranks (0 = one node each)."""

    name: str = "hierarchical"
    H_group: int = 4
    H_global: int = 16
    group_size: int = 0  # 0: the workers of one node (torchrun's LOCAL_WORLD_SIZE)

    def build(self, run: RunInfo) -> SyncSchedule:
        return Hierarchical(self.H_group, self.H_global, self.group_size or run.local_world_size)

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.H_group < 1:
            yield "H_group", self.H_group, "must be >= 1"
        if self.H_global < self.H_group or self.H_global % max(1, self.H_group):
            yield "H_global", self.H_global, f"must be a multiple of H_group={self.H_group}"
        if self.group_size < 0:
            yield "group_size", self.group_size, "must be >= 0 (0 = one node)"
