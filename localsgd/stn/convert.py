"""Turn an ordinary model into a Self-Tuning Network, in place.

``optimizer=stn`` works with the models of ``localsgd.models`` unchanged:
:func:`to_stn` replaces every ``nn.Linear``/``nn.Conv1d``/``nn.Conv2d`` by its best-response
layer (MacKay et al., ICLR 2019, arXiv 1903.03088; the elementary weights are copied, so the
converted model computes what the original did), wraps every activation module in a dropout site
whose per-example rate is a tuned hyperparameter (the paper's CNN experiments tune one dropout rate per layer),
and attaches the :class:`HyperSpace` (h and s) as the submodule ``stn_hyper``, so the hyperparameters
are model parameters: in ``state_dict`` checkpoints and in what local SGD averages.

Tunable hyperparameters and their ranges (:data:`HYPERPARAMETERS`; tunable defaults, not paper
constants except where noted): ``dropout`` (one per activation, (0, 0.95) as in Bae's Delta-STN
code, per example), ``input_dropout`` (0, 0.95), ``input_noise`` (multiplicative scaling noise,
(0, 0.3) as in the official CNN code), ``shift`` (0, 0.25 of the length) and ``stretch`` (0, 0.3)
for 1-D signals, and ``weight_decay`` (an L2 coefficient on the effective weights, [0, ∞) through
softplus, one value per minibatch; Delta-STN tunes weight decay, Bae & Grosse 2020). Initial
values default to 0.05 (the official code's dropout default) and 1e-4 for weight decay.

The conversion draws the response weights from an explicit generator, so every rank builds the same
replica without touching torch's global RNG.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .layers import HyperContext, StnConv1d, StnConv2d, StnDropout, StnLayer, StnLinear
from .space import HParamSpec, HyperSpace


@dataclass(frozen=True)
class Range:
    low: float
    high: float
    per_example: bool
    init: float


HYPERPARAMETERS: dict[str, Range] = {
    "dropout": Range(0.0, 0.95, True, 0.05),
    "input_dropout": Range(0.0, 0.95, True, 0.05),
    "input_noise": Range(0.0, 0.3, True, 0.05),
    "shift": Range(0.0, 0.25, True, 0.05),
    "stretch": Range(0.0, 0.3, True, 0.05),
    "weight_decay": Range(0.0, math.inf, False, 1e-4),
}
ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid)
SPACE_NAME = "stn_hyper"  # the submodule holding h and s


@dataclass
class StnModel:
    """What :func:`to_stn` produced: the space, the shared context and the best-response layers."""

    space: HyperSpace
    context: HyperContext
    layers: list[StnLayer]
    dropout_sites: list[str]  # module paths of the wrapped activations, in the order of ``dropout.<i>``

    def response_parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in layer.response_parameters()]

    def general_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Everything else but h and s: elementary weights and any non-STN parameters (e.g. norms)."""
        excluded = {id(p) for p in self.response_parameters()} | {id(self.space.h), id(self.space.s)}
        return [p for p in model.parameters() if id(p) not in excluded]


def find(model: nn.Module) -> StnModel | None:
    """The STN parts of a model converted by :func:`to_stn`, or None."""
    space = getattr(model, SPACE_NAME, None)
    if not isinstance(space, HyperSpace):
        return None
    layers = [m for m in model.modules() if isinstance(m, StnLayer)]
    sites = [name for name, m in model.named_modules() if isinstance(m, StnDropout)]
    context = layers[0].context if layers else HyperContext(space, centered=True)
    return StnModel(space, context, layers, sites)


def specs_for(tune: list[str], n_dropout_sites: int, init: dict[str, float], init_scale: float) -> list[HParamSpec]:
    unknown = [name for name in [*tune, *init] if name not in HYPERPARAMETERS]
    if unknown:
        raise ValueError(f"unknown STN hyperparameter(s) {unknown}; known: {sorted(HYPERPARAMETERS)}")
    specs = []
    for name in tune:
        r = HYPERPARAMETERS[name]
        value = init.get(name, r.init)
        names = [f"dropout.{i}" for i in range(n_dropout_sites)] if name == "dropout" else [name]
        specs += [HParamSpec(n, value, r.low, r.high, per_example=r.per_example, init_scale=init_scale)
                  for n in names]
    return specs


def to_stn(model: nn.Module, tune: list[str], init: dict[str, float] | None = None, init_scale: float = 1.0,
           centered: bool = True, generator: torch.Generator | None = None) -> StnModel:
    """Convert ``model`` in place (see the module docstring) and return its STN parts."""
    if find(model) is not None:
        raise ValueError("this model is already a Self-Tuning Network")
    if isinstance(model, nn.Sequential | nn.ModuleList | nn.ModuleDict):
        # A container would run (or list) the attached space as one of its layers.
        raise ValueError(f"to_stn needs a model with its own forward, not a bare {type(model).__name__}; "
                         "wrap it in a module")
    if len(set(tune)) != len(tune):
        raise ValueError(f"optimizer.tune lists a hyperparameter twice: {list(tune)}")
    if "dropout" in tune:
        fixed = [name for name, m in model.named_modules() if isinstance(m, nn.Dropout) and m.p > 0]
        if fixed:
            raise ValueError(f"the model already has fixed dropout at {fixed}; set its dropout to 0 (e.g. "
                             "model.dropout=0.0) so that STN tunes the rate")
    sites = [name for name, m in model.named_modules() if isinstance(m, ACTIVATIONS)] if "dropout" in tune else []
    if "dropout" in tune and not sites:
        raise ValueError(f"{type(model).__name__} has no activation modules to put tuned dropout after; "
                         "remove 'dropout' from optimizer.tune")
    space = HyperSpace(specs_for(list(tune), len(sites), dict(init or {}), init_scale))
    param = next(model.parameters(), None)
    if param is not None:
        space.to(device=param.device, dtype=param.dtype)
    context = HyperContext(space, centered)
    site_index = {name: i for i, name in enumerate(sites)}
    layers: list[StnLayer] = []
    _replace(model, "", context, generator, site_index, space, layers)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no Linear/Conv1d/Conv2d layers to give a best response")
    model.add_module(SPACE_NAME, space)
    return StnModel(space, context, layers, sites)


def _replace(module: nn.Module, prefix: str, context: HyperContext, generator: torch.Generator | None,
             site_index: dict[str, int], space: HyperSpace, layers: list[StnLayer]) -> None:
    for name, child in list(module.named_children()):
        path = f"{prefix}{name}"
        new: nn.Module | None = None
        if isinstance(child, nn.Linear):
            new = StnLinear.from_module(child, context, generator)
        elif isinstance(child, nn.Conv1d):
            new = StnConv1d.from_module(child, context, generator)
        elif isinstance(child, nn.Conv2d):
            new = StnConv2d.from_module(child, context, generator)
        elif path in site_index:
            new = StnDropout(child, space.index(f"dropout.{site_index[path]}"), context)
        if new is None:
            _replace(child, f"{path}.", context, generator, site_index, space, layers)
            continue
        if isinstance(new, StnLayer):
            layers.append(new)
        setattr(module, name, new)
