"""CIFAR-10 (Krizhevsky, "Learning Multiple Layers of Features from Tiny Images", 2009) from local files.

Reads the standard *python* version of the set: the pickled batches ``data_batch_1`` ..
``data_batch_5`` and ``test_batch`` (dicts with ``b"data"``, uint8 (N, 3072) in channel-major
order, and ``b"labels"``), from ``root`` or ``root/cifar-10-batches-py``. Nothing is downloaded:
the files must already be there. Images become float32 (N, 3, 32, 32), normalised per channel with
the mean and standard deviation of the (possibly limited) train set.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DATASETS, Dataset, Problems

TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
SUBDIR = "cifar-10-batches-py"
NUM_CLASSES = 10


@DATASETS.add
@dataclass
class CIFAR10Config:
    """``data=cifar10``: CIFAR-10 from the python batch files in ``root``; (3, 32, 32), 10 classes."""

    name: str = "cifar10"
    root: str | None = None  # required: a directory holding the batches, or holding cifar-10-batches-py/
    limit_train: int = 0  # use only the first N train images (0 = all 50,000)
    limit_test: int = 0  # use only the first N test images (0 = all 10,000)

    def problems(self) -> Problems:
        if not self.root or self.root == "???":  # "???" is OmegaConf's MISSING
            need = f"must name a directory holding the CIFAR-10 python batches (or {SUBDIR}/); no download"
            yield "root", self.root, need
        if self.limit_train < 0:
            yield "limit_train", self.limit_train, "must be >= 0 (0 = all)"
        if self.limit_test < 0:
            yield "limit_test", self.limit_test, "must be >= 0 (0 = all)"

    def build(self) -> Dataset:
        if not self.root or self.root == "???":
            raise FileNotFoundError(
                "data.root is not set: CIFAR-10 cannot be downloaded here; place its python batches "
                f"(data_batch_1..5, test_batch, or the {SUBDIR}/ folder) in a directory and set data.root to it"
            )
        for key in ("limit_train", "limit_test"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key}={getattr(self, key)} must be >= 0 (0 = all)")
        directory = resolve_root(self.root)
        x_train, y_train = _read_split(directory, TRAIN_FILES, int(self.limit_train), self.root)
        x_test, y_test = _read_split(directory, (TEST_FILE,), int(self.limit_test), self.root)
        mean, std = channel_stats(x_train.reshape(len(x_train), 3, -1))
        return Dataset(
            name="cifar10",
            x_train=_normalise(x_train, mean, std),
            y_train=torch.from_numpy(y_train),
            x_test=_normalise(x_test, mean, std),
            y_test=torch.from_numpy(y_test),
            num_classes=NUM_CLASSES,
        )


def resolve_root(root: str | Path) -> Path:
    """``root`` itself when it holds the batches, else ``root/cifar-10-batches-py`` when that exists."""
    base = Path(root).expanduser()
    sub = base / SUBDIR
    if not (base / TRAIN_FILES[0]).exists() and sub.is_dir():
        return sub
    return base


def _missing(path: Path, root: str | Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"CIFAR-10 batch file {path} is missing. CIFAR-10 cannot be downloaded here: place the python "
        f"version of the set (data_batch_1..5 and test_batch, as unpacked from cifar-10-python.tar.gz) "
        f"in {root!s} or in {Path(root) / SUBDIR!s}, and set data.root to it."
    )


def _get(d: dict[Any, Any], key: str) -> Any:
    if key.encode() in d:
        return d[key.encode()]
    if key in d:
        return d[key]
    raise KeyError(key)


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One batch file: uint8 images (N, 3072) and int64 labels (N,)."""
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="bytes")
    try:
        data = np.asarray(_get(d, "data"))
        labels = np.asarray(_get(d, "labels"), dtype=np.int64)
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (no {e} entry)") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"{path} is not a CIFAR-10 python batch: data {data.dtype} {data.shape}, {len(labels)} labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"{path} has labels outside [0, {NUM_CLASSES})")
    return data, labels


def _read_split(
    directory: Path, names: tuple[str, ...], limit: int, root: str | Path
) -> tuple[np.ndarray, np.ndarray]:
    for name in names:  # check every file first so the error names the first missing one, before any IO
        if not (directory / name).is_file():
            raise _missing(directory / name, root)
    xs, ys, have = [], [], 0
    for name in names:
        x, y = read_batch(directory / name)
        xs.append(x)
        ys.append(y)
        have += len(y)
        if limit and have >= limit:
            break
    x, y = np.concatenate(xs), np.concatenate(ys)
    if limit:
        x, y = x[:limit], y[:limit]
    return x, y


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean and (population) std of uint8 images (N, 3, HW), from value histograms."""
    values = np.arange(256, dtype=np.float64)
    mean, std = np.empty(3), np.empty(3)
    for c in range(3):
        counts = np.bincount(x[:, c].ravel(), minlength=256).astype(np.float64)
        total = counts.sum()
        mean[c] = (counts * values).sum() / total
        std[c] = np.sqrt((counts * (values - mean[c]) ** 2).sum() / total)
    std[std == 0] = 1.0
    return mean, std


def _normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(x).reshape(len(x), 3, 32, 32).to(torch.float32)
    shape = (1, 3, 1, 1)
    return t.sub_(torch.from_numpy(mean).float().view(shape)).div_(torch.from_numpy(std).float().view(shape))
