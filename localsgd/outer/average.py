"""Plain parameter averaging: x_{t+1} = (1/K) Σ_k x_k (local SGD, Stich, ICLR 2019, arXiv 1805.09767, Alg. 1).

The identity outer optimizer. It reads nothing but the average, so the engine keeps no copy of x_t.
No constants.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .base import OUTER, OuterOptimizer


class AverageOuter(OuterOptimizer):
    """x_{t+1} = x̄: leaves ``averaged`` as it is."""

    name = "average"
    needs_global_copy = False

    def step(self, global_params: list[torch.Tensor], averaged: list[torch.Tensor], inner_lr: float) -> None:
        self.steps += 1


@OUTER.add
@dataclass
class AverageConfig:
    """``outer=average``: plain local SGD (the new global model is the workers' average)."""

    name: str = "average"

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        return iter(())

    def build(self) -> OuterOptimizer:
        return AverageOuter()
