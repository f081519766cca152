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
