"""A small learned optimizer: a per-parameter MLP maps optimizer features to an update (``optimizer=learned``).

Metz, Maheswaranathan, Cheung & Sohl-Dickstein (ICLR 2019, arXiv 1804.00222) parameterise the
learning procedure itself and meta-learn its parameters θ through unrolled training. This module is
the supervised, per-parameter instance of that idea, following the ``MLPLOpt`` design of Metz et al.,
"Understanding and correcting pathologies in the training of learned optimizers" (ICML 2019,
arXiv 1810.10180, §3 and the public ``learned_optimization`` code), scaled down so it meta-trains on
2 CPU cores ("TinyLOpt", ours). For every element of every parameter
tensor:

* features (``lopt_features``): gradient g, parameter p, momenta m_β = β·m_β + (1−β)·g for
  β ∈ ``momentum_decays``, the RMS √v with v = β₂·v + (1−β₂)·g², and the normalised momentum
  m_0.9·(v + 1e-8)^(−1/2). Each of these 8 is divided by its root mean square over the whole tensor,
  x·(1e-5 + mean(x²))^(−1/2) (arXiv 1810.10180's per-tensor normalisation), so the rule is invariant to
  the scale of a tensor's gradient. Then one per-tensor feature, log(1e-3 + RMS(p)), and 5
  un-normalised time features tanh(t/τ − 1), τ ∈ ``timescales``;
* an MLP 14 → 16 → 16 → 2 (ReLU) with 546 meta-parameters θ, shared by all elements and tensors,
  outputs a direction d and a log-magnitude μ;
* the update is p ← p − lr·step_mult·d·exp(exp_mult·μ) (arXiv 1810.10180, Eq. 1 form).

Deviation from the design's 13 inputs: the log parameter scale is ours. With every other input
normalised per tensor, a rule without it can only use one absolute step size for every layer. The
bundled rule still steps about 5e-3 per element everywhere, too much for MNIST-1D's 256-wide MLP
(lr 0.1–0.3 train it; 1.0 diverges), while the default 1-D CNN trains well at 1.0. Tunable
defaults, not paper constants: the decays (0.5, 0.9, 0.99, 0.999) and β₂ = 0.999, the timescales, the
hidden widths (16, 16), ``step_mult`` = 1e-3 (as in ``MLPLOpt``) and ``exp_mult`` = 0.1 (``MLPLOpt``
uses 1e-3; with evolution strategies' perturbation scale 0.01 on θ a magnitude channel that small would
take thousands of meta-steps to matter, so ours is larger). ``lr`` (default 1.0) is a user multiplier
on the learned step, the escape hatch for problems far from the meta-training distribution.

The update is one pure function, :func:`lopt_update`, on plain tensors. :class:`LearnedOptimizer`
(a ``torch.optim.Optimizer``) applies it per parameter; the meta-trainer (:mod:`.meta_train`) applies
it with ``torch.func.vmap`` over tasks and perturbations. Under local SGD every per-element state
tensor (the momenta and v, each shaped like its parameter) is averaged, reset or kept by the engine's
``sync.optimizer_state`` policy, and the time features use the global step, which the plugin passes
in every step, so all workers (and a resumed worker) agree on it. That plugin (``optimizer=learned``) is
:mod:`localsgd.optim.learned`; this module imports nothing from :mod:`localsgd.optim`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

FEATURE_VERSION = 1  # bump when the features, their order or the MLP layout change
BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "lopt.pt"
_NORM_EPS = 1e-5  # per-tensor feature normalisation, as in MLPLOpt
_RMS_EPS = 1e-8  # inside the normalised momentum m·(v + eps)^(-1/2)
_SCALE_FLOOR = 1e-3  # log(1e-3 + RMS(p)): zero-initialised biases give a finite input

State = tuple[torch.Tensor, ...]
"""Per-parameter optimizer state: one momentum per decay, then the second moment v; each shaped like p."""


@dataclass(frozen=True)
class LOptSpec:
    """The architecture of the rule; stored in every checkpoint next to θ."""

    momentum_decays: tuple[float, ...] = (0.5, 0.9, 0.99, 0.999)
    rms_decay: float = 0.999
    timescales: tuple[float, ...] = (10.0, 100.0, 1000.0, 1e4, 1e5)
    hidden: tuple[int, ...] = (16, 16)
    step_mult: float = 1e-3
    exp_mult: float = 0.1
    normalised_momentum: int = 1  # index into momentum_decays of the momentum in m·v^(-1/2) (β = 0.9)

    @property
    def n_normalised(self) -> int:
        return 2 + len(self.momentum_decays) + 2  # g, p, momenta, rms, normalised momentum

    @property
    def n_inputs(self) -> int:
        return self.n_normalised + 1 + len(self.timescales)  # + the tensor's log parameter scale

    def layer_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of each linear layer of the MLP."""
        widths = [self.n_inputs, *self.hidden, 2]
        return [(widths[i + 1], widths[i]) for i in range(len(widths) - 1)]

    @property
    def n_params(self) -> int:
        return sum(o * i + o for o, i in self.layer_shapes())

    def state_keys(self) -> tuple[str, ...]:
        """Names of the per-parameter state tensors in ``LearnedOptimizer.state[p]``."""
        return (*(f"m_{b:g}" for b in self.momentum_decays), "v")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LOptSpec:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


DEFAULT_SPEC = LOptSpec()


# ---------------------------------------------------------------------------------------------- the rule
def init_theta(spec: LOptSpec = DEFAULT_SPEC, kind: str = "adam", generator: torch.Generator | None = None
               ) -> torch.Tensor:
    """A starting θ (float32, flat).

    ``random``: U(±1/√fan_in) weights, zero biases, last layer ×0.01 (steps start tiny).
    ``adam``: the same, except that two units per hidden layer carry ±(normalised momentum) through the
    ReLUs and the direction output is their difference, so d equals the per-tensor-normalised
    m_0.9/√v exactly: meta-training starts from Adam with a per-tensor step RMS of ``step_mult``
    (we wanted an Adam-like start; this is it in closed form instead of by regression).
    """
    if kind not in ("adam", "random"):
        raise ValueError(f"init kind must be 'adam' or 'random', got {kind!r}")
    layers = []
    shapes = spec.layer_shapes()
    for i, (n_out, n_in) in enumerate(shapes):
        w = (torch.rand(n_out, n_in, generator=generator) * 2 - 1) / math.sqrt(n_in)
        if i == len(shapes) - 1:
            w *= 0.01
        layers.append([w, torch.zeros(n_out)])
    if kind == "adam":
        if not spec.hidden or min(spec.hidden) < 2:
            raise ValueError("the 'adam' init needs at least one hidden layer with >= 2 units")
        feature = spec.n_normalised - 1  # the normalised momentum is the last normalised feature
        for i, (w, _) in enumerate(layers[:-1]):
            w[:2] = 0.0
            if i == 0:
                w[0, feature], w[1, feature] = 1.0, -1.0  # relu(x) and relu(-x)
            else:
                w[0, 0], w[1, 1] = 1.0, 1.0  # pass both halves on
        out_w = layers[-1][0]
        out_w.zero_()  # d = relu(x) - relu(-x) = x exactly, log-magnitude 0
        out_w[0, :2] = torch.tensor([1.0, -1.0])
    return torch.cat([t.reshape(-1) for layer in layers for t in layer])


def _mlp(theta: torch.Tensor, x: torch.Tensor, spec: LOptSpec) -> torch.Tensor:
    offset, h = 0, x
    shapes = spec.layer_shapes()
    for i, (n_out, n_in) in enumerate(shapes):
        w = theta[offset : offset + n_out * n_in].view(n_out, n_in)
        offset += n_out * n_in
        b = theta[offset : offset + n_out]
        offset += n_out
        h = F.linear(h, w, b)
        if i < len(shapes) - 1:
            h = F.relu(h)
    return h


def time_features(t: float | int | torch.Tensor, spec: LOptSpec, dtype: torch.dtype, device: torch.device
                  ) -> torch.Tensor:
    """tanh(t/τ − 1) for each timescale τ: near −0.76 at the start, → 1 once t ≫ τ."""
    taus = torch.tensor(spec.timescales, dtype=dtype, device=device)
    return torch.tanh(torch.as_tensor(t, dtype=dtype, device=device) / taus - 1.0)


def zero_state(p: torch.Tensor, spec: LOptSpec = DEFAULT_SPEC) -> State:
    return tuple(torch.zeros_like(p) for _ in range(len(spec.momentum_decays) + 1))


def advance_state(g: torch.Tensor, state: State, spec: LOptSpec = DEFAULT_SPEC) -> State:
    """The momenta and v after gradient ``g`` (exponential moving averages, no bias correction)."""
    *momenta, v = state
    new_m = [b * m + (1.0 - b) * g for b, m in zip(spec.momentum_decays, momenta, strict=True)]
    new_v = spec.rms_decay * v + (1.0 - spec.rms_decay) * g * g
    return (*new_m, new_v)


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    """√x, with a zero (not infinite) derivative at x = 0, so backprop through an unroll stays finite."""
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


class Segments(NamedTuple):
    """Several tensors flattened into one vector, so one call updates them all (the meta-trainer's layout).

    Element i belongs to tensor ``ids[i]``; ``averaging[s]`` holds 1/size(s) on tensor s's elements and
    0 elsewhere, so ``averaging @ x`` is the per-tensor mean (one matmul, which ``vmap`` batches well).
    """

    ids: torch.Tensor  # (n,) int64
    averaging: torch.Tensor  # (n_tensors, n) float

    @classmethod
    def of(cls, numels: Iterable[int], dtype: torch.dtype = torch.float32) -> Segments:
        sizes = torch.tensor(list(numels))
        ids = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
        averaging = torch.zeros(len(sizes), int(sizes.sum()), dtype=dtype)
        averaging[ids, torch.arange(len(ids))] = 1.0
        return cls(ids, averaging / sizes[:, None].to(dtype))


def lopt_features(p: torch.Tensor, g: torch.Tensor, state: State, t: float | int | torch.Tensor,
                  spec: LOptSpec = DEFAULT_SPEC, segments: Segments | None = None) -> torch.Tensor:
    """The MLP's input, shaped ``(p.numel(), spec.n_inputs)``, from the *updated* state.

    The 8 gradient-derived features are normalised over the whole tensor ``p`` or, with ``segments``,
    over each tensor that the flat ``p`` concatenates.
    """
    *momenta, v = state
    rms = _safe_sqrt(v)
    normalised_momentum = momenta[spec.normalised_momentum] * torch.rsqrt(v + _RMS_EPS)
    raw = torch.stack([g, p, *momenta, rms, normalised_momentum], dim=-1).reshape(-1, spec.n_normalised)
    # Second-moment normalisation per tensor: the rule sees shapes of distributions, not scales.
    if segments is None:
        mean_square = raw.square().mean(dim=0, keepdim=True)
    else:
        mean_square = (segments.averaging.to(raw.dtype) @ raw.square())[segments.ids]
    raw = raw * torch.rsqrt(_NORM_EPS + mean_square)
    # The one scale the normalisation hides that a step size must know: how large the tensor's weights are.
    scale = torch.log(_SCALE_FLOOR + _safe_sqrt(mean_square[:, 1:2])).expand(raw.shape[0], 1)
    times = time_features(t, spec, p.dtype, p.device).expand(raw.shape[0], -1)
    return torch.cat([raw, scale, times], dim=-1)


def lopt_update(theta: torch.Tensor, p: torch.Tensor, g: torch.Tensor, state: State, t: float | int | torch.Tensor,
                lr: float | torch.Tensor = 1.0, spec: LOptSpec = DEFAULT_SPEC, segments: Segments | None = None
                ) -> tuple[torch.Tensor, State]:
    """One learned step for one tensor: ``(p_new, state_new)``; pure, so ``torch.func.vmap`` can batch it.

    ``t`` is the 0-based step of this update (the global step under local SGD); ``lr`` multiplies the
    learned step. ``theta`` is cast to ``p``'s dtype, so float64 parameters get a float64 update.
    With ``segments``, ``p`` (and ``g`` and the state) are several flat tensors concatenated.
    """
    new_state = advance_state(g, state, spec)
    x = lopt_features(p, g, new_state, t, spec, segments)
    out = _mlp(theta.to(p.dtype), x, spec)
    step = spec.step_mult * out[:, 0] * torch.exp(spec.exp_mult * out[:, 1])
    return p - lr * step.reshape(p.shape), new_state


# ---------------------------------------------------------------------------------------------- checkpoints
class FeatureVersionError(ValueError):
    """A learned-optimizer checkpoint was made for other features than this code computes."""


def save_checkpoint(path: str | Path, theta: torch.Tensor, spec: LOptSpec, meta: dict[str, Any] | None = None) -> None:
    """θ (float32) with its spec and the feature version; a few KB."""
    if theta.numel() != spec.n_params:
        raise ValueError(f"theta has {theta.numel()} elements, the spec needs {spec.n_params}")
    blob = {"feature_version": FEATURE_VERSION, "theta": theta.detach().float().cpu().clone(),
            "spec": spec.to_dict(), "meta": dict(meta or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(blob, tmp)
    tmp.replace(path)


def load_checkpoint(path: str | Path | None = None) -> tuple[torch.Tensor, LOptSpec, dict[str, Any]]:
    """``(theta, spec, meta)`` from ``path`` (default: the bundled checkpoint); checks the feature version."""
    path = Path(path) if path else BUNDLED_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"learned-optimizer checkpoint {path} does not exist; make one with "
                                "`localsgd-meta-train --out <path>`, or leave optimizer.checkpoint empty for the "
                                "bundled one")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    version = blob.get("feature_version")
    if version != FEATURE_VERSION:
        raise FeatureVersionError(
            f"learned-optimizer checkpoint {path} has feature_version={version!r}, this code computes version "
            f"{FEATURE_VERSION}; re-run `localsgd-meta-train` to make a checkpoint for these features")
    spec = LOptSpec.from_dict(blob["spec"])
    theta = blob["theta"].float()
    if theta.numel() != spec.n_params:
        raise ValueError(f"learned-optimizer checkpoint {path}: theta has {theta.numel()} elements, its spec "
                         f"needs {spec.n_params}")
    return theta, spec, dict(blob.get("meta", {}))


# ---------------------------------------------------------------------------------------------- the optimizer
class LearnedOptimizer(torch.optim.Optimizer):
    """``torch.optim.Optimizer`` applying :func:`lopt_update` to every parameter with a gradient.

    Param-group options: ``lr`` (multiplier of the learned step, default 1.0) and ``t`` (the step
    used by the time features; incremented after every step, and overwritten each step by the
    local-SGD plugin with the global step). θ is frozen; ``state_dict`` carries a copy, and loading a
    state made with another θ is refused.
    """

    def __init__(self, params: Iterable[Any], theta: torch.Tensor | None = None, *, lr: float = 1.0,
                 spec: LOptSpec | None = None, checkpoint: str | Path | None = None) -> None:
        if theta is None:
            theta, loaded_spec, _ = load_checkpoint(checkpoint)
            spec = spec or loaded_spec
        spec = spec or DEFAULT_SPEC
        if theta.numel() != spec.n_params:
            raise ValueError(f"theta has {theta.numel()} elements, the spec needs {spec.n_params}")
        if not lr >= 0:
            raise ValueError(f"LearnedOptimizer lr must be >= 0 (a multiplier of the learned step), got {lr}")
        super().__init__(params, {"lr": lr, "t": 0})
        self.spec = spec
        self.theta = theta.detach().float().cpu().clone()
        self._theta_on: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def _theta_for(self, p: torch.Tensor) -> torch.Tensor:
        key = (p.device, p.dtype)
        if key not in self._theta_on:
            self._theta_on[key] = self.theta.to(device=p.device, dtype=p.dtype)
        return self._theta_on[key]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        keys = self.spec.state_keys()
        for group in self.param_groups:
            t = group["t"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                state = self.state[p]
                if not state:  # first step, or the engine's optimizer_state=reset cleared it
                    state.update(zip(keys, zero_state(p, self.spec)))
                p_new, new_state = lopt_update(self._theta_for(p), p, p.grad, tuple(state[k] for k in keys), t,
                                               group["lr"], self.spec)
                # In place: under local SGD the parameters are views into the engine's flat buffers.
                p.copy_(p_new)
                for k, value in zip(keys, new_state):
                    state[k].copy_(value)
            group["t"] = t + 1
        return loss

    def state_dict(self) -> dict[str, Any]:
        out = super().state_dict()
        out["learned_theta"] = self.theta.clone()
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        theta = state_dict.pop("learned_theta", None)
        if theta is not None and not torch.equal(theta.float().cpu(), self.theta):
            raise ValueError("this optimizer state was saved with another learned-optimizer θ (a different "
                             "checkpoint); resume with the checkpoint the run started with")
        super().load_state_dict(state_dict)

