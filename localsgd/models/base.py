"""The model registry shared by every architecture in ``localsgd.models``.

Each config dataclass registers itself with ``@MODELS.add``; its ``build(input_shape, num_classes)``
takes the dataset's ``input_shape`` (without the batch dimension) and ``num_classes`` and returns an
``nn.Module`` mapping ``(B, *input_shape)`` to ``(B, num_classes)`` logits. Initialisation draws only
from torch's global RNG, so ``torch.manual_seed`` before building makes it deterministic (the trainer
seeds before building, so every worker starts identical).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

from torch import nn

from ..registry import Registry

Problems = Iterator[tuple[str, Any, str]]
"""``(field_name, value, requirement)`` as yielded by every config's ``problems()``."""

MODELS: Registry[nn.Module] = Registry("model")


def raise_problems(model: str, problems: Problems) -> None:
    """Raise ``ValueError`` listing every problem, if any (a config made in code skips ``check_config``)."""
    bad = list(problems)
    if bad:
        raise ValueError(f"invalid {model} config: " + "; ".join(f"{k}={v!r} {r}" for k, v, r in bad))


def check_dropout(value: float) -> Problems:
    if not 0.0 <= value < 1.0:
        yield "dropout", value, "must be in [0, 1)"


def check_shape(model: str, input_shape: tuple[int, ...], ndim: int, what: str) -> tuple[int, ...]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != ndim or any(s < 1 for s in shape):
        raise ValueError(f"model {model!r} needs inputs shaped {what}, got input_shape={shape}")
    return shape


def check_classes(model: str, num_classes: int) -> int:
    if int(num_classes) < 2:
        raise ValueError(f"model {model!r} needs num_classes >= 2, got {num_classes}")
    return int(num_classes)


def flat_size(input_shape: tuple[int, ...]) -> int:
    if not input_shape or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be non-empty with positive sizes, got {tuple(input_shape)}")
    return math.prod(int(s) for s in input_shape)
