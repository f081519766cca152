"""Process groups, ranks, timeouts and every collective localsgd issues.

This is the only module that reads the launcher's environment (torchrun's ``RANK``/``LOCAL_RANK``/
``WORLD_SIZE``, falling back to Slurm's ``SLURM_PROCID``/``SLURM_LOCALID``/``SLURM_NTASKS`` for
srun-native launches) and the only one that calls ``torch.distributed`` collectives. Isolating them
here (the torchft process-group-layer pattern) means one place decides the backend (NCCL when CUDA is
available, else Gloo), one place sets timeouts, so that a mismatched or stuck collective becomes a
clear error instead of a hang, and one place can be replaced by a fake in tests.

Without a launcher the process runs as world size 1: :func:`init` then creates a one-rank Gloo group
on an in-memory store, so the same code path (and the same communication accounting) is exercised.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

__all__ = [
    "DistEnv",
    "read_env",
    "init",
    "destroy",
    "leave",
    "is_initialized",
    "rank",
    "world_size",
    "local_rank",
    "is_main",
    "print0",
    "backend",
    "device",
    "barrier",
    "all_reduce_sum_",
    "all_reduce_max_",
    "all_reduce_sum_async",
    "broadcast_",
    "broadcast_object",
    "all_gather_object",
    "set_timeout",
    "new_subgroups",
    "CollectiveTimeout",
]


class CollectiveTimeout(RuntimeError):
    """A collective did not complete within the configured timeout (a rank died, hung or diverged)."""


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    local_rank: int
    world_size: int
    launcher: str  # "torchrun", "slurm" or "single"


def _int_env(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from exc


def _export_submitit_env() -> None:
    # A hydra-submitit job with several tasks per sweep point is launched by srun without torchrun;
    # submitit knows the job's rank layout and master address, so let it export torchrun's names.
    if "RANK" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    import submitit

    if submitit.JobEnvironment().num_tasks > 1:
        # set_cuda_visible_devices=False: init() pins the device from LOCAL_RANK itself.
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)


def read_env() -> DistEnv:
    """Read rank information from torchrun's variables, else Slurm's, else a single process."""
    _export_submitit_env()
    rank = _int_env("RANK")
    if rank is not None:
        world = _int_env("WORLD_SIZE")
        if world is None:
            raise ValueError("RANK is set but WORLD_SIZE is not: launch with torchrun or set both")
        local = _int_env("LOCAL_RANK")
        env = DistEnv(rank, rank if local is None else local, world, "torchrun")
    elif _int_env("SLURM_PROCID") is not None and (_int_env("SLURM_NTASKS") or 1) > 1:
        env = DistEnv(
            _int_env("SLURM_PROCID") or 0,
            _int_env("SLURM_LOCALID") or 0,
            _int_env("SLURM_NTASKS") or 1,
            "slurm",
        )
    else:
        env = DistEnv(0, 0, 1, "single")
    if not 0 <= env.rank < env.world_size:
        raise ValueError(f"rank {env.rank} is outside world size {env.world_size}")
    return env


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def rank() -> int:
    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


_LOCAL_RANK = 0


def group_rank(group: Any = None) -> int:
    """This process's rank within ``group`` (the default group when None)."""
    return tdist.get_rank(group) if is_initialized() else 0


def group_size(group: Any = None) -> int:
    return tdist.get_world_size(group) if is_initialized() else 1


def local_rank() -> int:
    return _LOCAL_RANK


def is_main() -> bool:
    return rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def backend() -> str:
    """The default group's backend name, or "none" when no group exists."""
    return str(tdist.get_backend()) if is_initialized() else "none"


def device() -> torch.device:
    """The device this rank computes on: its local CUDA device under NCCL, else the CPU."""
    if is_initialized() and backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _pick_backend(requested: str) -> str:
    if requested != "auto":
        if requested == "nccl" and not torch.cuda.is_available():
            raise ValueError("comm.backend=nccl needs CUDA, which is not available on this machine")
        return requested
    return "nccl" if torch.cuda.is_available() else "gloo"


def _set_nccl_env() -> None:
    # Make a failed NCCL collective tear the process down instead of hanging.
    key = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
    if os.environ.get(key, "3") != "3":
        log.warning("overriding %s=%s with 3 so a failed collective ends the process", key, os.environ[key])
    os.environ[key] = "3"


def init(backend_name: str = "auto", init_timeout_s: float = 300.0) -> DistEnv:
    """Create the default process group (idempotent) and pin this rank's CUDA device.

    With no launcher, a one-rank Gloo group on an in-memory store is created, so single-process runs
    take the same code path as distributed ones.
    """
    global _LOCAL_RANK
    env = read_env()
    _LOCAL_RANK = env.local_rank
    if is_initialized():
        return env
    chosen = _pick_backend(backend_name)
    timeout = _dt.timedelta(seconds=init_timeout_s)
    _TIMEOUT_S[:] = [init_timeout_s]
    _SUBGROUPS.clear()
    if chosen == "nccl":
        _set_nccl_env()
        torch.cuda.set_device(env.local_rank)
    if env.launcher == "single":
        store = tdist.HashStore()
        tdist.init_process_group(chosen, store=store, rank=0, world_size=1, timeout=timeout)
    else:
        if env.launcher == "slurm":
            os.environ.setdefault("RANK", str(env.rank))
            os.environ.setdefault("WORLD_SIZE", str(env.world_size))
            os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
            if "MASTER_ADDR" not in os.environ:
                raise ValueError(
                    "srun-native launch needs MASTER_ADDR (and MASTER_PORT): export the first host of "
                    "the job, as launch/slurm.sbatch does"
                )
            os.environ.setdefault("MASTER_PORT", "29500")
        kwargs: dict[str, Any] = {}
        if chosen == "nccl":
            kwargs["device_id"] = torch.device("cuda", env.local_rank)
        # torchrun keeps one TCPStore across worker-group restarts, so a restarted group would read
        # the dead workers' addresses (observed with Gloo: "connectFullMesh failed ... Connection
        # refused"). A per-attempt key prefix gives every attempt a clean namespace.
        base_store, _, _ = next(tdist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
        store = tdist.PrefixStore(f"localsgd/attempt-{restart_count()}", base_store)
        tdist.init_process_group(
            chosen, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs
        )
    return env


_SUBGROUPS: list[Any] = []  # every subgroup made here, so set_timeout bounds their collectives too
_TIMEOUT_S: list[float] = []  # the timeout now in force (set by init and set_timeout)


def set_timeout(seconds: float, group: Any = None) -> None:
    """Tighten (or relax) the collective timeout after start-up (torchtitan does the same); without
    ``group``, for the default group and every subgroup made by :func:`new_subgroups`."""
    if not is_initialized():
        return
    setter = getattr(tdist.distributed_c10d, "_set_pg_timeout", None)
    if setter is None:  # pragma: no cover - very old torch
        log.warning("this torch cannot change a process group's timeout; keeping the init timeout")
        return
    setter(_dt.timedelta(seconds=seconds), group)
    if group is None:
        _TIMEOUT_S[:] = [seconds]
        for sub in _SUBGROUPS:
            setter(_dt.timedelta(seconds=seconds), sub)


def destroy() -> None:
    if is_initialized():
        tdist.destroy_process_group()


def leave(code: int = 0) -> NoReturn:
    """Destroy the process group, flush, and end the process with ``code`` without interpreter finalisation.

    Call it last in a script of your own under torchrun (the trainer does). At finalisation a Gloo or
    TCPStore background thread torn down by a static destructor occasionally aborts the process
    ("terminate called without an active exception", SIGABRT: about one run in twelve on a loaded
    2-core machine), so torchrun reports a finished run as failed; ``os._exit`` skips that teardown.
    """
    destroy()
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def _wait(work: Any, what: str) -> None:
    try:
        work.wait()
    except RuntimeError as exc:
        raise CollectiveTimeout(
            f"rank {rank()}: {what} failed or timed out ({exc}); another rank probably died, hung or "
            "issued a different collective (see comm.train_timeout_s)"
        ) from exc


def barrier(what: str = "barrier") -> None:
    if world_size() > 1:
        # A barrier as an all-reduce of one element keeps it under the process group's timeout on
        # both backends (Gloo's barrier ignores it on some versions).
        flag = torch.zeros(1, device=device())
        _wait(tdist.all_reduce(flag, async_op=True), what)


def all_reduce_sum_(tensor: torch.Tensor, group: Any = None, what: str = "all-reduce") -> torch.Tensor:
    """In-place sum over ranks (identity at world size 1)."""
    if is_initialized() and tdist.get_world_size(group) > 1:
        _wait(tdist.all_reduce(tensor, op=tdist.ReduceOp.SUM, group=group, async_op=True), what)
    return tensor


_AVERAGE_IN_COLLECTIVE: dict[str, bool] = {"nccl": True}


def average_in_collective(group: Any = None) -> bool:
    """Whether this backend's all-reduce can average (``ReduceOp.AVG``), so callers need no division pass.

    NCCL always can. Gloo gained AVG in recent PyTorch releases; older ones reject the op ("Cannot
    use ReduceOp.AVG with Gloo") on every rank alike before anything is sent, either when the
    collective is created or, in some releases, when its work runs (the error then comes out of
    ``wait``). So the first call probes with a one-element all-reduce and remembers the answer for
    the process: it is a collective, and every rank of ``group`` must make it at the same point (the
    averaging engine calls it right before its first averaging all-reduce).
    """
    name = backend()
    known = _AVERAGE_IN_COLLECTIVE.get(name)
    if known is not None:
        return known
    if not is_initialized() or tdist.get_world_size(group) == 1:
        return False
    probe = torch.ones(1, device=device())
    try:
        tdist.all_reduce(probe, op=tdist.ReduceOp.AVG, group=group, async_op=True).wait()
    except (RuntimeError, ValueError) as exc:
        if "AVG" not in str(exc):  # a real failure (a dead rank, a timeout), not the op's absence
            raise CollectiveTimeout(f"rank {rank()}: probe for ReduceOp.AVG failed or timed out ({exc}); "
                                    "another rank probably died or hung (see comm.train_timeout_s)") from exc
        _AVERAGE_IN_COLLECTIVE[name] = False
        return False
    _AVERAGE_IN_COLLECTIVE[name] = bool(probe.item() == 1.0)
    return _AVERAGE_IN_COLLECTIVE[name]


def all_reduce_sum_async(tensor: torch.Tensor, group: Any = None, average: bool = False) -> Any:
    """Start an in-place sum (or, with ``average``, mean); a handle for :func:`wait`, or None.

    ``average`` needs a backend for which :func:`average_in_collective` is True; otherwise the caller
    sums and divides.
    """
    if is_initialized() and tdist.get_world_size(group) > 1:
        op = tdist.ReduceOp.AVG if average else tdist.ReduceOp.SUM
        return tdist.all_reduce(tensor, op=op, group=group, async_op=True)
    return None


def all_gather_into_tensor_async(output: torch.Tensor, tensor: torch.Tensor, group: Any = None) -> Any:
    """Start gathering every rank's ``tensor`` into ``output`` (rank order); a handle for :func:`wait`."""
    if is_initialized() and tdist.get_world_size(group) > 1:
        # all_gather_single is the name from torch 2.13 on (all_gather_into_tensor warns there)
        gather = getattr(tdist, "all_gather_single", None) or tdist.all_gather_into_tensor
        return gather(output, tensor, group=group, async_op=True)
    output.copy_(tensor)
    return None


def wait(handle: Any, what: str = "all-reduce") -> None:
    if handle is not None:
        _wait(handle, what)


def all_reduce_max_(tensor: torch.Tensor, group: Any = None, what: str = "all-reduce(max)") -> torch.Tensor:
    if is_initialized() and tdist.get_world_size(group) > 1:
        _wait(tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX, group=group, async_op=True), what)
    return tensor


def all_reduce_max_async(tensor: torch.Tensor, group: Any = None) -> Any:
    if is_initialized() and tdist.get_world_size(group) > 1:
        return tdist.all_reduce(tensor, op=tdist.ReduceOp.MAX, group=group, async_op=True)
    return None


def broadcast_(tensor: torch.Tensor, src: int = 0, group: Any = None, what: str = "broadcast") -> torch.Tensor:
    if is_initialized() and tdist.get_world_size(group) > 1:
        _wait(tdist.broadcast(tensor, src=src, group=group, async_op=True), what)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank (rank 0 decides, everyone agrees)."""
    if world_size() == 1:
        return obj
    box = [obj]
    try:
        tdist.broadcast_object_list(box, src=src, device=device() if backend() == "nccl" else None)
    except RuntimeError as exc:
        raise CollectiveTimeout(f"rank {rank()}: broadcast_object failed or timed out ({exc})") from exc
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    try:
        tdist.all_gather_object(out, obj)
    except RuntimeError as exc:
        raise CollectiveTimeout(f"rank {rank()}: all_gather_object failed or timed out ({exc})") from exc
    return out


def new_subgroups(groups: Sequence[Sequence[int]]) -> Any:
    """Create one subgroup per list of ranks (every rank must call this); return this rank's group."""
    mine = None
    timeout = _dt.timedelta(seconds=_TIMEOUT_S[0]) if _TIMEOUT_S else None  # else torch's 30-minute default
    for ranks in groups:
        g = tdist.new_group(list(ranks), timeout=timeout)
        if rank() in ranks:
            _SUBGROUPS.append(g)
            mine = g
    return mine


def restart_count() -> int:
    """How many times torchrun restarted this worker group (0 on the first attempt)."""
    return _int_env("TORCHELASTIC_RESTART_COUNT") or 0


def local_world_size() -> int:
    """Workers on this node (torchrun's LOCAL_WORLD_SIZE, Slurm's tasks per node, else 1)."""
    return _int_env("LOCAL_WORLD_SIZE") or _int_env("SLURM_NTASKS_PER_NODE") or 1


def launch_id() -> str | None:
    """An id that every rank of one launch, and every restart of it, reads alike; None without a launcher.

    torchrun gives all ranks (and restarts) the same ``TORCHELASTIC_RUN_ID`` (cut to its first 8
    characters when longer than 16, e.g. a uuid); Slurm the job id, as ``slurm-<id>``.
    """
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rid and rid != "none":
        return rid if len(rid) <= 16 else rid[:8]
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm-{job}"
    return None


def launch_start_time() -> float | None:
    """When this launch started, the same on every rank and restart; None where that cannot be known alike.

    ``localsgd-run`` exports its start as ``LOCALSGD_LAUNCH_TIME``; Slurm exports ``SLURM_JOB_START_TIME``;
    the ranks of a one-node torchrun share their parent, the launcher agent, whose start time the kernel
    keeps (it survives the agent's restarts of its workers). A multi-node torchrun without either has no
    common clock: the name is then the run id alone. Without a launcher: now.
    """
    for key in ("LOCALSGD_LAUNCH_TIME", "SLURM_JOB_START_TIME"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return float(value)
    if os.environ.get("TORCHELASTIC_RUN_ID") is None:
        return time.time()
    if os.environ.get("WORLD_SIZE") != os.environ.get("LOCAL_WORLD_SIZE"):
        return None
    return _process_start_time(os.getppid())


def _process_start_time(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks
