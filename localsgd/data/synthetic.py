"""Synthetic high-dimensional binary logistic regression, a planted model in the style of LIBSVM's w8a.

A well-specified convex problem of the kind local SGD is analysed on (Stich, ICLR 2019,
arXiv 1805.09767, uses logistic regression on w8a/epsilon): draw a true weight vector
``w* ~ N(0, I) / sqrt(d * sparsity)`` and rows ``x`` with a ``sparsity`` fraction of non-zero
entries (``binary``: the non-zeros are 1, like w8a; ``gaussian``: they are N(0, 1)), so that
``x . w*`` has variance about 1; then ``y ~ Bernoulli(sigmoid(scale * x . w*))``, and a
``label_noise`` fraction of labels is flipped. Everything is drawn from ``numpy.random.Generator``
seeded by ``seed``, so the data is identical on every worker and every run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .base import DATASETS, Dataset, Problems, check_fraction

FEATURE_KINDS = ("binary", "gaussian")


@DATASETS.add
@dataclass
class SyntheticLogRegConfig:
    """``data=synthetic_logreg``: planted logistic-regression data, ``n_features`` inputs, 2 classes."""

    name: str = "synthetic_logreg"
    n_samples: int = 20000  # train + test
    n_features: int = 300
    sparsity: float = 0.1  # expected fraction of non-zero features per row (1.0 = dense; gaussian only)
    features: str = "binary"  # "binary" ({0, 1}, like w8a) or "gaussian"
    scale: float = 1.0  # multiplies the logits x . w*; larger = cleaner labels
    label_noise: float = 0.0  # fraction of labels flipped after sampling
    test_fraction: float = 0.2
    seed: int = 0

    def problems(self) -> Problems:
        if self.n_samples < 10:
            yield "n_samples", self.n_samples, "must be >= 10"
        if self.n_features < 1:
            yield "n_features", self.n_features, "must be >= 1"
        if not 0.0 < self.sparsity <= 1.0:
            yield "sparsity", self.sparsity, "must be in (0, 1]"
        elif self.features == "binary" and self.sparsity == 1.0:
            yield "sparsity", self.sparsity, "must be < 1 for binary features (dense rows are all ones)"
        if self.features not in FEATURE_KINDS:
            yield "features", self.features, f"must be one of {list(FEATURE_KINDS)}"
        if not self.scale > 0.0:
            yield "scale", self.scale, "must be > 0"
        if not 0.0 <= self.label_noise < 0.5:
            yield "label_noise", self.label_noise, "must be in [0, 0.5)"
        yield from check_fraction("test_fraction", self.test_fraction)
        if self.seed < 0:
            yield "seed", self.seed, "must be >= 0"

    def build(self) -> Dataset:
        x, y, _ = generate(self)
        n_test = min(max(int(round(len(y) * self.test_fraction)), 1), len(y) - 1)
        n_train = len(y) - n_test  # rows are i.i.d., so the first rows are as random a train set as any
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        return Dataset(
            name="synthetic_logreg",
            x_train=xt[:n_train].clone(),
            y_train=yt[:n_train].clone(),
            x_test=xt[n_train:].clone(),
            y_test=yt[n_train:].clone(),
            num_classes=2,
        )


def generate(cfg: SyntheticLogRegConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(x, y, w_star)``: float32 (n, d) inputs, int64 (n,) labels in {0, 1}, float64 (d,) weights."""
    problems = list(SyntheticLogRegConfig.problems(cfg))  # also works on an OmegaConf DictConfig
    if problems:
        what = "; ".join(f"{k}={v!r} {r}" for k, v, r in problems)
        raise ValueError(f"invalid synthetic_logreg config: {what}")
    rng = np.random.default_rng(cfg.seed)
    n, d, s = int(cfg.n_samples), int(cfg.n_features), float(cfg.sparsity)
    w_star = rng.standard_normal(d) / np.sqrt(d * s)
    mask = rng.random((n, d), dtype=np.float32) < s
    if cfg.features == "binary":
        x = mask.astype(np.float32)
    else:
        x = rng.standard_normal((n, d), dtype=np.float32) * mask
    logits = cfg.scale * (x.astype(np.float64) @ w_star)
    y = (rng.random(n) < 1.0 / (1.0 + np.exp(-logits))).astype(np.int64)
    flip = rng.random(n) < cfg.label_noise
    y[flip] = 1 - y[flip]
    return x, y, w_star
