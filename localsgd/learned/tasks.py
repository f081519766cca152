"""The offline task distribution the learned optimizer is meta-trained and evaluated on (no downloads).

Metz et al. (ICLR 2019, arXiv 1804.00222) meta-train over a distribution of tasks so the learned rule
generalises beyond any one of them; at 2-CPU-core scale the distribution is small fully-connected nets on small data:

* ``teacher_regression``: inputs x ~ N(0, I_d); targets from a random tanh teacher MLP (d → 32 → 1),
  standardised, plus N(0, 0.1²) noise; a ReLU student MLP; mean squared error.
* ``teacher_classification``: labels = argmax of a random teacher's C logits; cross-entropy.
* ``mixture_logreg``: a mixture of C Gaussians N(μ_c, I) with μ_c ~ N(0, s²I), s ~ U(0.5, 1.5);
  multinomial logistic regression (no hidden layer); cross-entropy.
* ``digits_mlp``: scikit-learn's 8×8 digits (pixels / 16), a 64-h-10 ReLU MLP; cross-entropy.
  With ``permute_pixels`` the 64 inputs are shuffled by a per-task permutation (held-out only).

Every task is a finite training set of ``n_train`` rows whose training loss the inner optimizer
minimises from a random initialisation (U(±init_scale/√fan_in) weights, zero biases). The sampling
ranges are tunable defaults, not paper constants: input dims 8–64 (logistic regression 8–256), hidden
widths 8–128 (digits 32–64), batch 16–64, init scale 0.5–2 (log-uniform), C ∈ {2, 4, 10}. The design's
ranges (dims 8–32, widths 8–64) are widened so the rule sees fan-ins as large as MNIST-1D's MLP.
Several tasks of one :class:`TaskSpec` are stacked into a :class:`TaskBatch` so the meta-trainer can
``vmap`` over them.

The held-out suite (:func:`heldout_suite`) uses what meta-training never samples: hidden width 48,
input dim 24, digits with permuted pixels, and nets with two hidden layers.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FAMILIES = ("teacher_regression", "teacher_classification", "mixture_logreg", "digits_mlp")
TRAIN_IN_DIMS = (8, 16, 32, 64)
TRAIN_LOGREG_DIMS = (8, 16, 32, 64, 128, 256)  # a linear model is cheap, so it carries the widest fan-ins
TRAIN_WIDTHS = (8, 16, 32, 64, 128)
TRAIN_DIGITS_WIDTHS = (32, 64)
TRAIN_CLASSES = (2, 4, 10)
TRAIN_BATCHES = (16, 32, 64)
N_TRAIN = 512  # rows of a generated task (digits keeps its 1,347 training rows)
DIGITS_TRAIN_ROWS = 1347  # the first 75% of a fixed shuffle of the 1,797 images


@dataclass(frozen=True)
class TaskSpec:
    """The shape of a task: everything that must agree for tasks to be batched together."""

    family: str
    in_dim: int
    hidden: tuple[int, ...]
    out_dim: int
    batch_size: int
    init_scale: float = 1.0
    permute_pixels: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"task family must be one of {FAMILIES}, got {self.family!r}")

    @property
    def loss_kind(self) -> str:
        return "mse" if self.family == "teacher_regression" else "ce"

    @property
    def n_train(self) -> int:
        return DIGITS_TRAIN_ROWS if self.family == "digits_mlp" else N_TRAIN

    def layer_sizes(self) -> list[tuple[int, int]]:
        """(out, in) of each linear layer of the student."""
        widths = [self.in_dim, *self.hidden, self.out_dim]
        return [(widths[i + 1], widths[i]) for i in range(len(widths) - 1)]

    def describe(self) -> str:
        arch = "-".join(str(w) for w in (self.in_dim, *self.hidden, self.out_dim))
        extra = ", permuted pixels" if self.permute_pixels else ""
        return f"{self.family} {arch} b={self.batch_size} init×{self.init_scale:.2g}{extra}"


@dataclass
class TaskBatch:
    """M tasks of one spec, stacked on a leading dimension."""

    spec: TaskSpec
    x: torch.Tensor  # (M, n, in_dim)
    y: torch.Tensor  # (M, n): regression targets, or class indices stored as floats (vmap needs one dtype)
    init: list[torch.Tensor]  # per parameter (M, *shape): weight, bias, weight, bias, ...

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


# ---------------------------------------------------------------------------------------------- sampling
def sample_spec(gen: torch.Generator) -> TaskSpec:
    """One task shape from the meta-training distribution."""

    def pick(options: Sequence[int]) -> int:
        return int(options[int(torch.randint(len(options), (1,), generator=gen))])

    family = FAMILIES[int(torch.randint(len(FAMILIES), (1,), generator=gen))]
    batch = pick(TRAIN_BATCHES)
    init_scale = float(math.exp(math.log(0.5) + math.log(4.0) * float(torch.rand((), generator=gen))))
    if family == "digits_mlp":
        return TaskSpec(family, 64, (pick(TRAIN_DIGITS_WIDTHS),), 10, batch, init_scale)
    if family == "mixture_logreg":
        return TaskSpec(family, pick(TRAIN_LOGREG_DIMS), (), pick(TRAIN_CLASSES), batch, init_scale)
    in_dim = pick(TRAIN_IN_DIMS)
    out = 1 if family == "teacher_regression" else pick(TRAIN_CLASSES)
    return TaskSpec(family, in_dim, (pick(TRAIN_WIDTHS),), out, batch, init_scale)


def make_tasks(spec: TaskSpec, seeds: Sequence[int]) -> TaskBatch:
    """The tasks of ``spec`` drawn with ``seeds`` (data and initialisation both follow the seed)."""
    xs, ys, inits = [], [], []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        x, y = _make_data(spec, gen)
        xs.append(x)
        ys.append(y)
        inits.append(init_params(spec, gen))
    stacked = [torch.stack([p[i] for p in inits]) for i in range(len(inits[0]))]
    return TaskBatch(spec, torch.stack(xs), torch.stack(ys), stacked)


def init_params(spec: TaskSpec, gen: torch.Generator) -> list[torch.Tensor]:
    out = []
    for n_out, n_in in spec.layer_sizes():
        bound = spec.init_scale / math.sqrt(n_in)
        out += [(torch.rand(n_out, n_in, generator=gen) * 2 - 1) * bound, torch.zeros(n_out)]
    return out


def _teacher(x: torch.Tensor, out_dim: int, gen: torch.Generator, width: int = 32) -> torch.Tensor:
    w1 = torch.randn(x.shape[1], width, generator=gen) / math.sqrt(x.shape[1])
    w2 = torch.randn(width, out_dim, generator=gen) / math.sqrt(width)
    return torch.tanh(x @ w1 * 2.0) @ w2


def _make_data(spec: TaskSpec, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    n, d = spec.n_train, spec.in_dim
    if spec.family == "digits_mlp":
        x, y = digits_train()
        if spec.permute_pixels:
            x = x[:, torch.randperm(d, generator=gen)]
        return x.clone(), y.clone()
    if spec.family == "mixture_logreg":
        spread = 0.5 + float(torch.rand((), generator=gen))
        means = torch.randn(spec.out_dim, d, generator=gen) * spread
        labels = torch.randint(spec.out_dim, (n,), generator=gen)
        return means[labels] + torch.randn(n, d, generator=gen), labels.float()
    x = torch.randn(n, d, generator=gen)
    if spec.family == "teacher_regression":
        target = _teacher(x, 1, gen)[:, 0]
        target = (target - target.mean()) / (target.std() + 1e-8)
        return x, target + 0.1 * torch.randn(n, generator=gen)
    return x, (_teacher(x, spec.out_dim, gen) * 3.0).argmax(dim=1).float()


@functools.cache
def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    order = np.random.default_rng(0).permutation(len(bunch.target))
    x = torch.tensor(bunch.data[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(bunch.target[order], dtype=torch.float32)
    return x, y


def digits_train() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = _digits()
    return x[:DIGITS_TRAIN_ROWS], y[:DIGITS_TRAIN_ROWS]


# ---------------------------------------------------------------------------------------------- the student
def forward(params: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The student MLP (ReLU between layers) as a pure function of its parameters.

    Unbatched (weights (out, in), x (B, in)) or batched over tasks (weights (N, out, in), x (N, B, in)).
    """
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        h = torch.matmul(h, params[2 * i].transpose(-1, -2)) + params[2 * i + 1].unsqueeze(-2)
        if i < n_layers - 1:
            h = F.relu(h)
    return h


def loss_fn(params: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor, loss_kind: str) -> torch.Tensor:
    """Mean training loss on a batch: a scalar, or one per task when batched (leading dimension N)."""
    out = forward(params, x)
    if loss_kind == "mse":
        return (out[..., 0] - y).square().mean(-1)
    per_row = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1).long(), reduction="none")
    return per_row.view(y.shape).mean(-1)


def build_module(spec: TaskSpec, params: Sequence[torch.Tensor]) -> nn.Sequential:
    """The same student as an ``nn.Module`` (for evaluating ``torch.optim`` optimizers), weights copied."""
    layers: list[nn.Module] = []
    sizes = spec.layer_sizes()
    for i, (n_out, n_in) in enumerate(sizes):
        lin = nn.Linear(n_in, n_out)
        with torch.no_grad():
            lin.weight.copy_(params[2 * i])
            lin.bias.copy_(params[2 * i + 1])
        layers.append(lin)
        if i < len(sizes) - 1:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def module_loss(spec: TaskSpec, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = module(x)
    if spec.loss_kind == "mse":
        return F.mse_loss(out[:, 0], y)
    return F.cross_entropy(out, y.long())


# ---------------------------------------------------------------------------------------------- evaluation sets
def heldout_suite() -> list[tuple[TaskSpec, int]]:
    """20 fixed (spec, seed) tasks outside the meta-training distribution (our held-out generalisation test)."""
    suite: list[tuple[TaskSpec, int]] = []
    for i in range(4):
        suite.append((TaskSpec("teacher_regression", 24, (48,), 1, 32), 90_000 + i))
        suite.append((TaskSpec("teacher_classification", 24, (48,), 4, 32), 91_000 + i))
        suite.append((TaskSpec("digits_mlp", 64, (32,), 10, 32, permute_pixels=True), 92_000 + i))
        deep_family = "teacher_classification" if i % 2 else "teacher_regression"
        suite.append((TaskSpec(deep_family, 16, (32, 32), 1 if i % 2 == 0 else 10, 32), 93_000 + i))
        suite.append((TaskSpec("mixture_logreg", 24, (), 3, 32), 94_000 + i))
    return suite


def validation_suite() -> list[tuple[TaskSpec, int]]:
    """4 fixed in-distribution tasks (one per family) that meta-training evaluates θ on as it goes."""
    return [(TaskSpec("teacher_regression", 16, (32,), 1, 32), 80_000),
            (TaskSpec("teacher_classification", 16, (32,), 4, 32), 80_001),
            (TaskSpec("mixture_logreg", 16, (), 4, 32), 80_002),
            (TaskSpec("digits_mlp", 64, (32,), 10, 32), 80_003)]


def train_module(spec: TaskSpec, seed: int, make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer],
                 steps: int, batch_seed: int = 0) -> float:
    """Train task (``spec``, ``seed``) with a ``torch.optim`` optimizer; return the final full training loss.

    Minibatches come from their own generator (``batch_seed``), so every optimizer sees the same ones;
    a diverged run returns ``inf``.
    """
    batch = make_tasks(spec, [seed])
    module = build_module(spec, [p[0] for p in batch.init])
    opt = make_optimizer(list(module.parameters()))
    x, y = batch.x[0], batch.y[0]
    gen = torch.Generator().manual_seed(batch_seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (spec.batch_size,), generator=gen)
        loss = module_loss(spec, module, x[idx], y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = float(module_loss(spec, module, x, y))
    return final if math.isfinite(final) else math.inf
