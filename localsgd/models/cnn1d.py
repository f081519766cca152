"""A small 1-D CNN for MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D",
ICML 2024, arXiv 2011.14439), in the spirit of the paper's baseline CNN.

Three Conv1d layers with kernel 5 and ``channels`` filters (strides 1, 2, 2, "same" padding, ReLU),
then optional dropout and a Linear layer on the flattened features: for (1, 40) inputs and the
default 32 channels that is 13.7k parameters, and a single worker with SGD (lr 0.05, momentum 0.9,
batch 64) passes 0.90 test accuracy on 10,000-sample MNIST-1D after about 500 steps. No
normalisation layers, so it has no buffers and every parameter is averaged by local SGD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import MODELS, Problems, check_classes, check_dropout, raise_problems

KERNEL = 5
STRIDES = (1, 2, 2)


@MODELS.add
@dataclass
class CNN1DConfig:
    """``model=cnn1d``: 3 x (Conv1d k5 -> ReLU), strides 1, 2, 2, then Linear; inputs (C, L) or (L,)."""

    name: str = "cnn1d"
    channels: int = 32
    dropout: float = 0.0  # before the final Linear layer

    def problems(self) -> Problems:
        if self.channels < 1:
            yield "channels", self.channels, "must be >= 1"
        yield from check_dropout(self.dropout)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        raise_problems("cnn1d", self.problems())
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 1:
            shape = (1, *shape)
        if len(shape) != 2 or min(shape) < 1:
            raise ValueError(
                f"model 'cnn1d' needs inputs shaped (C, L) or (L,), got input_shape={tuple(input_shape)}"
            )
        return CNN1D(shape[0], shape[1], check_classes("cnn1d", num_classes), int(self.channels), float(self.dropout))


def _out_len(length: int, stride: int) -> int:
    pad = KERNEL // 2
    return (length + 2 * pad - KERNEL) // stride + 1


class CNN1D(nn.Module):
    def __init__(
        self, in_channels: int, length: int, num_classes: int, channels: int = 32, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.in_channels, self.length = in_channels, length
        layers: list[nn.Module] = []
        c_in, out_len = in_channels, length
        for stride in STRIDES:
            layers += [nn.Conv1d(c_in, channels, KERNEL, stride=stride, padding=KERNEL // 2), nn.ReLU()]
            c_in, out_len = channels, _out_len(out_len, stride)
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.head = nn.Linear(channels * out_len, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], self.in_channels, self.length)  # (B, L) inputs get their channel dim
        return self.head(self.dropout(self.features(x).flatten(1)))
