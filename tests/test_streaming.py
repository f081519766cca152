"""Streaming fragments, delayed application and compressed payloads (localsgd.engine.streaming, .compress).

The pure parts (fragment bounds, codes, error feedback at one rank) run in process; the rest on 2 and
4 real Gloo ranks, each rank's trajectory compared with a reference written from the equations of
Streaming DiLoCo (arXiv 2501.18512) with torch's own Nesterov SGD as the outer step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import localsgd
from localsgd.engine import compress as codec
from localsgd.engine.streaming import fragment_bounds, sync_offsets
from localsgd.errors import NonFiniteError, ScheduleDisagreementError
from localsgd.outer import NesterovOuter
from localsgd.schedules import Fixed

from .distributed import run_ok
from .launch_helpers import TINY, output, records, torchrun


# ---------------------------------------------------------------------- in process
@pytest.mark.parametrize(("numel", "fragments"), [(10, 1), (10, 3), (147, 4), (5, 5)])
def test_fragment_bounds_partition_the_buffer_exactly(numel: int, fragments: int) -> None:
    bounds = fragment_bounds(numel, fragments)
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [e - s for s, e in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_fragments_cover_every_parameter_and_buffer_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(6), fragments=3)
    fb = sync.layout.buffers[0]
    covered = torch.zeros(fb.param_numel, dtype=torch.int64)
    buffers_seen = []
    for frag in sync.streaming.fragments:
        for view, _ in frag.pieces:
            if view.data_ptr() >= fb.flat.data_ptr() and view.data_ptr() < fb.flat.data_ptr() + fb.flat.numel() * 4:
                start = (view.data_ptr() - fb.flat.data_ptr()) // 4
                covered[start : start + view.numel()] += 1
            else:
                buffers_seen.append((frag.index, view.data_ptr()))
    assert torch.equal(covered, torch.ones_like(covered))  # every parameter element in exactly one fragment
    float_buffers = [b for b in model.buffers() if b.is_floating_point()]
    assert sorted(p for _, p in buffers_seen) == sorted(b.data_ptr() for b in float_buffers)
    assert {i for i, _ in buffers_seen} == {2}  # the buffers ride with the last fragment
    assert sync_offsets(6, 3) == [2, 4, 0]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("compress", ["int8", "int4"])
@pytest.mark.parametrize("numel", [1, 255, 256, 1001])
def test_block_codes_decode_within_half_a_quantum(seed: int, compress: str, numel: int) -> None:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(numel, generator=g) * torch.logspace(-3, 1, numel)  # blocks of very different scales
    v[: min(numel, 7)] = 0.0  # an all-zero start (a zero scale must decode to zeros)
    code = codec.encode_blocks(v, compress)
    wire = codec.pack_code(code)
    assert wire.numel() == codec.wire_bytes(numel, compress, 4)
    back = codec.decode_blocks(codec.unpack_code(wire, numel, compress), numel, compress)
    blocks = -(-numel // 256)
    bound = torch.zeros(blocks * 256)
    bound[:numel] = v.abs()
    half_quantum = (bound.view(blocks, 256).amax(1) / codec.QMAX[compress] / 2).repeat_interleave(256)[:numel]
    assert torch.all((back - v).abs() <= half_quantum * (1 + 1e-6) + 1e-30)
    assert torch.all(back[v == 0] == 0)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("compress", ["int8", "int4"])
def test_decoding_over_the_output_gives_the_bits_of_adding_to_zeros(seed: int, compress: str) -> None:
    # The first rank's code is written over the work buffer (no pass zeroing it first), the later ones
    # added: the same bits as accumulating every code into zeros, whatever the buffer held before.
    g = torch.Generator().manual_seed(seed)
    codes = [codec.encode_blocks(torch.randn(1001, generator=g) * 3, compress) for _ in range(3)]
    want = torch.zeros(1001)
    got = torch.full((1001,), float("nan"))  # stale contents must not leak through
    for i, code in enumerate(codes):
        codec.accumulate_blocks(want, code, compress, weight=1 / 3)
        codec.accumulate_blocks(got, code, compress, weight=1 / 3, overwrite=i == 0)
    assert torch.equal(got, want)
    assert torch.equal(codec.decode_blocks(codes[0], 1001, compress),
                       codec.accumulate_blocks(torch.zeros(1001), codes[0], compress))


def test_finalize_launches_every_fragment_before_it_applies_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    # One pipeline at the end: while one fragment is coded the ones ahead of it travel.
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = localsgd.LocalSGD(model, opt, schedule=Fixed(4), fragments=4, delay=0, compress="int8")
    for _ in range(6):
        model(torch.randn(3, 8)).square().mean().backward()
        opt.step()
        sync.step()
    calls: list[tuple[str, int]] = []
    stream = sync.streaming
    launch, apply = stream._launch, stream._apply
    monkeypatch.setattr(stream, "_launch", lambda p, t: calls.append(("launch", p)) or launch(p, t))
    monkeypatch.setattr(stream, "_apply", lambda pending, t: calls.append(("apply", pending.fragment))
                        or apply(pending, t))
    assert sync.finalize()
    assert calls == [*(("launch", p) for p in range(4)), *(("apply", p) for p in range(4))]


@pytest.mark.parametrize(("compress", "unit"), [("bf16", 2.0**-8), ("fp16", 2.0**-11)])
def test_casts_round_within_the_unit_roundoff(compress: str, unit: float) -> None:
    v = torch.randn(4096, generator=torch.Generator().manual_seed(3)) * 10
    back = codec.round_trip(v, compress)
    assert torch.all((back - v).abs() <= v.abs() * unit)
    assert codec.wire_bytes(4096, compress, 4) == 2 * 4096


def _sums_sent_and_true(compress: str, error_feedback: bool, rounds: int = 200) -> tuple[float, float]:
    """Each round the pseudo-gradient is d (one large element sets the block's scale, the others sit
    below half a quantum), coded as the engine codes it (with the residual added first, as ``_encode``
    does); returns max |Σ true − Σ sent| and one quantum. The engine's use of the residual on real ranks
    is checked against the hand-computed quadratic below."""
    d = torch.full((256,), 0.003)
    d[0] = 1.0
    residual = torch.zeros(256)
    true_sum = torch.zeros(256, dtype=torch.float64)
    sent_sum = torch.zeros(256, dtype=torch.float64)
    for _ in range(rounds):
        delta = d + residual if error_feedback else d.clone()
        code = codec.encode_blocks(delta, compress, residual=residual if error_feedback else None)
        true_sum += d.double()
        sent_sum += codec.decode_blocks(code, 256, compress).double()
    return float((true_sum - sent_sum).abs().max()), 1.0 / codec.QMAX[compress]


@pytest.mark.parametrize("compress", ["int8", "int4"])
def test_error_feedback_keeps_the_sum_sent_within_one_quantum_of_the_sum_true(compress: str) -> None:
    drift, quantum = _sums_sent_and_true(compress, error_feedback=True)
    assert drift <= quantum
    lost, _ = _sums_sent_and_true(compress, error_feedback=False)
    assert lost > 0.5  # without it the small values round to zero every round: 200 x 0.003 lost


def test_streaming_options_are_refused_with_the_reason() -> None:
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="must divide the period H=8"):
        localsgd.LocalSGD(model, None, schedule=Fixed(8), fragments=3)
    with pytest.raises(ValueError, match="must be < H/fragments = 2"):
        localsgd.LocalSGD(nn.Linear(3, 2), None, schedule=Fixed(8), fragments=4, delay=2)
    with pytest.raises(ValueError, match="needs a fixed schedule"):
        localsgd.LocalSGD(nn.Linear(3, 2), None, schedule=localsgd.schedules.OneShot(), delay=1)
    with pytest.raises(ValueError, match="compress='int2' is not one of"):
        localsgd.LocalSGD(nn.Linear(3, 2), None, schedule=Fixed(8), compress="int2")
    with pytest.raises(ValueError, match="merge='progress' needs delay >= 1"):
        localsgd.LocalSGD(nn.Linear(3, 2), None, schedule=Fixed(8), fragments=2, merge="progress")
    with pytest.raises(ValueError, match="needs the blocking sync"):
        localsgd.LocalSGD(nn.Linear(3, 2), None, schedule=Fixed(8), compress="int8", on_nonfinite="skip_round")
    with pytest.raises(ValueError, match="has only 2 parameter values, fewer than fragments"):
        localsgd.LocalSGD(nn.Linear(1, 1), None, schedule=Fixed(8), fragments=4)
    with pytest.raises(ValueError, match="pre_average runs before every average"):
        localsgd.LocalSGD(nn.Linear(3, 2), None, schedule=Fixed(8), fragments=2, pre_average=lambda group: None)
    with pytest.raises(ValueError, match="outer_state_on_host=True needs the blocking sync"):
        localsgd.LocalSGD(nn.Linear(3, 2), None, schedule=Fixed(8), compress="int8",
                          outer=NesterovOuter(0.7, 0.9), outer_state_on_host=True)
    mixed = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="come in 2 \\(dtype, device\\) groups"):
        localsgd.LocalSGD(mixed, None, schedule=Fixed(8), fragments=2)


# ---------------------------------------------------------------------- on real ranks
def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3)).double()


def _bn_run(rank: int, engine_kw: dict, outer: bool, steps: int = 14) -> tuple[dict, dict]:
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sync = localsgd.LocalSGD(model, opt, schedule=Fixed(4), outer=NesterovOuter(0.7, 0.9) if outer else None,
                             **engine_kw)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        x = torch.randn(8, 5, generator=gen, dtype=torch.float64) * (rank + 1)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync.step(loss=loss)
    sync.finalize()
    stats = sync.stats.state_dict()
    return {k: v.clone() for k, v in model.state_dict().items()}, {k: stats[k] for k in ("rounds", "bytes")}


def _streaming_f1_equals_blocking(rank: int, world: int) -> list[tuple[bool, dict, dict]]:
    out = []
    for outer in (False, True):
        (a, sa), (b, sb) = _bn_run(rank, {}, outer), _bn_run(rank, {"streaming": True}, outer)
        out.append((all(torch.equal(a[k], b[k]) for k in a), sa, sb))
    return out


@pytest.mark.slow
def test_streaming_with_one_fragment_and_no_delay_equals_the_blocking_engine_bit_for_bit() -> None:
    for rank_result in run_ok(_streaming_f1_equals_blocking, 2, timeout_s=120):
        for equal, blocking_stats, streaming_stats in rank_result:
            assert equal
            assert blocking_stats == streaming_stats


class _Reference:
    """K replicas of x ∈ R^d on f_k(x) = ½‖x − c_k‖², plain SGD, synced as Streaming DiLoCo says."""

    def __init__(self, x0: torch.Tensor, centres: torch.Tensor, lr: float, H: int, F: int, tau: int,  # noqa: N803
                 alpha: float, outer: bool, compress: str, merge: str = "mix") -> None:
        self.merge = merge
        self.xs = [x0.clone() for _ in centres]
        self.centres, self.lr, self.H, self.F, self.tau, self.alpha = centres, lr, H, F, tau, alpha
        self.bounds = fragment_bounds(x0.numel(), F)
        self.offsets = [((p + 1) * H // F) % H for p in range(F)]
        self.compress = compress
        keeps_ref = outer or compress != "none"
        self.ref = x0.clone() if keeps_ref else None
        self.outer = None
        if outer:
            self.glob = [x0[s:e].clone().requires_grad_(False) for s, e in self.bounds]
            self.outer = [torch.optim.SGD([g], lr=0.7, momentum=0.9, nesterov=True) for g in self.glob]
        ef = codec.error_feedback_default(compress)
        self.residual = [[torch.zeros(e - s) for s, e in self.bounds] for _ in centres] if ef else None
        self.inflight: tuple[int, int, torch.Tensor] | None = None  # (fragment, due, new global value)
        self.applied_at = [0] * F
        self.mixed = [False] * F  # the last apply left the replicas apart (alpha > 0, or progress kept)
        self.sent: list[torch.Tensor] = []  # merge=progress: each replica's copy of the fragment in flight

    def _new_global(self, p: int) -> torch.Tensor:
        s, e = self.bounds[p]
        if self.compress == "none":
            avg = torch.stack([x[s:e] for x in self.xs]).mean(0)
        else:
            decoded = []
            for k, x in enumerate(self.xs):
                delta = (self.ref[s:e] - x[s:e]).float()
                if self.residual is not None:
                    delta = delta + self.residual[k][p]
                back = codec.round_trip(delta, self.compress)
                if self.residual is not None:
                    self.residual[k][p] = delta - back
                decoded.append(back)
            # A cast is summed by the all-reduce in its own format (rank order here; the ring's at K > 2).
            wire = codec.CAST_DTYPES.get(self.compress, torch.float32)
            total = torch.zeros(e - s, dtype=wire)
            for back in decoded:
                total += back.to(wire)
            avg = (self.ref[s:e].float() - total.float() / len(self.xs)).to(self.xs[0].dtype)
        if self.outer is not None:
            g = self.glob[p]
            g.grad = g - avg
            self.outer[p].step()
            avg = g.detach().clone()
        if self.ref is not None:
            self.ref[s:e] = avg
        return avg

    def _apply(self, p: int, new: torch.Tensor, t: int, alpha: float, sent: list[torch.Tensor] | None = None) -> None:
        s, e = self.bounds[p]
        for k, x in enumerate(self.xs):
            if sent is not None:  # the average plus the progress this replica made while it travelled
                x[s:e] = new + (x[s:e] - sent[k])
            else:
                x[s:e] = alpha * x[s:e] + (1 - alpha) * new if alpha else new
        self.applied_at[p], self.mixed[p] = t, bool(alpha) or sent is not None

    def step(self, t: int) -> None:
        for x, c in zip(self.xs, self.centres):
            x -= self.lr * (x - c)
        if self.inflight is not None and self.inflight[1] == t:
            self._apply(self.inflight[0], self.inflight[2], t, self.alpha, self._sent())
            self.inflight = None
        for p, off in enumerate(self.offsets):
            if t % self.H == off:
                new = self._new_global(p)
                if self.tau == 0:
                    self._apply(p, new, t, self.alpha)
                else:
                    s, e = self.bounds[p]
                    self.sent = [x[s:e].clone() for x in self.xs]
                    self.inflight = (p, t + self.tau, new)

    def _sent(self) -> list[torch.Tensor] | None:
        return self.sent if self.merge == "progress" else None

    def finalize(self, t: int) -> None:
        if self.inflight is not None:
            self._apply(self.inflight[0], self.inflight[2], t, self.alpha, self._sent())
        for p in range(self.F):
            if self.applied_at[p] != t or self.mixed[p]:
                self._apply(p, self._new_global(p), t, 0.0)


def _quadratic_vs_reference(rank: int, world: int, case: dict) -> float:
    d, lr, steps = 11, 0.1, 29
    g = torch.Generator().manual_seed(5)
    centres = torch.randn(world, d, generator=g, dtype=torch.float64) * 3
    x0 = torch.randn(d, generator=g, dtype=torch.float64)
    dtype = torch.float32 if case["compress"] != "none" else torch.float64
    centres, x0 = centres.to(dtype), x0.to(dtype)
    x = nn.Parameter(x0.clone())
    holder = nn.Module()
    holder.x = x
    opt = torch.optim.SGD([x], lr=lr)
    sync = localsgd.LocalSGD(holder, opt, schedule=Fixed(case["H"]), fragments=case["F"], delay=case["tau"],
                             mix=case["alpha"], compress=case["compress"], merge=case.get("merge", "mix"),
                             outer=NesterovOuter(0.7, 0.9) if case["outer"] else None)
    ref = _Reference(x0, centres, lr, case["H"], case["F"], case["tau"], case["alpha"], case["outer"],
                     case["compress"], case.get("merge", "mix"))
    worst = 0.0
    for t in range(1, steps + 1):
        opt.zero_grad()
        x.grad = x.detach() - centres[rank]
        opt.step()
        sync.step()
        ref.step(t)
        worst = max(worst, float((x.detach() - ref.xs[rank]).abs().max()))
    sync.finalize()
    ref.finalize(steps)
    worst = max(worst, float((x.detach() - ref.xs[rank]).abs().max()))
    return worst


CASES = [
    {"H": 4, "F": 2, "tau": 1, "alpha": 0.0, "outer": False, "compress": "none"},
    {"H": 6, "F": 3, "tau": 1, "alpha": 0.5, "outer": True, "compress": "none"},
    {"H": 4, "F": 1, "tau": 3, "alpha": 0.25, "outer": True, "compress": "none"},
    {"H": 4, "F": 2, "tau": 1, "alpha": 0.0, "outer": True, "compress": "int8"},
    {"H": 4, "F": 4, "tau": 0, "alpha": 0.0, "outer": False, "compress": "int4"},
    {"H": 4, "F": 2, "tau": 1, "alpha": 0.5, "outer": False, "compress": "bf16"},
    {"H": 8, "F": 2, "tau": 3, "alpha": 0.0, "outer": False, "compress": "none", "merge": "progress"},
    {"H": 4, "F": 2, "tau": 1, "alpha": 0.0, "outer": True, "compress": "int8", "merge": "progress"},
]


def _all_cases(rank: int, world: int) -> list[float]:
    return [_quadratic_vs_reference(rank, world, case) for case in CASES]


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_delayed_fragments_follow_the_reference_on_a_quadratic(world: int) -> None:
    for worst in run_ok(_all_cases, world, timeout_s=180):
        for case, diff in zip(CASES, worst):
            tol = 1e-12  # float64, the same operations
            if case["compress"] != "none":
                tol = 1e-5  # float32: the same codes; the decoded sums rounded in float32 in another order (ulps)
            if case["compress"] in codec.CAST_DTYPES and world > 2:
                tol = 2**-7 * 3  # the ring adds bf16 values in its own order: bf16 rounding (|x| <= ~3)
            assert diff <= tol, (case, diff)


def _nan_in_flight(rank: int, world: int, compress: str = "none") -> dict:
    """Rank 1's fragment 0 turns NaN right before it leaves at step 6 (H=4, F=2, τ=1): every rank must
    raise when it would land (step 7), and no rank may have applied it. With a block code (float32: the
    native codec where it is built) the check words ride inside the all-gather of the codes."""
    model = _bn_model() if compress == "none" else _bn_model().float()
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(4), fragments=2, delay=1, compress=compress)
    error = ""
    try:
        for step in range(1, 12):
            if rank == 1 and step == 6:
                with torch.no_grad():
                    model[0].weight[0, 0] = float("nan")
            sync.step(loss=torch.tensor(1.0))
    except NonFiniteError as exc:
        error = str(exc)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {"error": error, "step": sync.local_step, "finite": finite}


@pytest.mark.slow
@pytest.mark.parametrize("compress", ["none", "int8"])
def test_a_nan_in_an_in_flight_fragment_is_caught_and_never_applied(compress: str) -> None:
    out = run_ok(_nan_in_flight, 2, compress, timeout_s=60)
    for result in out:
        assert "rank 1 at step 6" in result["error"] and "fragment 0 of 2" in result["error"]
        assert result["step"] == 7  # raised when it would have landed
    assert out[0]["finite"]  # rank 0 never took rank 1's NaN


def _progress_to_the_end(rank: int, world: int, compress: str) -> list[float]:
    """merge=progress with the last fragment launched at the last step: finalize applies it with no progress."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sync = localsgd.LocalSGD(model, opt, schedule=Fixed(4), fragments=2, delay=1, merge="progress", compress=compress)
    for step in range(1, 23):  # fragment 0 leaves at step 22 and lands in finalize
        gen = torch.Generator().manual_seed(100 * rank + step)
        loss = nn.functional.cross_entropy(model(torch.randn(16, 6, generator=gen)),
                                           torch.randint(0, 3, (16,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync.step(loss=loss)
    sync.finalize()
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).tolist()


@pytest.mark.slow
@pytest.mark.parametrize("compress", ["none", "int8"])
def test_finalize_leaves_identical_replicas_when_a_progress_merge_lands_at_its_launch_step(compress: str) -> None:
    # live + (x̄ − sent) with live = sent rounds differently on each rank: such a landing must copy x̄
    first, second = run_ok(_progress_to_the_end, 2, compress, timeout_s=60)
    assert first == second


def _shifted_clock(rank: int, world: int) -> str:
    """Rank 1's step counter runs 4 ahead: the same calls sync the same fragments, but the step in the
    check words differs, which the check that rides with the int4 codes must catch on every rank."""
    model = _bn_model().float()
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(4), fragments=2, delay=1, compress="int4")
    sync.local_step = 4 * rank
    try:
        for _ in range(8):
            sync.step(loss=torch.tensor(1.0))
    except ScheduleDisagreementError as exc:
        return str(exc)
    return ""


@pytest.mark.slow
def test_ranks_whose_steps_disagree_fail_at_the_first_code_that_lands() -> None:
    for message in run_ok(_shifted_clock, 2, timeout_s=60):
        assert "step" in message and "[2, 6]" in message, message


def _bytes_and_identity(rank: int, world: int, compress: str) -> dict:
    model = _bn_model().float()
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(4), fragments=2, compress=compress)
    bounds = fragment_bounds(sum(p.numel() for p in model.parameters()), 2)
    offsets = sync_offsets(4, 2)
    gen = torch.Generator().manual_seed(rank)

    def agree(lo: int, hi: int) -> bool:
        params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])[lo:hi]
        gathered = [torch.empty_like(params) for _ in range(world)]
        torch.distributed.all_gather(gathered, params)
        return all(torch.equal(gathered[0], g) for g in gathered)

    landed = []
    for t in range(1, 17):
        with torch.no_grad():
            model[0].weight.add_(torch.randn(model[0].weight.shape, generator=gen))
            model[3].weight.add_(torch.randn(model[3].weight.shape, generator=gen))
        if sync.step():
            lo, hi = bounds[offsets.index(t % 4)]
            landed.append((agree(lo, hi), agree(0, bounds[-1][1])))  # (the fragment that landed, everything)
    syncs_before_end = sync.stats.fragment_syncs
    assert sync.finalize()  # fragment 0 landed at step 14 and moved since; fragment 1 landed at 16
    return {"bytes": sync.stats.bytes, "syncs": (syncs_before_end, sync.stats.fragment_syncs), "landed": landed,
            "final": agree(0, bounds[-1][1]), "sizes": [f.numel for f in sync.streaming.fragments]}


@pytest.mark.long
@pytest.mark.slow
def test_stats_bytes_equal_the_wire_format_exactly_and_replicas_agree_after_each_fragment() -> None:
    for compress in ("none", "bf16", "int8", "int4"):
        for out in run_ok(_bytes_and_identity, 2, compress, timeout_s=60):
            first, last = (codec.wire_bytes(n, compress, 4) for n in out["sizes"])
            assert out["syncs"] == (8, 9) and out["bytes"] == 4 * (first + last) + first, compress
            # The fragment that landed agrees on every rank; the other one still differs until finalize.
            assert out["landed"] == [(True, False)] * 8 and out["final"], compress


def _resume_mid_flight(rank: int, world: int, extra: dict) -> bool:
    """Checkpoint the engine while a fragment is in flight (H=4, F=2, τ=1: fragment 0 leaves at 6, lands
    at 7), continue; a fresh engine loaded from that checkpoint must end bit-identical."""
    extra = dict(extra)
    dtype = torch.float32 if extra.pop("float32", False) else torch.float64  # float32: the native codec's buffers
    outer = extra.pop("outer", True)
    kw = {"fragments": 2, "delay": 1, "compress": "int8", **extra}

    def build():
        model = _bn_model().to(dtype)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        return model, opt, localsgd.LocalSGD(model, opt, schedule=Fixed(4),
                                             outer=NesterovOuter(0.7, 0.9) if outer else None, **kw)

    def train(model, opt, sync, steps):
        for step in steps:
            gen = torch.Generator().manual_seed(1000 * rank + step)
            x = torch.randn(8, 5, generator=gen, dtype=dtype)
            loss = nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,), generator=gen))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync.step(loss=loss)

    model, opt, sync = build()
    train(model, opt, sync, range(1, 7))
    saved = ({k: v.clone() for k, v in model.state_dict().items()}, {**opt.state_dict()}, sync.state_dict())
    saved = torch.utils._pytree.tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, saved)
    train(model, opt, sync, range(7, 15))
    sync.finalize()
    a = model.state_dict()
    model2, opt2, sync2 = build()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sync2.load_state_dict(saved[2])
    train(model2, opt2, sync2, range(7, 15))
    sync2.finalize()
    b = model2.state_dict()
    return all(torch.equal(a[k], b[k]) for k in a) and sync.stats.bytes == sync2.stats.bytes


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{}, {"merge": "progress"}, {"merge": "progress", "compress": "none"},
                                   {"merge": "progress", "float32": True, "outer": False}])
def test_a_checkpoint_with_a_fragment_in_flight_resumes_bit_for_bit(extra: dict) -> None:
    # merge=progress: the copy each rank sent rides in the checkpoint (its progress is added to the average);
    # float32 without an outer step: the native encode from the live parameters and the native landing
    assert all(run_ok(_resume_mid_flight, 2, extra, timeout_s=60))


@pytest.mark.parametrize("kw", [{"mix": 0.5}, {"merge": "progress"}, {"compress": "int8"}, {"compress": "fp16"},
                                {"compress": "int4", "merge": "progress"}])
def test_world_one_streaming_trains_exactly_like_no_sync(kw: dict) -> None:
    def run(sync_kw: dict | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Linear(6, 3)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        sync = None if sync_kw is None else localsgd.LocalSGD(model, opt, schedule=Fixed(4), fragments=2,
                                                              delay=1, **sync_kw)
        gen = torch.Generator().manual_seed(1)
        for _ in range(13):
            opt.zero_grad()
            model(torch.randn(5, 6, generator=gen)).square().mean().backward()
            opt.step()
            if sync is not None:
                sync.step()
        if sync is not None:
            sync.finalize()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(None), run(kw)):
        assert torch.equal(a, b)


class _LrSpy(localsgd.outer.SlowMoOuter):
    """SlowMo that records (the inner LR it was given, the optimizer's LR when it was called)."""

    calls: list[tuple[float, float]] = []  # a class attribute: the per-fragment deep copies share it
    optimizer: torch.optim.Optimizer | None = None

    def step(self, global_params, averaged, inner_lr):  # type: ignore[no-untyped-def]
        _LrSpy.calls.append((inner_lr, _LrSpy.optimizer.param_groups[0]["lr"]))
        super().step(global_params, averaged, inner_lr)


def test_a_delayed_fragment_steps_slowmo_with_the_lr_of_its_round_not_of_its_landing() -> None:
    # SlowMo divides the round's displacement by the inner LR gamma_t; the LR changes every step here, so a
    # fragment that lands tau = 2 steps after it left must be given the LR of the step it left at.
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    _LrSpy.calls, _LrSpy.optimizer = [], opt
    sync = localsgd.LocalSGD(model, opt, schedule=Fixed(8), fragments=2, delay=2, outer=_LrSpy())
    for t in range(16):
        opt.param_groups[0]["lr"] = 1.0 / (t + 1)  # step t runs at 1/(t+1): the step is readable from the LR
        model(torch.randn(3, 4)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sync.step()
    assert len(_LrSpy.calls) == 3  # launched after local steps 4, 8, 12 (the one of step 16 is in flight)
    assert all(round(1 / now) - round(1 / given) == 2 for given, now in _LrSpy.calls)


def test_world_one_streaming_is_plain_training_and_counts_no_bytes() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(4), fragments=2, delay=1, compress="int8")
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(9):
        sync.step()
    sync.finalize()
    # The code of a zero pseudo-gradient is exact, so one rank's "average" leaves it where it was.
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert sync.stats.bytes == 0 and sync.stats.rounds >= 2 and math.isfinite(sync.stats.seconds)



# ---------------------------------------------------------------------- the trainer, killed and resumed
STREAM_RUN = [*TINY, "schedule.H=4", "sync.fragments=2", "sync.delay=1", "sync.compress=int8", "outer=nesterov",
              "checkpoint.every_rounds=1", "checkpoint.keep_latest_k=3", "trainer.max_steps=16", "trainer.log_every=1"]


@pytest.mark.slow
def test_a_streaming_run_killed_with_a_fragment_in_flight_resumes_bit_for_bit(tmp_path: Path) -> None:
    # H=4, F=2, τ=1: fragment 0 leaves at step 6 and lands at 7, where rank 1 dies; rounds end (and
    # checkpoints are taken) where fragment 1 lands: steps 5, 9, 13, then the final average at 16.
    ref = torchrun(tmp_path, tmp_path / "ref", STREAM_RUN)
    assert ref.returncode == 0, output(ref)
    hit = torchrun(tmp_path, tmp_path / "hit", STREAM_RUN, max_restarts=1, LOCALSGD_FAULT="kill:rank=1,step=7")
    assert hit.returncode == 0, output(hit)
    starts = records(tmp_path / "hit", "start")
    assert [s["step"] for s in starts] == [0, 5] and starts[1]["resumed"]
    assert [r["step"] for r in records(tmp_path / "hit", "train")] == list(range(1, 17))
    a = torch.load(tmp_path / "ref/checkpoints/step-16/model.pt")
    b = torch.load(tmp_path / "hit/checkpoints/step-16/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "hit" / "checkpoints").glob("step-*"))
    assert kept == [9, 13, 16]
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary == {**summary, **json.loads((tmp_path / "hit" / "summary.json").read_text()),
                       "wall_seconds": summary["wall_seconds"], "run_dir": summary["run_dir"],
                       "comm_seconds": summary["comm_seconds"], "restart_count": summary["restart_count"]}
    assert "fragments=2 delay=1 int8+ef" in summary["schedule"]
