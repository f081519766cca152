"""Data of the user's own: two interleaved spirals (Lang & Witbrock, 1988), generated from a seed.

A data factory returns a ``localsgd.data.Dataset`` (tensors in memory, the fast path) or any other
``localsgd.data.TrainingData``; see ``localsgd/data/base.py`` for the protocol.
"""

from __future__ import annotations

import math

import torch

from localsgd.data import Dataset


def two_spirals(n: int = 4000, noise: float = 0.1, turns: float = 1.5, test_fraction: float = 0.2,
                seed: int = 0) -> Dataset:
    """``n`` points of two classes on the arms of two spirals, with Gaussian noise; shuffled, then split."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g) * turns * 2 * math.pi
    label = torch.randint(0, 2, (n,), generator=g)
    angle = t + math.pi * label
    radius = t / (turns * 2 * math.pi)
    x = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    x = (x + noise * radius.unsqueeze(1) * torch.randn(n, 2, generator=g)).float()
    n_test = int(n * test_fraction)
    return Dataset("two_spirals", x[n_test:], label[n_test:], x[:n_test], label[:n_test], num_classes=2)
