"""The agreement check's words: pure encode/decode functions, testable without a process group.

Before replicas are averaged every rank must agree on what it is about to average (the step, the
round, the element count, the config and the next period), and no rank may contribute a
non-finite value. Two encodings carry that agreement:

* **The full check** (:func:`encode_full_check`, :func:`decode_full_check`): one int64 vector
  reduced with MAX, ``[v, -v, per-rank non-finite step + 1, per-rank digest, stop flag, per-rank
  loss bits, integer buffers]`` with v the agreed fields. MAX of v and of -v gives the range of each
  field over ranks, so a disagreement is seen and named; each per-rank slot has one writer (the
  others send the identity of MAX), so every slot arrives exact.
* **The fused check words** (:func:`encode_fused_slot`, :func:`decode_fused_words`), which ride in
  the tail of the averaging buffer itself, in the floating dtype being averaged: per rank 9 words of
  16 bits (a 64-bit digest as four words, a non-finite flag, the round's mean loss as four words),
  then one stop word. Only the owner writes a slot and the others send 0, so a float32/64 sum
  carries every word exactly (integers below 2**24) and an average carries word/world to within
  2**-24 relative: ``round(x * world)`` restores the word.

The digest is 8 bytes of BLAKE2b (RFC 7693) over the packed fields. It used to be two CRC32s with
different seeds; CRC is affine over GF(2) (crc(a) ^ crc(b) ^ crc(c) = crc(a ^ b ^ c) for
equal-length inputs), so both halves collide together and the "64-bit" hash had the collision
resistance of one CRC32. BLAKE2b has no such structure.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

SLOT_WORDS = 9  # per rank in the fused check: 4 x 16-bit digest, non-finite flag, 4 x 16-bit loss bits
FIELDS = ("step", "round", "elements", "config_hash", "next_H")
INT64_MIN = -(2**63)


def digest64(values: Sequence[int]) -> bytes:
    """8-byte BLAKE2b digest of signed 64-bit integers (about a microsecond for a dozen values)."""
    return hashlib.blake2b(struct.pack(f"<{len(values)}q", *values), digest_size=8).digest()


def fused_tail_words(world: int) -> int:
    """Words a group of ``world`` ranks uses at the end of the tail: its slots and the stop word."""
    return SLOT_WORDS * world + 1


def _loss_bits(mean_loss: float) -> tuple[int, ...]:
    return struct.unpack("<4H", struct.pack("<d", mean_loss))


def _mean_loss(losses: list[float]) -> float | None:
    """The mean over ranks of their round losses; None when any rank's is unknown (NaN)."""
    return None if any(x != x for x in losses) else sum(losses) / len(losses)


def encode_fused_slot(values: Sequence[int], nonfinite: bool, mean_loss: float) -> tuple[int, ...]:
    """This rank's 9 words: the digest of ``values``, the non-finite flag and the loss bits."""
    return (*struct.unpack("<4H", digest64(values)), int(nonfinite), *_loss_bits(mean_loss))


def fused_words(tail_numel: int, world: int, me: int, slot: Sequence[int], stop: bool) -> list[int]:
    """The whole tail as this rank sends it: zeros except its slot and the stop word.

    The tail holds slots for the whole world; a smaller group (hierarchical) uses its last
    ``fused_tail_words(size)`` words, and the rest stay zero on every rank.
    """
    words = [0] * tail_numel
    lo = tail_numel - fused_tail_words(world) + SLOT_WORDS * me
    words[lo : lo + SLOT_WORDS] = slot
    words[-1] = int(stop)
    return words


@dataclass(frozen=True)
class FusedVerdict:
    passed: bool  # every digest equal and no rank non-finite
    stop: bool  # some rank asked to stop
    mean_loss: float | None  # mean over ranks of their round losses (None if unknown anywhere); only if passed


def decode_fused_words(received: Sequence[float], world: int, averaged: bool) -> FusedVerdict:
    """Read the reduced tail words (the last ``fused_tail_words(world)`` of them matter)."""
    n = fused_tail_words(world)
    factor = world if averaged else 1
    out = [round(x * factor) for x in received[len(received) - n :]]
    first = out[:4]
    passed = all(out[i : i + 4] == first and out[i + 4] == 0 for i in range(0, n - 1, SLOT_WORDS))
    mean = None
    if passed:
        mean = _mean_loss([struct.unpack("<d", struct.pack("<4H", *out[i + 5 : i + 9]))[0]
                           for i in range(0, n - 1, SLOT_WORDS)])
    return FusedVerdict(passed, out[-1] > 0, mean)


def encode_full_check(values: Sequence[int], world: int, me: int, nonfinite_step: int, stop: bool,
                      mean_loss: float, int_buffers: Sequence[int]) -> list[int]:
    """This rank's int64 words of the full check (MAX-reduced). ``values`` are the FIELDS."""
    nonfinite, digests, losses = [0] * world, [0] * world, [INT64_MIN] * world
    nonfinite[me] = nonfinite_step + 1  # 0 means finite
    digests[me] = (int.from_bytes(digest64(values), "little") >> 2) + 1  # positive: MAX keeps the owner's
    losses[me] = struct.unpack("<q", struct.pack("<d", mean_loss))[0]
    return [*values, *(-x for x in values), *nonfinite, *digests, int(stop), *losses, *int_buffers]


@dataclass(frozen=True)
class FullVerdict:
    disagree: dict[str, tuple[int, int]]  # field -> (min, max) over ranks, for fields that differ
    bad: dict[int, int]  # rank (in the group) -> its first non-finite step
    odd_ranks: list[int]  # ranks whose digest differs from rank 0's
    stop: bool
    mean_loss: float | None
    int_buffers: list[int] = field(default_factory=list)  # MAX over ranks

    @property
    def passed(self) -> bool:
        return not self.disagree and not self.bad


def decode_full_check(received: Sequence[int], world: int) -> FullVerdict:
    out = list(received)
    n = len(FIELDS)
    hi, lo = out[:n], [-x for x in out[n : 2 * n]]
    disagree = {f: (lo[i], hi[i]) for i, f in enumerate(FIELDS) if lo[i] != hi[i]}
    base = 2 * n
    bad = {r: out[base + r] - 1 for r in range(world) if out[base + r] > 0}
    digests = out[base + world : base + 2 * world]
    odd = [r for r in range(world) if digests[r] != digests[0]]
    stop = bool(out[base + 2 * world])
    first_loss = base + 2 * world + 1
    mean = _mean_loss([struct.unpack("<d", struct.pack("<q", x))[0] for x in out[first_loss : first_loss + world]])
    return FullVerdict(disagree, bad, odd, stop, mean, out[first_loss + world :])
