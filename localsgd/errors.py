"""Errors localsgd raises on every rank at once, so a failure never turns into a hang."""

from __future__ import annotations


class LocalSGDError(RuntimeError):
    """Base class of localsgd's run-time errors."""


class NonFiniteError(LocalSGDError):
    """A rank produced NaN/Inf; nothing was averaged or checkpointed at or after that step."""

    def __init__(self, bad: dict[int, int], sync_step: int, where: str = "the sync") -> None:
        self.bad = dict(sorted(bad.items()))  # rank -> first non-finite step
        ranks = ", ".join(f"rank {r} at step {s}" for r, s in self.bad.items())
        super().__init__(
            f"non-finite loss, parameters, buffers or averaged optimizer state on {ranks} (detected at "
            f"{where} after step {sync_step}); no rank averaged, every replica is as it was before that "
            "sync, and no checkpoint was written at or after that step. Lower the learning "
            "rate, or set sync.on_nonfinite=skip_round to roll back to the last sync and go on."
        )


class ScheduleDisagreementError(LocalSGDError):
    """Ranks reached a sync with different steps, rounds, sizes or configs: averaging would corrupt."""

    def __init__(self, fields: dict[str, tuple[int, int]], odd_ranks: list[int], sync_step: int) -> None:
        self.fields = fields
        self.odd_ranks = odd_ranks
        diffs = ", ".join(f"{k} ranges over [{lo}, {hi}]" for k, (lo, hi) in fields.items())
        super().__init__(
            f"ranks disagree at the sync after local step {sync_step}: {diffs}; ranks differing from "
            f"rank 0: {odd_ranks}. Nothing was averaged. Every rank must run the same config and a "
            "schedule that depends only on the step and all-reduced values."
        )


class CheckpointError(LocalSGDError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file and the reason."""


class ConfigError(ValueError):
    """A config value is invalid; the message names the full key and the value."""


class RunDirBusyError(CheckpointError):
    """Another live job holds the run directory's lock; the message names its pid, host and start time."""
