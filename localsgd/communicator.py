"""Who communicates, and when: the one interface the worker loop talks to.

Local SGD (:class:`~localsgd.engine.LocalSGD`: average the parameters every H_r local steps) and the
DDP baseline (:class:`~localsgd.ddp.DDPBaseline`: average the gradients at every step, Li et al.,
VLDB 2020, arXiv 2006.15704) are two answers to the same question, so the loop sees one protocol
and names neither. ``schedule=ddp`` stays the config spelling of the baseline.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch

from .engine import SyncStats


@runtime_checkable
class Communicator(Protocol):
    stats: SyncStats
    local_step: int  # local optimizer steps taken so far
    stop_requested: bool  # set locally (a signal); agreed at the next communication
    stop_agreed: bool  # some rank asked to stop, known to every rank at the same step

    @property
    def in_sync(self) -> bool:
        """Every replica is identical now (a checkpoint may be taken)."""

    @property
    def round_completed(self) -> bool:
        """The last step completed a global round on every rank (where checkpoints are taken)."""

    @property
    def round_steps(self) -> int:
        """H of the current round: local steps between the last communication and the next one."""

    def step(self, loss: torch.Tensor | float | None = None) -> bool:
        """Count one local optimizer step; True when it ended a communication round."""

    def finalize(self) -> bool:
        """Make every replica identical after training; True if that communicated."""

    def averaged(self) -> AbstractContextManager[None]:
        """Evaluate the average of the replicas inside this context."""

    def describe(self) -> str: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
