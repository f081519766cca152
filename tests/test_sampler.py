"""Data shards: disjoint, covering, reshuffled per epoch, resumable mid-epoch."""

from __future__ import annotations

import pytest
import torch

from localsgd.sampler import ShardSampler


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_the_dataset_each_epoch(world: int) -> None:
    n = 103
    samplers = [ShardSampler(n, r, world, seed=5) for r in range(world)]
    per_rank = n // world
    epoch0 = [s.next_indices(per_rank) for s in samplers]
    union = torch.cat(epoch0)
    assert len(set(union.tolist())) == len(union) == per_rank * world  # disjoint
    assert n - len(union) == n % world  # only the documented remainder is left out
    epoch1 = [s.next_indices(per_rank) for s in samplers]
    assert len(set(torch.cat(epoch1).tolist())) == per_rank * world
    assert not all(torch.equal(a, b) for a, b in zip(epoch0, epoch1))  # reshuffled
    assert all(s.epoch == 1 for s in samplers)


def test_batch_size_change_mid_epoch_neither_skips_nor_repeats() -> None:
    a, b = ShardSampler(50, 0, 2, seed=1), ShardSampler(50, 0, 2, seed=1)
    steady = torch.cat([a.next_indices(5) for _ in range(10)])
    ramped = torch.cat([b.next_indices(k) for k in (3, 7, 1, 9, 4, 11, 6, 9)])
    assert torch.equal(steady, ramped)  # 50 samples either way: the same stream


def test_resume_mid_epoch_continues_with_exactly_the_remaining_indices() -> None:
    ref = ShardSampler(40, 1, 2, seed=3)
    stream = torch.cat([ref.next_indices(6) for _ in range(8)])  # crosses two epoch boundaries
    first = ShardSampler(40, 1, 2, seed=3)
    head = torch.cat([first.next_indices(6) for _ in range(3)])
    resumed = ShardSampler(40, 1, 2, seed=3)
    resumed.load_state_dict(first.state_dict())
    tail = torch.cat([resumed.next_indices(6) for _ in range(5)])
    assert torch.equal(torch.cat([head, tail]), stream)


def test_resume_with_another_world_size_or_seed_is_refused() -> None:
    state = ShardSampler(40, 0, 2, seed=3).state_dict()
    with pytest.raises(ValueError, match="world_size=2, this run has 4"):
        ShardSampler(40, 0, 4, seed=3).load_state_dict(state)
    with pytest.raises(ValueError, match="seed=3, this run has 4"):
        ShardSampler(40, 0, 2, seed=4).load_state_dict(state)


def test_too_small_dataset_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be sharded over 4 ranks"):
        ShardSampler(3, 0, 4, seed=0)


def _batch_sizes(gen: torch.Generator, shard: int, count: int) -> list[int]:
    """Random batch sizes, some crossing an epoch's end and some longer than a whole shard."""
    return [int(b) for b in torch.randint(1, shard + shard // 2 + 2, (count,), generator=gen)]


@pytest.mark.parametrize("seed", range(6))
def test_spans_slice_the_same_stream_that_indices_hand_out(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for world, rank in ((1, 0), (2, 1), (3, 2)):
        by_index, by_span = ShardSampler(47, rank, world, seed), ShardSampler(47, rank, world, seed)
        for b in _batch_sizes(gen, 47 // world, 30):
            idx = by_index.next_indices(b)
            spans = by_span.next_spans(b)
            assert torch.equal(torch.cat([by_span.shard(e)[lo:hi] for e, lo, hi in spans]), idx)
            assert sum(hi - lo for _, lo, hi in spans) == b and len(idx) == b
            assert by_span.state_dict() == by_index.state_dict()


@pytest.mark.parametrize("seed", range(6))
def test_in_memory_stream_batches_equal_indexing_the_whole_set(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The epoch copy (small shards) and batch-by-batch indexing (large ones) give the same batches as
    indexing the tensors with the sampler's indices, across epochs, ramps and a resume mid-epoch."""
    import localsgd.data.base as data_base
    from localsgd.data import InMemoryStream

    gen = torch.Generator().manual_seed(100 + seed)
    n, world = 53, 2
    x, y = torch.randn(n, 3, 2, generator=gen), torch.randint(0, 10, (n,), generator=gen)
    sizes = _batch_sizes(gen, n // world, 24)
    for rank in range(world):
        ref = ShardSampler(n, rank, world, seed)
        expected = [(x[i], y[i]) for i in (ref.next_indices(b) for b in sizes)]
        for cap in (data_base.EPOCH_COPY_MAX_BYTES, 0):
            monkeypatch.setattr(data_base, "EPOCH_COPY_MAX_BYTES", cap)
            stream = InMemoryStream(x, y, ShardSampler(n, rank, world, seed))
            assert stream.copies_epochs == (cap > 0)
            got = [stream.next_batch(b) for b in sizes[:9]]
            resumed = InMemoryStream(x, y, ShardSampler(n, rank, world, seed))
            resumed.load_state_dict(stream.state_dict())
            got += [resumed.next_batch(b) for b in sizes[9:]]
            for (gx, gy), (ex, ey) in zip(got, expected, strict=True):
                assert torch.equal(gx, ex) and torch.equal(gy, ey)
            assert resumed.samples_seen == sum(sizes)


def test_in_memory_stream_copies_only_shards_under_the_cap_and_never_writes_the_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import localsgd.data.base as data_base
    from localsgd.data import InMemoryStream

    x, y = torch.arange(40.0).reshape(20, 2), torch.arange(20)
    shard_bytes = 10 * (x[:1].nbytes + y[:1].nbytes)  # rank 0 of 2: 10 rows
    monkeypatch.setattr(data_base, "EPOCH_COPY_MAX_BYTES", shard_bytes)
    assert InMemoryStream(x, y, ShardSampler(20, 0, 2, seed=1)).copies_epochs
    monkeypatch.setattr(data_base, "EPOCH_COPY_MAX_BYTES", shard_bytes - 1)
    assert not InMemoryStream(x, y, ShardSampler(20, 0, 2, seed=1)).copies_epochs
    monkeypatch.setattr(data_base, "EPOCH_COPY_MAX_BYTES", shard_bytes)
    stream = InMemoryStream(x, y, ShardSampler(20, 0, 2, seed=1))
    before = x.clone()
    stream.next_batch(4)[0].mul_(0)  # a model that writes its input in place
    assert torch.equal(x, before)
