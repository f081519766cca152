"""What the worker loop trains on (:class:`TrainingData`), its in-memory form, and the dataset registry.

The loop asks its data for four things, which is the whole protocol a data factory returns (a built-in
``data=<name>`` or a user's ``data._target_=my_pkg.make_data``):

* ``input_shape`` and ``num_classes``, which the built-in models are sized by (a token set gives its
  window ``(T,)`` and its vocabulary);
* ``train_stream(rank, world, seed, device)``: this rank's endless stream of training batches, which
  counts its samples and checkpoints its position (:class:`TrainStream`);
* ``eval_batches(rank, world, batch_size, device)``: this rank's part of a fixed evaluation set, the
  parts of all ranks disjoint and together the whole set;
* ``loss_fn(logits, targets)``: the training loss, a *mean over the elements of the targets* (the
  evaluation multiplies it by ``targets.numel()`` to sum over ranks exactly), with
  ``reports_accuracy`` (targets are class indices of ``logits.argmax(-1)``) and ``reports_perplexity``
  (the loss is a mean token negative log-likelihood, so ``exp`` of it is the perplexity).

:class:`Dataset` holds small sets whole as tensors (MNIST-1D, Greydanus 2020, arXiv 2011.14439;
scikit-learn's digits and breast-cancer sets; synthetic logistic regression; CIFAR-10, Krizhevsky
2009): its stream slices them on the device in the order of :class:`localsgd.sampler.ShardSampler`,
from a copy of the rank's shard gathered once an epoch (:class:`InMemoryStream`), the fast path. Each
config dataclass registers itself with ``@DATASETS.add`` and loads its dataset in ``build()``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import Registry
from ..sampler import ShardSampler

Batch = tuple[torch.Tensor, torch.Tensor]

Problem = tuple[str, Any, str]
"""``(field_name, value, requirement)`` as yielded by every config's ``problems()``."""
Problems = Iterator[Problem]


class TrainStream(Protocol):
    """One rank's training batches, in an order fixed by the seed, with a checkpointable position."""

    @property
    def samples_seen(self) -> int: ...

    def start(self, plan: Callable[[int], int], first_step: int, last_step: int) -> None:
        """Before the first batch (and after a resume): ``plan(step)`` samples at each step to come, for
        streams that load ahead (a ``DataLoader``); the others ignore it."""

    def next_batch(self, batch_size: int) -> Batch: ...

    def close(self) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TrainingData:
    """The protocol of the module docstring; subclasses set the attributes and the two methods."""

    name: str
    num_classes: int
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = staticmethod(F.cross_entropy)
    reports_accuracy: bool = True  # targets are class indices: accuracy of logits.argmax(-1)
    reports_perplexity: bool = False  # the loss is a mean token NLL: exp(loss) is the perplexity
    train_accuracy: bool = True  # keep each step's logits for the logging window's training accuracy
    tokens_per_sample: int | None = None  # a token set counts tokens as well as samples (windows)

    @property
    def input_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    @property
    def num_train(self) -> int | None:
        """Training samples, for the batch-fits-a-shard check; None for a stream without epochs."""
        return None

    def train_stream(self, rank: int, world: int, seed: int, device: torch.device) -> TrainStream:
        raise NotImplementedError

    def eval_batches(self, rank: int, world: int, batch_size: int, device: torch.device) -> Iterator[Batch]:
        raise NotImplementedError

    def close(self) -> None:
        """Release what evaluation holds (a loader's worker processes); the run's end calls it."""


EPOCH_COPY_MAX_BYTES = 64 * 2**20
"""Largest shard (inputs and targets) an :class:`InMemoryStream` copies into sample order once an epoch."""


class InMemoryStream:
    """Batches of tensors already on the device, in the order of the sampler's indices.

    A shard of at most :data:`EPOCH_COPY_MAX_BYTES` is gathered into the epoch's sample order once,
    when the epoch starts, and each batch is a slice of that copy: a view, where indexing a batch out
    of the whole set copies it (two gathers a step). The batches are the same tensors either way
    (tested); a larger shard is indexed batch by batch, so the copy never doubles a large set.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, sampler: ShardSampler) -> None:
        self.x, self.y, self.sampler = x, y, sampler
        row_bytes = x[:1].nbytes + y[:1].nbytes
        self.copies_epochs = row_bytes * sampler.shard_size <= EPOCH_COPY_MAX_BYTES
        self._epoch = -1  # the epoch whose shard _x, _y hold, in sample order
        self._x, self._y = x[:0], y[:0]

    @property
    def samples_seen(self) -> int:
        return self.sampler.samples_seen

    def start(self, plan: Callable[[int], int], first_step: int, last_step: int) -> None:
        pass  # slices on demand

    def next_batch(self, batch_size: int) -> Batch:
        if not self.copies_epochs:
            idx = self.sampler.next_indices(batch_size)
            return self.x[idx], self.y[idx]
        parts = [self._epoch_slice(*span) for span in self.sampler.next_spans(batch_size)]
        if len(parts) == 1:  # the batch lies inside one epoch: views, no copy
            return parts[0]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    def _epoch_slice(self, epoch: int, start: int, stop: int) -> Batch:
        if epoch != self._epoch:  # a new epoch: gather its shard into sample order once
            idx = self.sampler.shard(epoch)
            self._x, self._y, self._epoch = self.x[idx], self.y[idx], epoch
        return self._x[start:stop], self._y[start:stop]

    def close(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()  # the sampler's own state: checkpoints of earlier versions resume

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


@dataclass
class Dataset(TrainingData):
    """A whole dataset in memory: float32 inputs of shape ``(N, *input_shape)``, int64 class labels."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != torch.float32:
                raise TypeError(f"{self.name}: x_{split} must be float32, got {x.dtype}")
            if y.dtype != torch.int64 or y.dim() != 1:
                raise TypeError(f"{self.name}: y_{split} must be a 1-D int64 tensor, got {y.dtype} {y.shape}")
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"{self.name}: x_{split} has {x.shape[0]} rows but y_{split} {y.shape[0]}")
        if self.x_test.shape[1:] != self.x_train.shape[1:]:
            raise ValueError(
                f"{self.name}: train inputs {tuple(self.x_train.shape[1:])} and test inputs "
                f"{tuple(self.x_test.shape[1:])} differ in shape"
            )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={self.x_train.shape[0]}, test={self.x_test.shape[0]}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )

    @property
    def num_train(self) -> int:
        return int(self.y_train.shape[0])

    def train_stream(self, rank: int, world: int, seed: int, device: torch.device) -> InMemoryStream:
        """Disjoint shards reshuffled every epoch (:class:`~localsgd.sampler.ShardSampler`), on ``device``."""
        return InMemoryStream(self.x_train.to(device), self.y_train.to(device),
                              ShardSampler(self.num_train, rank, world, seed))

    def eval_batches(self, rank: int, world: int, batch_size: int, device: torch.device) -> Iterator[Batch]:
        """Every ``world``-th test sample from ``rank`` on, in batches of ``batch_size``."""
        xs, ys = self.x_test[rank::world].to(device), self.y_test[rank::world].to(device)
        for i in range(0, len(ys), batch_size):
            yield xs[i : i + batch_size], ys[i : i + batch_size]

    def without_train_rows(self, keep: torch.Tensor) -> Dataset:
        """The same dataset training on rows ``keep`` of its training set only (a held-out validation part)."""
        return Dataset(self.name, self.x_train[keep], self.y_train[keep], self.x_test, self.y_test, self.num_classes)


DATASETS: Registry[Dataset] = Registry("data")


def split_indices(n: int, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic random (not stratified) train/test split of ``range(n)`` by ``seed``.

    The test part has ``round(n * test_fraction)`` rows, clipped so both parts are non-empty; both parts
    are in shuffled order, so contiguous shards of either are not sorted by class.
    """
    n_test = min(max(int(round(n * test_fraction)), 1), n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_test:], perm[:n_test]


def check_fraction(name: str, value: float) -> Problems:
    if not 0.0 < value < 1.0:
        yield name, value, "must be in (0, 1)"
