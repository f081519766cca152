"""Streaming averaging: fragments that sync at their own offsets, overlapped with the next steps.

Streaming DiLoCo (Douillard et al. 2025, arXiv 2501.18512, Alg. 1 and §2.3) splits the parameters
into F fragments; fragment p syncs at the local steps t ≡ (p+1)·H/F (mod H), so one round's
traffic spreads over the round instead of arriving as one burst. With a delay τ the fragment's
collective starts at its sync step t (``async_op=True``: Gloo's worker threads and NCCL's stream
carry it while the worker computes) and its result is applied τ steps later, mixed with the
progress the replica made meanwhile (their Eq. for the merge, with α the weight of the local copy):

    x̄_p(t) = outer(x_ref,p, (1/K) Σ_k x_k,p(t))     the fragment's new global value
    x_k,p(t+τ) ← α·x_k,p(t+τ) + (1 − α)·x̄_p(t)       α = 0: the global value replaces the local one

``merge="progress"`` instead keeps all the progress the replica made while the fragment travelled,
as computation-communication decoupled SGD does (CoCoD-SGD; Shen et al. 2019, arXiv 1906.12043):

    x_k,p(t+τ) ← x̄_p(t) + (x_k,p(t+τ) − x_k,p(t))   the average, plus this rank's last τ steps

F = 1, τ = 0, α = 0 is blocking local SGD exactly (the same all-reduce of the same values, so the
same bits at K = 2, tested). Constraints, as in torchft's DiLoCo: H divisible by F and τ < H/F, so
at most one fragment is ever in flight and it lands before the next one leaves (until
:meth:`StreamingSync.finalize`, which sends every fragment still apart at once).

What each sync sends: a copy of the fragment taken at step t (training goes on in the parameters
while the copy travels), or with compression its pseudo-gradient x_ref − x_k (:mod:`.compress`;
block codes of CPU float32 fragments are made and decoded in one fused pass by :mod:`.native_codec`,
the same bits as the torch path: its encode reads the live parameters and takes the copy a delayed merge
needs in the same pass, and without an outer step one landing pass decodes the codes, updates x_ref and
merges into the live parameters; the wire and gather buffers are kept between syncs).
Floating buffers (BatchNorm statistics) ride with the last fragment and are averaged, never
outer-stepped. Every guarantee of the blocking sync holds per fragment:

* **Agreement and non-finite values.** A full check (:mod:`.check_words`: step, fragment round,
  element count, config, fragment index; each rank's first non-finite step) travels with the
  payload: beside it in a MAX all-reduce for summed payloads, inside it for block codes (appended to
  each rank's code in the one all-gather; every rank takes the maximum of the K copies). A rank
  whose losses or fragment copy are non-finite sends zeros, and the check is read before the
  result is used: a non-finite fragment raises :class:`~localsgd.errors.NonFiniteError`
  on every rank and is never applied (``on_nonfinite=skip_round`` needs the blocking sync).
* **Outer optimizers per fragment**: each fragment has its own (a copy of the configured one), so
  its momentum follows its own rounds.
* **Accounting**: ``stats.bytes`` adds exactly the bytes each sync submits (:func:`.compress.wire_bytes`),
  ``stats.rounds`` counts full rounds (the last fragment's), ``stats.fragment_syncs`` every fragment.
* **The end**: :meth:`finalize` applies what is in flight, then averages every fragment whose
  replicas differ with τ = 0 and α = 0, so every replica ends identical.
* **Checkpoints** hold each rank's replica (replicas differ between syncs), every fragment's x_ref,
  error-feedback residual and outer state; one taken while a fragment is in flight waits for it and
  records its reduced result, which the resumed run applies at the same step: bit-exact resume.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .. import dist
from ..errors import NonFiniteError, ScheduleDisagreementError
from . import compress as codec
from . import native_codec
from .check_words import FullVerdict, decode_full_check, encode_full_check
from .state import all_finite

if TYPE_CHECKING:
    from .local_sgd import LocalSGD


MERGES = ("mix", "progress")  # how a delayed fragment's average meets the replica's progress (module docstring)
# The options at which LocalSGD runs the blocking sync; any other value of one of them streams or compresses.
BLOCKING_DEFAULTS = {"fragments": 1, "delay": 0, "mix": 0.0, "merge": "mix", "compress": "none", "error_feedback": None}


def streaming_options(**options: Any) -> list[str]:
    """The names of the streaming/compression options set away from the blocking sync's values
    (``error_feedback=False`` is the blocking default too)."""
    return [k for k, default in BLOCKING_DEFAULTS.items()
            if options.get(k, default) != default and not (k == "error_feedback" and not options[k])]


def fragment_bounds(numel: int, fragments: int) -> list[tuple[int, int]]:
    """[start, end) of ``fragments`` contiguous ranges that partition ``numel`` elements, sizes within one."""
    return [(p * numel // fragments, (p + 1) * numel // fragments) for p in range(fragments)]


def sync_offsets(H: int, fragments: int) -> list[int]:  # noqa: N803 - H is the paper's symbol
    """Fragment p syncs at the steps t > 0 with t % H == offsets[p] (the last one at the round's end)."""
    return [((p + 1) * H // fragments) % H for p in range(fragments)]


def _kept(buf: torch.Tensor | None, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``buf`` if it holds ``numel`` values of ``dtype`` on ``device``, else a fresh buffer that does."""
    if buf is None or buf.numel() != numel or buf.dtype != dtype or buf.device != device:
        return torch.empty(numel, dtype=dtype, device=device)
    return buf


@dataclass
class Fragment:
    """One fragment: where it lives in the model, its staging buffer, and its own sync state."""

    index: int
    pieces: list[tuple[torch.Tensor, int]]  # (live 1-D view into the model, offset in the fragment)
    numel: int
    param_numel: int  # the first param_numel elements are parameters (outer-stepped); the rest buffers
    send: torch.Tensor  # what this rank sends (a copy taken at the sync step)
    ref: torch.Tensor | None = None  # x_ref: the fragment's last global value, identical on every rank
    residual: torch.Tensor | None = None  # error feedback: what this rank's codes dropped so far
    outer: Any = None
    syncs: int = 0  # completed syncs of this fragment
    applied_at: int = 0  # local step of the last apply (0: never)
    mixed: bool = False  # the last apply kept part of the local copy (α > 0): replicas differ
    # kept between syncs (a fragment's next sync leaves only after its last one landed): this rank's wire
    # buffer (native codec) and the all-gather's output, so a sync faults in no fresh pages
    wire: torch.Tensor | None = None
    gathered: torch.Tensor | None = None
    # decided once per layout (see StreamingSync._build_fragments): the block code runs in the native codec,
    # and ``live`` is the parameters' view into the model that its encode reads and its landing writes
    native: bool = False
    live: torch.Tensor | None = None

    def gather(self) -> None:
        for view, offset in self.pieces:
            self.send[offset : offset + view.numel()].copy_(view)

    def write(self, values: torch.Tensor, mix: float, sent: tuple[torch.Tensor, torch.Tensor] | None = None,
              first_piece: int = 0) -> None:
        """Live ← mix·live + (1 − mix)·values (mix = 0: an exact copy); with ``sent`` = (the copy this rank
        sent, a work buffer of the fragment's length), live ← values + (live − sent): the average plus the
        progress made since, the difference held in the work buffer rather than a fresh temporary.
        ``first_piece``: the pieces before it were written already (the native landing)."""
        for view, offset in self.pieces[first_piece:]:
            end = offset + view.numel()
            new = values[offset:end]
            if sent is not None:  # the difference first: exactly 0 where nothing changed
                copy, work = sent
                view.add_(torch.sub(new, copy[offset:end], out=work[offset:end]))
            elif mix == 0.0:
                view.copy_(new)
            else:
                view.mul_(mix).add_(new, alpha=1.0 - mix)


@dataclass
class InFlight:
    """A launched fragment sync: its collectives (None once waited) and what they return into."""

    fragment: int
    launched: int  # local step it left at
    due: int  # local step its result is applied at
    payload: torch.Tensor  # reduced in place (all-reduce) or gathered into (int codes)
    check: torch.Tensor
    world: int
    averaged_in_collective: bool
    handles: list[Any] = field(default_factory=list)
    sent: torch.Tensor | None = None  # merge="progress": the copy this rank sent
    # the round's inner LR γ_t at launch (SlowMo divides the displacement by it): the LR may change in flight
    inner_lr: float | None = None
    check_rides: bool = False  # the check words travel at the end of each rank's code (read them out on finish)


class StreamingSync:
    """Fragments, delay, mix and compressed payloads for one :class:`~localsgd.engine.LocalSGD`."""

    def __init__(self, engine: LocalSGD, *, fragments: int, delay: int, mix: float, merge: str = "mix", compress: str,
                 error_feedback: bool | None, block: int) -> None:
        if int(fragments) != fragments or fragments < 1:
            raise ValueError(f"LocalSGD fragments must be an integer >= 1, got {fragments!r}")
        if int(delay) != delay or delay < 0:
            raise ValueError(f"LocalSGD delay must be an integer >= 0, got {delay!r}")
        if not 0.0 <= mix < 1.0:
            raise ValueError(f"LocalSGD mix must be in [0, 1) (the local copy's weight), got {mix!r}")
        if compress not in codec.COMPRESSIONS:
            raise ValueError(f"LocalSGD compress={compress!r} is not one of {codec.COMPRESSIONS}")
        if int(block) != block or block < 1:
            raise ValueError(f"LocalSGD compress_block must be an integer >= 1, got {block!r}")
        self.engine = engine
        if merge not in MERGES:
            raise ValueError(f"LocalSGD merge={merge!r} is not one of {MERGES}")
        if merge == "progress" and mix != 0.0:
            raise ValueError(f"LocalSGD merge='progress' keeps all local progress: it takes no mix (got mix={mix!r})")
        if merge == "progress" and delay == 0:
            raise ValueError("LocalSGD merge='progress' needs delay >= 1: with delay 0 an average lands before any "
                             "local progress, so there is none to keep (merge='mix' is the same run)")
        self.F, self.delay, self.mix, self.merge = int(fragments), int(delay), float(mix), merge
        self.compress, self.block = compress, block
        self.error_feedback = codec.error_feedback_default(compress) if error_feedback is None else bool(error_feedback)
        if self.error_feedback and compress == "none":
            raise ValueError("LocalSGD error_feedback=True needs a lossy compress (bf16, fp16, int8 or int4)")
        schedule = engine.schedule
        self.periodic = self.F > 1 or self.delay > 0
        if self.periodic:
            H = getattr(schedule, "H", None)  # noqa: N806
            if schedule.name != "fixed" or H is None:
                raise ValueError(f"LocalSGD fragments={self.F}, delay={self.delay}: streaming syncs fragments at "
                                 f"fixed offsets in a round of H steps and needs a fixed schedule, got "
                                 f"{schedule.describe()}")
            if H % self.F:
                raise ValueError(f"LocalSGD fragments={self.F}: must divide the period H={H}")
            if self.delay >= H // self.F:
                raise ValueError(f"LocalSGD delay={self.delay}: must be < H/fragments = {H // self.F}, so a "
                                 "fragment lands before the next one leaves")
            self.H, self.offsets = H, sync_offsets(H, self.F)
        if engine.on_nonfinite != "raise":
            raise ValueError("LocalSGD on_nonfinite=skip_round rolls every fragment back together and needs the "
                             "blocking sync; use fragments=1, delay=0, compress=none, or on_nonfinite=raise")
        if engine.buffer_policy == "broadcast":
            raise ValueError("LocalSGD buffers=broadcast needs the blocking sync; use buffers=average or local")
        if engine.optimizer_state.policy != "keep":
            raise ValueError(f"LocalSGD optimizer_state={engine.optimizer_state.policy!r} acts on the whole model "
                             "after a blocking average; streaming and compression need optimizer_state=keep")
        if engine._subgroup is not None:
            raise ValueError("LocalSGD: a hierarchical schedule needs the blocking sync")
        if engine.outer_state_on_host:
            raise ValueError("LocalSGD outer_state_on_host=True needs the blocking sync: streaming keeps each "
                             "fragment's x_ref beside the model")
        if engine.pre_average is not None and self.F > 1:
            raise ValueError(f"LocalSGD pre_average runs before every average and moves the whole model; with "
                             f"fragments={self.F} it would run F times a round: use fragments=1")
        self.fragments: list[Fragment] = []
        self.inflight: InFlight | None = None
        self._layout_version = -1
        self.in_sync_at = 0  # the local step at which every replica was last identical
        self.round_completed_at = -1  # the local step at which the last round's last fragment landed
        self._finalizing = False
        self._build_fragments()
        # Build (or load) the native codec now, not inside the first sync; "native" or why the torch path is used
        self.codec_path = ""
        if compress in codec.QMAX:
            self.codec_path = "native" if self.fragments[0].native else (
                native_codec.why_not or "torch: the native codec takes contiguous CPU float32 buffers")

    def describe(self) -> str:
        parts = [f"fragments={self.F}"] if self.F > 1 else []
        parts += [f"delay={self.delay}"] if self.delay else []
        parts += [f"mix={self.mix:g}"] if self.mix else []
        parts += ["merge=progress"] if self.merge == "progress" else []
        if self.compress != "none":
            parts.append(self.compress + ("+ef" if self.error_feedback else ""))
        return " ".join(parts) or "streaming"

    # ---------------------------------------------------------------- layout
    def _build_fragments(self) -> None:
        layout = self.engine.layout
        if len(layout.buffers) != 1:
            kinds = ", ".join(f"{fb.flat.dtype} on {fb.flat.device}" for fb in layout.buffers) or "none"
            raise ValueError(f"LocalSGD streaming/compression averages one flat buffer, and this model's averaged "
                             f"tensors come in {len(layout.buffers)} (dtype, device) groups ({kinds}); give every "
                             "parameter one dtype and device")
        fb = layout.buffers[0]
        if fb.param_numel < self.F:
            raise ValueError(f"LocalSGD fragments={self.F}: the model has only {fb.param_numel} parameter values, "
                             "fewer than fragments; use fewer fragments")
        bounds = fragment_bounds(fb.param_numel, self.F)
        buffer_views = [b.view(-1) for b in fb.buffers]
        old = self.fragments
        self.fragments = []
        self._work: dict[str, torch.Tensor] = {}  # reusable float32 work buffers (see _scratch)
        for p, (s, e) in enumerate(bounds):
            pieces = [(fb.flat[s:e], 0)] if e > s else []
            numel = e - s
            if p == self.F - 1:
                for view in buffer_views:
                    pieces.append((view, numel))
                    numel += view.numel()
            frag = Fragment(p, pieces, numel, e - s, torch.empty(numel, dtype=fb.flat.dtype, device=fb.flat.device))
            if old and old[p].numel == numel:  # a re-pointed model (moved, not resized): keep the sync state
                for name in ("ref", "residual", "outer", "syncs", "applied_at", "mixed"):
                    setattr(frag, name, getattr(old[p], name))
            else:
                frag.outer = copy.deepcopy(self.engine.outer) if self.engine.outer is not None else None
                if self._keeps_ref:
                    frag.gather()
                    frag.ref = frag.send.clone()
                if self.error_feedback:
                    frag.residual = torch.zeros(numel, dtype=torch.float32, device=fb.flat.device)
            frag.native = self.compress in codec.QMAX and native_codec.usable(
                frag.send, *(t for t in (frag.ref, frag.residual) if t is not None))
            if frag.native and pieces and native_codec.usable(pieces[0][0]):  # the parameters come first, at offset 0
                frag.live = pieces[0][0]
            self.fragments.append(frag)
        self._layout_version = layout.version

    @property
    def _keeps_ref(self) -> bool:
        outer = self.engine.outer
        return self.compress != "none" or (outer is not None and getattr(outer, "needs_global_copy", True))

    def _refresh(self) -> None:
        engine = self.engine
        if not engine.layout.quick_ok():
            engine.layout.refresh()
        if engine.layout.version != self._layout_version:
            self._build_fragments()

    # ---------------------------------------------------------------- the step
    def due_fragments(self, t: int) -> list[int]:
        """Fragments whose sync step is ``t``."""
        if self.periodic:
            return [p for p, off in enumerate(self.offsets) if t % self.H == off]
        return [0] if self.engine.schedule.should_sync(t) else []

    def step(self) -> bool:
        """After local step ``engine.local_step``: apply what is due, launch what syncs now."""
        engine, t = self.engine, self.engine.local_step
        applied = False
        if self.inflight is not None and self.inflight.due == t:
            self._apply(self.inflight, t)
            self.inflight, applied = None, True
        for p in self.due_fragments(t):
            start = time.perf_counter()
            self._refresh()
            pending = self._launch(p, t)
            engine.stats.seconds += time.perf_counter() - start
            if pending.due == t:
                self._apply(pending, t)
                applied = True
            else:
                self.inflight = pending
        return applied

    def _round_ended(self, launched: int) -> None:
        """Bookkeeping when the round's last fragment lands; the round ended at its launch step."""
        engine = self.engine
        engine.stats.rounds += 1
        engine.last_sync_step = launched
        self.round_completed_at = engine.local_step
        if not self.periodic:  # any schedule: it observes all-reduced values only, as in the blocking sync
            engine.schedule.observe(step=launched, loss=engine.last_round_loss, lr=engine._next_round_lr())
        engine.schedule.advance(launched)

    # ---------------------------------------------------------------- launch and apply
    def _launch(self, p: int, t: int) -> InFlight:
        engine = self.engine
        group = engine.group
        world, me = engine._size_rank(group)
        frag = self.fragments[p]
        if engine.pre_average is not None:
            engine.pre_average(group)
        with torch.no_grad():
            # the native encode reads a fragment of parameters only straight from the model and takes the copy in
            # the same pass; otherwise the copy is gathered first and encoded from there
            source = frag.live if len(frag.pieces) == 1 else None
            # world 1: the "average" is the copy sent, so the progress since is kept whatever the merge
            keeps_copy = (self.merge == "progress" or world == 1) and self.delay > 0 and not self._finalizing
            if source is None:
                frag.gather()
            bad_step = engine._local_nonfinite_step(scan_replica=False)
            if bad_step < 0 and not all_finite(frag.send if source is None else source):
                bad_step = t
            if bad_step >= 0 and source is not None:
                frag.gather()  # zeros travel; the copy is still what this rank held
            # A block code cannot overflow, so its check is known first and rides at the end of each rank's
            # code in the one all-gather (every rank gets every rank's words and takes their maximum): one
            # collective per fragment sync instead of two. Casts and plain floats are summed: theirs travels apart.
            rides = self.compress in codec.QMAX and world > 1
            if rides:
                check = self._check(frag, t, world, me, bad_step)
                payload, averaged, _ = self._encode(frag, world, bad_step >= 0, group, tail=check.view(torch.uint8),
                                                    source=source, keeps_copy=keeps_copy)
            else:
                payload, averaged, overflow = self._encode(frag, world, bad=bad_step >= 0, group=group, source=source,
                                                           keeps_copy=keeps_copy)
                check = self._check(frag, t, world, me, t if overflow else bad_step)
            engine._round_loss = [0.0, 0]
            pending = InFlight(p, t, t + self.delay, payload, check, world, averaged,
                               inner_lr=engine._current_lr() or 1.0, check_rides=rides)
            if keeps_copy:
                # the all-reduce of compress=none reduces the send buffer in place: keep the copy apart
                pending.sent = frag.send.clone() if payload is frag.send else frag.send
            if world > 1:
                if not rides:
                    pending.handles.append(dist.all_reduce_max_async(check, group=group))
                if self.compress in codec.QMAX:
                    gathered = frag.gathered = _kept(frag.gathered, world * payload.numel(), payload.dtype,
                                                             payload.device)
                    pending.handles.append(dist.all_gather_into_tensor_async(gathered, payload, group=group))
                    pending.payload = gathered
                else:
                    pending.handles.append(dist.all_reduce_sum_async(payload, group=group, average=averaged))
                engine.stats.bytes += codec.wire_bytes(frag.numel, self.compress, frag.send.element_size(), self.block)
                engine.stats.check_bytes += check.numel() * check.element_size()
        return pending

    def _check(self, frag: Fragment, t: int, world: int, me: int, bad_step: int) -> torch.Tensor:
        """The full check words (:mod:`.check_words`) this rank sends with fragment ``frag``'s sync at step t."""
        engine = self.engine
        next_h = 0 if self.periodic or self._finalizing else engine.schedule.fingerprint()
        last = frag.index == self.F - 1
        words = encode_full_check([t, frag.syncs, frag.numel, engine.config_hash, next_h * self.F + frag.index], world,
                                  me, bad_step, engine.stop_requested, engine._mean_round_loss(),
                                  [int(b) for b in engine.layout.int_buffers] if last else [])
        return torch.tensor(words, dtype=torch.int64, device=frag.send.device)

    def _encode(self, frag: Fragment, world: int, bad: bool, group: Any, tail: torch.Tensor | None = None,
                source: torch.Tensor | None = None, keeps_copy: bool = True) -> tuple[torch.Tensor, bool, bool]:
        """The payload this rank sends, whether the collective averages (else it sums), and whether a cast
        overflowed its format (fp16 beyond 65504: the payload is then zeros, as for a non-finite replica).
        ``tail`` (bytes, block codes only) is appended to the code: the check words that ride with it.
        ``source`` (``frag.live`` or None): the live values the native encode reads, writing
        ``frag.send`` in the same pass where a delayed merge keeps it (``keeps_copy``; else ``frag.send``
        holds the gathered copy)."""
        averaged = world > 1 and dist.average_in_collective(group)
        if self.compress == "none":
            if bad:
                frag.send.zero_()  # a non-finite replica sends zeros: NaN/Inf never enter the sum
            return frag.send, averaged, False
        assert frag.ref is not None
        delta = self._scratch("delta", frag)  # kept buffers: no fresh pages per sync (the native path uses none)
        if self.compress in codec.QMAX:
            if bad:  # zeros: nothing of a non-finite replica enters the others' sums
                grid = self._scratch("grid", frag)
                code = codec.encode_blocks(delta.zero_(), self.compress, self.block, scratch=grid)
                return codec.pack_code(code, tail), False, False
            if frag.native:  # one fused pass from x_ref, x and e: the same bits as the torch path
                tail_bytes = 0 if tail is None else tail.numel()
                length = codec.wire_bytes(frag.numel, self.compress, 4, self.block) + tail_bytes
                frag.wire = _kept(frag.wire, length, torch.uint8, frag.send.device)
                wire = native_codec.encode(frag.ref, frag.send if source is None else source, frag.residual,
                                           self._block_work(frag), self.compress, self.block, tail,
                                           copy_out=frag.send if source is not None and keeps_copy else None,
                                           wire=frag.wire)
            else:
                wire = codec.encode_delta(frag.ref, frag.send, frag.residual, self.compress, self.block, delta=delta,
                                          grid=self._scratch("grid", frag), tail=tail)
            return wire, False, False
        if bad:
            delta.zero_()
        else:
            torch.sub(frag.ref, frag.send, out=delta)  # the pseudo-gradient x_ref − x_k
            if frag.residual is not None:
                delta.add_(frag.residual)
        wire = delta.to(codec.CAST_DTYPES[self.compress])
        if not bad and not all_finite(wire):  # |Δ| beyond fp16's range: inf, never summed into the others
            return wire.zero_(), averaged, True
        if frag.residual is not None and not bad:
            frag.residual.copy_(delta).sub_(wire.to(torch.float32))
        return wire, averaged, False

    def _block_work(self, frag: Fragment) -> torch.Tensor:
        """The native codec's scratch: one block of float32 values (it keeps no fragment-sized intermediate)."""
        buf = self._work.get("block")
        need = native_codec.work_numel(max(f.numel for f in self.fragments), self.block)
        if buf is None or buf.numel() < need:
            buf = self._work["block"] = torch.empty(need)
        return buf

    def _scratch(self, name: str, frag: Fragment, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A work buffer of the fragment's length, kept between syncs (one per name and dtype, sized for the
        largest fragment), so a sync allocates and faults in no fresh pages. A launch is done with its
        buffers once it returns (what travels is a fresh code or the fragment's own copy), and fragments
        are applied one at a time, so several fragments in flight (finalize) share them safely."""
        key = f"{name}:{dtype}"
        buf = self._work.get(key)
        if buf is None or buf.numel() < frag.numel or buf.device != frag.send.device:
            size = max(f.numel for f in self.fragments)
            buf = self._work[key] = torch.empty(size, dtype=dtype, device=frag.send.device)
        return buf[: frag.numel]

    def _finish(self, pending: InFlight) -> None:
        start = time.perf_counter()
        for h in pending.handles:
            dist.wait(h, "LocalSGD fragment average")
        pending.handles = []
        if pending.check_rides:  # every rank's words sit at the end of its code: their maximum, as an all-reduce
            words = pending.payload.view(pending.world, -1)[:, -pending.check.numel() * 8:]
            pending.check = words.contiguous().view(torch.int64).amax(dim=0)
            pending.check_rides = False
        self.engine.stats.wait_seconds += time.perf_counter() - start

    def _apply(self, pending: InFlight, t: int) -> None:
        engine = self.engine
        start = time.perf_counter()
        self._refresh()
        self._finish(pending)
        frag = self.fragments[pending.fragment]
        verdict: FullVerdict = decode_full_check(pending.check.tolist(), pending.world)
        engine.last_round_loss = verdict.mean_loss
        engine.stop_agreed = engine.stop_agreed or verdict.stop
        if verdict.disagree:
            raise ScheduleDisagreementError(verdict.disagree, verdict.odd_ranks, pending.launched)
        if verdict.bad:
            raise NonFiniteError(verdict.bad, pending.launched, where=f"fragment {frag.index} of {self.F}")
        with torch.no_grad():
            mix = self.mix if pending.world > 1 else 0.0
            # Landing at its own launch step (finalize), a fragment met no progress: copy the average, since
            # live + (x̄ − sent) with live = sent is x̄ only up to a rounding that differs between ranks.
            progress = pending.sent is not None and t > pending.launched
            if not self._land_native(frag, pending, mix, progress):
                self._land(frag, pending, mix, progress)
            if pending.fragment == self.F - 1:
                for b, value in zip(engine.layout.int_buffers, verdict.int_buffers):
                    b.fill_(value)  # integer buffers (num_batches_tracked) kept consistent: take the max
        frag.syncs += 1
        # an average applied at its own launch step (finalize's flush) met no progress: replicas are identical
        frag.applied_at, frag.mixed = t, mix > 0 or progress
        engine.stats.fragment_syncs += 1
        if pending.fragment == self.F - 1 and not self._finalizing:
            self._round_ended(pending.launched)
        if all(f.applied_at == t and not f.mixed for f in self.fragments):
            self.in_sync_at = t
        engine.stats.seconds += time.perf_counter() - start

    def _land_native(self, frag: Fragment, pending: InFlight, mix: float, progress: bool) -> bool:
        """Decode, update x_ref and write the live parameters in one native pass (a block code without an
        outer step, merged by copy or by progress); False where that does not apply. The same bits as
        :meth:`_land`. Pieces after the first (float buffers riding with the last fragment) are written
        from the average as there."""
        live = frag.live
        writes = pending.world > 1  # alone and without an outer step: nothing to apply
        if not frag.native or frag.outer is not None or mix != 0.0 or (writes and live is None):
            return False
        assert frag.ref is not None
        n_live = live.numel() if writes and live is not None else 0
        rest = writes and n_live < frag.numel
        out = self._scratch("mean", frag) if rest else None
        sent = pending.sent if progress and writes else None
        native_codec.land(frag.ref, pending.payload, pending.world, self._block_work(frag), self.compress,
                          self.block, out=out, out_from=n_live, update_ref=True,
                          live=live if n_live else None, sent=sent)
        if rest:
            assert out is not None
            frag.write(out, 0.0, (sent, self._scratch("delta", frag)) if sent is not None else None, first_piece=1)
        return True

    def _land(self, frag: Fragment, pending: InFlight, mix: float, progress: bool) -> None:
        """The average, the outer step, x_ref and the merge into the live parameters, in torch."""
        engine = self.engine
        average = self._decode(frag, pending)
        if frag.outer is not None:
            params, ref = average[: frag.param_numel], frag.ref
            lr = pending.inner_lr if pending.inner_lr is not None else engine._current_lr() or 1.0
            frag.outer.step([] if ref is None else [ref[: frag.param_numel]], [params], inner_lr=lr)
        if frag.ref is not None:
            frag.ref.copy_(average)
        if pending.world > 1 or frag.outer is not None:  # alone and without an outer step: nothing to apply
            sent = (pending.sent, self._scratch("delta", frag, frag.send.dtype)) if progress else None
            frag.write(average, mix, sent)

    def _decode(self, frag: Fragment, pending: InFlight) -> torch.Tensor:
        """The fragment's average x̄ (before the outer step), in the buffer's dtype."""
        world, payload = pending.world, pending.payload
        if self.compress == "none":
            if world > 1 and not pending.averaged_in_collective:
                payload.div_(world)
            return payload
        assert frag.ref is not None
        if self.compress in codec.QMAX:
            mean = self._scratch("mean", frag)
            if frag.native:  # x_ref − mean in one pass: the torch path's bits
                return native_codec.decode_mean(frag.ref, payload, world, mean, self.compress, self.block,
                                                work=self._block_work(frag))
            mean = codec.decode_mean(frag.ref, payload, world, self.compress, self.block, out=mean,
                                     grid=self._scratch("grid", frag))
        else:
            mean = payload.to(torch.float32)
            if world > 1 and not pending.averaged_in_collective:
                mean.div_(world)
            torch.sub(frag.ref, mean, out=mean)  # x_ref − mean pseudo-gradient: the fragment's average
        return mean if frag.send.dtype == torch.float32 else mean.to(frag.send.dtype)

    # ---------------------------------------------------------------- the end
    def finalize(self) -> bool:
        """Apply what is in flight, then average (τ = 0, α = 0) every fragment whose replicas differ."""
        engine, t = self.engine, self.engine.local_step
        self._refresh()
        if self.inflight is not None:
            self._apply(self.inflight, t)
            self.inflight = None
        if self.in_sync_at == t and engine.stats.rounds > 0:
            return False
        world, _ = engine._size_rank(engine.group)
        saved_mix, self.mix, self._finalizing = self.mix, 0.0, True
        try:
            # Every fragment leaves before the first is applied: the coding of one overlaps the transfer of
            # those ahead of it, and the link never idles between them (one pipeline, not F round trips).
            launched = []
            for frag in self.fragments:
                if world == 1 or frag.applied_at != t or frag.mixed:
                    start = time.perf_counter()
                    pending = self._launch(frag.index, t)
                    engine.stats.seconds += time.perf_counter() - start  # _apply counts its own part
                    pending.due = t
                    launched.append(pending)
            for pending in launched:
                self._apply(pending, t)
        finally:
            self.mix, self._finalizing = saved_mix, False
        engine.stats.rounds += 1  # as in the blocking sync, the final average counts as a round
        self.in_sync_at = t
        engine.last_sync_step = engine.last_global_sync_step = t
        return True

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        inflight = None
        if self.inflight is not None:  # wait for it and record its reduced result, applied at its step
            self._finish(self.inflight)
            f = self.inflight
            inflight = {"fragment": f.fragment, "launched": f.launched, "due": f.due, "world": f.world,
                        "averaged_in_collective": f.averaged_in_collective, "payload": f.payload.clone(),
                        "check": f.check.clone(), "sent": None if f.sent is None else f.sent.clone(),
                        "inner_lr": f.inner_lr}
        return {
            "fragments": [{"ref": None if f.ref is None else f.ref.clone(),
                           "residual": None if f.residual is None else f.residual.clone(),
                           "outer": None if f.outer is None else f.outer.state_dict(),
                           "syncs": f.syncs, "applied_at": f.applied_at, "mixed": f.mixed} for f in self.fragments],
            # replicas differ between syncs: each rank's own copy (model.pt holds rank 0's)
            "replica": {"params": [fb.param_view.clone() for fb in self.engine.layout.buffers],
                        "buffers": [[b.clone() for b in fb.buffers] for fb in self.engine.layout.buffers]},
            "inflight": inflight, "in_sync_at": self.in_sync_at,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._refresh()
        if self.inflight is not None:  # replaced unawaited: its collective may still write the kept buffers
            for frag in self.fragments:
                frag.wire = frag.gathered = None
        saved = state["fragments"]
        if len(saved) != self.F:
            raise ValueError(f"checkpoint holds {len(saved)} fragments, this run has fragments={self.F}")
        with torch.no_grad():
            replica = state["replica"]
            for fb, params, buffers in zip(self.engine.layout.buffers, replica["params"], replica["buffers"],
                                           strict=True):
                fb.param_view.copy_(params)
                for b, value in zip(fb.buffers, buffers, strict=True):
                    b.copy_(value)
            for frag, s in zip(self.fragments, saved):
                for name in ("ref", "residual"):
                    value = s[name]
                    if value is not None and getattr(frag, name) is not None:
                        getattr(frag, name).copy_(value)
                if frag.outer is not None and s["outer"] is not None:
                    frag.outer.load_state_dict(s["outer"])
                frag.syncs, frag.applied_at, frag.mixed = int(s["syncs"]), int(s["applied_at"]), bool(s["mixed"])
        self.in_sync_at = int(state["in_sync_at"])
        f = state["inflight"]
        self.inflight = None if f is None else InFlight(f["fragment"], f["launched"], f["due"], f["payload"],
                                                        f["check"], f["world"], f["averaged_in_collective"],
                                                        sent=f.get("sent"), inner_lr=f.get("inner_lr"))
