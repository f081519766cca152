"""Models, registered by the name used in ``configs/model/<name>.yaml``.

* ``logreg``: multinomial logistic regression (one Linear layer).
* ``mlp``: a ReLU multilayer perceptron.
* ``cnn1d``: a small 1-D CNN for MNIST-1D (Greydanus & Kobak, ICML 2024, arXiv 2011.14439).
* ``resnet20``: ResNet-20 for CIFAR (He et al., CVPR 2016, arXiv 1512.03385, Section 4.2).
* ``gpt``: a GPT-2-shaped decoder-only transformer language model (Radford et al. 2019; Vaswani et al.,
  NeurIPS 2017, arXiv 1706.03762) on token windows ``(T,)``, ``num_classes`` the vocabulary, giving
  ``(B, T, vocab)`` logits.

``build(cfg, input_shape, num_classes)`` builds one from its typed config (or an OmegaConf node with
the same fields); the caller seeds torch first, which makes the initialisation deterministic. Each
config dataclass builds its model (``cfg.build(input_shape, num_classes)``) and registers itself in
:data:`MODELS`, so a new model touches only its own file, ``configs/model/<name>.yaml`` and its test.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .base import MODELS
from .cnn1d import CNN1D, CNN1DConfig
from .gpt import GPT, GPTConfig
from .logreg import LogReg, LogRegConfig
from .mlp import MLP, MLPConfig
from .resnet20 import ResNet20, ResNet20Config

__all__ = [
    "MODELS",
    "build",
    "LogReg",
    "LogRegConfig",
    "MLP",
    "MLPConfig",
    "CNN1D",
    "CNN1DConfig",
    "ResNet20",
    "ResNet20Config",
    "GPT",
    "GPTConfig",
]


def build(cfg: Any, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model named by ``cfg.name`` for inputs ``(B, *input_shape)`` and ``num_classes`` logits; or the
    user's ``model._target_``, called with its config's other keys (and ``input_shape`` / ``num_classes`` when
    its signature names them and the config does not set them)."""
    from ..registry import as_target, instantiate_target

    target = as_target(cfg)
    if target is not None:
        model = instantiate_target(target, input_shape=tuple(input_shape), num_classes=int(num_classes))
        if not isinstance(model, nn.Module):
            raise TypeError(f"model._target_={target.target!r} returned {type(model).__name__}, not a torch.nn.Module")
        return model
    return MODELS.build(cfg, input_shape, num_classes)
