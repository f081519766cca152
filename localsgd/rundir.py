"""The run directory: one job at a time in it, and what an earlier run left there.

:class:`RunDirLock` keeps a second job out of a run directory that a live job uses (two jobs in one
``hydra.run.dir`` would write duplicate steps, remove each other's ``step-N.tmp`` and purge each
other's checkpoints). Rank 0 takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<run_dir>/.lock`` and
writes its host, pid and start time into the file, so a refused job can name the owner. The lock
belongs to the open file, not to the file's existence: the kernel drops it when the owner exits,
however it exits (``kill -9``, OOM killer, a node reboot of a local disk), so a ``.lock`` file left by
a dead job is no obstacle; the next job locks it and overwrites the owner record. For the same reason
the file is never deleted: a job that unlinked it could race a third job that creates a new file and
locks that while the second still holds the old one. The lock is per host on filesystems without
cross-host locking: Linux NFS maps ``flock`` to NFS byte-range locks (cross-host, unless mounted
``nolock``); on a filesystem that refuses ``flock`` (Lustre mounted ``noflock``) the lock is skipped
with a warning rather than failing every run.

:func:`completed_run` tells whether a run directory holds a finished run (its ``summary.json``, or its
``final`` record in ``metrics.jsonl``, at ``max_steps``); :func:`rotate_previous_run` moves an earlier
run's outputs aside (``metrics.jsonl`` -> ``metrics.jsonl.1`` -> ``metrics.jsonl.2`` ..., like
logrotate) before a run starts again from step 0. All three are for rank 0 only and issue no
collective.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import logging
import os
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import RunDirBusyError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
RUN_OUTPUTS = ("metrics.jsonl", "summary.json")  # what rotate_previous_run moves aside by default
_BUSY = (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)  # flock's "held by another" (EACCES: NFS byte-range)
_OWNER_READ_S = 1.0  # how long a refused job waits for the owner to finish writing its record


def busy_message(run_dir: Path, owner: dict[str, Any]) -> str:
    return (f"run directory {run_dir} is in use by pid {owner.get('pid', '?')} on host {owner.get('host', '?')} "
            f"since {owner.get('started', '?')}; use another hydra.run.dir or stop that run")


class RunDirLock:
    """An exclusive, non-blocking lock on a run directory, held by rank 0 for the whole run.

    ``with RunDirLock(run_dir): ...`` or ``lock = RunDirLock.acquire(run_dir)`` ... ``lock.release()``.
    Acquiring raises :class:`~localsgd.errors.RunDirBusyError` at once if a live process holds it.
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None

    @classmethod
    def acquire(cls, run_dir: str | os.PathLike[str]) -> RunDirLock:
        lock = cls(run_dir)
        lock.lock()
        return lock

    @property
    def held(self) -> bool:
        return self._fd is not None

    def lock(self) -> None:
        if self._fd is not None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        # O_CLOEXEC: a process this job execs does not inherit (and so keep) the lock.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in _BUSY:
                owner = _read_owner(fd)
                os.close(fd)
                raise RunDirBusyError(busy_message(self.run_dir, owner)) from None
            os.close(fd)
            log.warning("cannot lock %s (%s): this filesystem does not support flock, so a second job in this "
                        "run directory would not be stopped", self.path, exc.strerror or exc)
            return
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record, sort_keys=True) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Unlock (the file stays: see the module docstring). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)  # while still held: no reader sees a record of a job that has left
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunDirLock:
        self.lock()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _read_owner(fd: int) -> dict[str, Any]:
    """The holder's record; it writes it right after locking, so an empty file is retried briefly."""
    deadline = time.monotonic() + _OWNER_READ_S
    while True:
        try:
            owner = json.loads(os.pread(fd, 4096, 0).decode())
            if isinstance(owner, dict):
                return owner
        except (OSError, ValueError):
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.05)


# ---------------------------------------------------------------------- finished and earlier runs
@dataclass(frozen=True)
class CompletedRun:
    """A run that trained to ``max_steps`` in this directory."""

    step: int
    source: Path  # summary.json, or metrics.jsonl whose final record it is
    summary: dict[str, Any]

    def describe(self, run_dir: Path) -> str:
        """One line for the user (without the ``localsgd:`` prefix)."""
        acc = self.summary.get("final_eval_accuracy")
        result = f", final_eval_accuracy {acc:.4f}" if isinstance(acc, int | float) else ""
        return (f"run directory {run_dir} already holds a completed run (step {self.step}{result}, see "
                f"{self.source.name}); nothing to train. Use another hydra.run.dir, or checkpoint.resume=false "
                "to train again from step 0")


def completed_run(run_dir: str | os.PathLike[str], max_steps: int,
                  checkpoint_step: int | None = None) -> CompletedRun | None:
    """The run in ``run_dir`` that trained to ``max_steps``, or None.

    Evidence, in order: ``summary.json`` (written last, atomically) with ``steps == max_steps``; else
    the last ``final`` record of ``metrics.jsonl`` at ``max_steps`` (killed between the two). Pass
    ``checkpoint_step``, the step of the checkpoint ``find_latest`` returned, when checkpoints are on:
    a record contradicted by a checkpoint at another step (or by none: pass -1) is stale and does
    not count.
    """
    if checkpoint_step is not None and checkpoint_step != max_steps:
        return None
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
        if isinstance(summary, dict) and summary.get("steps") == max_steps:
            return CompletedRun(max_steps, summary_path, summary)
    except (OSError, ValueError):
        pass
    metrics_path = run_dir / "metrics.jsonl"
    try:
        lines = metrics_path.read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(record, dict) and record.get("event") == "final":
            if record.get("step") == max_steps:
                return CompletedRun(max_steps, metrics_path, {k: v for k, v in record.items() if k != "event"})
            return None
        if isinstance(record, dict) and record.get("event") == "start":
            return None  # the last attempt started after the last final record and has not finished
    return None


def _has_content(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.exists() and path.stat().st_size > 0


def _generation(path: Path, n: int) -> Path:
    return path.with_name(f"{path.name}.{n}")


def rotate_previous_run(run_dir: str | os.PathLike[str],
                        paths: Sequence[str | os.PathLike[str]] = RUN_OUTPUTS) -> list[tuple[Path, Path]]:
    """Move an earlier run's outputs aside before a run starts from step 0 in ``run_dir``.

    Each of ``paths`` (relative to ``run_dir``, or absolute, e.g. a checkpoint directory) that exists
    with content becomes ``<name>.1``, after every existing ``<name>.n`` became ``<name>.n+1``; the
    numbers stay aligned across ``paths`` (``metrics.jsonl.2`` and ``summary.json.2`` are one run's),
    and an empty file or directory is left where it is. Rank 0 only, before the first record is written.
    Returns the ``(old, new)`` moves of the current outputs (empty when there was nothing to move).
    """
    run_dir = Path(run_dir)
    targets = [run_dir / p for p in paths]
    current = [p for p in targets if _has_content(p)]
    if not current:
        return []
    top = 0
    for path in targets:
        pattern = re.compile(re.escape(path.name) + r"\.(\d+)$")
        if path.parent.is_dir():
            for sibling in path.parent.iterdir():
                if m := pattern.match(sibling.name):
                    top = max(top, int(m.group(1)))
    # From the oldest down, so no move lands on a name still in use (a rerun after a crash half-way
    # through finds a gap at worst, never an overwrite).
    for n in range(top, 0, -1):
        for path in targets:
            if _generation(path, n).exists():
                os.replace(_generation(path, n), _generation(path, n + 1))
    moves = []
    for path in current:
        os.replace(path, _generation(path, 1))
        moves.append((path, _generation(path, 1)))
    return moves
