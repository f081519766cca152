"""A model of the user's own: a residual MLP (He et al., CVPR 2016, arXiv 1512.03385, Eq. 1, on vectors)."""

from __future__ import annotations

import math

import torch
from torch import nn


class ResidualMLP(nn.Module):
    """``depth`` blocks ``x + W2 relu(W1 LayerNorm(x))`` between an input and an output layer.

    localsgd passes ``input_shape`` and ``num_classes`` of the data because the signature names them;
    ``width`` and ``depth`` come from the config (``model.width=64``).
    """

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, width: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.inp = nn.Linear(math.prod(input_shape), width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))
            for _ in range(depth))
        self.out = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)
