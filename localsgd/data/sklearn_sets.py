"""Two small tabular sets bundled with scikit-learn (no download): ``digits`` and ``breast_cancer``.

* digits: the UCI optical-recognition handwritten digits (Alpaydin & Kaynak 1998) as shipped by
  ``sklearn.datasets.load_digits``: 1,797 8x8 images, 10 classes; pixels 0..16 scaled to [0, 1] and
  flattened to 64 features.
* breast_cancer: the Wisconsin diagnostic breast cancer set (Street, Wolberg & Mangasarian 1993) from
  ``sklearn.datasets.load_breast_cancer``: 569 rows, 30 features, 2 classes; features standardised
  with the mean and standard deviation of the *train* split only (no test-set leakage).

Both use a deterministic (unstratified) random split chosen by ``seed``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import DATASETS, Dataset, Problems, check_fraction, split_indices


@DATASETS.add
@dataclass
class DigitsConfig:
    """``data=digits``: scikit-learn's 8x8 digits, flattened to 64 features in [0, 1], 10 classes."""

    name: str = "digits"
    seed: int = 0  # chooses the train/test split
    test_fraction: float = 0.25

    def problems(self) -> Problems:
        yield from check_fraction("test_fraction", self.test_fraction)

    def build(self) -> Dataset:
        from sklearn.datasets import load_digits

        bunch = load_digits()
        x = np.asarray(bunch.data, dtype=np.float64) / 16.0  # pixel intensities 0..16 -> [0, 1]
        y = np.asarray(bunch.target)
        return _to_dataset("digits", x, y, 10, self.seed, self.test_fraction, standardise=False)


@DATASETS.add
@dataclass
class BreastCancerConfig:
    """``data=breast_cancer``: 30 standardised features (train statistics), 2 classes."""

    name: str = "breast_cancer"
    seed: int = 0  # chooses the train/test split
    test_fraction: float = 0.25

    def problems(self) -> Problems:
        yield from check_fraction("test_fraction", self.test_fraction)

    def build(self) -> Dataset:
        from sklearn.datasets import load_breast_cancer

        bunch = load_breast_cancer()
        x = np.asarray(bunch.data, dtype=np.float64)
        y = np.asarray(bunch.target)
        return _to_dataset("breast_cancer", x, y, 2, self.seed, self.test_fraction, standardise=True)


def _to_dataset(
    name: str,
    x: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    seed: int,
    test_fraction: float,
    standardise: bool,
) -> Dataset:
    train, test = split_indices(len(y), test_fraction, seed)
    x_train, x_test = x[train], x[test]
    if standardise:
        mean = x_train.mean(axis=0)
        std = x_train.std(axis=0)
        std[std == 0] = 1.0  # a constant train feature stays 0 instead of dividing by zero
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    return Dataset(
        name=name,
        x_train=torch.from_numpy(np.ascontiguousarray(x_train, dtype=np.float32)),
        y_train=torch.from_numpy(y[train].astype(np.int64)),
        x_test=torch.from_numpy(np.ascontiguousarray(x_test, dtype=np.float32)),
        y_test=torch.from_numpy(y[test].astype(np.int64)),
        num_classes=num_classes,
    )
