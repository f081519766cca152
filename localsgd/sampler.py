"""Disjoint, per-epoch reshuffled data shards that count samples, not steps.

Every rank draws the same permutation of the N training indices for epoch e (seeded by the run seed
and e, like ``DistributedSampler.set_epoch``, which pytorch/pytorch#31771 shows people forget), and
takes every W-th index starting at its rank, truncated to ``N // W`` so all shards are equal and
disjoint (the ``N mod W`` leftover indices are skipped that epoch; they are different ones each epoch).
The sampler keeps a *sample* cursor, so a batch size that changes mid-epoch neither skips nor repeats
data and a resume continues with exactly the remaining indices of the uninterrupted run.

:class:`ValidationShard` holds out a seeded fraction of the training set as one fixed, disjoint
validation part per rank (for plugins that tune on validation data, such as ``optimizer=stn``).
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Any

import torch


@lru_cache(maxsize=1)
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of ``range(num_samples)`` every rank draws for ``epoch`` (read-only: shards are views).

    Cached (the newest only) because it is the same for every rank: the simulator's K workers
    (:mod:`localsgd.sim`) share one draw per epoch instead of making K; a rank's shard is a view of it
    anyway, so the cache holds no extra memory.
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=gen)


def stream_spans(epoch: int, cursor: int, shard_size: int, batch_size: int) -> Iterator[tuple[int, int, int]]:
    """The ``(epoch, start, stop)`` slices of a shard that a stream at ``(epoch, cursor)`` hands out next.

    ``batch_size`` samples in order: the rest of the current epoch's shard, then the next epochs'; a
    cursor at the shard's end moves to the next epoch first.
    """
    need = batch_size
    while need > 0:
        if cursor == shard_size:
            epoch, cursor = epoch + 1, 0
        take = min(need, shard_size - cursor)
        yield epoch, cursor, cursor + take
        cursor += take
        need -= take


class ShardSampler:
    """This rank's stream of training indices, epoch after epoch."""

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int) -> None:
        if num_samples < world_size:
            raise ValueError(f"dataset of {num_samples} samples cannot be sharded over {world_size} ranks")
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.epoch = 0
        self.cursor = 0  # samples of this epoch's shard already handed out
        self.samples_seen = 0
        self._shard_size = num_samples // world_size
        self._shard_epoch = -1  # the epoch whose indices _shard holds
        self._shard = torch.empty(0, dtype=torch.long)

    @property
    def shard_size(self) -> int:
        return self._shard_size

    def shard(self, epoch: int) -> torch.Tensor:
        """This rank's indices for ``epoch``, in the order it hands them out (the current epoch's is kept)."""
        if epoch != self._shard_epoch:
            perm = epoch_permutation(self.num_samples, self.seed, epoch)
            self._shard, self._shard_epoch = perm[self.rank :: self.world_size][: self._shard_size], epoch
        return self._shard

    def next_spans(self, batch_size: int) -> list[tuple[int, int, int]]:
        """Hand out the next ``batch_size`` samples as ``(epoch, start, stop)`` slices of :meth:`shard`.

        One slice unless the batch crosses the end of an epoch. Streams that keep each epoch's shard
        gathered (:class:`localsgd.data.InMemoryStream`) slice it instead of indexing with
        :meth:`next_indices`; both advance the same cursor.
        """
        end = self.cursor + batch_size
        if end <= self._shard_size:  # the common case: inside the current epoch's shard
            spans = [(self.epoch, self.cursor, end)]
        else:
            spans = list(stream_spans(self.epoch, self.cursor, self._shard_size, batch_size))
            self.epoch = spans[-1][0]
        self.cursor = spans[-1][2]
        self.samples_seen += batch_size
        return spans

    def next_indices(self, batch_size: int) -> torch.Tensor:
        """The next ``batch_size`` indices of this rank's stream (crossing epochs when needed)."""
        parts = [self.shard(epoch)[start:stop] for epoch, start, stop in self.next_spans(batch_size)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "samples_seen": self.samples_seen,
            "num_samples": self.num_samples,
            "world_size": self.world_size,
            "seed": self.seed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("num_samples", "world_size", "seed"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"sampler checkpoint has {key}={state[key]}, this run has {getattr(self, key)}: "
                    "refusing a silent mis-resume (the data shards would differ)"
                )
        self.epoch = int(state["epoch"])
        self.cursor = int(state["cursor"])
        self.samples_seen = int(state["samples_seen"])


class ShardGroup:
    """All ``world_size`` ranks' :class:`ShardSampler` streams at once, as one ``(world_size, batch)`` index tensor.

    Rank k's shard is ``perm[k::W][:S]`` (S = N // W), so the W shards are the columns of
    ``perm[:W·S].view(S, W)``: one slice of that view is every rank's next batch. All ranks draw the same
    batch size at every step, so their cursors move together and one cursor serves them all. Row k of
    :meth:`next_indices` equals rank k's ``ShardSampler.next_indices`` (tested, epoch crossings included);
    :mod:`localsgd.sim` draws its K workers' batches this way instead of making K calls a step.
    """

    def __init__(self, num_samples: int, world_size: int, seed: int) -> None:
        if num_samples < world_size:
            raise ValueError(f"dataset of {num_samples} samples cannot be sharded over {world_size} ranks")
        self.num_samples, self.world_size, self.seed = num_samples, world_size, seed
        self.shard_size = num_samples // world_size
        self.epoch = 0
        self.cursor = 0
        self.samples_seen = 0  # per rank
        self._shards = self._make_shards(0)

    def _make_shards(self, epoch: int) -> torch.Tensor:
        perm = epoch_permutation(self.num_samples, self.seed, epoch)
        return perm[: self.world_size * self.shard_size].view(self.shard_size, self.world_size).T

    def next_indices(self, batch_size: int) -> torch.Tensor:
        """Every rank's next ``batch_size`` indices, shape ``(world_size, batch_size)`` (across epochs when needed)."""
        parts = []
        for epoch, start, stop in stream_spans(self.epoch, self.cursor, self.shard_size, batch_size):
            if epoch != self.epoch:
                self.epoch, self._shards = epoch, self._make_shards(epoch)
            parts.append(self._shards[:, start:stop])
            self.cursor = stop
        self.samples_seen += batch_size
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class ValidationShard:
    """This worker's validation batches for ``optim.StepContext.next_val_batch``, held out from training.

    A seeded permutation, the same on every rank, holds out ``fraction`` of the training samples and
    splits them into one fixed, disjoint part per rank, as each worker would hold out part of its own
    local data; a rank draws batches from its part only (reshuffled every epoch, checkpointed).
    ``train_index`` lists the samples left for training, in their original order.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, fraction: float, batch_size: int, rank: int, world: int,
                 seed: int) -> None:
        n = len(y)
        n_val = int(round(fraction * n))
        if not world <= n_val < n:
            raise ValueError(f"validation fraction {fraction} of {n} training samples leaves {n_val} for "
                             f"validation; need at least one per worker ({world}) and some for training")
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + 7))
        self.train_index = perm[n_val:].sort().values
        mine = perm[:n_val][rank::world].to(y.device)
        self.x, self.y = x[mine], y[mine]
        self.batch_size = batch_size
        self.sampler = ShardSampler(len(mine), 0, 1, seed * 1_000_003 + 11 * (rank + 1))

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.sampler.next_indices(self.batch_size).to(self.y.device)
        return self.x[idx], self.y[idx]

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
