"""Run a function on N real ranks on one machine, each started as the trainer starts its ranks.

Each rank is a spawned process given torchrun's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``) that joins through
:func:`localsgd.dist.init`, the trainer's own path (env rendezvous, per-attempt store prefix, NCCL
device pinning), so the code under test sees the process group a real launch gives it. As the
trainer does with ``comm.init_timeout_s`` and ``comm.train_timeout_s``, joining may take as long as
the whole run (``timeout_s``; a rank's interpreter can be slow to start on a busy machine) and every
collective after that is bounded by ``collective_timeout_s`` (:func:`localsgd.dist.set_timeout`).

The parent gives each run a free port and stops waiting when every rank has reported, when a rank
dies without reporting or when the run exceeds ``timeout_s``; it then kills what is left, so a bug
fails fast instead of hanging a test suite or a benchmark (a free port per
run; each multi-process test should take seconds).

Used by the multi-process tests (through ``tests/distributed.py``) and by ``benchmarks/averaging.py``,
whose shaped-link mode moves each rank into its own network namespace with ``prepare_rank``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from .. import dist

__all__ = ["free_port", "run_ranks", "run_ok"]

# After every rank has reported, how long the ranks get to tear their process group down and exit
# before they are killed (after a failure they are killed at once).
_EXIT_GRACE_S = 5.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (the OS picks it), for one run's rendezvous."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _launcher_env(rank: int, world: int, master_addr: str, port: int) -> dict[str, str]:
    """The variables torchrun gives a worker on a single node, which :func:`localsgd.dist.init` reads."""
    return {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": master_addr, "MASTER_PORT": str(port)}


def _worker(fn: Callable[..., Any], rank: int, world: int, args: tuple[Any, ...], results: Any, *,
            backend: str, master_addr: str, port: int, init_timeout_s: float, collective_timeout_s: float,
            prepare_rank: Callable[[int], None] | None) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    try:
        if prepare_rank is not None:
            prepare_rank(rank)
        os.environ.update(_launcher_env(rank, world, master_addr, port))
        if backend == "nccl":
            torch.cuda.set_device(rank)  # one GPU per rank, as torchrun's LOCAL_RANK gives it
        dist.init(backend, init_timeout_s=init_timeout_s)
        dist.set_timeout(collective_timeout_s)
        results.put((rank, "ok", fn(rank, world, *args)))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        dist.destroy()


def _collect(procs: list[Any], results: Any, timeout_s: float) -> dict[int, tuple[str, Any]]:
    """Every rank's ``(status, value)``; raise if a rank exits without reporting or the run outlasts ``timeout_s``."""
    world = len(procs)
    got: dict[int, tuple[str, Any]] = {}
    exited_before: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(got) < world:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            missing = sorted(set(range(world)) - set(got))
            raise TimeoutError(f"ranks {missing} did not finish in {timeout_s}s")
        try:
            rank, status, value = results.get(timeout=min(remaining, 1.0))
            got[rank] = (status, value)
            continue
        except queue_mod.Empty:
            pass
        # A rank's report is in the pipe before the rank exits, so one that had exited at the last
        # check and still has not reported after a whole empty wait since then never will (it died,
        # or its result did not pickle). Any exit code counts: os._exit(0) reports nothing either.
        exited = {r for r, p in enumerate(procs) if p.exitcode is not None and r not in got}
        silent = sorted(exited & exited_before)
        if silent:
            codes = ", ".join(f"rank {r}: {procs[r].exitcode}" for r in silent)
            raise RuntimeError(f"ranks {silent} exited without reporting (exit codes {codes}): they died, "
                               "or their results did not pickle (see their stderr)")
        exited_before = exited
    return got


def _stop(procs: list[Any], grace_s: float) -> None:
    """Give the ranks ``grace_s`` in all to exit on their own, then kill the rest."""
    deadline = time.monotonic() + grace_s
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(timeout=_EXIT_GRACE_S)


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, timeout_s: float = 60.0,
              collective_timeout_s: float = 20.0, backend: str = "gloo", master_addr: str = "127.0.0.1",
              prepare_rank: Callable[[int], None] | None = None) -> list[tuple[str, Any]]:
    """Run ``fn(rank, world, *args)`` on ``world`` ranks; return ``[(status, result_or_error)]`` by rank.

    ``status`` is ``"ok"`` with ``fn``'s return value, or ``"error"`` with the exception and its
    traceback. ``fn``, ``args`` and the results cross process boundaries, so they must pickle (``fn``
    defined at module level). ``prepare_rank(rank)``, if given, runs first in each rank's process,
    before its process group exists (to enter a network namespace, or set ``GLOO_SOCKET_IFNAME``);
    ``master_addr`` is then the address at which rank 0 hosts the rendezvous.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    options = {"backend": backend, "master_addr": master_addr, "port": free_port(),
               "init_timeout_s": max(timeout_s, collective_timeout_s),
               "collective_timeout_s": collective_timeout_s, "prepare_rank": prepare_rank}
    procs = [ctx.Process(target=_worker, args=(fn, r, world, args, results), kwargs=options, daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    try:
        got = _collect(procs, results, timeout_s)
    except BaseException:
        _stop(procs, grace_s=0.0)  # a hung rank would only wait out its collective timeout
        raise
    _stop(procs, grace_s=_EXIT_GRACE_S)
    return [got[r] for r in range(world)]


def run_ok(fn: Callable[..., Any], world: int, *args: Any, **kw: Any) -> list[Any]:
    """Like :func:`run_ranks` but raise ``AssertionError`` with every rank's error if any rank failed."""
    out = run_ranks(fn, world, *args, **kw)
    errors = [f"rank {r}: {v}" for r, (s, v) in enumerate(out) if s != "ok"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [v for _, v in out]
