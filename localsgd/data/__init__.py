"""Datasets, registered by the name used in ``configs/data/<name>.yaml``, or a user's factory.

* ``mnist1d``: MNIST-1D (Greydanus & Kobak, ICML 2024, arXiv 2011.14439), generated locally and cached.
* ``digits``, ``breast_cancer``: scikit-learn's bundled UCI sets.
* ``synthetic_logreg``: planted high-dimensional logistic regression (w8a-like, cf. Stich, ICLR 2019).
* ``cifar10``: CIFAR-10 (Krizhevsky 2009) from the python batch files in a local directory.
* ``tokens``: language-model windows of memory-mapped token files (nanoGPT's ``.bin`` layout).

All but ``tokens`` are held in memory as tensors (:class:`Dataset`). A user's own data comes from
``data._target_=my_pkg.make_data``: a callable, given the other keys of ``data`` as arguments, that returns
a :class:`Dataset` (small sets, in memory), a :class:`MapStyleData` (any map-style ``torch`` dataset, read by a
``DataLoader`` with ``loader.num_workers`` workers) or any other :class:`TrainingData` (see
``localsgd.data.base`` for the protocol).

``build(cfg)`` returns a :class:`Dataset` from one of the typed configs below (or an OmegaConf node
with the same fields). Each config dataclass loads its dataset (``cfg.build()``) and registers itself in
:data:`DATASETS`, so a new dataset touches only its own file, ``configs/data/<name>.yaml`` and its test.
"""

from __future__ import annotations

from typing import Any

from .base import DATASETS, Dataset, InMemoryStream, TrainingData, TrainStream
from .cifar10 import CIFAR10Config
from .loader import LoaderOptions, LoaderStream, MapStyleData, loaded
from .mnist1d import MNIST1DConfig
from .sklearn_sets import BreastCancerConfig, DigitsConfig
from .synthetic import SyntheticLogRegConfig
from .tokens import TokenData, TokensConfig

__all__ = [
    "DATASETS",
    "Dataset",
    "InMemoryStream",
    "LoaderOptions",
    "LoaderStream",
    "MapStyleData",
    "loaded",
    "TrainingData",
    "TrainStream",
    "TokenData",
    "TokensConfig",
    "build",
    "MNIST1DConfig",
    "DigitsConfig",
    "BreastCancerConfig",
    "SyntheticLogRegConfig",
    "CIFAR10Config",
]


def build(cfg: Any) -> TrainingData:
    """The dataset named by ``cfg.name``, built from ``cfg``; or what ``cfg``'s ``_target_`` returns."""
    from ..registry import as_target, instantiate_target

    target = as_target(cfg)
    if target is not None:
        made = instantiate_target(target)
        if not isinstance(made, TrainingData):
            raise TypeError(f"data._target_={target.target!r} returned {type(made).__name__}, not a "
                            "localsgd.data.Dataset or another localsgd.data.TrainingData (see localsgd.data.base)")
        return made
    return DATASETS.build(cfg)
