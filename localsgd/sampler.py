"""Disjoint, per-epoch reshuffled data shards that count samples, not steps.

Every rank draws the same permutation of the N training indices for epoch e (seeded by the run seed
and e, like ``DistributedSampler.set_epoch``, which pytorch/pytorch#31771 shows people forget), and
takes every W-th index starting at its rank, truncated to ``N // W`` so all shards are equal and
disjoint (the ``N mod W`` leftover indices are skipped that epoch; they are different ones each epoch).
The sampler keeps a *sample* cursor, so a batch size that changes mid-epoch neither skips nor repeats
data and a resume continues with exactly the remaining indices (``reliability.md`` T10).
"""

from __future__ import annotations

from typing import Any

import torch


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
        self._shard = self._make_shard(0)

    @property
    def shard_size(self) -> int:
        return self.num_samples // self.world_size

    def _make_shard(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.num_samples, generator=gen)
        return perm[self.rank :: self.world_size][: self.shard_size]

    def next_indices(self, batch_size: int) -> torch.Tensor:
        """The next ``batch_size`` indices of this rank's stream (crossing epochs when needed)."""
        end = self.cursor + batch_size
        if end <= self._shard_size:  # the common case: one slice of the current epoch's shard
            out = self._shard[self.cursor : end]
            self.cursor = end
            self.samples_seen += batch_size
            return out
        parts = []
        need = batch_size
        while need > 0:
            if self.cursor == self.shard_size:
                self.epoch += 1
                self.cursor = 0
                self._shard = self._make_shard(self.epoch)
            take = min(need, self.shard_size - self.cursor)
            parts.append(self._shard[self.cursor : self.cursor + take])
            self.cursor += take
            need -= take
        self.samples_seen += batch_size
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
        self._shard = self._make_shard(self.epoch)
