"""Data from any map-style ``torch.utils.data.Dataset``, loaded by a ``DataLoader`` with worker processes.

:class:`MapStyleData` is what a user's data factory returns for data too large to hold as tensors (files
on disk, decoded on the fly): a train and an evaluation dataset whose items are ``(input, target)``, the
loss, and the class count. :func:`loaded` also routes an in-memory :class:`~localsgd.data.base.Dataset`
through the same path (``loader.mode=dataloader``), which is how the tests hold the two paths equal.

The order of the samples is the one the in-memory path uses: :class:`~localsgd.sampler.ShardSampler`'s
disjoint shards, reshuffled each epoch, drawn by the sample (so a batch that changes mid-epoch skips
nothing). A ``DataLoader`` prefetches, so the indices it is given run ahead of the loop; the stream
therefore keeps two samplers: the *producer*, which feeds the loader the batches of the coming steps
(their sizes are known in advance: ``plan(step)``, the ramp's batch times the micro-batches, 0 for a step
that draws no data), and the *consumer*, advanced by each batch the loop takes, which is what a
checkpoint records. A resume restarts the producer from the consumer's position, so it continues with
exactly the samples the uninterrupted run would have drawn, whatever ``num_workers`` is. The loader makes
one pass over the whole run, so its workers live as long as the run (``persistent_workers`` only
matters across passes). They are *spawned* by default (``loader.start_method``): a rank runs Gloo's and
the interpreter's threads, and a process forked from it can inherit a lock one of them held at that instant
and wait on it forever (CPython 3.11 was seen to stop in ``PyOS_AfterFork_Child``), which stalls the rank and
times out its peers' collectives. Spawned workers start clean and watch their parent, so they also exit
when a rank is killed; the price is a second or two at start, a dataset that pickles (``fork`` stays
available for one that does not), and tensors moved into shared memory (``/dev/shm``) to reach them. A
fork server is not offered: its workers keep it alive and it keeps them alive, so a killed rank's workers
would never exit. Workers are seeded from a generator of their own
(the run seed and the rank), never from the global RNG that dropout draws from. A ramp that decides its
batch at run time (``ramp=noise_scale``) cannot be planned ahead, and is refused with this path by
``config.check_config``.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from ..sampler import ShardSampler
from .base import Batch, Dataset, TrainingData

Plan = Callable[[int], int]
"""``plan(step)``: the number of samples local step ``step`` draws (0: none)."""


@dataclass
class LoaderOptions:
    """``loader.*``: how the ``DataLoader`` loads (``torch.utils.data.DataLoader``'s own arguments)."""

    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = True
    prefetch_factor: int = 2
    start_method: str = "spawn"


@dataclass
class MapStyleData(TrainingData):
    """Map-style train and evaluation datasets of ``(input, target)`` items, loaded by a ``DataLoader``."""

    train: Any
    test: Any
    num_classes: int
    name: str = "map_style"
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy
    reports_accuracy: bool = True
    options: LoaderOptions = field(default_factory=LoaderOptions)
    _eval_loaders: dict[tuple[int, int, int, str], DataLoader] = field(default_factory=dict, repr=False,
                                                                       compare=False)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(torch.as_tensor(self.train[0][0]).shape)

    @property
    def num_train(self) -> int:
        return len(self.train)

    def _loader(self, dataset: Any, batch_sampler: Any, seed: int, device: torch.device) -> DataLoader:
        o = self.options
        workers = o.num_workers > 0
        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=o.num_workers,
                          pin_memory=o.pin_memory and device.type == "cuda",
                          persistent_workers=o.persistent_workers and workers,
                          prefetch_factor=o.prefetch_factor if workers else None,
                          generator=torch.Generator().manual_seed(seed),
                          multiprocessing_context=o.start_method if workers else None)

    def train_stream(self, rank: int, world: int, seed: int, device: torch.device) -> LoaderStream:
        return LoaderStream(self, ShardSampler(self.num_train, rank, world, seed), seed * 1_000_003 + 31 * (rank + 1),
                            device)

    def eval_batches(self, rank: int, world: int, batch_size: int, device: torch.device) -> Iterator[Batch]:
        key = (rank, world, batch_size, str(device))
        if key not in self._eval_loaders:  # one loader for every evaluation: its workers start once
            mine = list(range(rank, len(self.test), world))
            batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
            self._eval_loaders[key] = self._loader(self.test, batches, 0, device)
        with _sigint_ignored():  # the first pass starts the workers
            batches = iter(self._eval_loaders[key])
        for x, y in batches:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def close(self) -> None:
        """Stop the evaluation loaders' workers (the training stream stops its own)."""
        loaders, self._eval_loaders = self._eval_loaders, {}
        for loader in loaders.values():
            _shutdown(getattr(loader, "_iterator", None))


def loaded(data: TrainingData, mode: str, options: LoaderOptions) -> TrainingData:
    """``data`` as the loop will read it: an in-memory set through a ``DataLoader`` when ``mode`` says so,
    a map-style set with the ``loader.*`` options; anything else (token windows) as it is."""
    if isinstance(data, Dataset) and mode == "dataloader":
        return MapStyleData(TensorDataset(data.x_train, data.y_train), TensorDataset(data.x_test, data.y_test),
                            data.num_classes, name=data.name, options=options)
    if isinstance(data, MapStyleData):
        return replace(data, options=options, _eval_loaders={})
    return data


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Start workers with SIGINT ignored, a disposition a spawned interpreter inherits and keeps. A terminal's
    Ctrl-C reaches the whole process group: a worker still importing torch would die of it, and the loader
    with it, where the rank means to stop at its next sync with a checkpoint (the rank stops its workers
    itself). Only the main thread may set handlers; elsewhere the workers start as they are."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _shutdown(batches: object) -> None:
    """Stop a ``DataLoader`` iterator's workers now rather than when it is collected (or the rank exits)."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


class _PlannedBatches:
    """The loader's batch sampler: the index lists of the coming steps, from the producer sampler."""

    def __init__(self, producer: ShardSampler, plan: Plan, first_step: int, last_step: int) -> None:
        self.producer, self.plan, self.first, self.last = producer, plan, first_step, last_step

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.first, self.last):
            size = self.plan(step)
            if size:
                yield self.producer.next_indices(size).tolist()


class LoaderStream:
    """One rank's training batches through a ``DataLoader``; see the module docstring."""

    def __init__(self, data: MapStyleData, sampler: ShardSampler, seed: int, device: torch.device) -> None:
        self.data, self.sampler, self.seed, self.device = data, sampler, seed, device
        self._batches: Iterator[Batch] | None = None

    @property
    def samples_seen(self) -> int:
        return self.sampler.samples_seen

    def start(self, plan: Plan, first_step: int, last_step: int) -> None:
        """Start loading the batches of steps ``first_step .. last_step - 1`` from the consumer's position."""
        producer = ShardSampler(self.sampler.num_samples, self.sampler.rank, self.sampler.world_size,
                                self.sampler.seed)
        producer.load_state_dict(self.sampler.state_dict())
        self.close()
        loader = self.data._loader(self.data.train, _PlannedBatches(producer, plan, first_step, last_step),
                                   self.seed, self.device)
        with _sigint_ignored():
            self._batches = iter(loader)

    def next_batch(self, batch_size: int) -> Batch:
        if self._batches is None:
            raise RuntimeError("LoaderStream.start(plan, first_step, last_step) must be called before next_batch")
        x, y = next(self._batches)
        if len(y) != batch_size:
            raise RuntimeError(f"the loader's batch has {len(y)} samples and the step asked for {batch_size}: the "
                               "plan given to start() does not match the steps taken")
        self.sampler.next_spans(batch_size)  # the consumer follows the loop, for the checkpoint
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def close(self) -> None:
        """Stop the loader's workers (the run's end, or a restart of the plan)."""
        batches, self._batches = self._batches, None
        _shutdown(batches)

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)


__all__ = ["LoaderOptions", "LoaderStream", "MapStyleData", "loaded"]
