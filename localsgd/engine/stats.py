"""Communication accounting of one rank: rounds, payload bytes, seconds (``stats`` of a communicator)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass
class SyncStats:
    """Communication so far on this rank."""

    rounds: int = 0  # averaging rounds completed
    fragment_syncs: int = 0  # fragment averages completed (streaming; F per round)
    bytes: int = 0  # payload bytes this rank submitted to averaging all-reduces
    seconds: float = 0.0  # wall seconds inside sync (check + average + state policy)
    wait_seconds: float = 0.0  # of those, blocked on a streaming fragment still in flight when it was due
    check_bytes: int = 0  # payload bytes of the agreement/NaN fingerprint all-reduces
    skipped_rounds: int = 0  # rounds rolled back under on_nonfinite=skip_round
    eval_bytes: int = 0  # payload of averages made only to evaluate the averaged model

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, type(getattr(self, k))(v))
