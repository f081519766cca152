"""The communication-schedule interface: when do workers average?

Steps are counted per worker as *optimizer steps completed* (1-based): after the first optimizer
step the count is 1. Round r (0-based) is the block of local steps between sync r-1 and sync r and
lasts ``local_steps(r)`` steps, so the sync that ends round r happens after step
``H_0 + ... + H_r``. ``should_sync`` is derived from that cumulative sum, never from ``step % H``,
because most schedules change H over time.

Every rank must reach the same decision from the same inputs: a schedule may depend only on the
step, its config and values that were all-reduced (passed to :meth:`SyncSchedule.observe`). The
engine's per-round fingerprint catches a violation before anything is averaged.

Each schedule's config dataclass registers itself in :data:`SCHEDULES` under the name used in
``configs/schedule/<name>.yaml`` and builds its schedule from a :class:`RunInfo` (``cfg.build(run)``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar

from ..registry import Registry


@dataclass
class RunInfo:
    """What a schedule may know about the run when it is built (all equal on every rank)."""

    total_local_steps: int
    world_size: int
    batch_size: int
    first_lr_decay_step: int | None = None
    local_world_size: int = 1


class SyncSchedule(abc.ABC):
    """Decides after which local steps the replicas are averaged. Stateful and checkpointable."""

    name: ClassVar[str] = "base"

    def __init__(self) -> None:
        self.sync_round = 0  # completed averaging rounds
        self.next_sync_step: int | None = None  # step count after which the next sync happens

    @abc.abstractmethod
    def local_steps(self, round_index: int) -> int:
        """H_r >= 1: local steps in round ``round_index`` (0-based)."""

    def should_sync(self, step: int) -> bool:
        """True when the optimizer step that brought the count to ``step`` ends the current round."""
        if self.next_sync_step is None:
            self.next_sync_step = self._checked_local_steps(0)
        return step >= self.next_sync_step

    def advance(self, step: int) -> None:
        """Called by the engine right after the sync that ended a round at ``step``."""
        self.sync_round += 1
        self.next_sync_step = step + self._checked_local_steps(self.sync_round)

    def observe(self, *, step: int, loss: float | None = None, lr: float | None = None) -> None:
        """Receive run-time signals at the sync that ended a round at ``step``, before :meth:`advance`.

        ``loss`` is the training loss all-reduced over the round just finished. ``lr`` is the learning
        rate the *next* round's first step will run at (after any decay due at this step), so a
        schedule that sets the next H from ``lr`` (QSR, AdaComm) reacts to an LR drop in the very
        round it begins, not one round late. Only adaptive schedules use these.
        """
        return None

    def _checked_local_steps(self, round_index: int) -> int:
        h = int(self.local_steps(round_index))
        if h < 1:
            raise ValueError(f"schedule {self.name!r} returned H={h} for round {round_index}; H must be >= 1")
        return h

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sync_round": self.sync_round, "next_sync_step": self.next_sync_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint holds schedule {state.get('name')!r}, this run uses {self.name!r}")
        self.sync_round = int(state["sync_round"])
        nxt = state["next_sync_step"]
        self.next_sync_step = None if nxt is None else int(nxt)

    def fingerprint(self) -> int:
        """A small integer every rank must agree on at a sync (the next round's length)."""
        return self._checked_local_steps(self.sync_round + 1)

    def describe(self) -> str:
        return self.name


SCHEDULES: Registry[SyncSchedule | None] = Registry("schedule")
