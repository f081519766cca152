"""The in-memory dataset record and the dataset registry shared by every loader in ``localsgd.data``.

All datasets used by localsgd (MNIST-1D, Greydanus 2020, arXiv 2011.14439; scikit-learn's digits and
breast-cancer sets; synthetic logistic regression; CIFAR-10, Krizhevsky 2009) are small enough to
hold as tensors, so a loader returns the whole train and test split at once and the trainer shards it.
Each config dataclass registers itself with ``@DATASETS.add`` and loads its dataset in ``build()``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..registry import Registry

Problem = tuple[str, Any, str]
"""``(field_name, value, requirement)`` as yielded by every config's ``problems()``."""
Problems = Iterator[Problem]


@dataclass
class Dataset:
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
