"""The DDP baseline behind the communicator interface: gradients all-reduced at every step.

PyTorch's DistributedDataParallel (Li et al., VLDB 2020, arXiv 2006.15704) overlaps a bucketed
gradient all-reduce with the backward pass. Here its communication goes through a comm hook that
calls :mod:`localsgd.dist` (so the process group's timeout bounds it, and the mean is taken inside
the collective where the backend can) and counts the payload, so DDP and local SGD are accounted
alike. DDP has no round boundary to carry a stop flag: every ``stop_check_every`` steps a
1-element MAX all-reduce lets a preemption signal seen by any rank stop all of them at one step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from . import dist
from .engine import SyncStats


class DDPBaseline:
    """Wraps ``model`` in DistributedDataParallel; train through :attr:`step_model`."""

    def __init__(self, model: nn.Module, bucket_cap_mb: float = 25.0, stop_check_every: int = 10) -> None:
        from torch.nn.parallel import DistributedDataParallel as DDP

        self.stats = SyncStats()
        self.stop_check_every = stop_check_every
        self.local_step = 0
        self.stop_requested = False
        self.stop_agreed = False
        device = dist.device()
        self.step_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                              bucket_cap_mb=bucket_cap_mb)
        world = dist.world_size()
        averages = dist.average_in_collective()  # a collective: every rank builds the baseline alike
        stats = self.stats

        # DDP inspects the hook's annotations; leave them off.
        def counting_allreduce(state, bucket):  # type: ignore[no-untyped-def]
            tensor = bucket.buffer()
            begin = time.perf_counter()
            work = dist.all_reduce_sum_async(tensor, average=averages)
            if work is not None:  # a group of one sends nothing
                stats.bytes += tensor.numel() * tensor.element_size()

            def finish(fut):  # type: ignore[no-untyped-def]
                stats.seconds += time.perf_counter() - begin
                out = fut.value()[0]
                return out if averages else out.div_(world)

            if work is None:  # world size 1: nothing to reduce
                done: torch.futures.Future = torch.futures.Future()
                done.set_result(tensor)
                return done
            return work.get_future().then(finish)

        self.step_model.register_comm_hook(None, counting_allreduce)

    @property
    def in_sync(self) -> bool:
        return True  # gradients are averaged before every step: the replicas never differ

    @property
    def round_completed(self) -> bool:
        return True  # every step is a round

    def step(self, loss: torch.Tensor | float | None = None) -> bool:
        self.local_step += 1
        self.stats.rounds += 1
        if self.local_step % self.stop_check_every == 0:
            flag = torch.tensor([float(self.stop_requested)], device=dist.device())
            dist.all_reduce_max_(flag, what="DDP preemption check")
            self.stats.check_bytes += flag.element_size()
            self.stop_agreed = bool(flag.item() > 0)
        return True

    def finalize(self) -> bool:
        return False

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        yield

    @property
    def round_steps(self) -> int:
        return 1  # a gradient all-reduce at every step

    def describe(self) -> str:
        return "ddp"

    def state_dict(self) -> dict[str, Any]:
        return {"local_step": self.local_step, "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local_step = int(state["local_step"])
        self.stats.load_state_dict(state["stats"])
