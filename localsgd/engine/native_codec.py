"""The block codes of :mod:`.compress`, fused into one C pass per block, built on first use.

The torch path of an int8/int4 fragment sync makes about ten passes over the values to encode
(x_ref − x, + e, |·|, max, ÷ s, round, clamp, the residual, the cast, the pack) and four per rank
to decode, then three more to land the average (x_ref ← x̄, and live + (x̄ − sent) for a delayed
merge). ``codec.c`` (beside this file) does the same arithmetic value by value, a block at a time in
a one-block scratch: :func:`encode` reads x_ref, x (the live parameters) and e once and writes the
codes, the scales, the new residual and, for a delayed merge, the copy of x it needs;
:func:`land` reads every rank's code once and writes x̄ = x_ref − (1/K) Σ_k decode(code_k) into x_ref
and into the live parameters (x̄, or live + (x̄ − sent)). Measured on one 275K-value fragment (one
thread, ``benchmarks/codec.py``): int8 encode, decode and landing 3–4× faster than the torch path,
int4 4–6× (its nibbles cost the torch path the most).

**The same bits.** Every float operation in ``codec.c`` is one IEEE-754 binary32 operation, rounded
to nearest, in the order the torch path applies them (each product rounded before its sum: both
paths avoid fused multiply-adds), and round-half-even is ``(x + 1.5·2²³) − 1.5·2²³``, exact for
|x| < 2²². So the codes, the scales, the residuals and the decoded average equal the torch path's
bit for bit (tested over seeds, sizes, block widths and world sizes), and a run may mix ranks that
use either path: every rank decodes the same codes into the same floats. A library is used only
after it reproduces the torch path on a probe vector on this machine (a compiler that breaks IEEE
semantics is caught there, and the torch path is used instead).

**Building.** The first use compiles ``codec.c`` with the C compiler (``$CC``, else ``cc``, ``gcc``
or ``clang``; ``-O3 -ffp-contract=off``, ``-march=native`` where accepted) into
``$LOCALSGD_CACHE_DIR`` (else ``~/.cache/localsgd``), named by a hash of the source, the compiler,
the flags and this CPU's feature flags, so a cluster of mixed nodes never loads a library built for
another CPU; concurrent ranks write it atomically. About 0.3 s once per machine.
``LOCALSGD_NATIVE_CODEC=0`` turns it off (the torch path, the same bits); ``=1`` makes a failed
build an error instead of a fallback. CUDA tensors, dtypes other than float32 and non-contiguous
buffers take the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from ..errors import ConfigError, LocalSGDError
from . import compress as codec

SOURCE = Path(__file__).with_name("codec.c")
ABI = 2
BASE_FLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-fno-fast-math", "-ffp-contract=off")
ENV = "LOCALSGD_NATIVE_CODEC"

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32


class NativeCodecError(LocalSGDError):
    """The native codec was required (``LOCALSGD_NATIVE_CODEC=1``) and could not be built or loaded."""


_lib: ctypes.CDLL | None = None
_tried = False
why_not = ""  # why the torch path is in use ("" while the native codec is loaded or not yet tried)


def mode() -> str:
    """``off``, ``on`` (required) or ``auto``, from ``$LOCALSGD_NATIVE_CODEC``."""
    value = os.environ.get(ENV, "").strip().lower()
    if value in ("0", "off", "false", "no"):
        return "off"
    if value in ("1", "on", "true", "yes", "require"):
        return "on"
    if value in ("", "auto"):
        return "auto"
    raise ConfigError(f"{ENV}={value!r}: use 0 (the torch path), 1 (native, an error if it cannot be built) or auto")


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return shutil.which(cc) or cc
    return next((found for name in ("cc", "gcc", "clang") if (found := shutil.which(name))), None)


def _cpu_signature() -> str:
    """What decides which instructions ``-march=native`` may emit: the CPU's feature flags on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() + platform.machine()


def cache_dir() -> Path:
    from ..data.mnist1d import cache_root

    return cache_root()


def _build(cc: str, target: Path) -> None:
    """Compile into a temporary file beside ``target``, then rename: ranks building at once never see half a
    library. ``-march=native`` is dropped when the compiler refuses it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        errors = []
        for extra in (("-march=native",), ()):
            proc = subprocess.run([cc, *BASE_FLAGS, *extra, "-o", tmp, str(SOURCE)], capture_output=True, text=True,
                                  timeout=120)
            if proc.returncode == 0:
                os.replace(tmp, target)
                return
            errors.append(proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"])
        raise RuntimeError(f"{cc} failed: {errors[-1][0]}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.lsgd_codec_abi.restype = _I32
    if lib.lsgd_codec_abi() != ABI:
        raise RuntimeError(f"{path} has ABI {lib.lsgd_codec_abi()}, not {ABI}")
    lib.lsgd_encode.restype = _I64
    lib.lsgd_encode.argtypes = [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I32, _I32]
    lib.lsgd_land.restype = None
    lib.lsgd_land.argtypes = [_P, _P, _I64, _I32, _P, _P, _I64, _I32, _P, _P, _I64, _I64, _I64, _I32,
                              ctypes.c_float, _I32]
    return lib


def library_path(cc: str) -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), cc.encode(), " ".join(BASE_FLAGS).encode(), platform.machine().encode(),
                 _cpu_signature().encode()):
        key.update(part)
        key.update(b"\0")
    return cache_dir() / f"codec-{key.hexdigest()[:16]}.so"


def _load() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install cc, gcc or clang)")
    path = library_path(cc)
    try:
        if not path.exists():
            _build(cc, path)
        lib = _open(path)
    except OSError:  # a truncated or foreign file under our name: build it again, once
        path.unlink(missing_ok=True)
        _build(cc, path)
        lib = _open(path)
    mismatch = _probe(lib)
    if mismatch:
        raise RuntimeError(f"{path} does not reproduce the torch path's bits ({mismatch})")
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded native codec, or None (the torch path): built and checked on the first call."""
    global _lib, _tried, why_not
    if _tried:
        return _lib
    _tried = True
    how = mode()
    if how == "off":
        why_not = f"{ENV}=0"
        return None
    try:
        _lib = _load()
    except Exception as exc:  # noqa: BLE001 - any failure means the torch path, which gives the same bits
        why_not = f"native codec unavailable: {exc}"
        if how == "on":
            raise NativeCodecError(f"{ENV}=1 but the native codec could not be used: {exc}; unset {ENV} to "
                                   "fall back to the torch path (the same results, slower)") from exc
    return _lib


def reset() -> None:
    """Forget the loaded library and retry on the next :func:`library` call (tests, after changing the env)."""
    global _lib, _tried, why_not
    _lib, _tried, why_not = None, False, ""


def usable(*tensors: torch.Tensor) -> bool:
    """Whether these buffers can take the native path (CPU, float32, contiguous) and it is available."""
    if not all(t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() for t in tensors):
        return False
    return library() is not None


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _encode(lib: ctypes.CDLL, ref: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
            work: torch.Tensor, compress: str, block: int, tail: torch.Tensor | None = None,
            copy_out: torch.Tensor | None = None, wire: torch.Tensor | None = None) -> torch.Tensor:
    n = ref.numel()
    codes = codec.code_bytes(n, compress, block)
    length = codec.wire_bytes(n, compress, 4, block)  # the codes, then the float32 scales
    total = length + (0 if tail is None else tail.numel())
    wire = torch.empty(total, dtype=torch.uint8) if wire is None else wire
    if tail is not None:
        wire[length:].copy_(tail)
    lib.lsgd_encode(ref.data_ptr(), x.data_ptr(), _ptr(copy_out), _ptr(residual), work.data_ptr(),
                    wire.data_ptr(), wire.data_ptr() + codes, n, block, codec.QMAX[compress],
                    int(compress == "int4"))
    return wire


def _land(lib: ctypes.CDLL, ref: torch.Tensor, wires: torch.Tensor, world: int, work: torch.Tensor,
          compress: str, block: int, *, out: torch.Tensor | None = None, out_from: int = 0,
          update_ref: bool = False, live: torch.Tensor | None = None, sent: torch.Tensor | None = None) -> None:
    weight = 1.0 / world
    n_live = 0 if live is None else live.numel()
    lib.lsgd_land(ref.data_ptr(), wires.data_ptr(), wires.numel() // world, world, work.data_ptr(), _ptr(out),
                  out_from, int(update_ref), _ptr(live), _ptr(sent), n_live, ref.numel(), block,
                  int(compress == "int4"), weight, int(weight != 1.0))


def work_numel(n: int, block: int) -> int:
    """Floats of scratch :func:`encode` and :func:`land` need: one block's values."""
    return max(1, min(block, n))


def encode(ref: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None, work: torch.Tensor,
           compress: str, block: int, tail: torch.Tensor | None = None, *, copy_out: torch.Tensor | None = None,
           wire: torch.Tensor | None = None) -> torch.Tensor:
    """The wire buffer (codes, scales, then ``tail``'s bytes: :func:`.compress.pack_code`'s layout) of
    Δ = ref − x (+ residual), and the new residual in place. ``work``: float32 scratch of at least
    :func:`work_numel` values; ``copy_out`` (optional) receives ``x`` in the same pass; ``wire`` (optional,
    ``compress.wire_bytes`` plus the tail long) is written instead of a fresh buffer. Needs :func:`usable`."""
    lib = library()
    n = ref.numel()
    assert lib is not None and x.numel() == n and work.numel() >= work_numel(n, block) and usable(ref, x, work)
    assert residual is None or (residual.numel() == n and usable(residual))
    assert copy_out is None or (copy_out.numel() == n and usable(copy_out))
    tail_bytes = 0 if tail is None else tail.numel()
    assert wire is None or (wire.dtype == torch.uint8 and wire.is_contiguous()
                            and wire.numel() == codec.wire_bytes(n, compress, 4, block) + tail_bytes)
    return _encode(lib, ref, x, residual, work, compress, block, tail, copy_out, wire)


def land(ref: torch.Tensor, wires: torch.Tensor, world: int, work: torch.Tensor, compress: str, block: int, *,
         out: torch.Tensor | None = None, out_from: int = 0, update_ref: bool = False,
         live: torch.Tensor | None = None, sent: torch.Tensor | None = None) -> None:
    """One pass from the gathered codes: a = ref − (1/world) Σ_r decode(code_r) (``wires``: ``world`` wire
    buffers back to back, summed in rank order), written to ``out[out_from:]``, to ``ref`` (``update_ref``)
    and to ``live`` (its first ``live.numel()`` values): a itself, or with ``sent`` live + (a − sent).
    The same bits as :func:`.compress.decode_mean` followed by those copies and that merge in torch.
    Needs :func:`usable`."""
    lib = library()
    n = ref.numel()
    assert lib is not None and wires.dtype == torch.uint8 and wires.is_contiguous() and usable(ref, work)
    # every rank's code and scales must be there: C reads them at a stride of wires.numel() // world
    assert wires.numel() % world == 0 and wires.numel() // world >= codec.wire_bytes(n, compress, 4, block)
    assert work.numel() >= work_numel(n, block) and (out is None or out.numel() == n)
    assert live is None or live.numel() <= n
    assert sent is None or (live is not None and sent.numel() >= live.numel())
    for t in (out, live, sent):
        assert t is None or usable(t)
    _land(lib, ref, wires, world, work, compress, block, out=out, out_from=out_from, update_ref=update_ref,
          live=live, sent=sent)


def decode_mean(ref: torch.Tensor, wires: torch.Tensor, world: int, out: torch.Tensor, compress: str,
                block: int, work: torch.Tensor | None = None) -> torch.Tensor:
    """``out = ref − (1/world) Σ_r decode(code_r)``, the codes in rank order in ``wires`` (``world`` wire
    buffers back to back). Needs :func:`usable`."""
    work = torch.empty(work_numel(ref.numel(), block)) if work is None else work
    land(ref, wires, world, work, compress, block, out=out)
    return out


def _probe(lib: ctypes.CDLL) -> str:
    """'' if ``lib`` reproduces the torch path on a probe (both codes, odd sizes, a short last block, a zero
    block, odd block widths, with and without error feedback, 1 to 3 ranks, the landing's copies and
    merge); else what differed."""
    g = torch.Generator().manual_seed(20261206)
    for compress in codec.QMAX:
        for n, block in ((1001, 256), (515, 7)):
            ref = torch.randn(n, generator=g)
            work = torch.empty(work_numel(n, block))
            wires = []
            for r in range(3):
                send = ref - torch.randn(n, generator=g) * 10.0 ** -r
                send[:block] = ref[:block]  # rank 1, without a residual: a block of zeros, scale 0
                residual = torch.randn(n, generator=g) * 1e-3 if r != 1 else None
                mine = None if residual is None else residual.clone()
                want = codec.encode_delta(ref, send, residual, compress, block)
                copy = torch.empty(n) if r != 2 else None
                got = _encode(lib, ref, send, mine, work, compress, block, copy_out=copy)
                if (not torch.equal(want, got) or (copy is not None and not torch.equal(copy, send))
                        or (residual is not None and not torch.equal(residual, mine))):
                    return f"encode {compress}, {n} values, block {block}"
                wires.append(want)
            for world in (1, 2, 3):
                both = torch.cat(wires[:world])
                want = codec.decode_mean(ref, both, world, compress, block)
                kept, out = ref.clone(), torch.empty(n)  # the decode alone: x_ref untouched, every value out
                _land(lib, kept, both, world, work, compress, block, out=out)
                if not torch.equal(out, want) or not torch.equal(kept, ref):
                    return f"decode {compress}, {n} values, block {block}, {world} ranks"
                live, sent = torch.randn(n, generator=g), torch.randn(n, generator=g)
                merged = live.clone()
                merged[: n - 5].add_(torch.sub(want[: n - 5], sent[: n - 5]))  # the torch path's merge
                got_ref, got_live, out = ref.clone(), live.clone(), torch.full((n,), 7.0)
                _land(lib, got_ref, both, world, work, compress, block, out=out, out_from=n - 9, update_ref=True,
                      live=got_live[: n - 5], sent=sent)
                if (not torch.equal(got_ref, want) or not torch.equal(got_live, merged)
                        or not torch.equal(out[n - 9 :], want[n - 9 :]) or bool((out[: n - 9] != 7.0).any())):
                    return f"land {compress}, {n} values, block {block}, {world} ranks"
    return ""
