"""Multinomial logistic regression: one linear layer on the flattened input, ``num_classes`` logits.

The convex model of the local-SGD analyses (Stich, ICLR 2019, arXiv 1805.09767, experiments on
logistic regression). Two classes still get two logits (softmax cross-entropy is used throughout,
which for two classes is the logistic loss of the logit difference).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .base import MODELS, Problems, check_classes, flat_size


@MODELS.add
@dataclass
class LogRegConfig:
    """``model=logreg``: ``Linear(prod(input_shape), num_classes)``."""

    name: str = "logreg"
    bias: bool = True
    zero_init: bool = False  # start at w = 0 (the usual convex-optimisation start) instead of torch's init

    def problems(self) -> Problems:
        return iter(())

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return LogReg(
            flat_size(input_shape), check_classes("logreg", num_classes), bias=self.bias, zero_init=self.zero_init
        )


class LogReg(nn.Module):
    def __init__(
        self, in_features: int, num_classes: int, bias: bool = True, zero_init: bool = False
    ) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes, bias=bias)
        if zero_init:
            nn.init.zeros_(self.linear.weight)
            if self.linear.bias is not None:
                nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))
