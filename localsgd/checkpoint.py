"""Crash-safe checkpoints at sync boundaries: a crash at any point leaves the last committed one intact.

Right after an average every replica holds the same parameters, so a checkpoint is one ``model.pt``
written by rank 0 plus one ``rank{r}.pt`` per rank (optimizer state, RNG, data cursor, engine and
schedule state). DCP's ``.metadata`` plays the same commit-marker role as our manifest but carries
no checksums; ours does.

The names in the checkpoint directory, and what each means:

* ``step-N/``: committed. It counts only if its ``manifest.json`` lists every rank's file and every
  size and sha256 matches (:meth:`Checkpointer.verify`).
* ``step-N.tmp/``: being written. Complete only once it holds ``manifest.json``, which rank 0 writes
  (through ``manifest.json.tmp`` and ``os.replace``) after every rank has fsynced its file.
* ``step-N.old/``: a committed ``step-N`` moved aside by a re-save of the same step, kept until the
  replacement is committed. It is a complete checkpoint, never a half-deleted one.
* ``step-N.deleting/``: retention (``keep_latest_k``) or recovery is deleting it; never used.

Saving step N (:meth:`Checkpointer.save`, collective): every rank serialises its state and hashes it;
one gather tells every rank every file's size and digest. If this Checkpointer committed exactly
these bytes as step N earlier in this process (the trainer saves the last step at its checkpoint
round and again at the end) and rank 0 still finds that commit's manifest, the committed ``step-N``
is returned untouched (its manifest keeps the first save's metadata, ``wall_seconds`` included).
Otherwise:

1. rank 0 creates a fresh ``step-N.tmp/``; every rank writes and fsyncs its file into it;
2. a gather of the write errors (a full disk: ``CheckpointError`` naming the file, the bytes needed
   and free; the partial ``.tmp`` is removed; the committed checkpoints are untouched, on every rank);
3. rank 0 writes ``manifest.json`` and fsyncs the directory;
4. if ``step-N`` exists it is renamed to ``step-N.old`` (``os.replace``, atomic within a filesystem);
5. the commit: ``step-N.tmp`` is renamed to ``step-N`` and the parent directory fsynced;
6. ``step-N.old`` is deleted, ``latest`` rewritten, and checkpoints beyond ``keep_latest_k`` renamed
   to ``.deleting`` and deleted (the newest is never deleted);
7. rank 0 broadcasts the outcome, so every rank returns, or raises, together.

A committed checkpoint is never deleted before its replacement is committed. Before it picks a
checkpoint, :meth:`Checkpointer.find_latest` repairs whatever a kill left, by this rule:

* ``step-N.old`` without ``step-N`` (killed between steps 4 and 5): renamed back to ``step-N``;
* ``step-N.old`` with ``step-N`` (killed in step 6): deleted if ``step-N`` verifies, else it takes
  the place of the broken ``step-N`` if it verifies itself;
* ``step-N.tmp`` with a manifest that verifies, where ``step-N`` is missing or does not verify (a
  run of an older localsgd killed while it deleted ``step-N`` to replace it): becomes ``step-N``;
  any other ``step-N.tmp`` is deleted;
* ``step-*.deleting`` is deleted.

So every crash leaves the previous or the new checkpoint loadable, never a mix and never neither.
Reading a checkpoint that the OS refuses (``PermissionError``, ``EIO``) makes it unusable like a
corrupt one: with ``checkpoint.fallback=true`` the previous one is tried, else ``CheckpointError``.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import dist
from .errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER_DIR = re.compile(r"^step-(\d+)\.(tmp|old|deleting)$")
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class Found:
    """A verified, committed checkpoint."""

    step: int
    path: Path
    manifest: dict[str, Any]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(data: bytes) -> dict[str, Any]:
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _serialise(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class Checkpointer:
    """Writes and finds checkpoints in one directory shared by all ranks."""

    def __init__(self, directory: str | os.PathLike[str], keep_latest_k: int = 2, fallback: bool = True) -> None:
        self.dir = Path(directory)
        self.keep_latest_k = keep_latest_k
        self.fallback = fallback
        # (step, file listing) of the last commit by this object, identical on every rank: a re-save
        # of the same bytes can return at once, decided by rank 0 alone and broadcast.
        self._last_commit: tuple[int, dict[str, Any]] | None = None

    # ------------------------------------------------------------------ save
    def save(self, step: int, model_state: dict[str, Any], rank_state: dict[str, Any],
             meta: dict[str, Any], fault_hook: Any = None) -> Path:
        """Collective: every rank calls it at the same sync boundary. Returns the committed path.

        ``fault_hook(stage)``, if given, is called at the crash points the tests exercise: ``"shards"``
        (files written, not committed), ``"aside"`` (the old ``step-N`` renamed to ``step-N.old``,
        the new one not yet committed), ``"committed"`` (before ``step-N.old`` is deleted) and
        ``"purge"`` (an old checkpoint half-way to deletion).
        """
        final = self.dir / f"step-{step}"
        tmp = self.dir / f"step-{step}.tmp"
        me = dist.rank()
        blobs = {f"rank{me}.pt": _serialise(rank_state)}
        if dist.is_main():
            blobs["model.pt"] = _serialise(model_state)
        mine = {name: _digest(data) for name, data in blobs.items()}
        listing: dict[str, Any] = {}
        for part in dist.all_gather_object(mine):
            listing.update(part)
        start: tuple[bool, str | None] | None = None
        if dist.is_main():
            # This very object committed these very bytes as this step (the trainer saves the last
            # step at its checkpoint round and again at the end): keep that commit, write nothing.
            reuse = self._last_commit == (step, listing) and (final / "manifest.json").is_file()
            setup_error = None
            if not reuse:
                try:
                    self.dir.mkdir(parents=True, exist_ok=True)
                    if tmp.exists():
                        shutil.rmtree(tmp)  # left by a crash mid-save (find_latest kept it if it was complete)
                    tmp.mkdir()
                except OSError as exc:
                    setup_error = self._write_error(tmp, exc, step, listing)
            start = (reuse, setup_error)
        start = dist.broadcast_object(start, src=0)
        assert start is not None
        reuse, setup_error = start
        if reuse:
            return final
        if setup_error:
            raise CheckpointError(setup_error)

        write_error = None
        for name, data in blobs.items():
            try:
                _write_bytes(tmp / name, data)
            except OSError as exc:
                write_error = self._write_error(tmp / name, exc, step, listing)
                break
        del blobs
        if fault_hook is not None:
            fault_hook("shards")  # test hook: die after the shards are written, before the commit
        errors = [e for e in dist.all_gather_object(write_error) if e]
        if errors:
            if dist.is_main():
                _remove_tree(tmp)  # the partial checkpoint; the committed ones are untouched
            raise CheckpointError(errors[0])

        commit_error = None
        if dist.is_main():
            try:
                self._commit(step, tmp, final, meta, listing, fault_hook)
            except OSError as exc:
                commit_error = self._write_error(tmp, exc, step, listing)
        commit_error = dist.broadcast_object(commit_error, src=0)
        if commit_error:
            raise CheckpointError(commit_error)
        self._last_commit = (step, listing)
        return final

    def _commit(self, step: int, tmp: Path, final: Path, meta: dict[str, Any], listing: dict[str, Any],
                fault_hook: Any) -> None:
        """Rank 0: manifest, then the atomic rename; an existing ``step-N`` is moved aside, not deleted."""
        manifest = {"format_version": FORMAT_VERSION, "step": step, "world_size": dist.world_size(),
                    **meta, "files": listing}
        manifest_tmp = tmp / "manifest.json.tmp"
        try:
            _write_bytes(manifest_tmp, json.dumps(manifest, indent=1, sort_keys=True).encode())
            os.replace(manifest_tmp, tmp / "manifest.json")
            _fsync_dir(tmp)
        except OSError as exc:
            _remove_tree(tmp)
            exc.filename = exc.filename or str(manifest_tmp)  # a failed write() names no file
            raise
        aside = self.dir / f"step-{step}.old"
        if final.exists():  # a re-save of a committed step: keep it until the new one is committed
            if aside.exists():  # older than final, which committed after it was set aside
                shutil.rmtree(aside)
            os.replace(final, aside)
            _fsync_dir(self.dir)
        # else an existing step-N.old is the only committed copy of step N: it stays until the commit
        if fault_hook is not None:
            fault_hook("aside")  # test hook: die with the old copy aside and the new one uncommitted
        try:
            os.replace(tmp, final)  # the commit
            _fsync_dir(self.dir)
        except OSError:
            if aside.exists() and not final.exists():
                os.replace(aside, final)  # the previous copy back in place; the new one stays uncommitted
            raise
        if fault_hook is not None:
            fault_hook("committed")  # test hook: die before the old copy is deleted
        _remove_tree(aside)
        try:
            latest_tmp = self.dir / "latest.tmp"
            latest_tmp.write_text(f"step-{step}\n")
            os.replace(latest_tmp, self.dir / "latest")
        except OSError as exc:  # a pointer for people; find_latest never reads it
            log.warning("checkpoint step-%s is committed but %s could not be updated: %s",
                        step, self.dir / "latest", exc)
        try:
            self._purge(fault_hook)
        except OSError as exc:  # the new checkpoint is committed; the next save or resume retries
            log.warning("checkpoint step-%s is committed but retention could not delete an old one: %s", step, exc)

    def _write_error(self, path: Path, exc: OSError, step: int, listing: dict[str, Any]) -> str:
        """One line for a failed write: for a full disk, what is needed, what is free, what to do."""
        path = Path(exc.filename) if exc.filename else path
        if exc.errno not in _DISK_FULL:
            return (f"{path}: cannot write checkpoint step-{step} ({exc.strerror or exc}); "
                    "the previous checkpoint is kept")
        needed = sum(int(info["bytes"]) for info in listing.values())
        try:
            free = f"{_human_bytes(shutil.disk_usage(self.dir).free)} free"
        except OSError:
            free = "free space unknown"
        what = "quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
        return (f"{path}: {what} writing checkpoint step-{step}, which needs {_human_bytes(needed)} "
                f"({needed} bytes; {free} in {self.dir}); the previous checkpoint is kept. Free space there, "
                f"or set checkpoint.dir=... to a filesystem with room, or lower checkpoint.keep_latest_k "
                f"(now {self.keep_latest_k}; a save needs room for one more checkpoint)")

    def _committed_steps(self) -> list[int]:
        if not self.dir.is_dir():
            return []
        steps = []
        for child in self.dir.iterdir():
            m = _STEP_DIR.match(child.name)
            if m and child.is_dir():
                steps.append(int(m.group(1)))
        return sorted(steps)

    def _purge(self, fault_hook: Any = None) -> None:
        steps = self._committed_steps()
        for step in steps[: max(0, len(steps) - self.keep_latest_k)]:
            doomed = self.dir / f"step-{step}"
            # Rename first, so a half-deleted directory never looks committed.
            deleting = self.dir / f"step-{step}.deleting"
            os.replace(doomed, deleting)
            if fault_hook is not None:
                fault_hook("purge")  # test hook: die with a directory half-way to deletion
            _remove_tree(deleting)

    # ------------------------------------------------------------------ resume
    def verify(self, step: int) -> dict[str, Any]:
        """Check one committed checkpoint completely; raise CheckpointError naming file and reason."""
        return self._verify_dir(self.dir / f"step-{step}")

    def _verify_dir(self, path: Path) -> dict[str, Any]:
        try:
            return self._verify_files(path)
        except OSError as exc:  # unreadable (permissions, EIO, a vanished mount): unusable, like a corrupt one
            where = exc.filename or path
            raise CheckpointError(f"{where}: cannot be read ({exc.strerror or exc})") from None

    def _verify_files(self, path: Path) -> dict[str, Any]:
        manifest_path = path / "manifest.json"
        if not manifest_path.is_file():
            raise CheckpointError(f"{manifest_path}: missing (checkpoint incomplete)")
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
            version = manifest["format_version"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{manifest_path}: unreadable manifest ({exc})") from None
        if version != FORMAT_VERSION:
            raise CheckpointError(f"{manifest_path}: format version {version}, this localsgd reads {FORMAT_VERSION}")
        expected = {"model.pt"} | {f"rank{r}.pt" for r in range(int(manifest.get("world_size", 0)))}
        missing = sorted(expected - set(files))
        if missing:
            raise CheckpointError(f"{path / missing[0]}: not listed in the manifest (missing rank file)")
        for name, info in sorted(files.items()):
            fpath = path / name
            if not fpath.is_file():
                raise CheckpointError(f"{fpath}: missing (listed in the manifest)")
            size = fpath.stat().st_size
            if size != info["bytes"]:
                raise CheckpointError(f"{fpath}: size {size} bytes, manifest says {info['bytes']} (truncated?)")
            if _sha256_file(fpath) != info["sha256"]:
                raise CheckpointError(f"{fpath}: sha256 mismatch (corrupt)")
        return manifest

    def _verifies(self, path: Path) -> dict[str, Any] | None:
        try:
            return self._verify_dir(path)
        except CheckpointError:
            return None

    def _replace_broken(self, broken: Path, good: Path) -> None:
        """Put the complete ``good`` copy in the place of ``broken`` (which may be absent)."""
        if broken.exists():
            doomed = broken.with_name(broken.name + ".deleting")
            _remove_tree(doomed)
            os.replace(broken, doomed)
            _remove_tree(doomed)
        os.replace(good, broken)

    def recover(self) -> dict[int, dict[str, Any]]:
        """Rank 0: repair what a crash left in the directory (see the module docstring for the rule).

        Never deletes a complete copy of a step that has no other complete copy. Returns the
        manifests of the committed checkpoints it verified on the way, by step.
        """
        verified: dict[int, dict[str, Any]] = {}
        if not self.dir.is_dir():
            return verified
        leftovers: dict[str, list[int]] = {"old": [], "tmp": [], "deleting": []}
        for child in self.dir.iterdir():
            m = _LEFTOVER_DIR.match(child.name)
            if m:
                leftovers[m.group(2)].append(int(m.group(1)))
        for step in sorted(leftovers["old"]):  # before .tmp: a restored step-N decides what a tmp is worth
            final, aside = self.dir / f"step-{step}", self.dir / f"step-{step}.old"
            try:
                if not final.exists():
                    os.replace(aside, final)  # killed between moving it aside and the commit
                    log.warning("checkpoint step-%s: restored from %s (a re-save was interrupted)", step, aside.name)
                elif (manifest := self._verifies(final)) is not None:
                    verified[step] = manifest
                    _remove_tree(aside)  # killed after the commit, before the old copy was deleted
                elif self._verifies(aside) is not None:
                    self._replace_broken(final, aside)
                    log.warning("checkpoint step-%s does not verify; its previous copy %s took its place",
                                step, aside.name)
                else:
                    _remove_tree(aside)
            except OSError as exc:
                log.warning("checkpoint step-%s: cannot repair %s (%s); leaving it", step, aside, exc)
        for step in sorted(leftovers["tmp"]):
            final, tmp = self.dir / f"step-{step}", self.dir / f"step-{step}.tmp"
            try:
                if (tmp / "manifest.json").exists() and step not in verified:
                    if final.exists() and (manifest := self._verifies(final)) is not None:
                        verified[step] = manifest
                    elif self._verifies(tmp) is not None:
                        self._replace_broken(final, tmp)
                        log.warning("checkpoint step-%s: the complete copy in %s took the place of a missing or "
                                    "broken one (a replacement was interrupted)", step, tmp.name)
                        continue
                _remove_tree(tmp)  # left by a crash mid-save: never loaded
            except OSError as exc:
                log.warning("checkpoint step-%s: cannot repair %s (%s); leaving it", step, tmp, exc)
        for step in leftovers["deleting"]:
            _remove_tree(self.dir / f"step-{step}.deleting")
        return verified

    def find_latest(self) -> Found | None:
        """Rank 0 repairs crash leftovers, picks the newest valid checkpoint (falling back if allowed)
        and tells every rank; every rank returns, or raises, the same."""
        decision: dict[str, Any] | None = None
        if dist.is_main():
            decision = {"step": None, "error": None, "manifest": None}
            try:
                verified = self.recover()
                steps = self._committed_steps()
            except OSError as exc:
                decision["error"] = f"{self.dir}: cannot list the checkpoints ({exc.strerror or exc})"
                steps = []
            for step in reversed(steps):
                try:
                    decision["manifest"] = verified[step] if step in verified else self.verify(step)
                    decision["step"] = step
                    break
                except CheckpointError as exc:
                    if not self.fallback:
                        decision["error"] = f"{exc}; set checkpoint.fallback=true to resume from the previous one"
                        break
                    log.warning("checkpoint %s is unusable, trying the previous one: %s", step, exc)
        decision = dist.broadcast_object(decision, src=0)
        assert decision is not None
        if decision["error"]:
            raise CheckpointError(decision["error"])
        if decision["step"] is None:
            return None
        return Found(decision["step"], self.dir / f"step-{decision['step']}", decision["manifest"])

    def load(self, found: Found) -> tuple[dict[str, Any], dict[str, Any]]:
        """Load ``model.pt`` and this rank's file (weights only: no code runs from a checkpoint)."""
        me = dist.rank()
        out = []
        for name in ("model.pt", f"rank{me}.pt"):
            fpath = found.path / name
            try:
                out.append(torch.load(fpath, map_location="cpu", weights_only=True))
            except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
                raise CheckpointError(f"{fpath}: cannot be loaded ({exc})") from exc
        return out[0], out[1]
