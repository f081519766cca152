"""The averaging engine: ``LocalSGD`` wraps a model and its optimizer in any training loop.

Local SGD (Stich, ICLR 2019, arXiv 1805.09767, Algorithm 1; Lin et al., ICLR 2020, arXiv 1808.07217)
runs H_r optimizer steps on each worker, then replaces every replica by the average
x̄ = (1/K) Σ_k x_k. This module implements that average once per round, with:

* **One flat buffer per (device, dtype), bucketed.** Parameters are re-pointed to views of the flat
  buffer, so averaging needs no copy of the parameters at all (zero extra memory) and one all-reduce
  per bucket (one per sync for models under ``bucket_cap_mb``). Floating buffers (BatchNorm
  statistics) ride in the same all-reduce, copied in and out. The layout is re-checked cheaply at
  every sync, so ``model.to(...)`` after wrapping is detected and the layout rebuilt.
* **The mean inside the collective.** ``ReduceOp.AVG`` (NCCL; Gloo in recent PyTorch, probed once per
  process by :func:`localsgd.dist.average_in_collective`) leaves no division pass for Python; on an
  older Gloo each bucket is summed and divided as it arrives, while later buckets are in flight.
* **An agreement fingerprint before every average** (``shared/design/reliability.md`` §3): a single
  MAX all-reduce of ``[v, -v, per-rank non-finite step, per-rank fingerprint hash, stop flag,
  integer buffers]`` with v = (step, round, element count, config hash, next H). A NaN on any rank or
  a disagreement raises the same error on every rank *before* anything is averaged, so a non-finite
  value is never averaged (and so never checkpointed).
* **The fused check (default, ``agreement_check="fused"``).** A second collective costs one network
  latency per sync, which on small models is as much as the average itself. So after the first
  global sync has verified the layout with the full check above, every rank writes a few check words
  into a reserved tail of its averaging buffer (per-rank slots: a 64-bit fingerprint hash, a
  non-finite flag and the round loss, as 16-bit integers, which float32/64 sums carry exactly because
  only the owner writes a slot, and averages to within 2**-24 relative, restored by rounding
  word x world) and the check travels inside the one averaging all-reduce. A rank
  that finds itself non-finite sends zeros instead of its parameters, so NaN/Inf never enter the sum;
  the sum is used only when every hash agrees and no flag is set. Otherwise all ranks, which see the
  same words, fall back together to the full check, which names the field, rank and step, and raise
  (or roll back under ``skip_round``). ``before`` keeps two collectives (check, then average);
  ``overlapped`` starts both at once.
* **Policies** for buffers (``average`` | ``broadcast`` | ``local``), optimizer state (``keep`` |
  ``average`` | ``reset``) and non-finite values (``raise`` | ``skip_round``).
* **Exact accounting**: ``stats.bytes`` is the payload this rank submitted to averaging all-reduces
  (element count × element size, counted also at world size 1 where the collective is an identity);
  the agreement check is counted apart in ``stats.check_bytes``.

The default optimizer-state policy is ``keep`` (each worker keeps its own momentum or Adam moments),
matching torch's PostLocalSGDOptimizer, torchft and accelerate, so comparisons are like for like.
"""

from __future__ import annotations

import contextlib
import math
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import dist
from .errors import NonFiniteError, ScheduleDisagreementError
from .schedules.base import SyncSchedule

BUFFER_POLICIES = ("average", "broadcast", "local")
OPTIMIZER_STATE_POLICIES = ("keep", "average", "reset")
NONFINITE_POLICIES = ("raise", "skip_round")
AGREEMENT_CHECKS = ("fused", "before", "overlapped")
_FP_FIELDS = ("step", "round", "elements", "config_hash", "next_H")
_INT64_MIN = -(2**63)
_SLOT_WORDS = 9  # per rank in the fused check: 4 x 16-bit hash, non-finite flag, 4 x 16-bit loss bits
_FUSED_DTYPES = (torch.float32, torch.float64)  # integers below 2**24 are exact in both


@dataclass
class SyncStats:
    """Communication so far on this rank."""

    rounds: int = 0  # averaging rounds completed
    bytes: int = 0  # payload bytes this rank submitted to averaging all-reduces
    seconds: float = 0.0  # wall seconds inside sync (check + average + state policy)
    check_bytes: int = 0  # payload bytes of the agreement/NaN fingerprint all-reduces
    skipped_rounds: int = 0  # rounds rolled back under on_nonfinite=skip_round
    eval_bytes: int = 0  # payload of averages made only to evaluate the averaged model

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, type(getattr(self, k))(v))


@dataclass
class _Group:
    """Everything averaged for one (device, dtype): parameters as views, then copied buffers."""

    flat: torch.Tensor
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    param_numel: int
    buckets: list[tuple[int, int]] = field(default_factory=list)
    check_numel: int = 0  # the fused check's words at the tail of ``flat`` (one group at most)
    bucket_views: list[torch.Tensor] = field(default_factory=list)  # made once: the sync path is hot
    bucket_data: list[torch.Tensor] = field(default_factory=list)  # each bucket less the check words
    buffer_slots: list[torch.Tensor] = field(default_factory=list)  # where each buffer rides in ``flat``

    @property
    def data_numel(self) -> int:
        return self.flat.numel() - self.check_numel

    def make_views(self) -> None:
        self.bucket_views = [self.flat[s:e] for s, e in self.buckets]
        self.bucket_data = [self.flat[s : max(s, min(e, self.data_numel))] for s, e in self.buckets]
        self.buffer_slots, offset = [], self.param_numel
        for b in self.buffers:
            self.buffer_slots.append(self.flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()


# What _finish_average needs: the group, one handle per bucket, whether the collective averaged, and
# the groups in the order their buckets were launched.
_Pending = tuple[Any, list[Any], bool, list[_Group]]


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
        self.model = model
        self.optimizers = _as_optimizers(optimizer)
        self.schedule = schedule
        self.buffer_policy = buffers
        self.optimizer_state_policy = optimizer_state
        self.on_nonfinite = on_nonfinite
        self.agreement_check = agreement_check
        self.max_skipped_rounds = max_skipped_rounds
        self.bucket_cap_bytes = int(bucket_cap_mb * 2**20)
        self.extra_tensors = list(extra_tensors)
        self.config_hash = int(config_hash) & 0x7FFFFFFF
        self.group = process_group
        self.outer = outer  # an OuterOptimizer (localsgd.outer); None = plain averaging
        # Called with the process group on every rank right before each averaging all-reduce (after
        # the check in before/overlapped mode); may run its own small collectives through ``dist``
        # (e.g. Delta-STN moves each replica to the consensus hyperparameters first).
        self.pre_average = pre_average
        self._global: list[torch.Tensor] | None = None  # x_t, the round's starting point (outer only)
        self.stats = SyncStats()
        self.local_step = 0  # optimizer steps completed on this rank
        self.last_sync_step = 0
        self.last_global_sync_step = 0  # replicas are identical everywhere only after a global sync
        self._group_info: dict[Any, tuple[int, int]] = {}
        self._subgroup = self._make_subgroup()
        self.stop_requested = False  # set locally (e.g. on SIGTERM); all-reduced at the next sync
        self.stop_agreed = False  # True once any rank asked to stop, known at a sync
        self._first_nonfinite = -1  # first local step whose loss was non-finite on this rank
        self._losses: list[tuple[int, Any]] = []
        self._round_loss = [0.0, 0]  # sum and count of this round's finite losses
        self.last_round_loss: float | None = None  # mean over ranks of the last round's mean loss
        self._consecutive_skips = 0
        self._snapshot: dict[str, Any] | None = None
        self._build_layout()
        self._reset_global_copy()
        if on_nonfinite == "skip_round":
            self._take_snapshot()

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
    def _averaged_buffers(self) -> list[torch.Tensor]:
        if self.buffer_policy == "local":
            return []
        return [b for b in self.model.buffers() if torch.is_floating_point(b)]

    def _int_buffers(self) -> list[torch.Tensor]:
        if self.buffer_policy == "local":
            return []
        return [b for b in self.model.buffers() if not torch.is_floating_point(b) and b.numel() == 1]

    def _build_layout(self) -> None:
        params = list(dict.fromkeys([*self.model.parameters(), *self.extra_tensors]))
        buffers = self._averaged_buffers()
        keys: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for p in params:
            keys.setdefault((p.device, p.dtype), ([], []))[0].append(p)
        for b in buffers:
            keys.setdefault((b.device, b.dtype), ([], []))[1].append(b)
        self._groups: list[_Group] = []
        check_group = None
        if self.agreement_check == "fused":
            check_group = next((k for k in keys if k[1] in _FUSED_DTYPES), None)
        self._layout_agreed = False  # the fused check is used only once a full check saw this layout
        for (device, dtype), (ps, bs) in keys.items():
            pn = sum(p.numel() for p in ps)
            check_numel = (_SLOT_WORDS * dist.group_size(self.group) + 1) if (device, dtype) == check_group else 0
            flat = torch.zeros(pn + sum(b.numel() for b in bs) + check_numel, device=device, dtype=dtype)
            offset = 0
            with torch.no_grad():
                for p in ps:
                    view = flat[offset : offset + p.numel()].view_as(p)
                    view.copy_(p.data)
                    p.data = view  # the parameter now lives inside the flat buffer
                    offset += p.numel()
            group = _Group(flat, ps, bs, pn, check_numel=check_numel)
            group.buckets = _bucket_bounds(group.data_numel, flat.numel(), self.bucket_cap_bytes // flat.element_size())
            group.make_views()
            self._groups.append(group)
        self._param_ptrs = [(p, p.data_ptr()) for g in self._groups for p in g.params]
        self._int_buffer_list = self._int_buffers()
        self._buffer_ptrs = [b.data_ptr() for b in buffers]  # model order, as _check_layout sees them
        self._check_group = next((g for g in self._groups if g.check_numel), None)
        # The fused check launches the check group last: its words, which carry this rank's
        # non-finite verdict, ride in the last bucket launched, after every other bucket was scanned.
        self._launch_order = sorted(self._groups, key=lambda g: g.check_numel > 0)
        g = self._check_group
        self._check_tail = None if g is None else g.flat[g.flat.numel() - g.check_numel :]
        self._check_tail_np = None  # a numpy view of a CPU tail: writing 19 words costs ~1 µs, not ~10
        if self._check_tail is not None and self._check_tail.device.type == "cpu":
            with contextlib.suppress(RuntimeError, ImportError):
                self._check_tail_np = self._check_tail.numpy()
        self._check_words_averaged = False  # whether the last fused words arrived averaged (x world)
        self.payload_bytes = sum(g.data_numel * g.flat.element_size() for g in self._groups)
        self.elements = sum(g.data_numel for g in self._groups)

    def param_buffers(self) -> list[torch.Tensor]:
        """The flat parameter buffers (one per device and dtype); the parameters are views of them."""
        return [g.flat[: g.param_numel] for g in self._groups]

    def _reset_global_copy(self) -> None:
        # Outer optimizers need x_t; at construction, after a load and after a sync it equals the
        # current (identical) parameters, so it never has to be checkpointed.
        if self.outer is not None and getattr(self.outer, "needs_global_copy", True):
            self._global = [v.detach().clone() for v in self.param_buffers()]

    def _quick_layout_ok(self) -> bool:
        # O(1) per sync: ``model.to(...)``/``.double()`` re-materialise every parameter, so the first
        # and last ones moving is the signature. Replacing modules needs rebuild_layout() (or is
        # caught by the full check in finalize(), averaged() and load_state_dict()).
        ends = (self._param_ptrs[0], self._param_ptrs[-1]) if self._param_ptrs else ()
        return all(p.data_ptr() == ptr for p, ptr in ends)

    def rebuild_layout(self) -> None:
        """Re-flatten after the model's parameters were replaced (not merely moved) since wrapping."""
        self._check_layout()

    def _check_layout(self) -> None:
        # Full pointer comparison; a model moved or re-materialised after wrapping gets a new layout.
        params_now = list(dict.fromkeys([*self.model.parameters(), *self.extra_tensors]))
        same = len(params_now) == len(self._param_ptrs) and all(
            p is q and p.data_ptr() == ptr for p, (q, ptr) in zip(params_now, self._param_ptrs)
        )
        same = same and [b.data_ptr() for b in self._averaged_buffers()] == self._buffer_ptrs
        if not same:
            self._build_layout()
            if self._global is not None and [t.numel() for t in self._global] != [
                    v.numel() for v in self.param_buffers()]:
                self._reset_global_copy()

    # ------------------------------------------------------------------ public API
    def step(self, loss: torch.Tensor | float | None = None) -> bool:
        """Count one optimizer step; average if it ends a round. Returns True when averaged.

        ``loss`` (optional) lets the engine record the first non-finite step without a host sync.
        """
        self.local_step += 1
        if loss is not None:
            self._record_loss(loss)
        if self.schedule.should_sync(self.local_step):
            self._sync()
            return True
        return False

    def finalize(self) -> bool:
        """Average a partial last round so every replica ends identical. Returns True if it averaged."""
        self._check_layout()
        if self.local_step == self.last_global_sync_step and self.stats.rounds > 0:
            return False
        self._sync(advance_schedule=False)
        return True

    @property
    def in_sync(self) -> bool:
        """True when no local step was taken since the last average (replicas are identical)."""
        return self.local_step == self.last_global_sync_step and (self.stats.rounds > 0 or self.local_step == 0)

    @contextlib.contextmanager
    def averaged(self) -> Iterator[None]:
        """Temporarily replace every replica by the average (for evaluation), then restore it.

        Costs one extra all-reduce, counted in ``stats.eval_bytes``, unless replicas are in sync.
        """
        if self.in_sync or dist.world_size() == 1:
            yield
            return
        self._check_layout()
        saved = [g.flat.clone() for g in self._groups]
        buffer_copies = [[b.clone() for b in g.buffers] for g in self._groups]
        try:
            self._average_groups(self.group)
            self.stats.eval_bytes += self.payload_bytes
            yield
        finally:
            with torch.no_grad():
                for g, s, bs in zip(self._groups, saved, buffer_copies):
                    g.flat.copy_(s)
                    for b, c in zip(g.buffers, bs):
                        b.copy_(c)

    # ------------------------------------------------------------------ the sync
    def _record_loss(self, loss: torch.Tensor | float) -> None:
        # Keep the step's loss tensor (no kernel launched, no host sync); checked at the sync.
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss = loss.detach()
        self._losses.append((self.local_step, loss))
        if len(self._losses) >= 1024:  # a long round (or one_shot): fold into the first-bad record
            self._fold_losses()

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

    def _local_nonfinite_step(self, scan_parameters: bool = True) -> int:
        self._fold_losses()
        if self._first_nonfinite >= 0 or not scan_parameters:
            return self._first_nonfinite
        for g in self._groups:
            if not _all_finite(g.flat[: g.param_numel]) or not all(_all_finite(b) for b in g.buffers):
                return self.local_step
        return -1

    def _start_fingerprint(self, nonfinite_step: int, next_h: int, group: Any = None) -> tuple[torch.Tensor, Any]:
        """Start the one MAX all-reduce that checks agreement, gathers NaN flags and the stop flag."""
        world, me = self._size_rank(group)
        v = [self.local_step, self.schedule.sync_round, self.elements, self.config_hash, next_h]
        device = self._groups[0].flat.device if self._groups else torch.device("cpu")
        nonfinite, hashes = [0] * world, [0] * world
        nonfinite[me] = nonfinite_step + 1  # 0 means finite
        hashes[me] = zlib.crc32(repr(v).encode()) + 1
        # Each rank's mean round loss rides along as float64 bits in its own slot (others hold the
        # int64 minimum, so MAX leaves every slot exact): every rank then computes the same mean.
        losses = [_INT64_MIN] * world
        mean = self._round_loss[0] / self._round_loss[1] if self._round_loss[1] else float("nan")
        losses[me] = struct.unpack("<q", struct.pack("<d", mean))[0]
        ints = [int(b) for b in self._int_buffer_list]  # integer buffers kept consistent: MAX
        words = [*v, *(-x for x in v), *nonfinite, *hashes, int(self.stop_requested), *losses, *ints]
        vec = torch.tensor(words, dtype=torch.int64, device=device)  # one host-to-device copy
        self.stats.check_bytes += vec.numel() * vec.element_size()
        return vec, dist.all_reduce_max_async(vec, group=group)

    def _decode_fingerprint(
        self, vec: torch.Tensor, group: Any = None
    ) -> tuple[dict[str, tuple[int, int]], dict[int, int], list[int], bool, list[int]]:
        """Ranks in the returned maps are ranks within ``group``."""
        world = self._size_rank(group)[0]
        n_fields = len(_FP_FIELDS)
        out = vec.tolist()
        hi, lo = out[:n_fields], [-x for x in out[n_fields : 2 * n_fields]]
        disagree = {f: (lo[i], hi[i]) for i, f in enumerate(_FP_FIELDS) if lo[i] != hi[i]}
        base = 2 * n_fields
        bad = {r: out[base + r] - 1 for r in range(world) if out[base + r] > 0}
        hashes = out[base + world : base + 2 * world]
        odd = [r for r in range(world) if hashes[r] != hashes[0]]
        stop = bool(out[base + 2 * world])
        loss_slots = base + 2 * world + 1
        losses = [struct.unpack("<d", struct.pack("<q", x))[0] for x in out[loss_slots : loss_slots + world]]
        self.last_round_loss = None if any(x != x for x in losses) else sum(losses) / world
        self._round_loss = [0.0, 0]
        ints = out[loss_slots + world :]
        return disagree, bad, odd, stop, ints

    def _average_groups(self, group: Any = None) -> None:
        """Sum every bucket across ``group`` (all started before any is awaited), then scale."""
        self._finish_average(self._start_average(group))

    def _start_average(self, group: Any = None, contribute_zeros: bool = False) -> _Pending:
        """Start one all-reduce per bucket, all in flight before any is awaited.

        Where the backend averages inside the collective (NCCL; Gloo in recent PyTorch, probed once)
        every bucket is averaged there, the fused check's words included (they are decoded as
        round(word x world), exact for 16-bit words), so no pass over the buffer follows. Otherwise
        the buckets are summed and :meth:`_finish_average` divides each as it arrives. Under the
        ``broadcast`` buffer policy rank 0's buffers must survive unscaled, so that policy sums.
        """
        with torch.no_grad():
            in_collective = self._stage_buffers(group)
            if contribute_zeros:
                for g in self._groups:
                    g.flat[: g.data_numel].zero_()  # a non-finite replica sends zeros: NaN/Inf never enter the sum
            handles = [dist.all_reduce_sum_async(view, group=group, average=in_collective)
                       for g in self._groups for view in g.bucket_views]
        return group, handles, in_collective, self._groups

    def _start_scanned_average(self, group: Any, loss_bad: int, next_h: int) -> tuple[_Pending, int]:
        """The fused check's average: every bucket is scanned for NaN/Inf right before it is launched.

        So the scan of bucket k+1 runs while bucket k travels (and, where the backend averages, while
        Gloo's threads divide it), instead of a whole-buffer pass before the first byte moves. Once a
        bucket is found non-finite it and every later one go as zeros, so nothing non-finite enters a
        sum; the check words, which carry this rank's verdict, ride in the last bucket launched.
        Returns what :meth:`_finish_average` needs and this rank's first non-finite step (or -1).
        """
        bad = loss_bad >= 0
        handles = []
        with torch.no_grad():
            in_collective = self._stage_buffers(group)
            for g in self._launch_order:
                last = len(g.buckets) - 1  # it alone holds the check words (see _bucket_bounds)
                for i, (view, data) in enumerate(zip(g.bucket_views, g.bucket_data)):
                    if not bad and not _all_finite(data):
                        bad = True
                    if bad:
                        data.zero_()  # a non-finite replica sends zeros from here on
                    if g.check_numel and i == last:
                        self._write_fused_check_words(bad, next_h, group)
                    handles.append(dist.all_reduce_sum_async(view, group=group, average=in_collective))
        local_bad = loss_bad if loss_bad >= 0 else (self.local_step if bad else -1)
        return (group, handles, in_collective, self._launch_order), local_bad

    def _stage_buffers(self, group: Any) -> bool:
        """Copy the float buffers into their slots of the flat buffers (under ``broadcast`` only rank
        0's survive the sum unscaled: the others send zeros there); return whether the collective
        averages (else it sums and :meth:`_finish_average` divides)."""
        world, me = self._size_rank(group)
        for g in self._groups:
            for b, slot in zip(g.buffers, g.buffer_slots):
                slot.copy_(b)
            if self.buffer_policy == "broadcast" and me != 0 and g.buffers:
                g.flat[g.param_numel : g.data_numel].zero_()
        in_collective = world > 1 and self.buffer_policy != "broadcast" and dist.average_in_collective(group)
        self._check_words_averaged = in_collective
        return in_collective

    def _finish_average(self, pending: _Pending, scale: bool = True) -> None:
        group, handles, in_collective, order = pending
        world = self._size_rank(group)[0]
        with torch.no_grad():
            if in_collective or world == 1:
                for h in handles:
                    dist.wait(h, "LocalSGD parameter average")
            else:
                # Scale each bucket as soon as it arrives, while later buckets are still in flight.
                slices = [(g, s, e) for g in order for s, e in g.buckets]  # the launch order
                for h, (g, s, e) in zip(handles, slices):
                    dist.wait(h, "LocalSGD parameter average")
                    if scale:
                        # rank 0's buffers arrive unscaled under broadcast; check words are never scaled
                        e = min(e, g.param_numel if self.buffer_policy == "broadcast" else g.data_numel)
                        if s < e:
                            g.flat[s:e].div_(world)
            if not scale:
                return
            for g in self._groups:
                for b, slot in zip(g.buffers, g.buffer_slots):
                    b.copy_(slot)

    def _size_rank(self, group: Any) -> tuple[int, int]:
        """(size, this rank's index) of ``group``, looked up once: the sync path runs every round."""
        info = self._group_info.get(group)
        if info is None:
            if not dist.is_initialized():  # no group yet (world size 1): nothing to remember
                return 1, 0
            info = self._group_info[group] = (dist.group_size(group), dist.group_rank(group))
        return info

    # ------------------------------------------------------------------ the fused check
    def _write_fused_check_words(self, nonfinite: bool, next_h: int, group: Any) -> None:
        """Write this rank's check words (hash, non-finite flag, loss bits; zeros in the other slots)
        and the stop flag into the tail of the check group's buffer, which the average then carries."""
        tail = self._check_tail
        assert tail is not None
        world, me = self._size_rank(group)
        v = (self.local_step, self.schedule.sync_round, self.elements, self.config_hash, next_h,
             *(int(b) for b in self._int_buffer_list))
        packed = struct.pack(f"<{len(v)}q", *v)
        digest = struct.pack("<II", zlib.crc32(packed), zlib.crc32(packed, 0x9E3779B9))  # 64 bits, µs
        mean = self._round_loss[0] / self._round_loss[1] if self._round_loss[1] else float("nan")
        slot = (*struct.unpack("<4H", digest), int(nonfinite), *struct.unpack("<4H", struct.pack("<d", mean)))
        # The tail holds slots for the whole world; a smaller group (hierarchical) uses its last
        # _SLOT_WORDS x size + 1 words, and the rest stay zero on every rank.
        lo = tail.numel() - (_SLOT_WORDS * world + 1) + _SLOT_WORDS * me
        self.stats.check_bytes += tail.numel() * tail.element_size()  # the whole tail is submitted
        if self._check_tail_np is not None:
            words = self._check_tail_np
            words[:] = 0
            words[lo : lo + _SLOT_WORDS] = slot
            words[-1] = int(self.stop_requested)
            return
        words_list = [0] * tail.numel()
        words_list[lo : lo + _SLOT_WORDS] = slot
        words_list[-1] = int(self.stop_requested)
        tail.copy_(torch.tensor(words_list, dtype=tail.dtype))  # one host-to-device copy

    def _decode_fused(self, group: Any) -> tuple[bool, bool]:
        """Read the summed check words: (every hash equal and no rank non-finite, stop requested)."""
        tail = self._check_tail
        assert tail is not None
        world = self._size_rank(group)[0]
        factor = world if self._check_words_averaged else 1
        n = _SLOT_WORDS * world + 1  # this group's slots and the stop word, at the end of the tail
        # One device-to-host copy. Each slot has one writer, so a sum carries its words exactly and an
        # average carries word/world to within 2**-24 relative: round(x * world) restores the word.
        out = [round(x * factor) for x in tail[tail.numel() - n :].tolist()]
        first = out[:4]
        ok = all(out[i : i + 4] == first and out[i + 4] == 0 for i in range(0, n - 1, _SLOT_WORDS))
        if ok:
            losses = [struct.unpack("<d", struct.pack("<4H", *out[i + 5 : i + 9]))[0]
                      for i in range(0, n - 1, _SLOT_WORDS)]
            self.last_round_loss = None if any(x != x for x in losses) else sum(losses) / world
            self._round_loss = [0.0, 0]
        return ok, out[-1] > 0

    def _optimizer_state_tensors(self) -> list[torch.Tensor]:
        out = []
        for opt in self.optimizers:
            for group in opt.param_groups:
                for p in group["params"]:
                    for value in opt.state.get(p, {}).values():
                        # Only per-element state (momentum, moments) is averaged; step counters agree.
                        if isinstance(value, torch.Tensor) and value.shape == p.shape and value.is_floating_point():
                            out.append(value)
        return out

    def _apply_optimizer_state_policy(self, group: Any = None) -> None:
        if self.optimizer_state_policy == "keep" or not self.optimizers:
            return
        if self.optimizer_state_policy == "reset":
            for opt in self.optimizers:
                opt.state.clear()  # as if freshly created: momentum restarts from the next gradient
            return
        tensors = self._optimizer_state_tensors()
        if not tensors:
            return
        world = self._size_rank(group)[0]
        by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in tensors:
            by_key.setdefault((t.device, t.dtype), []).append(t)
        with torch.no_grad():
            for ts in by_key.values():
                flat = torch.cat([t.reshape(-1) for t in ts])
                dist.all_reduce_sum_(flat, group=group, what="LocalSGD optimizer-state average")
                flat.div_(world)
                self.stats.bytes += flat.numel() * flat.element_size()
                offset = 0
                for t in ts:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    def _sync(self, advance_schedule: bool = True) -> None:
        start = time.perf_counter()
        if not self._quick_layout_ok():
            self._check_layout()
        # A hierarchical schedule averages within this rank's group except at its global steps;
        # finalize() always averages globally.
        is_global = self._subgroup is None or not advance_schedule or self.schedule.is_global(self.local_step)
        group = self.group if is_global else self._subgroup
        next_h = self.schedule.fingerprint() if advance_schedule else 0
        if self.pre_average is not None:
            self.pre_average(group)
        fused = self.agreement_check == "fused" and self._layout_agreed and self._check_group is not None
        local_bad = self._local_nonfinite_step(scan_parameters=not fused)
        summed = passed = False
        if fused:
            # One collective: the check words ride at the tail of the averaging buffer, each bucket is
            # scanned right before it leaves; if the check fails the result is discarded (raise or roll back).
            pending, local_bad = self._start_scanned_average(group, local_bad, next_h)
            self._finish_average(pending)
            summed = True
            passed, stop = self._decode_fused(group)
        if not passed:  # the full check: first sync, before/overlapped mode, or a fused check that failed
            vec, check = self._start_fingerprint(local_bad, next_h, group)
            pending = None
            if self.agreement_check == "overlapped" and not summed:
                # The average travels while the check does (one latency instead of two); a non-finite
                # replica sends zeros, and nothing summed is used unless the check passes.
                pending = self._start_average(group, contribute_zeros=local_bad >= 0)
            dist.wait(check, "LocalSGD agreement check")
            disagree, bad, odd, stop, ints = self._decode_fingerprint(vec, group)
            if pending is not None and (disagree or bad):
                self._finish_average(pending, scale=False)  # keep every rank's collectives paired
            if disagree:
                raise ScheduleDisagreementError(disagree, odd, self.local_step)
        if is_global:  # a stop must be agreed by every rank, so only a global sync can decide it
            self.stop_agreed = self.stop_agreed or stop
        if not passed:
            if bad:
                self._handle_nonfinite(bad)
                if advance_schedule:
                    self.schedule.advance(self.local_step)
                self.last_sync_step = self.local_step
                self.stats.seconds += time.perf_counter() - start
                return
            with torch.no_grad():
                for b, value in zip(self._int_buffer_list, ints):
                    b.fill_(value)  # integer buffers (num_batches_tracked) kept consistent: take the max
            if not summed:
                self._finish_average(pending if pending is not None else self._start_average(group))
            if is_global:
                self._layout_agreed = True  # every rank has this layout: the fused check may take over
        if self.outer is not None and is_global:
            # Hierarchical: group averages are part of the inner optimisation; the outer step sees
            # the round from the last global average x_t to the global average now (DiLoCo over nodes).
            self._outer_step()
        self._apply_optimizer_state_policy(group)
        self.stats.rounds += 1
        self.stats.bytes += self.payload_bytes
        self.last_sync_step = self.local_step
        if is_global:
            self.last_global_sync_step = self.local_step
        self._consecutive_skips = 0
        if advance_schedule:
            # Adaptive schedules see only all-reduced values, so every rank decides alike.
            self.schedule.observe(step=self.local_step, loss=self.last_round_loss, lr=self._current_lr())
            self.schedule.advance(self.local_step)
        if self.on_nonfinite == "skip_round":
            self._take_snapshot()
        self.stats.seconds += time.perf_counter() - start

    def _outer_step(self) -> None:
        averaged = self.param_buffers()
        with torch.no_grad():
            self.outer.step(self._global or [], averaged, inner_lr=self._current_lr() or 1.0)
            if self._global is not None:
                for g, a in zip(self._global, averaged):
                    g.copy_(a)

    def _current_lr(self) -> float | None:
        return float(self.optimizers[0].param_groups[0]["lr"]) if self.optimizers else None

    def _handle_nonfinite(self, bad: dict[int, int]) -> None:
        if self.on_nonfinite == "raise" or self._snapshot is None:
            raise NonFiniteError(bad, self.local_step)
        self._consecutive_skips += 1
        self.stats.skipped_rounds += 1
        if self._consecutive_skips > self.max_skipped_rounds:
            raise NonFiniteError(bad, self.local_step)
        self._restore_snapshot()
        self._first_nonfinite = -1

    def _take_snapshot(self) -> None:
        self._snapshot = {
            "flat": [g.flat.clone() for g in self._groups],
            "buffers": [[b.clone() for b in g.buffers] for g in self._groups],
            "optim": [_clone_state(opt.state_dict()) for opt in self.optimizers],
        }

    def _restore_snapshot(self) -> None:
        assert self._snapshot is not None
        with torch.no_grad():
            for g, flat, bufs in zip(self._groups, self._snapshot["flat"], self._snapshot["buffers"]):
                g.flat.copy_(flat)
                for b, c in zip(g.buffers, bufs):
                    b.copy_(c)
        for opt, state in zip(self.optimizers, self._snapshot["optim"]):
            opt.load_state_dict(_clone_state(state))

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
        self._check_layout()
        if self.outer is not None and state.get("outer") is not None:
            self.outer.load_state_dict(state["outer"])
        self._reset_global_copy()  # right after a global sync x_t = the parameters
        saved_start = state.get("outer_round_start")
        if saved_start is not None and self._global is not None:
            for t, saved in zip(self._global, saved_start, strict=True):
                t.copy_(saved)
        if self.on_nonfinite == "skip_round":
            self._take_snapshot()


def _bucket_bounds(data_numel: int, total: int, per_bucket: int) -> list[tuple[int, int]]:
    """Bucket [start, end) ranges: ``per_bucket`` elements of data each, the check words (``total -
    data_numel`` of them) appended to the last, so they are written once, before the last launch,
    and never share memory with a bucket already in flight."""
    per_bucket = max(1, per_bucket)
    bounds = [(s, min(s + per_bucket, data_numel)) for s in range(0, data_numel, per_bucket)] or [(0, 0)]
    bounds[-1] = (bounds[-1][0], total)
    return bounds


def _all_finite(t: torch.Tensor) -> bool:
    # A finite sum proves every element finite (NaN/Inf propagate through a sum); only an infinite or
    # NaN sum, which may also be a harmless overflow, needs the exact (slower) elementwise test.
    return t.numel() == 0 or math.isfinite(float(t.sum())) or bool(torch.isfinite(t).all())


def _clone_state(state: Any) -> Any:
    if isinstance(state, torch.Tensor):
        return state.clone()
    if isinstance(state, dict):
        return {k: _clone_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_clone_state(v) for v in state]
    return state
