"""Datasets, registered by the name used in ``configs/data/<name>.yaml``; all held in memory as tensors.

* ``mnist1d``: MNIST-1D (Greydanus & Kobak, ICML 2024, arXiv 2011.14439), generated locally and cached.
* ``digits``, ``breast_cancer``: scikit-learn's bundled UCI sets.
* ``synthetic_logreg``: planted high-dimensional logistic regression (w8a-like, cf. Stich, ICLR 2019).
* ``cifar10``: CIFAR-10 (Krizhevsky 2009) from the python batch files in a local directory.

``build(cfg)`` returns a :class:`Dataset` from one of the typed configs below (or an OmegaConf node
with the same fields). Each config dataclass loads its dataset (``cfg.build()``) and registers itself in
:data:`DATASETS`, so a new dataset touches only its own file, ``configs/data/<name>.yaml`` and its test.
"""

from __future__ import annotations

from typing import Any

from .base import DATASETS, Dataset
from .cifar10 import CIFAR10Config
from .mnist1d import MNIST1DConfig
from .sklearn_sets import BreastCancerConfig, DigitsConfig
from .synthetic import SyntheticLogRegConfig

__all__ = [
    "DATASETS",
    "Dataset",
    "build",
    "MNIST1DConfig",
    "DigitsConfig",
    "BreastCancerConfig",
    "SyntheticLogRegConfig",
    "CIFAR10Config",
]


def build(cfg: Any) -> Dataset:
    """The dataset named by ``cfg.name``, built from ``cfg``."""
    return DATASETS.build(cfg)
