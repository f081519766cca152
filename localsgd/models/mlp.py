"""A multilayer perceptron (Rumelhart, Hinton & Williams 1986): Linear-ReLU(-Dropout) blocks, then Linear.

Takes any input shape and flattens it; ``hidden`` lists the hidden widths (empty = logistic regression).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .base import MODELS, Problems, check_classes, check_dropout, flat_size, raise_problems


@MODELS.add
@dataclass
class MLPConfig:
    """``model=mlp``: hidden widths ``hidden`` with ReLU and optional dropout after each hidden layer."""

    name: str = "mlp"
    hidden: list[int] = field(default_factory=lambda: [256, 256])
    dropout: float = 0.0

    def problems(self) -> Problems:
        for i, h in enumerate(self.hidden):
            if h < 1:
                yield f"hidden[{i}]", h, "must be >= 1"
        yield from check_dropout(self.dropout)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        raise_problems("mlp", self.problems())
        return MLP(flat_size(input_shape), list(self.hidden), check_classes("mlp", num_classes), float(self.dropout))


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden: list[int], num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(1)]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, int(h)), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = int(h)
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
