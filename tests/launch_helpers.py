"""Run the real entry point (``python -m localsgd.train`` / ``torchrun``) in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from .distributed import free_port

ROOT = Path(__file__).resolve().parent.parent
TINY = ["data=digits", "model=mlp", "model.hidden=[32]", "trainer=smoke", "optimizer.lr=0.1"]


def env_for(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK",
                                                                     "MASTER_", "TORCHELASTIC", "LOCALSGD_FAULT"))}
    env.update({"WANDB_MODE": env.get("WANDB_MODE", "disabled"), "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1",
                "LOCALSGD_CACHE_DIR": str(tmp / "cache"), "PYTHONUNBUFFERED": "1", **extra})
    return env


def torchrun(tmp: Path, run_dir: Path, overrides: list[str], nproc: int = 2, max_restarts: int = 0,
             timeout: float = 240, **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--max-restarts={max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           "--monitor-interval=0.5", "-m", "localsgd.train", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=tmp, env=env_for(tmp, **env), capture_output=True, text=True, timeout=timeout)


def single(tmp: Path, run_dir: Path, overrides: list[str], timeout: float = 180,
           **env: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "localsgd.train", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.run(cmd, cwd=tmp, env=env_for(tmp, **env), capture_output=True, text=True, timeout=timeout)


def records(run_dir: Path, event: str | None = None) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    out = [json.loads(line) for line in lines]
    return [r for r in out if event is None or r["event"] == event]


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return f"rc={proc.returncode}\nSTDOUT:\n{proc.stdout[-4000:]}\nSTDERR:\n{proc.stderr[-6000:]}"
