"""Crash-safe checkpoints at sync boundaries: a crash at any point leaves the last committed one intact.

Right after an average every replica holds the same parameters, so a checkpoint is one ``model.pt``
written by rank 0 plus one ``rank{r}.pt`` per rank (optimizer state, RNG, data cursor, engine and
schedule state). Files go into a fresh ``step-N.tmp/`` directory; rank 0 then writes
``manifest.json`` (format version, step, world size, config, ``{file: {sha256, bytes}}``) and commits
by renaming the directory to ``step-N`` with ``os.replace`` (atomic within one filesystem). A
checkpoint counts only if its directory has no suffix and every checksum in its manifest matches, so
a crash at any point leaves either the previous or the new checkpoint loadable, never a mix.
DCP's ``.metadata`` plays the same commit-marker role but carries no checksums; ours does.
"""

from __future__ import annotations

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


def _write_bytes(path: Path, data: bytes) -> dict[str, Any]:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


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


class Checkpointer:
    """Writes and finds checkpoints in one directory shared by all ranks."""

    def __init__(self, directory: str | os.PathLike[str], keep_latest_k: int = 2, fallback: bool = True) -> None:
        self.dir = Path(directory)
        self.keep_latest_k = keep_latest_k
        self.fallback = fallback

    # ------------------------------------------------------------------ save
    def save(self, step: int, model_state: dict[str, Any], rank_state: dict[str, Any],
             meta: dict[str, Any], fault_hook: Any = None) -> Path:
        """Collective: every rank calls it at the same sync boundary. Returns the committed path."""
        final = self.dir / f"step-{step}"
        tmp = self.dir / f"step-{step}.tmp"
        if dist.is_main():
            self.dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        dist.barrier("checkpoint: create directory")
        me = dist.rank()
        files = {f"rank{me}.pt": _write_bytes(tmp / f"rank{me}.pt", _serialise(rank_state))}
        if dist.is_main():
            files["model.pt"] = _write_bytes(tmp / "model.pt", _serialise(model_state))
        if fault_hook is not None:
            fault_hook("shards")  # test hook: die after the shards are written, before the commit
        gathered = dist.all_gather_object(files)
        if dist.is_main():
            listing: dict[str, Any] = {}
            for part in gathered:
                listing.update(part)
            manifest = {"format_version": FORMAT_VERSION, "step": step, "world_size": dist.world_size(),
                        **meta, "files": listing}
            manifest_tmp = tmp / "manifest.json.tmp"
            _write_bytes(manifest_tmp, json.dumps(manifest, indent=1, sort_keys=True).encode())
            os.replace(manifest_tmp, tmp / "manifest.json")
            _fsync_dir(tmp)
            if final.exists():  # a re-run of the same step after a restart: replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)  # the commit
            _fsync_dir(self.dir)
            latest_tmp = self.dir / "latest.tmp"
            latest_tmp.write_text(f"step-{step}\n")
            os.replace(latest_tmp, self.dir / "latest")
            self._purge(fault_hook)
        dist.barrier("checkpoint: commit")
        return final

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
            shutil.rmtree(deleting, ignore_errors=True)

    # ------------------------------------------------------------------ resume
    def verify(self, step: int) -> dict[str, Any]:
        """Check one committed checkpoint completely; raise CheckpointError naming file and reason."""
        path = self.dir / f"step-{step}"
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

    def find_latest(self) -> Found | None:
        """Rank 0 picks the newest valid checkpoint (falling back if allowed) and tells every rank."""
        decision: dict[str, Any] | None = None
        if dist.is_main():
            decision = {"step": None, "error": None, "manifest": None}
            for stale in self.dir.glob("step-*.tmp") if self.dir.is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)  # left by a crash mid-save: never loaded
            for stale in self.dir.glob("step-*.deleting") if self.dir.is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)
            for step in reversed(self._committed_steps()):
                try:
                    decision["manifest"] = self.verify(step)
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
