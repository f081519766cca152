"""The flat layout: every averaged tensor of one (device, dtype) as a view of one contiguous buffer.

Parameters are re-pointed to views of the flat buffer, so averaging needs no copy of the parameters
(one all-reduce per bucket instead of one per tensor: the DDP bucketing idea, Li et al., VLDB 2020,
arXiv 2006.15704, applied to parameters). Floating buffers (BatchNorm statistics) ride in the same
buffer, copied in before and out after each average. The fused agreement check reserves a few words
at the tail of one floating buffer (:mod:`.check_words`).

Building the layout holds no second copy of the parameters on the device. On CPU the buffer is
allocated uninitialised (its pages are committed only when written) and each parameter's old storage
is released as soon as it is copied in, so the peak is one copy plus the largest tensor (measured:
0.13x extra for a 100 MB model, against 1.0x when the buffer was zero-filled first). A GPU commits
the whole allocation at once, so there the parameters are first moved to the host, one at a time,
and copied back into the buffer: the device peak is one copy, at the price of a host round trip once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

FUSED_DTYPES = (torch.float32, torch.float64)  # integers below 2**24 are exact in both


@dataclass
class FlatBuffer:
    """Everything averaged for one (device, dtype): parameters as views, then buffer slots, then
    (in one buffer at most) the fused check words."""

    flat: torch.Tensor
    params: list[torch.Tensor]
    buffers: list[torch.Tensor]
    param_numel: int
    check_numel: int = 0
    buckets: list[tuple[int, int]] = field(default_factory=list)
    bucket_views: list[torch.Tensor] = field(default_factory=list)  # made once: the sync path is hot
    bucket_data: list[torch.Tensor] = field(default_factory=list)  # each bucket less the check words
    buffer_slots: list[torch.Tensor] = field(default_factory=list)  # where each buffer rides in ``flat``

    @property
    def data_numel(self) -> int:
        return self.flat.numel() - self.check_numel

    @property
    def data(self) -> torch.Tensor:
        return self.flat[: self.data_numel]

    @property
    def param_view(self) -> torch.Tensor:
        return self.flat[: self.param_numel]

    def cut_buckets(self, per_bucket: int) -> None:
        self.buckets = bucket_bounds(self.data_numel, self.flat.numel(), per_bucket)
        self.bucket_views = [self.flat[s:e] for s, e in self.buckets]
        self.bucket_data = [self.flat[s : max(s, min(e, self.data_numel))] for s, e in self.buckets]
        self.buffer_slots, offset = [], self.param_numel
        for b in self.buffers:
            self.buffer_slots.append(self.flat[offset : offset + b.numel()].view_as(b))
            offset += b.numel()

    def stage_buffers(self) -> None:
        for b, slot in zip(self.buffers, self.buffer_slots):
            slot.copy_(b)

    def unstage_buffers(self) -> None:
        for b, slot in zip(self.buffers, self.buffer_slots):
            b.copy_(slot)


def bucket_bounds(data_numel: int, total: int, per_bucket: int) -> list[tuple[int, int]]:
    """Bucket [start, end) ranges: ``per_bucket`` elements of data each, the check words (``total -
    data_numel`` of them) appended to the last, so they are written once, before the last launch,
    and never share memory with a bucket already in flight."""
    per_bucket = max(1, per_bucket)
    bounds = [(s, min(s + per_bucket, data_numel)) for s in range(0, data_numel, per_bucket)] or [(0, 0)]
    bounds[-1] = (bounds[-1][0], total)
    return bounds


class FlatLayout:
    """The flat buffers of one model, the check tail, and the cheap test that they are still current."""

    def __init__(self, model: nn.Module, extra_tensors: Iterable[torch.Tensor], *, average_buffers: bool,
                 check_words: int, bucket_cap_bytes: int) -> None:
        self.model = model
        self.extra_tensors = list(extra_tensors)
        self.average_buffers = average_buffers
        self.check_words = check_words  # 0: no fused check tail
        self.bucket_cap_bytes = bucket_cap_bytes
        self.build()

    # ---------------------------------------------------------------- what is averaged
    def _params(self) -> list[torch.Tensor]:
        return list(dict.fromkeys([*self.model.parameters(), *self.extra_tensors]))

    def _float_buffers(self) -> list[torch.Tensor]:
        if not self.average_buffers:
            return []
        return [b for b in self.model.buffers() if torch.is_floating_point(b)]

    def _int_buffers(self) -> list[torch.Tensor]:
        if not self.average_buffers:
            return []
        return [b for b in self.model.buffers() if not torch.is_floating_point(b) and b.numel() == 1]

    # ---------------------------------------------------------------- building
    def build(self) -> None:
        params, buffers = self._params(), self._float_buffers()
        keys: dict[tuple[torch.device, torch.dtype], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for p in params:
            keys.setdefault((p.device, p.dtype), ([], []))[0].append(p)
        for b in buffers:
            keys.setdefault((b.device, b.dtype), ([], []))[1].append(b)
        check_key = next((k for k in keys if k[1] in FUSED_DTYPES), None) if self.check_words else None
        self.buffers: list[FlatBuffer] = []
        for (device, dtype), (ps, bs) in keys.items():
            check_numel = self.check_words if (device, dtype) == check_key else 0
            self.buffers.append(_flatten(ps, bs, device, dtype, check_numel))
        for fb in self.buffers:
            fb.cut_buckets(self.bucket_cap_bytes // fb.flat.element_size())
        self._param_ptrs = [(p, p.data_ptr()) for fb in self.buffers for p in fb.params]
        self._buffer_ptrs = [b.data_ptr() for b in buffers]  # model order, as is_current sees them
        self.int_buffers = self._int_buffers()
        self.check_buffer = next((fb for fb in self.buffers if fb.check_numel), None)
        # The fused check launches the check buffer last: its words, which carry this rank's
        # non-finite verdict, ride in the last bucket launched, after every other bucket was scanned.
        self.launch_order = sorted(self.buffers, key=lambda fb: fb.check_numel > 0)
        fb = self.check_buffer
        self.check_tail = None if fb is None else fb.flat[fb.flat.numel() - fb.check_numel :]
        self.check_tail_np = None  # a numpy view of a CPU tail: writing 19 words costs ~1 µs, not ~10
        if self.check_tail is not None and self.check_tail.device.type == "cpu":
            with contextlib.suppress(RuntimeError, ImportError):
                self.check_tail_np = self.check_tail.numpy()
        self.payload_bytes = sum(fb.data_numel * fb.flat.element_size() for fb in self.buffers)
        self.elements = sum(fb.data_numel for fb in self.buffers)
        self.version = getattr(self, "version", -1) + 1  # bumped on every rebuild

    def param_buffers(self) -> list[torch.Tensor]:
        """The flat parameter buffers (one per device and dtype); the parameters are views of them."""
        return [fb.param_view for fb in self.buffers]

    # ---------------------------------------------------------------- staying current
    def quick_ok(self) -> bool:
        """O(1): ``model.to(...)``/``.double()`` re-materialise every parameter, so the first and last
        ones moving is the signature. Replaced modules need :meth:`refresh` (called by ``finalize()``,
        ``averaged()`` and ``load_state_dict()``)."""
        ends = (self._param_ptrs[0], self._param_ptrs[-1]) if self._param_ptrs else ()
        return all(p.data_ptr() == ptr for p, ptr in ends)

    def is_current(self) -> bool:
        params_now = self._params()
        same = len(params_now) == len(self._param_ptrs) and all(
            p is q and p.data_ptr() == ptr for p, (q, ptr) in zip(params_now, self._param_ptrs))
        return same and [b.data_ptr() for b in self._float_buffers()] == self._buffer_ptrs

    def refresh(self) -> bool:
        """Rebuild if the model's tensors moved or were replaced; True if it rebuilt."""
        if self.is_current():
            return False
        self.build()
        return True


def _flatten(params: list[torch.Tensor], buffers: list[torch.Tensor], device: torch.device, dtype: torch.dtype,
             check_numel: int) -> FlatBuffer:
    param_numel = sum(p.numel() for p in params)
    total = param_numel + sum(b.numel() for b in buffers) + check_numel
    # Uninitialised: every element is written below (parameters) or before each use (buffer slots,
    # staged before every average), and the check tail is zeroed here.
    if device.type != "cpu":  # free the device copies first (see the module docstring)
        with torch.no_grad():
            for p in params:
                p.data = p.data.to("cpu")
    flat = torch.empty(total, device=device, dtype=dtype)
    flat[param_numel:].zero_()
    offset = 0
    with torch.no_grad():
        for p in params:
            view = flat[offset : offset + p.numel()].view_as(p)
            view.copy_(p.data)
            p.data = view  # the parameter now lives inside the flat buffer; its old storage is freed
            offset += p.numel()
    return FlatBuffer(flat, params, buffers, param_numel, check_numel)
