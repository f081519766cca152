"""``LocalSGD``: wrap a model and its optimizer in any training loop; average on the schedule's steps.

Local SGD (Stich, ICLR 2019, arXiv 1805.09767, Algorithm 1; Lin et al., ICLR 2020, arXiv 1808.07217)
runs H_r optimizer steps on each worker, then replaces every replica by the average
x̄ = (1/K) Σ_k x_k. One sync (:meth:`LocalSGD._sync`) is a short sequence of phases:

1. **Layout** (:mod:`.layout`): the flat buffers are still the model's tensors (O(1) test).
2. **Check and average** (:mod:`.check_words`, :mod:`.averaging`): every rank agrees on the step,
   round, size, config and next period, and no rank is non-finite, *before* the average is kept.
   ``fused`` (default, after a first full check): the check words ride in the averaging all-reduce,
   each bucket is scanned right before it leaves and a non-finite rank sends zeros; ``before``: the
   check completes first (two latencies); ``overlapped``: both travel together. A sync whose check
   fails leaves every replica as it was, then raises or, under ``on_nonfinite=skip_round``, rolls
   back to the last good sync (:class:`~.state.RoundSnapshot`). Where the check is read after the
   in-place average has landed (fused, overlapped), that takes a copy of what was sent
   (:class:`~.state.ReplicaBackup`): one pass over the payload per sync. A latency is cheaper than
   that pass for large payloads (on a 2-core loopback Gloo, a 16 MB copy costs about 0.15x a
   bare all-reduce of it), so the fused check applies up to ``fused_max_mb`` (4 MB) and larger
   payloads are checked first, as under ``before``.
3. **After the average**: the outer step (DiLoCo/SlowMo, :mod:`localsgd.outer`) at global syncs,
   the optimizer-state policy, accounting (:mod:`.stats`), and the schedule, which observes only
   all-reduced values so every rank decides alike.

``stats.bytes`` is the payload this rank submitted to averaging all-reduces (element count ×
element size, counted also at world size 1 where the collective is an identity); the agreement
check is counted apart in ``stats.check_bytes``. The default optimizer-state policy is ``keep``,
matching torch's PostLocalSGDOptimizer, torchft and accelerate, so comparisons are like for like.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import dist
from ..errors import NonFiniteError, ScheduleDisagreementError
from ..schedules.base import SyncSchedule
from .averaging import BucketedAverage, all_finite
from .check_words import (
    FullVerdict,
    decode_full_check,
    decode_fused_words,
    encode_full_check,
    encode_fused_slot,
    fused_tail_words,
    fused_words,
)
from .layout import FlatLayout
from .state import LayoutCopy, OptimizerStatePolicy, ReplicaBackup, RoundSnapshot
from .stats import SyncStats
from .streaming import StreamingSync, streaming_options

BUFFER_POLICIES = ("average", "broadcast", "local")
OPTIMIZER_STATE_POLICIES = ("keep", "average", "reset")
NONFINITE_POLICIES = ("raise", "skip_round")
AGREEMENT_CHECKS = ("fused", "before", "overlapped")


@dataclass(frozen=True)
class _Outcome:
    """What the check-and-average phase decided: ``bad`` ranks (empty when the average was kept)."""

    bad: dict[int, int]
    stop: bool


def _as_optimizers(optimizer: Any) -> list[torch.optim.Optimizer]:
    if optimizer is None:
        return []
    if isinstance(optimizer, torch.optim.Optimizer):
        return [optimizer]
    if isinstance(optimizer, Sequence):
        return list(optimizer)
    # A plugin that owns several torch optimizers exposes them as `.optimizers`.
    inner = getattr(optimizer, "optimizers", None)
    if inner is not None:
        return list(inner)
    raise TypeError(f"optimizer must be a torch Optimizer, a sequence of them, or None; got {type(optimizer)}")


class LocalSGD:
    """Average ``model``'s replicas across ranks on the steps ``schedule`` chooses.

    Call :meth:`step` after every optimizer step; it returns True when that step ended a round and
    the replicas were averaged. Call :meth:`finalize` after training so all replicas end identical.
    ``next_lr(step)``, if given, returns the learning rate local step ``step`` (0-based) will run at;
    adaptive schedules decide the next period from it (default: the optimizer's current rate).
    ``outer_state_on_host`` keeps an outer optimizer's round start x_t in host memory. Under the fused
    check, payloads above ``fused_max_mb`` are checked before they are averaged (see ``_sync``).

    Streaming and compression (:mod:`.streaming`, :mod:`.compress`): ``fragments`` F syncing at
    their own offsets in each round of a fixed schedule, each applied ``delay`` τ steps after it
    leaves and mixed as ``mix``·local + (1 − ``mix``)·global, or with ``merge="progress"`` added to
    the local progress made meanwhile (global + local − sent); ``compress`` the payload (``none``,
    ``bf16``, ``fp16``, ``int8``, ``int4``; blocks of ``compress_block`` values per scale) with
    ``error_feedback`` (default: on for int8/int4). The defaults are the blocking sync.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: Any = None,
        schedule: SyncSchedule | None = None,
        *,
        buffers: str = "average",
        optimizer_state: str = "keep",
        on_nonfinite: str = "raise",
        max_skipped_rounds: int = 3,
        bucket_cap_mb: float = 64.0,
        extra_tensors: Iterable[torch.Tensor] = (),
        config_hash: int = 0,
        process_group: Any = None,
        outer: Any = None,
        agreement_check: str = "fused",
        pre_average: Callable[[Any], None] | None = None,
        next_lr: Callable[[int], float] | None = None,
        outer_state_on_host: bool = False,
        fused_max_mb: float = 4.0,
        fragments: int = 1,
        delay: int = 0,
        mix: float = 0.0,
        merge: str = "mix",
        compress: str = "none",
        error_feedback: bool | None = None,
        compress_block: int = 256,
        streaming: bool | None = None,
    ) -> None:
        if schedule is None:
            raise ValueError("LocalSGD needs a schedule, e.g. localsgd.schedules.Fixed(8)")
        for name, value, allowed in (
            ("buffers", buffers, BUFFER_POLICIES),
            ("optimizer_state", optimizer_state, OPTIMIZER_STATE_POLICIES),
            ("on_nonfinite", on_nonfinite, NONFINITE_POLICIES),
            ("agreement_check", agreement_check, AGREEMENT_CHECKS),
        ):
            if value not in allowed:
                raise ValueError(f"LocalSGD {name}={value!r} is not one of {allowed}")
        if bucket_cap_mb <= 0:
            raise ValueError(f"LocalSGD bucket_cap_mb must be > 0, got {bucket_cap_mb}")
        if fused_max_mb < 0:
            raise ValueError(f"LocalSGD fused_max_mb must be >= 0, got {fused_max_mb}")
        self.model = model
        self.optimizers = _as_optimizers(optimizer)
        self.schedule = schedule
        self.buffer_policy = buffers
        self.on_nonfinite = on_nonfinite
        self.agreement_check = agreement_check
        self.max_skipped_rounds = max_skipped_rounds
        self.config_hash = int(config_hash) & 0x7FFFFFFF
        self.group = process_group
        self.outer = outer  # an OuterOptimizer (localsgd.outer); None = plain averaging
        # Called with the process group on every rank right before each average is launched (and
        # before the agreement check); may run its own small collectives through ``dist`` (e.g.
        # Delta-STN moves each replica to the consensus hyperparameters first).
        self.pre_average = pre_average
        self.next_lr = next_lr
        # x_t on the host (as torchft keeps its global copy): one copy of the parameters less on the
        # device, a device-host transfer per outer step (done in reused chunks by the outer optimizer).
        self.outer_state_on_host = outer_state_on_host
        # The fused check must back up what it sends (the in-place average has landed when the check
        # is read), one pass over the payload; above this size that pass costs more than the second
        # latency of checking first, so larger payloads are checked before they are averaged.
        self.fused_max_bytes = int(fused_max_mb * 2**20)
        self.stats = SyncStats()
        self.local_step = 0  # optimizer steps completed on this rank
        self.last_sync_step = 0
        self.last_global_sync_step = 0  # replicas are identical everywhere only after a global sync
        self.stop_requested = False  # set locally (e.g. on SIGTERM); all-reduced at the next sync
        self.stop_agreed = False  # True once any rank asked to stop, known at a sync
        self.last_round_loss: float | None = None  # mean over ranks of the last round's mean loss
        self._group_info: dict[Any, tuple[int, int]] = {}
        self._subgroup = self._make_subgroup()
        self._first_nonfinite = -1  # first local step whose loss was non-finite on this rank
        self._losses: list[tuple[int, Any]] = []
        self._round_loss = [0.0, 0]  # sum and count of this round's finite losses
        self._consecutive_skips = 0
        check_words = fused_tail_words(dist.group_size(self.group)) if agreement_check == "fused" else 0
        self.layout = FlatLayout(model, extra_tensors, average_buffers=buffers != "local", check_words=check_words,
                                 bucket_cap_bytes=int(bucket_cap_mb * 2**20))
        self._agreed_layout = -1  # the layout version a full check has seen on every rank (fused needs it)
        self.averager = BucketedAverage(self.layout, broadcast_buffers=buffers == "broadcast")
        self.backup = ReplicaBackup(self.layout) if agreement_check != "before" else None
        self.optimizer_state = OptimizerStatePolicy(optimizer_state, self.optimizers)
        self.snapshot = RoundSnapshot(self.layout, self.optimizers) if on_nonfinite == "skip_round" else None
        self._global: list[torch.Tensor] | None = None  # x_t, the round's starting point (outer only)
        self.streaming: StreamingSync | None = None
        self._reset_global_copy()
        if self.snapshot is not None:
            self.snapshot.take()
        # Streaming fragments, delayed application and compressed payloads (:mod:`.streaming`); None is
        # the blocking sync below. ``streaming=True`` runs the streaming path even at F=1, τ=0 (same result).
        if streaming is None:
            streaming = bool(streaming_options(fragments=fragments, delay=delay, mix=mix, merge=merge,
                                               compress=compress, error_feedback=error_feedback))
        self.streaming = StreamingSync(self, fragments=fragments, delay=delay, mix=mix, merge=merge,
                                       compress=compress, error_feedback=error_feedback,
                                       block=compress_block) if streaming else None
        if self.streaming is not None:
            self._global = None  # each fragment keeps its own x_ref

    def _make_subgroup(self) -> Any:
        """Groups of consecutive ranks for hierarchical schedules (every rank creates every group)."""
        size = getattr(self.schedule, "group_size", None)
        if size is None or not hasattr(self.schedule, "is_global"):
            return None
        world = dist.group_size(self.group)
        if self.group is not None or world % size:
            raise ValueError(f"hierarchical schedule: world size {world} is not a multiple of group_size {size} "
                             "(or a custom process_group was given)")
        if world == 1:
            return None
        return dist.new_subgroups([list(range(s, s + size)) for s in range(0, world, size)])

    # ------------------------------------------------------------------ layout
    @property
    def payload_bytes(self) -> int:
        return self.layout.payload_bytes

    @property
    def elements(self) -> int:
        return self.layout.elements

    @property
    def fused_check_active(self) -> bool:
        """Whether the next sync carries the check inside the average (a full check saw this layout)."""
        return (self.agreement_check == "fused" and self.layout.check_buffer is not None
                and self._agreed_layout == self.layout.version and self.payload_bytes <= self.fused_max_bytes)

    def param_buffers(self) -> list[torch.Tensor]:
        """The flat parameter buffers (one per device and dtype); the parameters are views of them."""
        return self.layout.param_buffers()

    def rebuild_layout(self) -> None:
        """Re-flatten after the model's parameters were replaced (not merely moved) since wrapping."""
        self._refresh_layout()

    def _refresh_layout(self) -> None:
        if self.layout.refresh() and self._global is not None and [t.numel() for t in self._global] != [
                v.numel() for v in self.param_buffers()]:
            self._reset_global_copy()

    def _reset_global_copy(self) -> None:
        # Outer optimizers need x_t; at construction, after a load and after a sync it equals the
        # current (identical) parameters, so it never has to be checkpointed at a sync. Streaming keeps
        # one per fragment instead.
        if self.streaming is None and self.outer is not None and getattr(self.outer, "needs_global_copy", True):
            self._global = [v.detach().to("cpu", copy=True) if self.outer_state_on_host else v.detach().clone()
                            for v in self.param_buffers()]

    # ------------------------------------------------------------------ public API
    def step(self, loss: torch.Tensor | float | None = None) -> bool:
        """Count one optimizer step; average if it ends a round. Returns True when averaged.

        ``loss`` (optional) lets the engine record the first non-finite step without a host sync.
        """
        self.local_step += 1
        if loss is not None:  # kept as a tensor (no kernel, no host sync), checked at the sync
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                loss = loss.detach()
            self._losses.append((self.local_step, loss))
            if len(self._losses) >= 1024:  # a long round (or one_shot): fold into the first-bad record
                self._fold_losses()
        if self.streaming is not None:
            return self.streaming.step()
        if self.schedule.should_sync(self.local_step):
            self._sync()
            return True
        return False

    def finalize(self) -> bool:
        """Average a partial last round so every replica ends identical. Returns True if it averaged."""
        self._refresh_layout()
        if self.streaming is not None:
            return self.streaming.finalize()
        if self.local_step == self.last_global_sync_step and self.stats.rounds > 0:
            return False
        self._sync(advance_schedule=False)
        return True

    @property
    def in_sync(self) -> bool:
        """True when no local step was taken since the last average (replicas are identical)."""
        if self.streaming is not None:
            return self.local_step == self.streaming.in_sync_at
        return self.local_step == self.last_global_sync_step and (self.stats.rounds > 0 or self.local_step == 0)

    @property
    def round_completed(self) -> bool:
        """The last step ended a global round: replicas identical after the blocking sync; under
        streaming the round's last fragment landed (each rank's replica then rides in its checkpoint)."""
        if self.streaming is not None:
            return self.streaming.round_completed_at == self.local_step
        return self.in_sync

    @property
    def round_steps(self) -> int:
        """H of the current round (the schedule's length for the round after the last sync)."""
        if self.schedule.next_sync_step is None:  # before the first step: round 0's length
            return self.schedule.local_steps(0)
        return self.schedule.next_sync_step - self.last_sync_step

    def describe(self) -> str:
        return self.schedule.describe() + ("" if self.streaming is None else ", " + self.streaming.describe())

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Temporarily replace every replica by the average (for evaluation), then restore it.

        Costs a full agreement check and one all-reduce, counted in ``stats.check_bytes`` and
        ``stats.eval_bytes``, unless replicas are in sync. A non-finite replica raises
        :class:`NonFiniteError` on every rank before anything is averaged.
        """
        if self.in_sync or dist.world_size() == 1:
            yield
            return
        self._refresh_layout()
        world, me = self._size_rank(self.group)
        verdict = self._full_check(self.group, world, me, self._replica_nonfinite_step(), next_h=0)
        if verdict.disagree:
            raise ScheduleDisagreementError(verdict.disagree, verdict.odd_ranks, self.local_step)
        if verdict.bad:
            raise NonFiniteError(verdict.bad, self.local_step, where="the evaluation average")
        saved = LayoutCopy(self.layout)
        try:
            self.averager.finish(self.averager.start(self.group, world, me))
            self.averager.apply()
            self.stats.eval_bytes += self.payload_bytes
            yield
        finally:
            saved.restore()

    # ------------------------------------------------------------------ the sync
    def _sync(self, advance_schedule: bool = True) -> None:
        start = time.perf_counter()
        if not self.layout.quick_ok():
            self._refresh_layout()
        # A hierarchical schedule averages within this rank's group except at its global steps;
        # finalize() always averages globally.
        is_global = self._subgroup is None or not advance_schedule or self.schedule.is_global(self.local_step)
        group = self.group if is_global else self._subgroup
        world, me = self._size_rank(group)
        next_h = self.schedule.fingerprint() if advance_schedule else 0
        if self.pre_average is not None:
            self.pre_average(group)
        outcome = self._check_and_average(group, world, me, next_h, is_global)
        if is_global:  # a stop must be agreed by every rank, so only a global sync can decide it
            self.stop_agreed = self.stop_agreed or outcome.stop
        if outcome.bad:
            self._skip_round(outcome.bad)
        else:
            self._after_average(group, world, is_global, advance_schedule)
        if advance_schedule:
            self.schedule.advance(self.local_step)
        self.last_sync_step = self.local_step
        self.stats.seconds += time.perf_counter() - start

    def _check_and_average(self, group: Any, world: int, me: int, next_h: int, is_global: bool) -> _Outcome:
        """Agree, then keep the average; or keep nothing and name the cause."""
        fused = self.fused_check_active
        local_bad = self._local_nonfinite_step(scan_replica=not fused)
        if fused:
            # One collective: the check words ride at the tail of the averaging buffer, each bucket
            # is scanned right before it leaves; a failed check discards the result from the backup.
            assert self.backup is not None
            self.backup.clear()
            pending, scanned_bad = self.averager.start_scanned(
                group, world, me, bad=local_bad >= 0, backup=self.backup,
                write_check_words=lambda bad: self._write_check_words(bad, next_h, world, me))
            self.averager.finish(pending)
            if local_bad < 0 and scanned_bad:
                local_bad = self.local_step
            tail = self.layout.check_tail
            assert tail is not None
            fused_verdict = decode_fused_words(tail.tolist(), world, pending.averaged_in_collective)
            if fused_verdict.passed:
                self.averager.apply()
                self.last_round_loss, self._round_loss = fused_verdict.mean_loss, [0.0, 0]
                return _Outcome({}, fused_verdict.stop)
            self.backup.restore()  # every replica as it was; the full check names the cause
        pending = None
        if self.agreement_check == "overlapped" and not fused:
            # The average travels while the check does (one latency instead of two); a non-finite
            # replica sends zeros, and nothing summed is kept unless the check passes.
            assert self.backup is not None
            self.backup.clear()
            check = self._start_full_check(group, world, me, local_bad, next_h)
            pending = self.averager.start(group, world, me, backup=self.backup, zeros=local_bad >= 0)
            verdict = self._finish_full_check(check, world)
            self.averager.finish(pending)
            if not verdict.passed:
                self.backup.restore()
        else:
            verdict = self._full_check(group, world, me, local_bad, next_h)
        self.last_round_loss, self._round_loss = verdict.mean_loss, [0.0, 0]
        if verdict.disagree:
            raise ScheduleDisagreementError(verdict.disagree, verdict.odd_ranks, self.local_step)
        if verdict.bad:
            return _Outcome(verdict.bad, verdict.stop)
        with torch.no_grad():
            for b, value in zip(self.layout.int_buffers, verdict.int_buffers):
                b.fill_(value)  # integer buffers (num_batches_tracked) kept consistent: take the max
        if pending is None:
            self.averager.finish(self.averager.start(group, world, me))
        self.averager.apply()
        if is_global:
            self._agreed_layout = self.layout.version  # every rank has this layout: fused may take over
        return _Outcome({}, verdict.stop)

    def _after_average(self, group: Any, world: int, is_global: bool, advance_schedule: bool) -> None:
        if self.outer is not None and is_global:
            # Hierarchical: group averages are part of the inner optimisation; the outer step sees
            # the round from the last global average x_t to the global average now (DiLoCo over nodes).
            self._outer_step()
        sent = self.optimizer_state.apply(group, world) + self.payload_bytes
        self.stats.rounds += 1
        if world > 1:  # a group of one sends nothing: its "average" is a local no-op
            self.stats.bytes += sent
        if is_global:
            self.last_global_sync_step = self.local_step
        self._consecutive_skips = 0
        if advance_schedule:
            # Adaptive schedules see only all-reduced values (and the rate the next round runs at),
            # so every rank decides alike.
            self.schedule.observe(step=self.local_step, loss=self.last_round_loss, lr=self._next_round_lr())
        if self.snapshot is not None:
            self.snapshot.take()

    def _skip_round(self, bad: dict[int, int]) -> None:
        """A non-finite rank: raise (replicas untouched), or roll back to the last good sync."""
        if self.on_nonfinite == "raise" or self.snapshot is None:
            raise NonFiniteError(bad, self.local_step)
        self._consecutive_skips += 1
        self.stats.skipped_rounds += 1
        if self._consecutive_skips > self.max_skipped_rounds:
            raise NonFiniteError(bad, self.local_step)
        self.snapshot.restore()
        self._first_nonfinite = -1

    def _outer_step(self) -> None:
        averaged = self.param_buffers()
        with torch.no_grad():
            self.outer.step(self._global or [], averaged, inner_lr=self._current_lr() or 1.0)
            if self._global is not None:
                for g, a in zip(self._global, averaged):
                    g.copy_(a)

    def _current_lr(self) -> float | None:
        return float(self.optimizers[0].param_groups[0]["lr"]) if self.optimizers else None

    def _next_round_lr(self) -> float | None:
        return float(self.next_lr(self.local_step)) if self.next_lr is not None else self._current_lr()

    def _size_rank(self, group: Any) -> tuple[int, int]:
        """(size, this rank's index) of ``group``, looked up once: the sync path runs every round."""
        info = self._group_info.get(group)
        if info is None:
            if not dist.is_initialized():  # no group yet (world size 1): nothing to remember
                return 1, 0
            info = self._group_info[group] = (dist.group_size(group), dist.group_rank(group))
        return info

    # ------------------------------------------------------------------ non-finite values
    def _fold_losses(self) -> None:
        if self._first_nonfinite < 0 and self._losses:
            raw = [v for _, v in self._losses]
            if all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in raw):
                values = torch.stack(raw).float()
            else:
                dev = raw[0].device if isinstance(raw[0], torch.Tensor) else None
                values = torch.stack([torch.as_tensor(v, device=dev).reshape(()).float() for v in raw])
            total = float(values.double().sum())  # float32 values cannot overflow a float64 sum
            if math.isfinite(total):  # so a finite total proves every loss finite: one op, one host sync
                self._round_loss[0] += total
                self._round_loss[1] += len(values)
            else:
                bad = (~torch.isfinite(values)).nonzero()
                self._first_nonfinite = self._losses[int(bad[0])][0]
        self._losses.clear()

    def _replica_nonfinite_step(self) -> int:
        for fb in self.layout.buffers:
            if not all_finite(fb.param_view) or not all(all_finite(b) for b in fb.buffers):
                return self.local_step
        return -1

    def _local_nonfinite_step(self, scan_replica: bool) -> int:
        """This rank's first non-finite step (losses, averaged optimizer state, and with
        ``scan_replica`` parameters and buffers), or -1."""
        self._fold_losses()
        if self._first_nonfinite >= 0:
            return self._first_nonfinite
        if not self.optimizer_state.locally_finite():
            return self.local_step
        return self._replica_nonfinite_step() if scan_replica else -1

    # ------------------------------------------------------------------ the check words
    def _check_values(self, next_h: int) -> list[int]:
        return [self.local_step, self.schedule.sync_round, self.elements, self.config_hash, next_h]

    def _mean_round_loss(self) -> float:
        return self._round_loss[0] / self._round_loss[1] if self._round_loss[1] else float("nan")

    def _write_check_words(self, nonfinite: bool, next_h: int, world: int, me: int) -> None:
        """This rank's fused words (digest, non-finite flag, loss bits; zeros in other slots) and the
        stop flag, into the tail of the check buffer, which the average then carries."""
        tail = self.layout.check_tail
        assert tail is not None
        values = [*self._check_values(next_h), *(int(b) for b in self.layout.int_buffers)]
        slot = encode_fused_slot(values, nonfinite, self._mean_round_loss())
        words = fused_words(tail.numel(), world, me, slot, self.stop_requested)
        if world > 1:  # the whole tail is submitted (a group of one sends nothing)
            self.stats.check_bytes += tail.numel() * tail.element_size()
        if self.layout.check_tail_np is not None:
            self.layout.check_tail_np[:] = words
        else:
            tail.copy_(torch.tensor(words, dtype=tail.dtype))  # one host-to-device copy

    def _start_full_check(self, group: Any, world: int, me: int, nonfinite_step: int,
                          next_h: int) -> tuple[torch.Tensor, Any]:
        words = encode_full_check(self._check_values(next_h), world, me, nonfinite_step, self.stop_requested,
                                  self._mean_round_loss(), [int(b) for b in self.layout.int_buffers])
        device = self.layout.buffers[0].flat.device if self.layout.buffers else torch.device("cpu")
        vec = torch.tensor(words, dtype=torch.int64, device=device)  # one host-to-device copy
        if world > 1:
            self.stats.check_bytes += vec.numel() * vec.element_size()
        return vec, dist.all_reduce_max_async(vec, group=group)

    def _finish_full_check(self, check: tuple[torch.Tensor, Any], world: int) -> FullVerdict:
        vec, handle = check
        dist.wait(handle, "LocalSGD agreement check")
        return decode_full_check(vec.tolist(), world)

    def _full_check(self, group: Any, world: int, me: int, nonfinite_step: int, next_h: int) -> FullVerdict:
        return self._finish_full_check(self._start_full_check(group, world, me, nonfinite_step, next_h), world)

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict[str, Any]:
        return {
            "local_step": self.local_step,
            "last_sync_step": self.last_sync_step,
            "last_global_sync_step": self.last_global_sync_step,
            "stats": self.stats.state_dict(),
            "schedule": self.schedule.state_dict(),
            "consecutive_skips": self._consecutive_skips,
            "outer": None if self.outer is None else self.outer.state_dict(),
            # x_t, the round's start, only when saved mid-round (at a global sync it equals the parameters)
            "outer_round_start": None if self._global is None or self.in_sync else [t.clone() for t in self._global],
            **({"streaming": self.streaming.state_dict()} if self.streaming is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local_step = int(state["local_step"])
        self.last_sync_step = int(state["last_sync_step"])
        self.last_global_sync_step = int(state.get("last_global_sync_step", self.last_sync_step))
        self.stats.load_state_dict(state["stats"])
        self.schedule.load_state_dict(state["schedule"])
        self._consecutive_skips = int(state.get("consecutive_skips", 0))
        self._first_nonfinite = -1
        self._losses.clear()
        self._refresh_layout()
        if self.outer is not None and state.get("outer") is not None:
            self.outer.load_state_dict(state["outer"])
        self._reset_global_copy()  # right after a global sync x_t = the parameters
        saved_start = state.get("outer_round_start")
        if saved_start is not None and self._global is not None:
            for t, saved in zip(self._global, saved_start, strict=True):
                t.copy_(saved)
        if self.streaming is not None:
            if "streaming" not in state:
                raise ValueError("checkpoint was written by the blocking sync; this run streams or compresses "
                                 "(sync.fragments, sync.delay, sync.mix, sync.merge, sync.compress): resume with the "
                                 "same settings")
            self.streaming.load_state_dict(state["streaming"])
        if self.snapshot is not None:
            self.snapshot.take()
