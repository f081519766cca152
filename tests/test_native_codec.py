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

from localsgd.engine import compress as codec
from localsgd.engine import native_codec

from .distributed import run_ok
from .test_streaming import _progress_to_the_end

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
    wires = []
    for send, residual in zip(sends, residuals):
        want_res = None if residual is None else residual.clone()
        got_res = None if residual is None else residual.clone()
        want = codec.encode_delta(ref, send, want_res, compress, block)
        got = native_codec.encode(ref, send, got_res, torch.empty(n), compress, block)
        assert torch.equal(want, got)  # codes and scales
        assert want_res is None or torch.equal(want_res, got_res)
        wires.append(got)
    for world in (1, 2, 3, 4):
        both = torch.cat(wires[:world])
        want = codec.decode_mean(ref, both, world, compress, block)
        got = native_codec.decode_mean(ref, both, world, torch.full((n,), float("nan")), compress, block)
        assert torch.equal(want, got), world


@needs_native
@pytest.mark.parametrize("compress", ["int8", "int4"])
def test_the_native_code_decodes_within_half_a_quantum_and_carries_its_tail(compress: str) -> None:
    g = torch.Generator().manual_seed(3)
    n, block, qmax = 1000, 256, codec.QMAX[compress]
    ref, send = torch.randn(n, generator=g), torch.randn(n, generator=g)
    tail = torch.arange(24, dtype=torch.uint8)
    wire = native_codec.encode(ref, send, None, torch.empty(n), compress, block, tail=tail)
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
    def encode_zeros(ref, send, residual, work, codes, scales, n, block, qmax, pack4):
        return None  # writes nothing: the wire keeps whatever torch.empty held, or zeros

    def decode_copy(*args):
        return None

    fake = SimpleNamespace(lsgd_encode=encode_zeros, lsgd_decode_mean=decode_copy)
    assert native_codec._probe(fake).startswith("encode int8")


# ------------------------------------------------------------------------------- end to end, 2 ranks
def _streaming_run(rank: int, world: int, native_ranks: tuple[int, ...]) -> dict:
    """test_streaming's 2-rank int8 run with merge=progress to the end, on the path this rank is given."""
    import os

    os.environ[native_codec.ENV] = "1" if rank in native_ranks else "0"
    native_codec.reset()
    path = "native" if native_codec.library() is not None else native_codec.why_not
    return {"params": _progress_to_the_end(rank, world, "int8"), "path": path}


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
