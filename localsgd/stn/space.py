"""The hyperparameter space of a Self-Tuning Network: unconstrained values h, perturbation scales s.

Self-Tuning Networks (MacKay, Vicol, Lorraine, Duvenaud & Grosse, ICLR 2019, arXiv 1903.03088,
Algorithm 1) tune hyperparameters λ by gradient descent on the validation loss. Every
hyperparameter lives in *unconstrained* space, h ∈ R^H, and reaches the model through a transform
onto its range (as in the official STN code's hyperparameter transforms):

* bounded (lo, hi):  λ = lo + (hi − lo)·sigmoid(h)          ("s_sigmoid", initialised by the logit)
* [lo, ∞):           λ = lo + softplus(h)                     ("lower_softplus")
* (−∞, hi]:          λ = hi − softplus(−h)                    ("upper_softplus"; our form, see below)
* unbounded:         λ = h                                    ("linear")
* discrete:          floor(λ) where it is *used*; the hypernetwork sees the continuous h, so h still
  gets a gradient (the official code does the same for cutout length and holes).

Training perturbs h with Gaussian noise, h̃ = h + σ ⊙ ε, ε ~ N(0, I), σ = softplus(s), one draw per
example (shape [B, H]); a hyperparameter that cannot vary within a minibatch (weight decay) copies
row 0 to every row. The validation objective subtracts τ times the entropy of that Gaussian,
H[q] = Σ_i log(σ_i √(2πe)), so σ does not collapse to 0 (the paper's tuning of the perturbation scale).

Tunable defaults, not paper constants: each hyperparameter's range and initial value are chosen by
the caller (``localsgd.stn.convert.HYPERPARAMETERS`` lists ours); the initial scale σ0 (0.5 in the
official CNN code, 1.0 in Bae's Delta-STN code) is ``HParamSpec.init_scale``. The upper-bounded
transform hi − softplus(−h) is our choice (the official code writes hi − softplus(−h + hi)); none of
our hyperparameters uses it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

TRANSFORMS = ("s_sigmoid", "lower_softplus", "upper_softplus", "linear")
_LOG_SQRT_2PI_E = 0.5 * math.log(2 * math.pi * math.e)


def inv_softplus(y: float) -> float:
    """x with softplus(x) = y (y > 0), stable for small and large y."""
    if y <= 0:
        raise ValueError(f"softplus is positive; cannot invert {y}")
    return y + math.log(-math.expm1(-y))


@dataclass(frozen=True)
class HParamSpec:
    """One tuned hyperparameter: its name, range, initial value and how it is perturbed."""

    name: str
    init: float
    low: float = 0.0
    high: float = 1.0  # float("inf") allowed
    discrete: bool = False  # floor(λ) where used (e.g. a number of cutout holes)
    per_example: bool = True  # False: one value per minibatch (row 0 copied to every row)
    init_scale: float = 0.5  # σ0 = softplus(s0) in unconstrained units
    transform: str | None = None  # None: chosen from the bounds

    @property
    def kind(self) -> str:
        if self.transform is not None:
            return self.transform
        finite_low, finite_high = math.isfinite(self.low), math.isfinite(self.high)
        if finite_low and finite_high:
            return "s_sigmoid"
        if finite_low:
            return "lower_softplus"
        if finite_high:
            return "upper_softplus"
        return "linear"

    def problems(self) -> list[str]:
        out = []
        if self.kind not in TRANSFORMS:
            out.append(f"{self.name}: transform {self.kind!r} is not one of {TRANSFORMS}")
        if not self.low < self.high:
            out.append(f"{self.name}: needs low < high, got [{self.low}, {self.high}]")
        elif not self.low < self.init < self.high and self.kind != "linear":
            out.append(f"{self.name}: init {self.init} must lie strictly inside ({self.low}, {self.high})")
        if not self.init_scale > 0:
            out.append(f"{self.name}: init_scale must be > 0, got {self.init_scale}")
        return out

    def to_unconstrained(self, value: float) -> float:
        """The h whose transform is ``value`` (the initialisation of h)."""
        kind = self.kind
        if kind == "s_sigmoid":
            u = (value - self.low) / (self.high - self.low)
            return math.log(u) - math.log1p(-u)
        if kind == "lower_softplus":
            return inv_softplus(value - self.low)
        if kind == "upper_softplus":
            return -inv_softplus(self.high - value)
        return value

    def to_constrained(self, h: torch.Tensor) -> torch.Tensor:
        """The continuous value λ(h) (no floor), elementwise."""
        kind = self.kind
        if kind == "s_sigmoid":
            return self.low + (self.high - self.low) * torch.sigmoid(h)
        if kind == "lower_softplus":
            return self.low + F.softplus(h)
        if kind == "upper_softplus":
            return self.high - F.softplus(-h)
        return h


class HyperSpace(nn.Module):
    """h (unconstrained hyperparameters) and s (perturbation scales), both ``[H]`` parameters.

    Being parameters of a module that sits inside the model, h and s are in the model's
    ``state_dict`` (checkpoints) and in ``model.parameters()``, so local SGD averages them with the
    weights, in unconstrained space (our rule, not from the STN papers).
    """

    def __init__(self, specs: list[HParamSpec]) -> None:
        super().__init__()
        problems = [p for spec in specs for p in spec.problems()]
        names = [spec.name for spec in specs]
        if len(set(names)) != len(names):
            problems.append(f"hyperparameter names repeat: {names}")
        if not specs:
            problems.append("no hyperparameters to tune")
        if problems:
            raise ValueError("invalid STN hyperparameter space: " + "; ".join(problems))
        self.specs = list(specs)
        self.h = nn.Parameter(torch.tensor([spec.to_unconstrained(spec.init) for spec in specs]))
        self.s = nn.Parameter(torch.tensor([inv_softplus(spec.init_scale) for spec in specs]))
        self._per_example = [spec.per_example for spec in specs]  # a plain list: not state, not averaged

    @property
    def names(self) -> list[str]:
        return [spec.name for spec in self.specs]

    def __len__(self) -> int:
        return len(self.specs)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no tuned hyperparameter {name!r}; tuned: {self.names}") from None

    def sigma(self) -> torch.Tensor:
        return F.softplus(self.s)

    def sample(self, batch: int, perturb: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, H] unconstrained values h̃ = h + σ ε (or h repeated), differentiable in h and s."""
        base = self.h.unsqueeze(0).expand(batch, -1)
        if not perturb:
            return base
        eps = torch.randn(batch, len(self), generator=generator, device=self.h.device, dtype=self.h.dtype)
        if not all(self._per_example):
            # Per-minibatch hyperparameters: one draw for the whole batch (row 0 everywhere).
            per_example = torch.tensor(self._per_example, device=eps.device)
            eps = torch.where(per_example, eps, eps[:1].expand_as(eps))
        return base + self.sigma() * eps

    def continuous(self, h_batch: torch.Tensor) -> torch.Tensor:
        """λ(h̃) without flooring: [..., H] → [..., H]."""
        return torch.stack([spec.to_constrained(h_batch[..., i]) for i, spec in enumerate(self.specs)], dim=-1)

    def constrained(self, h_batch: torch.Tensor) -> torch.Tensor:
        """The values as used by the data path and the model: λ(h̃), floored where discrete."""
        lam = self.continuous(h_batch)
        if any(spec.discrete for spec in self.specs):
            floor = torch.tensor([spec.discrete for spec in self.specs], device=lam.device)
            lam = torch.where(floor, lam.floor(), lam)
        return lam

    def hnet_input(self, h_batch: torch.Tensor, centered: bool) -> torch.Tensor:
        """What the best-response layers see: h̃ − stopgrad(h) (Delta-STN, centred) or h̃ (STN)."""
        return h_batch - self.h.detach() if centered else h_batch

    def entropy(self) -> torch.Tensor:
        """Entropy of N(h, diag σ²): Σ_i log(σ_i √(2πe))."""
        return (torch.log(self.sigma()) + _LOG_SQRT_2PI_E).sum()

    @torch.no_grad()
    def values(self) -> dict[str, float]:
        """The current constrained hyperparameters, by name (for logging)."""
        lam = self.constrained(self.h.detach().unsqueeze(0))[0]
        return dict(zip(self.names, (float(v) for v in lam)))

    @torch.no_grad()
    def scales(self) -> dict[str, float]:
        return dict(zip(self.names, (float(v) for v in self.sigma())))
