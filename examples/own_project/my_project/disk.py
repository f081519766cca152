"""Data of the user's own, read from disk item by item: the two spirals as one ``.npy`` file per split,
memory-mapped and read by a ``DataLoader``'s worker processes (``loader.num_workers``).

A factory for data too large to hold as tensors returns ``localsgd.data.MapStyleData`` of map-style
``torch.utils.data.Dataset``\\ s; localsgd shards, orders, prefetches and checkpoints the samples.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset as TorchDataset

from localsgd.data import MapStyleData

from .data import two_spirals


class NpyPoints(TorchDataset):
    """Rows of ``<root>/<split>_x.npy`` with labels from ``<root>/<split>_y.npy``, opened lazily per worker."""

    def __init__(self, root: Path, split: str) -> None:
        self.x_path, self.y_path = root / f"{split}_x.npy", root / f"{split}_y.npy"
        self.n = int(np.load(self.y_path, mmap_mode="r").shape[0])
        self._x: np.ndarray | None = None
        self._y: np.ndarray | None = None

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict[str, object]:
        # What a spawned worker receives: the paths, never maps opened here (they would pickle as copies).
        return {**self.__dict__, "_x": None, "_y": None}

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._x is None:  # in each worker: it maps the files itself
            self._x, self._y = np.load(self.x_path, mmap_mode="r"), np.load(self.y_path, mmap_mode="r")
        assert self._y is not None
        return torch.from_numpy(np.array(self._x[i])), torch.tensor(int(self._y[i]))


def spirals_on_disk(root: str, n: int = 4000, seed: int = 0) -> MapStyleData:
    """Write the spirals under ``root`` once (like a dataset's preparation step), then read them from there."""
    where = Path(root).expanduser()
    if not (where / "test_y.npy").is_file():
        where.mkdir(parents=True, exist_ok=True)
        ds = two_spirals(n=n, seed=seed)
        for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
            for name, array in ((f"{split}_x.npy", x.numpy()), (f"{split}_y.npy", y.numpy())):
                # Every rank may write at once: each writes a file of its own, then renames it into place.
                tmp = where / f".{name}.{os.getpid()}.tmp"
                with open(tmp, "wb") as f:
                    np.save(f, array)
                os.replace(tmp, where / name)  # test_y.npy comes last: its presence marks a complete set
    return MapStyleData(NpyPoints(where, "train"), NpyPoints(where, "test"), num_classes=2, name="spirals_on_disk")
