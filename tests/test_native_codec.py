"""The fused C block codes (localsgd.engine.native_codec) against the torch path of localsgd.engine.compress.

The claim is the same bits: codes, scales, residuals and decoded averages equal, over seeds, both codes,
sizes that leave a short last block, odd block widths and odd counts (int4's pad nibble), zero blocks,
with and without error feedback, at 1 to 4 ranks; and, end to end, a 2-rank streaming run ends on the same
parameters whether both ranks, one or neither use the native path. The build's failure modes: no compiler
(the torch path, or a clear error when the native one is required), a corrupt cached library (rebuilt),
a library that computes something else (refused by the probe).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from localsgd.engine import compress as codec
from localsgd.engine import native_codec

from .distributed import run_ok
from .test_streaming import _bn_model, _progress_to_the_end

needs_native = pytest.mark.skipif(native_codec.mode() == "off" or native_codec.library() is None,
                                  reason=f"native codec unavailable here: {native_codec.why_not}")


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A cache of its own and a loader that has tried nothing yet; the process's loader is restored after."""
    monkeypatch.setenv("LOCALSGD_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(native_codec.ENV, raising=False)
    native_codec.reset()
    yield tmp_path
    native_codec.reset()


def _case(seed: int, n: int, block: int, world: int) -> tuple[torch.Tensor, list[torch.Tensor], list]:
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, generator=g) * 2
    sends, residuals = [], []
    for r in range(world):
        send = ref - torch.randn(n, generator=g) * 10.0 ** (-r - 1)
        send[: min(block, n)] = ref[: min(block, n)]  # the first block is all zeros: scale 0
        sends.append(send)
        residuals.append(torch.randn(n, generator=g) * 1e-3 if r % 2 == 0 else None)
    return ref, sends, residuals


@needs_native
@pytest.mark.parametrize("compress", ["int8", "int4"])
@pytest.mark.parametrize(("n", "block"), [(1, 256), (255, 256), (1001, 256), (4096, 256), (515, 7), (999, 64)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_native_codes_and_averages_are_the_torch_paths_bits(compress: str, n: int, block: int, seed: int) -> None:
    ref, sends, residuals = _case(seed, n, block, 4)
    work = torch.full((native_codec.work_numel(n, block),), float("nan"))  # one block: no fragment-sized scratch
    wires = []
    for r, (send, residual) in enumerate(zip(sends, residuals)):
        want_res = None if residual is None else residual.clone()
        got_res = None if residual is None else residual.clone()
        want = codec.encode_delta(ref, send, want_res, compress, block)
        copy = torch.full((n,), float("nan")) if r % 2 else None  # the copy a delayed merge keeps, same pass
        wire = torch.full((want.numel(),), 0xA5, dtype=torch.uint8) if r < 2 else None  # a kept wire buffer
        got = native_codec.encode(ref, send, got_res, work, compress, block, copy_out=copy, wire=wire)
        assert torch.equal(want, got)  # codes and scales (int4: the pad nibble too)
        assert want_res is None or torch.equal(want_res, got_res)
        assert copy is None or torch.equal(copy, send)
        assert wire is None or got is wire
        wires.append(got)
    for world in (1, 2, 3, 4):
        both = torch.cat(wires[:world])
        want = codec.decode_mean(ref, both, world, compress, block)
        got = native_codec.decode_mean(ref, both, world, torch.full((n,), float("nan")), compress, block)
        assert torch.equal(want, got), world


@needs_native
@pytest.mark.parametrize("compress", ["int8", "int4"])
@pytest.mark.parametrize(("n", "block"), [(1, 256), (1001, 256), (515, 7), (999, 64)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_native_landing_is_the_torch_paths_decode_copies_and_merge(compress: str, n: int, block: int,
                                                                        seed: int) -> None:
    """x_ref ← x̄, live ← x̄ or live + (x̄ − sent) over the first n_live values, x̄ into ``out`` after them."""
    ref, sends, residuals = _case(seed, n, block, 3)
    wires = torch.cat([codec.encode_delta(ref, s, r, compress, block) for s, r in zip(sends, residuals)])
    g = torch.Generator().manual_seed(seed + 10)
    work = torch.empty(native_codec.work_numel(n, block))
    cases = ((1, 0, "copy"), (2, n, "progress"), (3, (n + 1) // 2, "progress"), (2, max(n - 3, 1), "copy"))
    for world, n_live, merge in cases:
        both = wires[: world * (wires.numel() // 3)]
        mean = codec.decode_mean(ref, both, world, compress, block)
        live, sent = torch.randn(n, generator=g), torch.randn(n, generator=g)
        want_live = live.clone()
        if merge == "progress":
            want_live[:n_live].add_(torch.sub(mean[:n_live], sent[:n_live]))  # the torch path's write
        else:
            want_live[:n_live].copy_(mean[:n_live])
        got_ref, got_live, out = ref.clone(), live.clone(), torch.full((n,), float("nan"))
        native_codec.land(got_ref, both, world, work, compress, block, out=out, out_from=n_live, update_ref=True,
                          live=got_live[:n_live] if n_live else None,
                          sent=sent if merge == "progress" and n_live else None)
        assert torch.equal(got_ref, mean), world
        assert torch.equal(got_live, want_live), world  # and nothing written past n_live
        assert torch.equal(out[n_live:], mean[n_live:]) and bool(out[:n_live].isnan().all()), world


@needs_native
@pytest.mark.parametrize("compress", ["int8", "int4"])
def test_the_native_code_decodes_within_half_a_quantum_and_carries_its_tail(compress: str) -> None:
    g = torch.Generator().manual_seed(3)
    n, block, qmax = 1000, 256, codec.QMAX[compress]
    ref, send = torch.randn(n, generator=g), torch.randn(n, generator=g)
    tail = torch.arange(24, dtype=torch.uint8)
    wire = native_codec.encode(ref, send, None, torch.empty(block), compress, block, tail=tail)
    assert wire.numel() == codec.wire_bytes(n, compress, 4, block) + 24 and torch.equal(wire[-24:], tail)
    mean = native_codec.decode_mean(ref, wire, 1, torch.empty(n), compress, block)  # ref − decode(code(ref − send))
    delta = ref - send
    for b in range(0, n, block):
        quantum = delta[b : b + block].abs().max() / qmax
        assert ((mean - send)[b : b + block].abs() <= quantum / 2 * (1 + 1e-5) + 1e-6).all()


def test_off_means_the_torch_path(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native_codec.ENV, "0")
    assert native_codec.library() is None and native_codec.why_not == "LOCALSGD_NATIVE_CODEC=0"
    assert not native_codec.usable(torch.zeros(3))


def test_without_a_compiler_auto_falls_back_and_required_fails_with_the_reason(
        fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", str(fresh_build / "no-such-cc"))
    assert native_codec.library() is None and "native codec unavailable" in native_codec.why_not
    native_codec.reset()
    monkeypatch.setenv(native_codec.ENV, "1")
    with pytest.raises(native_codec.NativeCodecError, match=r"LOCALSGD_NATIVE_CODEC=1 but .*unset"):
        native_codec.library()
    monkeypatch.setenv(native_codec.ENV, "sometimes")
    with pytest.raises(ValueError, match="LOCALSGD_NATIVE_CODEC='sometimes'"):
        native_codec.mode()


@needs_native
def test_a_corrupt_cached_library_is_rebuilt(fresh_build: Path) -> None:
    cc = native_codec._compiler()
    assert cc is not None
    path = native_codec.library_path(cc)
    path.write_bytes(b"not a shared library")
    assert native_codec.library() is not None and path.read_bytes()[:4] != b"not "
    assert not list(fresh_build.glob("*.tmp"))  # no half-built files left beside it


def test_the_probe_refuses_a_library_that_computes_something_else() -> None:
    def encode_zeros(ref, x, copy_out, residual, work, codes, scales, n, block, qmax, pack4):
        return None  # writes nothing: the wire keeps whatever torch.empty held, or zeros

    def land_nothing(*args):
        return None

    fake = SimpleNamespace(lsgd_encode=encode_zeros, lsgd_land=land_nothing)
    assert native_codec._probe(fake).startswith("encode int8")


@needs_native
def test_the_probe_refuses_a_landing_that_writes_too_little_or_too_much() -> None:
    real = native_codec.library()
    assert real is not None

    def land_nothing(*args):
        return None

    def land_always_into_ref(ref, wires, wire_len, world, work, out, out_from, update_ref, *rest):
        return real.lsgd_land(ref, wires, wire_len, world, work, out, out_from, 1, *rest)  # ignores update_ref

    def land_never_into_live(ref, wires, wire_len, world, work, out, out_from, update_ref, live, sent, n_live, *rest):
        return real.lsgd_land(ref, wires, wire_len, world, work, out, out_from, update_ref, None, None, 0, *rest)

    for land, what in ((land_nothing, "decode int8, 1001 values, block 256, 1 ranks"),
                       (land_always_into_ref, "decode int8, 1001 values, block 256, 1 ranks"),
                       (land_never_into_live, "land int8, 1001 values, block 256, 1 ranks")):
        assert native_codec._probe(SimpleNamespace(lsgd_encode=real.lsgd_encode, lsgd_land=land)) == what


# ------------------------------------------------------------------------------- end to end, 2 ranks
def _streaming_run(rank: int, world: int, native_ranks: tuple[int, ...]) -> dict:
    """test_streaming's 2-rank int8 run with merge=progress to the end, on the path this rank is given."""
    import os

    os.environ[native_codec.ENV] = "1" if rank in native_ranks else "0"
    native_codec.reset()
    path = "native" if native_codec.library() is not None else native_codec.why_not
    return {"params": _progress_to_the_end(rank, world, "int8"), "path": path}


def _bn_streaming_run(rank: int, world: int, native_ranks: tuple[int, ...], compress: str) -> dict:
    """A float32 BatchNorm model: its last fragment carries the float buffers after the parameters, so the
    native encode reads a gathered copy there and the landing writes the buffers from the average."""
    import os

    import localsgd
    from localsgd.schedules import Fixed

    os.environ[native_codec.ENV] = "1" if rank in native_ranks else "0"
    native_codec.reset()
    taken = {"encode_from_live": 0, "encode_from_copy": 0, "land": 0}
    encode, land = native_codec.encode, native_codec.land

    def counting_encode(*args, **kw):
        taken["encode_from_live" if kw.get("copy_out") is not None else "encode_from_copy"] += 1
        return encode(*args, **kw)

    def counting_land(*args, **kw):
        taken["land"] += 1
        return land(*args, **kw)

    native_codec.encode, native_codec.land = counting_encode, counting_land  # this rank's process only
    model = _bn_model().float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sync = localsgd.LocalSGD(model, opt, schedule=Fixed(4), fragments=2, delay=1, merge="progress", compress=compress)
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(13):
        x = torch.randn(8, 5, generator=gen) * (rank + 1)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 3, (8,), generator=gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync.step(loss=loss)
    replica = [t.detach().reshape(-1).tolist() for t in model.state_dict().values()]
    sync.finalize()
    return {"replica": replica, "final": [t.detach().reshape(-1).tolist() for t in model.state_dict().values()],
            "path": sync.streaming.codec_path, "taken": taken}


@needs_native
@pytest.mark.slow
@pytest.mark.parametrize("compress", ["int8", "int4"])
def test_a_model_with_float_buffers_streams_to_the_same_bits_on_either_path(compress: str) -> None:
    native = run_ok(_bn_streaming_run, 2, (0, 1), compress, timeout_s=90)
    torch_path = run_ok(_bn_streaming_run, 2, (), compress, timeout_s=90)
    assert [r["path"] for r in native] == ["native"] * 2
    assert [r["path"] for r in torch_path] == ["LOCALSGD_NATIVE_CODEC=0"] * 2
    # fragment 0 (parameters only) is encoded from the live parameters, fragment 1 (with the BatchNorm
    # statistics) from its gathered copy; every landing (and finalize's) is the native pass
    for r in native:
        assert r["taken"]["encode_from_live"] >= 3 and r["taken"]["encode_from_copy"] >= 3
        assert r["taken"]["land"] == r["taken"]["encode_from_live"] + r["taken"]["encode_from_copy"]
    assert all(sum(r["taken"].values()) == 0 for r in torch_path)
    for a, b in zip(native, torch_path):  # each rank's replica mid-round (a merge landed at step 13) and at the end
        assert a["replica"] == b["replica"] and a["final"] == b["final"]
    assert native[0]["final"] == native[1]["final"] and native[0]["replica"] != native[1]["replica"]


@needs_native
@pytest.mark.slow
def test_a_streaming_run_ends_on_the_same_bits_whichever_ranks_use_the_native_codec() -> None:
    both = run_ok(_streaming_run, 2, (0, 1), timeout_s=90)
    assert [r["path"] for r in both] == ["native", "native"]
    assert both[0]["params"] == both[1]["params"]
    neither = run_ok(_streaming_run, 2, (), timeout_s=90)
    assert [r["path"] for r in neither] == ["LOCALSGD_NATIVE_CODEC=0"] * 2
    mixed = run_ok(_streaming_run, 2, (1,), timeout_s=90)
    assert [r["path"] for r in mixed] == ["LOCALSGD_NATIVE_CODEC=0", "native"]
    for r in neither + mixed:  # every rank decodes the same codes into the same floats, whichever path
        assert r["params"] == both[0]["params"]


def test_the_engine_names_the_codec_path_it_uses(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import localsgd
    from localsgd.schedules import Fixed

    def path(compress: str, dtype: torch.dtype = torch.float32) -> str:
        model = torch.nn.Linear(4, 3).to(dtype)
        return localsgd.LocalSGD(model, None, schedule=Fixed(4), compress=compress).streaming.codec_path

    assert path("bf16") == ""  # casts have no block code
    if native_codec.library() is not None:
        assert path("int8", torch.float64) == "torch: the native codec takes contiguous CPU float32 buffers"
    monkeypatch.setenv(native_codec.ENV, "0")
    native_codec.reset()
    assert path("int4") == "LOCALSGD_NATIVE_CODEC=0"
    if native_codec._compiler() is not None:
        monkeypatch.setenv(native_codec.ENV, "1")
        native_codec.reset()
        assert path("int4") == "native"
