"""Helpers shared by the benchmark scripts: name the code state a measurement belongs to."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def git_state() -> str:
    """``<HEAD commit>`` of this checkout, ``+dirty`` when ``localsgd/`` has uncommitted changes."""
    root = Path(__file__).resolve().parents[1]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                  timeout=10).stdout.strip()

        head = git("rev-parse", "--short=12", "HEAD")
        dirty = git("status", "--porcelain", "--", "localsgd")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def source_digest() -> str:
    """First 12 hex digits of a sha256 over localsgd's sources: names the code state a result measured."""
    root = Path(__file__).resolve().parents[1] / "localsgd"
    h = hashlib.sha256()
    for f in sorted([*root.rglob("*.py"), *root.rglob("*.c")]):
        h.update(f.relative_to(root).as_posix().encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]
