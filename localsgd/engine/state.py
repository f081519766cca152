"""State policies around an average: the replica backup, the skip-round snapshot, optimizer state.

* :class:`ReplicaBackup`: what this rank sent into an in-place all-reduce, bucket by bucket, so a
  sync whose check fails after the average has landed restores every replica exactly
  (a failed sync changes nothing). One copy of the averaged data per rank.
* :class:`RoundSnapshot` (``on_nonfinite=skip_round``): the parameters, buffers and optimizer state
  of the last good sync, restored when a round turns out non-finite somewhere.
* :class:`OptimizerStatePolicy`: ``keep`` (each worker its own moments; torch's
  PostLocalSGDOptimizer, torchft and accelerate do the same), ``reset`` (fresh state each round) or
  ``average`` (the per-element moments, momentum or Adam's moments, averaged after the parameters).
  Averaged moments are scanned for NaN/Inf
  first, like the parameters, so a non-finite moment never spreads to other ranks.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .. import dist
from .layout import FlatBuffer, FlatLayout


def all_finite(t: torch.Tensor) -> bool:
    # A finite sum proves every element finite (NaN/Inf propagate through a sum); only an infinite or
    # NaN sum, which may also be a harmless overflow, needs the exact (slower) elementwise test.
    return t.numel() == 0 or math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


class ReplicaBackup:
    """A copy of each flat buffer's averaged data, written right before it is sent."""

    def __init__(self, layout: FlatLayout) -> None:
        self.layout = layout
        self._version = -1
        self._copies: dict[int, torch.Tensor] = {}
        self._saved: list[tuple[FlatBuffer, int, int]] = []

    def _copy_of(self, fb: FlatBuffer) -> torch.Tensor:
        if self._version != self.layout.version:  # a rebuilt layout: new buffers, new copies
            self._copies, self._version = {}, self.layout.version
        copy = self._copies.get(id(fb))
        if copy is None:
            copy = self._copies[id(fb)] = torch.empty_like(fb.data)
        return copy

    def clear(self) -> None:
        self._saved.clear()

    def save(self, fb: FlatBuffer, data: torch.Tensor) -> None:
        """Save ``data``, a view of ``fb.flat``, before it is sent."""
        start = data.storage_offset() - fb.flat.storage_offset()
        end = start + data.numel()
        if start < end:
            self._copy_of(fb)[start:end].copy_(data)
            self._saved.append((fb, start, end))

    def save_all(self) -> None:
        for fb in self.layout.buffers:
            self.save(fb, fb.data)

    def restore(self) -> None:
        """Put back everything saved since :meth:`clear` (waits for no collective: call it after)."""
        with torch.no_grad():
            for fb, start, end in self._saved:
                fb.flat[start:end].copy_(self._copies[id(fb)][start:end])
        self._saved.clear()


class LayoutCopy:
    """A copy of every flat buffer and averaged buffer (and the integer buffers), put back by :meth:`restore`."""

    def __init__(self, layout: FlatLayout) -> None:
        self.layout = layout
        self.flat = [fb.flat.clone() for fb in layout.buffers]
        self.buffers = [[b.clone() for b in fb.buffers] for fb in layout.buffers]
        self.int_buffers = [b.clone() for b in layout.int_buffers]  # BatchNorm's step counters too

    def restore(self) -> None:
        with torch.no_grad():
            for fb, flat, bufs in zip(self.layout.buffers, self.flat, self.buffers):
                fb.flat.copy_(flat)
                for b, c in zip(fb.buffers, bufs):
                    b.copy_(c)
            for b, c in zip(self.layout.int_buffers, self.int_buffers):
                b.copy_(c)


class RoundSnapshot:
    """The state of the last good sync, for ``on_nonfinite=skip_round``."""

    def __init__(self, layout: FlatLayout, optimizers: list[torch.optim.Optimizer]) -> None:
        self.layout, self.optimizers = layout, optimizers
        self.replica: LayoutCopy | None = None
        self.optim: list[Any] = []

    def take(self) -> None:
        self.replica = LayoutCopy(self.layout)
        self.optim = [clone_state(opt.state_dict()) for opt in self.optimizers]

    def restore(self) -> None:
        assert self.replica is not None
        self.replica.restore()
        for opt, state in zip(self.optimizers, self.optim):
            opt.load_state_dict(clone_state(state))


class OptimizerStatePolicy:
    """``keep`` | ``average`` | ``reset`` the optimizers' per-element state at each sync."""

    def __init__(self, policy: str, optimizers: list[torch.optim.Optimizer]) -> None:
        self.policy, self.optimizers = policy, optimizers

    def averaged_tensors(self) -> list[torch.Tensor]:
        if self.policy != "average":
            return []
        out = []
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    for value in opt.state.get(p, {}).values():
                        # Only per-element state (momentum, moments) is averaged; step counters agree.
                        if isinstance(value, torch.Tensor) and value.shape == p.shape and value.is_floating_point():
                            out.append(value)
        return out

    def locally_finite(self) -> bool:
        """Whether every tensor this policy would average is finite (checked before the agreement check)."""
        return self.policy != "average" or all(all_finite(t) for t in self.averaged_tensors())

    def apply(self, group: Any, world: int) -> int:
        """Run the policy after a passed average; returns the payload bytes it sent."""
        if self.policy == "keep":
            return 0
        if self.policy == "reset":
            for opt in self.optimizers:
                opt.state.clear()  # as if freshly created: momentum restarts from the next gradient
            return 0
        tensors = self.averaged_tensors()
        if not tensors:
            return 0
        sent = 0
        by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in tensors:
            by_key.setdefault((t.device, t.dtype), []).append(t)
        averaged = world > 1 and dist.average_in_collective(group)
        with torch.no_grad():
            for ts in by_key.values():
                flat = torch.cat([t.reshape(-1) for t in ts])
                dist.wait(dist.all_reduce_sum_async(flat, group=group, average=averaged),
                          "LocalSGD optimizer-state average")
                if not averaged:
                    flat.div_(world)
                sent += flat.numel() * flat.element_size()
                offset = 0
                for t in ts:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()
        return sent


def clone_state(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [clone_state(v) for v in state]
    return state
