"""Run a function on N real Gloo ranks on localhost, each collective bounded by a timeout.

Every test gets a free port; the parent kills all ranks if any fails or the whole run exceeds its
timeout, so a bug fails fast instead of hanging the suite.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable[..., Any], rank: int, world: int, port: int, timeout_s: float,
            queue: Any, args: tuple[Any, ...], backend: str = "gloo") -> None:
    import torch
    import torch.distributed as tdist

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per rank, as torchrun's LOCAL_RANK gives it
        tdist.init_process_group(backend, rank=rank, world_size=world,
                                 timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world, *args)
        queue.put((rank, "ok", result))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 60.0,
              collective_timeout_s: float = 20.0, backend: str = "gloo") -> list[tuple[str, Any]]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks; return ``[(status, result_or_error)]`` by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, world, port, collective_timeout_s, queue, args, backend),
                         daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, tuple[str, Any]] = {}
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
    try:
        while len(results) < world:
            remaining = (deadline - datetime.datetime.now()).total_seconds()
            if remaining <= 0:
                raise TimeoutError(f"ranks {sorted(set(range(world)) - set(results))} did not finish in {timeout_s}s")
            try:
                rank, status, value = queue.get(timeout=min(remaining, 1.0))
            except Exception:  # noqa: BLE001 - queue.Empty
                if any(p.exitcode not in (None, 0) for p in procs) and len(results) < world:
                    dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                    if dead:
                        raise RuntimeError(f"ranks {dead} exited without reporting") from None
                continue
            results[rank] = (status, value)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    return [results[r] for r in range(world)]


def run_ok(fn: Callable[..., Any], world: int, *args: Any, **kw: Any) -> list[Any]:
    """Like :func:`run_ranks` but fail the test with every rank's error if any rank failed."""
    out = run_ranks(fn, world, *args, **kw)
    errors = [f"rank {r}: {v}" for r, (s, v) in enumerate(out) if s != "ok"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [v for _, v in out]
