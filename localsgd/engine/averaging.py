"""Averaging strategies: how the flat buffers travel. Today one, :class:`BucketedAverage`.

Local SGD's average x̄ = (1/K) Σ_k x_k (Stich, ICLR 2019, arXiv 1805.09767, Alg. 1, line 7) is one
all-reduce per bucket of the flat buffers, every bucket in flight before the first is awaited.

* **The mean inside the collective.** ``ReduceOp.AVG`` (NCCL; Gloo in recent PyTorch, probed once per
  process by :func:`localsgd.dist.average_in_collective`) leaves no division pass for Python; on an
  older Gloo each bucket is summed and divided as it arrives, while later buckets are in flight.
  Under the ``broadcast`` buffer policy rank 0's buffers must arrive unscaled, so that policy sums.
* **Scanned launch** (the fused check): each bucket is scanned for NaN/Inf right before it leaves,
  so the scan of bucket k+1 overlaps the transfer of bucket k. Once a bucket is found non-finite it
  and every later one go as zeros, so nothing non-finite enters a sum.
* **A backup of what is sent.** The all-reduce is in place, so a sync whose check then fails would
  leave every rank holding the (discarded) average. Each bucket is copied to the replica backup
  (:class:`~localsgd.engine.state.ReplicaBackup`) right before it is launched, and restored when the
  check fails: a failed sync leaves every replica as it was.

The seam for other strategies (streaming fragments, compressed payloads) is this module's
interface: ``start(...)``/``start_scanned(...)`` launch and return a pending average, ``finish(pending)``
completes it, and ``apply()`` accepts it (writes the averaged buffers back into the model); a
rejected average is undone from the backup instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import dist
from .layout import FlatBuffer, FlatLayout
from .state import ReplicaBackup, all_finite


@dataclass
class PendingAverage:
    world: int
    handles: list[Any]
    averaged_in_collective: bool
    order: list[FlatBuffer]  # the buffers in launch order


class BucketedAverage:
    """Average the flat buffers of a :class:`FlatLayout` with one all-reduce per bucket."""

    def __init__(self, layout: FlatLayout, broadcast_buffers: bool) -> None:
        self.layout = layout
        self.broadcast_buffers = broadcast_buffers  # rank 0's buffers win (a sum, not a mean, there)

    def _stage(self, group: Any, world: int, me: int) -> bool:
        """Copy the float buffers into their slots (under ``broadcast`` only rank 0's survive: the
        others send zeros there); return whether the collective averages (else this sums)."""
        for fb in self.layout.buffers:
            fb.stage_buffers()
            if self.broadcast_buffers and me != 0 and fb.buffers:
                fb.flat[fb.param_numel : fb.data_numel].zero_()
        return world > 1 and not self.broadcast_buffers and dist.average_in_collective(group)

    def start(self, group: Any, world: int, me: int, *, backup: ReplicaBackup | None = None,
              zeros: bool = False) -> PendingAverage:
        """Launch every bucket as it is (``zeros``: this replica is non-finite and sends zeros)."""
        with torch.no_grad():
            averaged = self._stage(group, world, me)
            if backup is not None:
                backup.save_all()
            if zeros:
                for fb in self.layout.buffers:
                    fb.data.zero_()  # a non-finite replica sends zeros: NaN/Inf never enter the sum
            handles = [dist.all_reduce_sum_async(view, group=group, average=averaged)
                       for fb in self.layout.buffers for view in fb.bucket_views]
        return PendingAverage(world, handles, averaged, self.layout.buffers)

    def start_scanned(self, group: Any, world: int, me: int, *, bad: bool, backup: ReplicaBackup | None,
                      write_check_words: Callable[[bool], None]) -> tuple[PendingAverage, bool]:
        """Launch every bucket, each scanned right before it leaves; the check words, which carry
        this rank's verdict, are written into the last bucket launched. Returns the pending average
        and whether this replica was found non-finite (``bad`` in: the losses already were)."""
        handles = []
        order = self.layout.launch_order
        with torch.no_grad():
            averaged = self._stage(group, world, me)
            for fb in order:
                last = len(fb.buckets) - 1  # it alone holds the check words (see layout.bucket_bounds)
                for i, (view, data) in enumerate(zip(fb.bucket_views, fb.bucket_data)):
                    if backup is not None:
                        backup.save(fb, data)
                    if not bad and not all_finite(data):
                        bad = True
                    if bad:
                        data.zero_()  # a non-finite replica sends zeros from here on
                    if fb.check_numel and i == last:
                        write_check_words(bad)
                    handles.append(dist.all_reduce_sum_async(view, group=group, average=averaged))
        return PendingAverage(world, handles, averaged, order), bad

    def finish(self, pending: PendingAverage) -> None:
        """Wait for every bucket, dividing each as it arrives where the collective summed."""
        world = pending.world
        with torch.no_grad():
            if pending.averaged_in_collective or world == 1:
                for h in pending.handles:
                    dist.wait(h, "LocalSGD parameter average")
                return
            slices = [(fb, s, e) for fb in pending.order for s, e in fb.buckets]  # the launch order
            for h, (fb, s, e) in zip(pending.handles, slices):
                dist.wait(h, "LocalSGD parameter average")
                # rank 0's buffers arrive unscaled under broadcast; check words are never scaled
                e = min(e, fb.param_numel if self.broadcast_buffers else fb.data_numel)
                if s < e:
                    fb.flat[s:e].div_(world)

    def apply(self) -> None:
        """Accept a finished average: copy the averaged float buffers back into the model (the
        parameters are views of the flat buffers and hold it already)."""
        with torch.no_grad():
            for fb in self.layout.buffers:
                fb.unstage_buffers()
