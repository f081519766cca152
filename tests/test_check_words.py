"""The agreement check's words (``localsgd.engine.check_words``), as pure functions: no process group.

Collectives are simulated on the words each rank would send: a SUM (or SUM then divide by the
world, an AVG) of float tensors for the fused words, an elementwise MAX of int64 vectors for the
full check. The digest tests pin why BLAKE2b replaced two seeded CRC32s: CRC is affine over GF(2),
so the old 64-bit digest satisfied H(a) ^ H(b) ^ H(c) == H(a ^ b ^ c) and collisions between
distinct check values could be solved for with a little linear algebra.
"""

from __future__ import annotations

import math
import random
import struct
import zlib
from collections.abc import Callable, Sequence

import pytest
import torch

from localsgd.engine.check_words import (
    FIELDS,
    SLOT_WORDS,
    FullVerdict,
    decode_full_check,
    decode_fused_words,
    digest64,
    encode_full_check,
    encode_fused_slot,
    fused_tail_words,
    fused_words,
)

# step, round, elements, config_hash, next_H: what a sync's ranks must agree on
VALUES = (1200, 150, 25_000_037, 0x1234567, 8)
INT64_BOUNDS = (-(2**63), 2**63 - 1)


# ------------------------------------------------------------------ the digest
def two_crc32_digest(values: Sequence[int]) -> bytes:
    """The digest the engine used before BLAKE2b (reference only: it is affine over GF(2))."""
    packed = struct.pack(f"<{len(values)}q", *values)
    return struct.pack("<II", zlib.crc32(packed), zlib.crc32(packed, 0x9E3779B9))


def _xor(*digests: bytes) -> int:
    out = 0
    for d in digests:
        out ^= int.from_bytes(d, "little")
    return out


def _xor_identity_holds(h: Callable[[Sequence[int]], bytes], a: Sequence[int], b: Sequence[int],
                        c: Sequence[int]) -> bool:
    abc = [x ^ y ^ z for x, y, z in zip(a, b, c)]  # Python's ^ on signed ints is two's complement
    return _xor(h(a), h(b), h(c)) == _xor(h(abc))


def _random_values(rng: random.Random, n: int) -> list[int]:
    return [rng.randint(*INT64_BOUNDS) for _ in range(n)]


def test_digest64_is_not_affine_like_the_two_crc32_digest() -> None:
    rng = random.Random(20240917)
    for _ in range(300):
        n = rng.randint(1, 12)
        a, b, c = (_random_values(rng, n) for _ in range(3))
        assert _xor_identity_holds(two_crc32_digest, a, b, c), "the reference must show the CRC structure"
        assert not _xor_identity_holds(digest64, a, b, c), (a, b, c)


def _kernel_difference(h: Callable[[Sequence[int]], bytes], n: int, bits: Sequence[tuple[int, int]]) -> list[int]:
    """A nonzero d (using only the given (value index, bit) positions) with h(x ^ d) == h(x) for all x,
    assuming h is affine: L(d) = h(d) ^ h(0) is linear, and any 65 vectors of 64 bits are dependent,
    so Gaussian elimination over GF(2) finds a subset of unit vectors whose images XOR to zero."""
    zero = h([0] * n)
    basis: dict[int, tuple[int, int]] = {}  # pivot bit -> (reduced image, subset of ``bits`` giving it)
    for j, (i, bit) in enumerate(bits):
        unit = [0] * n
        unit[i] = 1 << bit
        image, subset = _xor(h(unit), zero), 1 << j
        while image:
            pivot = image.bit_length() - 1
            if pivot not in basis:
                basis[pivot] = (image, subset)
                break
            image, subset = image ^ basis[pivot][0], subset ^ basis[pivot][1]
        else:  # the subset's images cancel: its XOR is in the kernel
            d = [0] * n
            for k, (i2, bit2) in enumerate(bits):
                if subset >> k & 1:
                    d[i2] ^= 1 << bit2
            return d
    raise AssertionError("no dependency among the candidate bits")


def test_two_crc32_digest_collides_on_distinct_check_values_and_digest64_does_not() -> None:
    # Only the low 16 bits of each field (80 candidates): the colliding values stay plausible.
    bits = [(i, b) for i in range(len(VALUES)) for b in range(16)]
    d = _kernel_difference(two_crc32_digest, len(VALUES), bits)
    assert any(d) and all(0 <= x < 2**16 for x in d)
    other = tuple(x ^ y for x, y in zip(VALUES, d))
    assert other != VALUES
    assert two_crc32_digest(other) == two_crc32_digest(VALUES)
    assert digest64(other) != digest64(VALUES)
    # d is a difference that collides from every starting point, not just this one.
    rng = random.Random(7)
    for _ in range(20):
        x = _random_values(rng, len(VALUES))
        assert two_crc32_digest([a ^ b for a, b in zip(x, d)]) == two_crc32_digest(x)

    # End to end: with the old digest in the slot, two ranks that disagree on the step (or round...)
    # would pass the fused check and average; with digest64 they do not.
    def old_slot(values: Sequence[int]) -> tuple[int, ...]:
        return (*struct.unpack("<4H", two_crc32_digest(values)), 0, *struct.unpack("<4H", struct.pack("<d", 1.0)))

    n = fused_tail_words(2)
    for make_slot in (old_slot, lambda v: encode_fused_slot(v, False, 1.0)):
        sent = [fused_words(n, 2, 0, make_slot(VALUES), False), fused_words(n, 2, 1, make_slot(other), False)]
        verdict = decode_fused_words(_reduce(sent, torch.float32, averaged=False), 2, averaged=False)
        assert verdict.passed is (make_slot is old_slot)


def test_digest64_is_eight_bytes_and_depends_on_every_value_and_the_length() -> None:
    base = digest64(VALUES)
    assert len(base) == 8 and digest64(list(VALUES)) == base
    for i in range(len(VALUES)):
        changed = list(VALUES)
        changed[i] += 1
        assert digest64(changed) != base, FIELDS[i]
    assert digest64([*VALUES, 0]) != base


# ------------------------------------------------------------------ the fused words
def _reduce(sent: Sequence[Sequence[int]], dtype: torch.dtype, averaged: bool, world: int | None = None) -> list[float]:
    """What the all-reduce leaves in the tail: the SUM over ranks, or the SUM / world (an AVG)."""
    total = torch.tensor(sent, dtype=dtype).sum(0)
    if averaged:
        total = total / (world or len(sent))  # stays in ``dtype``: the rounding a real AVG makes
    return total.tolist()


def _losses(world: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(-3.0, 30.0) for _ in range(world)]


def _sent(world: int, losses: Sequence[float], tail_numel: int | None = None, nonfinite: Sequence[bool] = (),
          stop: Sequence[bool] = (), values: Sequence[int] = VALUES) -> list[list[int]]:
    tail_numel = fused_tail_words(world) if tail_numel is None else tail_numel
    nonfinite = list(nonfinite) or [False] * world
    stop = list(stop) or [False] * world
    return [fused_words(tail_numel, world, me, encode_fused_slot(values, nonfinite[me], losses[me]), stop[me])
            for me in range(world)]


def test_fused_slot_layout() -> None:
    slot = encode_fused_slot(VALUES, True, 2.5)
    assert len(slot) == SLOT_WORDS == 9
    assert slot[:4] == struct.unpack("<4H", digest64(VALUES))
    assert slot[4] == 1
    assert slot[5:] == struct.unpack("<4H", struct.pack("<d", 2.5))
    assert all(0 <= w < 2**16 for w in slot)
    assert fused_tail_words(3) == 28
    words = fused_words(28, 3, 1, slot, True)
    assert words[9:18] == list(slot) and words[-1] == 1
    assert words[:9] == [0] * 9 and words[18:27] == [0] * 9


@pytest.mark.parametrize("averaged", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_fused_round_trip_passes_with_the_exact_mean_loss(world: int, dtype: torch.dtype, averaged: bool) -> None:
    losses = _losses(world, seed=world)
    verdict = decode_fused_words(_reduce(_sent(world, losses), dtype, averaged), world, averaged)
    assert verdict.passed and not verdict.stop
    assert verdict.mean_loss == sum(losses) / world  # bit for bit: the loss bits arrive exact


@pytest.mark.parametrize("averaged", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("world", [2, 3, 4, 5])
def test_fused_one_flipped_digest_word_on_one_rank_fails(world: int, averaged: bool) -> None:
    losses = _losses(world, seed=10 + world)
    for rank in range(world):
        for word in range(4):
            sent = _sent(world, losses)
            sent[rank][SLOT_WORDS * rank + word] ^= 1 << (rank + word) % 16
            verdict = decode_fused_words(_reduce(sent, torch.float32, averaged), world, averaged)
            assert not verdict.passed and verdict.mean_loss is None, (rank, word)


def test_fused_different_values_on_one_rank_fail() -> None:
    world, losses = 3, _losses(3, seed=3)
    sent = _sent(world, losses)
    sent[2] = _sent(world, losses, values=(*VALUES[:-1], VALUES[-1] + 1))[2]  # rank 2 disagrees on next_H
    assert not decode_fused_words(_reduce(sent, torch.float32, averaged=False), world, averaged=False).passed


@pytest.mark.parametrize("averaged", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_fused_nonfinite_flag_on_any_rank_fails(world: int, averaged: bool) -> None:
    losses = _losses(world, seed=20 + world)
    for rank in range(world):
        flags = [r == rank for r in range(world)]
        verdict = decode_fused_words(_reduce(_sent(world, losses, nonfinite=flags), torch.float32, averaged),
                                     world, averaged)
        assert not verdict.passed and verdict.mean_loss is None, rank
    every = decode_fused_words(_reduce(_sent(world, losses, nonfinite=[True] * world), torch.float32, averaged),
                               world, averaged)
    assert not every.passed


def test_fused_unknown_loss_on_one_rank_passes_without_a_mean() -> None:
    losses = [1.0, float("nan"), 3.0]
    verdict = decode_fused_words(_reduce(_sent(3, losses), torch.float32, averaged=True), 3, averaged=True)
    assert verdict.passed and verdict.mean_loss is None


@pytest.mark.parametrize("averaged", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_fused_stop_word_propagates(world: int, averaged: bool) -> None:
    losses = _losses(world, seed=30 + world)
    none = decode_fused_words(_reduce(_sent(world, losses), torch.float32, averaged), world, averaged)
    assert not none.stop
    for stoppers in ([world - 1], list(range(world))):
        stop = [r in stoppers for r in range(world)]
        verdict = decode_fused_words(_reduce(_sent(world, losses, stop=stop), torch.float32, averaged),
                                     world, averaged)
        assert verdict.stop and verdict.passed and verdict.mean_loss == sum(losses) / world
    # A stop is carried even when the check fails (a non-finite rank asking to stop).
    failed = decode_fused_words(_reduce(_sent(world, losses, nonfinite=[True] * world, stop=[True] * world),
                                        torch.float32, averaged), world, averaged)
    assert failed.stop and not failed.passed


@pytest.mark.parametrize("averaged", [False, True], ids=["sum", "avg"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_fused_group_of_two_uses_the_last_words_of_a_tail_sized_for_four(dtype: torch.dtype, averaged: bool) -> None:
    tail, group = fused_tail_words(4), 2
    losses = _losses(group, seed=40)
    sent = _sent(group, losses, tail_numel=tail, stop=[False, True])
    unused = tail - fused_tail_words(group)
    assert all(words[:unused] == [0] * unused for words in sent)
    received = _reduce(sent, dtype, averaged, world=group)
    assert len(received) == tail
    verdict = decode_fused_words(received, group, averaged)
    assert verdict.passed and verdict.stop and verdict.mean_loss == sum(losses) / group
    # A disagreement inside the group is still seen there.
    sent[1][unused + SLOT_WORDS + 3] ^= 0x8000
    assert not decode_fused_words(_reduce(sent, dtype, averaged, world=group), group, averaged).passed


# ------------------------------------------------------------------ the full check
def _max_reduce(sent: Sequence[Sequence[int]]) -> list[int]:
    """An all-reduce MAX over ranks, in int64 as the engine sends it (every word must fit)."""
    return torch.tensor(sent, dtype=torch.int64).amax(0).tolist()


def _full(world: int, values: Sequence[Sequence[int]] | None = None, nonfinite_steps: Sequence[int] = (),
          stop: Sequence[bool] = (), losses: Sequence[float] = (),
          int_buffers: Sequence[Sequence[int]] = ()) -> FullVerdict:
    values = list(values) if values is not None else [VALUES] * world
    nonfinite_steps = list(nonfinite_steps) or [-1] * world
    stop = list(stop) or [False] * world
    losses = list(losses) or [1.0] * world
    int_buffers = list(int_buffers) or [[]] * world
    sent = [encode_full_check(values[me], world, me, nonfinite_steps[me], stop[me], losses[me], int_buffers[me])
            for me in range(world)]
    return decode_full_check(_max_reduce(sent), world)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
def test_full_check_agreement_passes_with_the_exact_mean_loss(world: int) -> None:
    losses = [-0.0, -1.25, *_losses(world, seed=50)][:world]  # -0.0's bits are the MAX identity itself
    verdict = _full(world, losses=losses)
    assert verdict.passed and verdict.disagree == {} and verdict.bad == {} and verdict.odd_ranks == []
    assert not verdict.stop and verdict.int_buffers == []
    assert verdict.mean_loss == sum(losses) / world


@pytest.mark.parametrize("index", range(len(FIELDS)), ids=FIELDS)
def test_full_check_names_each_disagreeing_field_with_its_range(index: int) -> None:
    deltas = [0, 5, -2, 0]  # rank 1 highest, rank 2 lowest
    values = [[*VALUES] for _ in deltas]
    for rank, delta in enumerate(deltas):
        values[rank][index] += delta
    verdict = _full(len(deltas), values=values)
    base = VALUES[index]
    assert verdict.disagree == {FIELDS[index]: (base - 2, base + 5)}
    assert verdict.odd_ranks == [1, 2] and verdict.bad == {} and not verdict.passed


def test_full_check_names_several_fields_and_odd_ranks_relative_to_rank_zero() -> None:
    values = [[*VALUES], [*VALUES], [*VALUES]]
    values[0][0] += 1  # rank 0 is one step ahead
    values[0][4] = 16  # and expects another period
    verdict = _full(3, values=values)
    assert verdict.disagree == {"step": (VALUES[0], VALUES[0] + 1), "next_H": (8, 16)}
    assert verdict.odd_ranks == [1, 2]


def test_full_check_maps_bad_ranks_to_their_first_nonfinite_step() -> None:
    verdict = _full(5, nonfinite_steps=[-1, 17, -1, 0, 123456], losses=[1.0, math.nan, 2.0, math.inf, 3.0])
    assert verdict.bad == {1: 17, 3: 0, 4: 123456}
    assert verdict.disagree == {} and verdict.odd_ranks == [] and not verdict.passed
    assert verdict.mean_loss is None  # a NaN round loss is unknown; the mean is not made up


def test_full_check_stop_and_integer_buffers_take_the_max() -> None:
    int_buffers = [[10, 100, -5], [30, 99, -7], [20, 98, -6]]
    verdict = _full(3, stop=[False, False, True], int_buffers=int_buffers)
    assert verdict.stop and verdict.passed
    assert verdict.int_buffers == [30, 100, -5]
    assert not _full(3, int_buffers=int_buffers).stop
