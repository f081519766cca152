"""Compressed averaging payloads: casts, block-scaled int8/int4, and error feedback.

What travels is the *pseudo-gradient* Δ_k = x_ref − x_k, the displacement of replica k since the
last average x_ref (identical on every rank), not the parameters: Δ is small and centred, so a
low-bit code of it loses far less than one of the parameters, and with an outer optimizer Δ is
exactly the quantity DiLoCo steps on (Douillard et al., arXiv 2311.08105, Alg. 1). The average is
decoded in float32 (or the buffer's dtype): x̄ = x_ref − (1/K) Σ_k decode(code(Δ_k)).

* **Casts** (``bf16``, ``fp16``): Δ is cast and summed by the all-reduce itself (Gloo and NCCL both
  reduce bf16/fp16); the sum is rounded to the format at every addition.
* **Block-scaled integers** (``int8``, ``int4``): per block of ``block`` values (256 by default) one
  float32 scale s = max|v| / q_max, q = round(v / s) clamped to ±q_max (127 or 7), int4 packed two
  to a byte. Quantized codes cannot be summed in place (each rank has its own scales), so every
  rank's code travels by one all-gather and every rank decodes and sums all K codes in rank order:
  the same bytes in, the same float sum out, so replicas stay identical. At K = 2 an all-gather sends
  each rank's code once, the same bytes as a reduce-scatter + all-gather of codes, with one
  quantization instead of two and one latency instead of two; for large K the two-phase form sends
  2(K−1)/K codes instead of K−1, and would be the better choice there.
* **Error feedback** (Seide et al., Interspeech 2014; Karimireddy et al., ICML 2019, arXiv
  1901.09847): each rank keeps e, what its code dropped, and sends code(Δ + e), then
  e ← (Δ + e) − decode(code(Δ + e)). So Σ_t sent_t = Σ_t Δ_t − e_T: the running sum of what was sent
  tracks the running sum of the true values within one rounding error (half a quantum per value).
  On by default for the integer codes.

Error bound of one code (tested): a cast rounds to the format's unit roundoff (2⁻⁸ for bf16, 2⁻¹¹
for fp16, relative); a block code is within s/2 = max|v|/(2 q_max) of each value of its block.
``wire_bytes`` is exactly what a rank submits: the code plus its scales.

Every product here is rounded before it is summed (a multiply, then an add; never ``addcmul``, which
may fuse them into one FMA on some CPUs), so this torch path and the fused C pass of
:mod:`.native_codec`, which the engine uses on CPU float32 buffers, give the same bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

COMPRESSIONS = ("none", "bf16", "fp16", "int8", "int4")
CAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
QMAX = {"int8": 127, "int4": 7}
DEFAULT_BLOCK = 256


def error_feedback_default(compress: str) -> bool:
    """Error feedback is on by default where the code drops the most: the integer codes."""
    return compress in QMAX


@dataclass(frozen=True)
class BlockCode:
    """One rank's block-scaled code of n values: ``codes`` (int8 values, or two int4 per byte) and
    one float32 scale per block."""

    codes: torch.Tensor  # uint8
    scales: torch.Tensor  # float32, one per block


def n_blocks(numel: int, block: int) -> int:
    return -(-numel // block)


def code_bytes(numel: int, compress: str, block: int = DEFAULT_BLOCK) -> int:
    """Bytes of the code of ``numel`` values, without scales."""
    if compress == "int8":
        return numel
    if compress == "int4":
        return -(-numel // 2)
    raise ValueError(f"no block code for compress={compress!r}")


def wire_bytes(numel: int, compress: str, element_size: int, block: int = DEFAULT_BLOCK) -> int:
    """Bytes one rank submits to send ``numel`` values (of ``element_size`` bytes uncompressed)."""
    if compress == "none":
        return numel * element_size
    if compress in CAST_DTYPES:
        return numel * 2
    return code_bytes(numel, compress, block) + 4 * n_blocks(numel, block)


def _segments(numel: int, block: int) -> list[tuple[int, int, int]]:
    """(start, end, values per block) of the full blocks and of the short last block, if any: each
    segment is viewed as (blocks, width) in place, so no pass pads or copies the values."""
    full = numel // block * block
    out = [(0, full, block)] if full else []
    return out + ([(full, numel, numel - full)] if numel > full else [])


def encode_blocks(values: torch.Tensor, compress: str, block: int = DEFAULT_BLOCK,
                  residual: torch.Tensor | None = None, scratch: torch.Tensor | None = None) -> BlockCode:
    """Round-to-nearest block code of a 1-D float32 tensor (see the module docstring).

    ``residual`` (same length), when given, receives what the code drops, ``values − decode(code)``
    (error feedback), computed from the rounded grid in the same pass instead of a second decode.
    ``scratch`` (float32, same length), when given, holds the grid instead of a fresh temporary.
    """
    qmax = QMAX[compress]
    n = values.numel()
    q = torch.empty(n, dtype=torch.int8, device=values.device)
    scales = []
    for start, end, width in _segments(n, block):
        blocks = values[start:end].view(-1, width)
        grid = blocks.abs() if scratch is None else torch.abs(blocks, out=scratch[start:end].view(-1, width))
        s = grid.amax(dim=1).div_(qmax)
        safe = torch.where(s > 0, s, torch.ones_like(s))
        torch.div(blocks, safe[:, None], out=grid).round_().clamp_(-qmax, qmax)  # q = round(v / s)
        if residual is not None:
            dropped = torch.mul(grid, s[:, None], out=residual[start:end].view(-1, width))
            torch.sub(blocks, dropped, out=dropped)  # v − q·s, rounded twice and never fused (the native bits)
        q[start:end].view(-1, width).copy_(grid)  # integers already: the cast is exact
        scales.append(s)
    scale = torch.cat(scales) if len(scales) > 1 else scales[0]
    if compress == "int8":
        return BlockCode(q.view(torch.uint8), scale)
    nibbles = (q + 8).to(torch.uint8)  # 1..15
    if n % 2:
        nibbles = torch.cat([nibbles, nibbles.new_full((1,), 8)])
    return BlockCode(nibbles[0::2] | (nibbles[1::2] << 4), scale)


def _codes_as_float(code: BlockCode, numel: int, compress: str, out: torch.Tensor | None = None) -> torch.Tensor:
    if compress == "int8":
        codes = code.codes.view(torch.int8)
        return codes.to(torch.float32) if out is None else out.copy_(codes)
    low = (code.codes & 0x0F).to(torch.int16) - 8
    high = (code.codes >> 4).to(torch.int16) - 8
    return torch.stack([low, high], dim=1).view(-1)[:numel].to(torch.float32)


def accumulate_blocks(out: torch.Tensor, code: BlockCode, compress: str, block: int = DEFAULT_BLOCK,
                      weight: float = 1.0, scratch: torch.Tensor | None = None,
                      overwrite: bool = False) -> torch.Tensor:
    """``out += weight · decode(code)``, one fused pass per segment (``out``: float32, the code's length;
    ``scratch``, float32 of the same length, holds the codes as floats instead of a fresh temporary).
    ``overwrite``: ``out = weight · decode(code)`` instead, the same bits as adding to zeros, without
    the pass that zeros ``out``."""
    n = out.numel()
    q = _codes_as_float(code, n, compress, scratch)
    scales = code.scales * weight if weight != 1.0 else code.scales
    first = 0
    for start, end, width in _segments(n, block):
        nb = (end - start) // width
        dst, codes, s = out[start:end].view(-1, width), q[start:end].view(-1, width), scales[first:first + nb, None]
        if overwrite:
            torch.mul(codes, s, out=dst)
        else:  # the product rounded, then the sum: one rounding each, never an FMA (the native codec's bits)
            dst.add_(codes.mul_(s))
        first += nb
    return out


def decode_blocks(code: BlockCode, numel: int, compress: str, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """float32 values of a block code (exact inverse of the rounding grid: q · s)."""
    out = torch.empty(numel, dtype=torch.float32, device=code.codes.device)
    return accumulate_blocks(out, code, compress, block, overwrite=True)


def pack_code(code: BlockCode, tail: torch.Tensor | None = None) -> torch.Tensor:
    """One uint8 wire buffer: the codes, then the scales' bytes, then ``tail`` (more bytes to carry, if any):
    one all-gather carries them all."""
    parts = [code.codes, code.scales.contiguous().view(torch.uint8)]
    return torch.cat(parts if tail is None else [*parts, tail])


def unpack_code(wire: torch.Tensor, numel: int, compress: str, block: int = DEFAULT_BLOCK) -> BlockCode:
    """The code at the start of ``wire`` (bytes after its scales, a :func:`pack_code` tail, are ignored)."""
    nc = code_bytes(numel, compress, block)
    scales = wire[nc : nc + 4 * n_blocks(numel, block)]
    return BlockCode(wire[:nc], scales.clone().view(torch.float32))  # a copy: aligned for float32


def encode_delta(ref: torch.Tensor, send: torch.Tensor, residual: torch.Tensor | None, compress: str,
                 block: int = DEFAULT_BLOCK, *, delta: torch.Tensor | None = None, grid: torch.Tensor | None = None,
                 tail: torch.Tensor | None = None) -> torch.Tensor:
    """The wire buffer (:func:`pack_code`, then ``tail``) of the block code of Δ = ref − send (+ ``residual``,
    which then receives what the code drops). ``delta`` and ``grid``: float32 work buffers of the same length,
    kept by the caller between syncs (fresh ones when None)."""
    delta = torch.sub(ref, send, out=torch.empty(ref.numel(), device=ref.device) if delta is None else delta)
    if residual is not None:
        delta.add_(residual)
    return pack_code(encode_blocks(delta, compress, block, residual=residual, scratch=grid), tail)


def decode_mean(ref: torch.Tensor, wires: torch.Tensor, world: int, compress: str, block: int = DEFAULT_BLOCK, *,
                out: torch.Tensor | None = None, grid: torch.Tensor | None = None) -> torch.Tensor:
    """``ref − (1/world) Σ_r decode(code_r)`` in float32, the ``world`` wire buffers back to back in ``wires``
    and summed in rank order (every rank sums the same codes the same way). ``out`` and ``grid``: float32
    buffers of ``ref``'s length (fresh ones when None)."""
    n = ref.numel()
    out = torch.empty(n, device=ref.device) if out is None else out
    for r, wire in enumerate(wires.view(world, -1)):
        code = unpack_code(wire, n, compress, block)
        accumulate_blocks(out, code, compress, block, weight=1.0 / world, scratch=grid, overwrite=r == 0)
    return torch.sub(ref, out, out=out)


def round_trip(values: torch.Tensor, compress: str, block: int = DEFAULT_BLOCK) -> torch.Tensor:
    """decode(code(values)) as this rank's own contribution would be decoded (float32)."""
    if compress == "none":
        return values.to(torch.float32)
    if compress in CAST_DTYPES:
        return values.to(CAST_DTYPES[compress]).to(torch.float32)
    return decode_blocks(encode_blocks(values, compress, block), values.numel(), compress, block)
