"""Structured best-response layers and per-example dropout of Self-Tuning Networks.

STN's structured best-response approximation (MacKay et al., ICLR 2019, arXiv 1903.03088) models
the best-response weights ŵ(λ) of each layer by scaling a second, "response" weight per output unit
by a linear function of the hyperparameters, without materialising a weight per example:

    W(δ) = W_e + (V δ) ⊙_row W_h,      b(δ) = b_e + (C δ) ⊙ b_h
    y    = (W_e x + b_e) + (V δ) ⊙ (W_h x) + (C δ) ⊙ b_h

where δ is the hypernetwork input of the example: the perturbed unconstrained hyperparameters h̃
(STN) or, in Delta-STN's centred parameterisation (Bae & Grosse, NeurIPS 2020, arXiv 2010.13514),
h̃ − stopgrad(h), so that at the current hyperparameters the response term vanishes and W_e itself is
the best-response weight. [V; C] is one bias-free linear map R^H → R^(2·D_out), the "bottleneck",
**zero-initialised** as in Bae's code (the official STN code draws it from N(0, 0.01²)); W_h and b_h
get PyTorch's default (Kaiming-uniform) initialisation. For a convolution the scaling is per output
channel.

Layers do not take δ as an argument: they read it, together with the constrained per-example values
used by dropout, from a :class:`HyperContext` shared by every STN layer of one model, which the STN
optimizer plugin fills around each forward. An unmodified model's ``forward`` (and the trainer's
evaluation, ``model(x)``) therefore keeps working: with nothing set, a Delta-STN layer is exactly its
elementary layer (δ = 0), and an STN layer uses δ = h.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .space import HyperSpace


class HyperContext:
    """The hypernetwork input and data-path values of the forward in progress, shared by one model's layers.

    ``hnet_in``: [B, H] or None (nothing set: Delta-STN layers skip the response term, STN layers use
    the current h). ``rates``: [B, H] constrained values, read by dropout sites in training mode; None
    turns them off. ``generator``: the worker's perturbation RNG, also used for dropout masks.
    """

    def __init__(self, space: HyperSpace, centered: bool) -> None:
        self.space = space
        self.centered = centered
        self.hnet_in: torch.Tensor | None = None
        self.rates: torch.Tensor | None = None
        self.generator: torch.Generator | None = None

    @property
    def n_hyper(self) -> int:
        return len(self.space)

    def current(self, batch: int) -> torch.Tensor | None:
        if self.hnet_in is not None:
            if self.hnet_in.shape[0] != batch:
                raise ValueError(f"STN hypernetwork input has {self.hnet_in.shape[0]} rows for a batch of {batch}")
            return self.hnet_in
        if self.centered:
            return None  # δ = 0: the response term is exactly zero
        return self.space.h.detach().unsqueeze(0).expand(batch, -1)

    @contextlib.contextmanager
    def use(self, hnet_in: torch.Tensor | None, rates: torch.Tensor | None = None,
            generator: torch.Generator | None = None) -> Iterator[None]:
        saved = self.hnet_in, self.rates, self.generator
        self.hnet_in, self.rates, self.generator = hnet_in, rates, generator
        try:
            yield
        finally:
            self.hnet_in, self.rates, self.generator = saved


class StnLayer(nn.Module):
    """The shared part of the best-response layers: parameters, row scales, materialised weights."""

    def __init__(self, weight_shape: tuple[int, ...], bias: bool, context: HyperContext,
                 generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        super().__init__()
        self.context = context  # a plain object, not a submodule: the model owns the space once
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        out_units = weight_shape[0]
        self.general_weight = nn.Parameter(torch.empty(weight_shape, **kw))
        self.response_weight = nn.Parameter(torch.empty(weight_shape, **kw))
        self.general_bias = nn.Parameter(torch.empty(out_units, **kw)) if bias else None
        self.response_bias = nn.Parameter(torch.empty(out_units, **kw)) if bias else None
        self.hyper_bottleneck = nn.Linear(context.n_hyper, out_units * (2 if bias else 1), bias=False, **kw)
        nn.init.zeros_(self.hyper_bottleneck.weight)
        for w, b in ((self.general_weight, self.general_bias), (self.response_weight, self.response_bias)):
            _default_init(w, b, generator)

    # ---- to be provided by each layer type
    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _per_unit(self, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Reshape [B, D_out] scales to broadcast against the layer's output ``out``."""
        raise NotImplementedError

    # ---- the best-response forward
    @property
    def out_units(self) -> int:
        return self.general_weight.shape[0]

    def response_parameters(self) -> list[nn.Parameter]:
        params = [self.response_weight, self.hyper_bottleneck.weight]
        return params + ([self.response_bias] if self.response_bias is not None else [])

    def general_parameters(self) -> list[nn.Parameter]:
        return [self.general_weight] + ([self.general_bias] if self.general_bias is not None else [])

    def row_scales(self, hnet_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(V δ, C δ): [B, D_out] each (C δ is None without bias)."""
        scales = self.hyper_bottleneck(hnet_in)
        if self.general_bias is None:
            return scales, None
        return scales[..., : self.out_units], scales[..., self.out_units :]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._apply_weight(x, self.general_weight, self.general_bias)
        hnet_in = self.context.current(x.shape[0])
        if hnet_in is None:
            return out
        scale_w, scale_b = self.row_scales(hnet_in)
        out = out + self._per_unit(scale_w, out) * self._apply_weight(x, self.response_weight, None)
        if scale_b is not None:
            out = out + self._per_unit(scale_b * self.response_bias, out)
        return out

    def weights_at(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The materialised (W, b) at one hypernetwork input δ: [H] → W_e + (Vδ) ⊙_row W_h, b_e + (Cδ) ⊙ b_h."""
        scale_w, scale_b = self.row_scales(delta)
        view = (-1,) + (1,) * (self.general_weight.dim() - 1)
        weight = self.general_weight + scale_w.reshape(view) * self.response_weight
        bias = None
        if scale_b is not None:
            bias = self.general_bias + scale_b * self.response_bias
        return weight, bias

    @torch.no_grad()
    def _copy_general(self, layer: nn.Module) -> None:
        self.general_weight.copy_(layer.weight)
        if self.general_bias is not None:
            self.general_bias.copy_(layer.bias)

    @torch.no_grad()
    def move_general_(self, delta: torch.Tensor) -> None:
        """W_e ← W_e + (Vδ) ⊙ W_h (and the bias): the elementary weights become ŵ(h + δ)."""
        weight, bias = self.weights_at(delta)
        self.general_weight.copy_(weight)
        if bias is not None:
            self.general_bias.copy_(bias)  # type: ignore[union-attr]


def _default_init(weight: torch.Tensor, bias: torch.Tensor | None, generator: torch.Generator | None) -> None:
    # PyTorch's default for Linear/Conv (Kaiming-uniform with a = √5, bias U(±1/√fan_in)), drawn on
    # the CPU from an explicit generator so every rank and every device gets the same values.
    with torch.no_grad():
        w = torch.empty(weight.shape, dtype=weight.dtype)
        nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
        weight.copy_(w)
        if bias is not None:
            fan_in = weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            bias.copy_(torch.empty(bias.shape, dtype=bias.dtype).uniform_(-bound, bound, generator=generator))


class StnLinear(StnLayer):
    """``y = W_e x + b_e + (Vδ) ⊙ (W_h x) + (Cδ) ⊙ b_h`` for inputs ``[B, ..., in_features]``."""

    def __init__(self, in_features: int, out_features: int, context: HyperContext, bias: bool = True,
                 generator: torch.Generator | None = None, **kw: Any) -> None:
        super().__init__((out_features, in_features), bias, context, generator, **kw)

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def _per_unit(self, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return scale.reshape(scale.shape[0], *([1] * (out.dim() - 2)), scale.shape[-1])

    @classmethod
    def from_module(cls, layer: nn.Linear, context: HyperContext, generator: torch.Generator | None) -> StnLinear:
        w = layer.weight
        new = cls(layer.in_features, layer.out_features, context, layer.bias is not None, generator,
                  dtype=w.dtype, device=w.device)
        new._copy_general(layer)
        return new


class _StnConvNd(StnLayer):
    _conv: Any = None
    _dims = 0

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...], context: HyperContext,
                 stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1, bias: bool = True,
                 generator: torch.Generator | None = None, **kw: Any) -> None:
        super().__init__((out_channels, in_channels // groups, *kernel_size), bias, context, generator, **kw)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups

    def _apply_weight(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return self._conv(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def _per_unit(self, scale: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        return scale.reshape(*scale.shape, *([1] * self._dims))  # per output channel

    @classmethod
    def from_module(cls, layer: nn.Module, context: HyperContext, generator: torch.Generator | None) -> _StnConvNd:
        if getattr(layer, "padding_mode", "zeros") != "zeros":
            raise ValueError(f"STN convolutions support padding_mode='zeros' only, got {layer.padding_mode!r}")
        w = layer.weight
        new = cls(layer.in_channels, layer.out_channels, tuple(layer.kernel_size), context, layer.stride,
                  layer.padding, layer.dilation, layer.groups, layer.bias is not None, generator,
                  dtype=w.dtype, device=w.device)
        new._copy_general(layer)
        return new


class StnConv1d(_StnConvNd):
    """Conv1d with a per-output-channel best response: conv(x, W_e) + b_e + (Vδ) ⊙_c conv(x, W_h) + (Cδ) ⊙ b_h."""

    _conv = staticmethod(F.conv1d)
    _dims = 1


class StnConv2d(_StnConvNd):
    """Conv2d with a per-output-channel best response (the official ``HyperConv2d`` form)."""

    _conv = staticmethod(F.conv2d)
    _dims = 2


class StnDropout(nn.Module):
    """An activation followed by inverted dropout at a per-example rate, a tuned hyperparameter.

    Example i's elements are kept with probability 1 − p_i and scaled by 1/(1 − p_i) (as
    ``nn.Dropout``), p_i = ``context.rates[i, index]``: the perturbed value of that example in
    training steps (MacKay et al. 2019: per-example Bernoulli masks). Off in eval mode and when
    no rates are set, so validation and evaluation run without dropout.
    """

    def __init__(self, activation: nn.Module, index: int, context: HyperContext) -> None:
        super().__init__()
        self.activation = activation
        self.index = index
        self.context = context

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation(x)
        rates = self.context.rates
        if not self.training or rates is None:
            return x
        return per_example_dropout(x, rates[:, self.index], self.context.generator)


def per_example_dropout(x: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout of each row of ``x`` ([B, ...]) at its own rate ``p`` ([B], in [0, 1))."""
    p = p.detach().reshape(-1, *([1] * (x.dim() - 1))).to(x.dtype)
    keep = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) >= p
    return x * keep / (1 - p)
