"""``optimizer=stn``: Self-Tuning Networks (and Delta-STN) as the optimizer of a local-SGD worker.

Algorithm 1 of MacKay, Vicol, Lorraine, Duvenaud & Grosse (ICLR 2019, arXiv 1903.03088) alternates
T_train weight steps on training data at perturbed hyperparameters with T_val hyperparameter steps on
validation data through the best-response approximation ŵ(λ). Delta-STN (Bae & Grosse, NeurIPS 2020,
arXiv 2010.13514) is the default here (``variant=delta``); it changes three things:

1. the hypernetwork input is centred, δ = h̃ − stopgrad(h), so ŵ(h) = W_e exactly;
2. separate objectives: the *general* (elementary) parameters take an SGD step at the unperturbed h
   (δ = 0, data path at h); the *response* parameters take one on the perturbed objective (δ and the
   data path at h̃ = h + σ ε), each with its own optimizer;
3. optionally (``linearize=true``) the response step fits only the first-order effect of δ on the
   outputs, f(x; h) + J_δ f(x; h)·δ, computed by one forward-mode pass (``torch.func.jvp``).

``variant=stn`` is the original: one step of all weights at the perturbed, *uncentred* input δ = h̃.
A hyper step (both variants) runs the model in eval mode (dropout and augmentation off, so the
hyperparameters act on L_V only through ŵ), samples h̃ when the scales are tuned, and descends
L_V − τ·H[q(h̃)] in h and s with their own optimizers.

Every call is one local step of the trainer (LocalSGD counts hyper steps like training steps), but a
hyper step consumes no training data: ``uses_train_batch`` is False for it, so the trainer draws no
training batch (the data cursor and ``samples`` count training steps only). A hyper step reports its
validation loss and logits, so a logging window's ``loss``/``accuracy`` mix both, and ``log_values()``
adds ``hp/<name>``, ``hp_sigma/<name>`` and ``stn_val_loss`` to the ``train`` records.

Phases count *global* steps (the local step index is the same on every rank), so all workers switch
together: ``hyper_warmup_steps`` training steps first, then cycles of ``train_steps`` training and
``val_steps`` hyper steps. Each worker has its own validation shard (the trainer holds out
``val_fraction`` of the training set and gives each rank a disjoint part) and its own perturbation
RNG stream, seeded by the run seed and the rank and checkpointed with the optimizers.

The model side (hyperparameter space, best-response layers, data path, conversion, averaging) is
:mod:`localsgd.stn`; ``StnConfig.build`` converts the model in place and registers as ``optimizer=stn``.

What it can tune, measured on the ridge golden test of ``tests/test_stn.py`` (tuned weight decay on
d = 30 ridge regression with a closed-form best response, problems 0-9, optimum h* in [−2.8, −0.4]):

* The hyper step is only as good as the learned response, and the response learns from how the
  perturbed training loss changes with δ. A hyperparameter that starts where it barely changes L_T
  leaves it nothing to learn from: from a weight decay of 1e-3 (the Hessian's smallest eigenvalues are
  0.015-0.045) the response after 300 or even 3,000 steps is at most 4% of dw*/dh in norm, at a
  cosine of −0.15 to +0.4 to it. The hypergradient's sign is then chance; RMSprop, which normalises
  the step, moves h at full size either way, and a step down weakens the signal further: h ran from
  −6.9 to between −9 and −11 on 3 or 4 of the 10 problems. From weight decay 3, above every optimum,
  the response matches dw*/dh to cosine 0.99 and within 20% in norm by the first hyper step, and all
  10 problems x 4 initialisations end within 0.06 of h* (with the LR warm-up of the next point).
  Start a tuned hyperparameter where it visibly matters to training; when unsure, on the strongly
  regularised side.
* The response is a product (V δ)·W_h trained by SGD with momentum. While the general weights are far
  from their optimum its gradient is mostly noise, and at lr 0.05 without an LR warm-up it grew until
  unstable in 6 of 32 ridge runs from weight decay 3 (non-finite within 82 steps); a 100-step linear
  warm-up (``warmup_steps``, which scales the response lr too) kept all 40 finite.

Tunable defaults (not from the papers unless said): general/response SGD lr 0.05 with momentum 0.9
(the papers' code: 0.01, 0.9), hyper and scale RMSprop lr 0.01, T_train : T_val = 5 : 1, σ0 = 1.0,
entropy weight τ = 1e-3, validation fraction 0.15 (these five as in Bae's Delta-STN MLP example), and
``hyper_warmup_steps`` = 100 (the papers warm up for 5 epochs). Tuned weight decay adds
(wd/2)·Σ‖W(δ)‖² over the weight matrices of the best-response layers at the minibatch's value, the
same convention as SGD's ``weight_decay``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import dist
from ..errors import ConfigError
from ..stn.augment import DATA_HYPERPARAMETERS, apply_data_path
from ..stn.averaging import consensus_pre_average
from ..stn.convert import HYPERPARAMETERS, StnModel, find, to_stn
from .base import OPTIMIZERS, Batch, OptimizerPlugin, StepContext, StepOutput, require_batch
from .torch_optim import LRScheduleFields

VARIANTS = ("delta", "stn")
AVERAGING = ("plain", "jacobian")
HYPER_OPTIMIZERS = ("rmsprop", "adam")


@OPTIMIZERS.add
@dataclass
class StnConfig(LRScheduleFields):
    """``optimizer=stn``: Delta-STN (default) or STN, tuning ``tune`` online; see :mod:`localsgd.optim.stn`."""

    name: str = "stn"
    lr: float = 0.05  # general (elementary) weights; follows the warm-up/decay schedule
    momentum: float = 0.9
    weight_decay: float = 0.0  # a fixed L2 on the general weights (0 when weight_decay is tuned)
    response_lr: float = 0.0  # response weights and bottlenecks; 0 = lr (scaled by the same schedule)
    variant: str = "delta"  # delta | stn
    linearize: bool = False  # Delta-STN: fit the response to the first-order output change (a JVP)
    tune: list[str] = field(default_factory=lambda: ["dropout"])  # of localsgd.stn.convert.HYPERPARAMETERS
    init: dict[str, float] = field(default_factory=dict)  # initial values by name (default 0.05; wd 1e-4)
    init_scale: float = 1.0  # σ0, the initial perturbation scale in unconstrained units
    tune_scales: bool = True
    entropy_weight: float = 1e-3
    hyper_optimizer: str = "rmsprop"  # rmsprop | adam, for h and for s
    hyper_lr: float = 0.01
    scale_lr: float = 0.01
    hyper_warmup_steps: int = 100  # training steps before the first hyper step
    train_steps: int = 5  # T_train of each cycle
    val_steps: int = 1  # T_val of each cycle (0: no tuning, only general steps at fixed hyperparameters)
    val_fraction: float = 0.15  # of the training set, held out as per-worker validation shards
    averaging: str = "plain"  # plain | jacobian (Delta-STN: move to the consensus h before averaging)

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        yield from self._lr_problems()
        for key, value, allowed in (("variant", self.variant, VARIANTS), ("averaging", self.averaging, AVERAGING),
                                    ("hyper_optimizer", self.hyper_optimizer, HYPER_OPTIMIZERS)):
            if value not in allowed:
                yield key, value, f"must be one of {allowed}"
        if self.variant == "stn":
            if self.averaging == "jacobian":
                yield "averaging", self.averaging, "jacobian needs variant=delta (STN's response is not centred)"
            if self.linearize:
                yield "linearize", self.linearize, "needs variant=delta"
        if not 0 <= self.momentum < 1:
            yield "momentum", self.momentum, "must be in [0, 1)"
        for key in ("weight_decay", "response_lr", "entropy_weight"):
            if getattr(self, key) < 0:
                yield key, getattr(self, key), "must be >= 0"
        for key in ("init_scale", "hyper_lr", "scale_lr"):
            if not getattr(self, key) > 0:
                yield key, getattr(self, key), "must be > 0"
        if self.hyper_warmup_steps < 0 or self.val_steps < 0:
            yield "hyper_warmup_steps/val_steps", (self.hyper_warmup_steps, self.val_steps), "must be >= 0"
        if self.train_steps < 1:
            yield "train_steps", self.train_steps, "must be >= 1"
        if self.val_steps > 0 and not 0 < self.val_fraction < 1:
            yield "val_fraction", self.val_fraction, "must be in (0, 1) when val_steps > 0"
        tune = list(self.tune)
        if not tune:
            yield "tune", tune, f"must name at least one of {sorted(HYPERPARAMETERS)}"
        if len(set(tune)) != len(tune):
            yield "tune", tune, "names a hyperparameter twice"
        for name in [*tune, *self.init]:
            if name not in HYPERPARAMETERS:
                yield "tune" if name in tune else f"init.{name}", name, f"unknown; known: {sorted(HYPERPARAMETERS)}"
        for name, value in dict(self.init).items():
            r = HYPERPARAMETERS.get(name)
            if r is not None and not r.low < value < r.high:
                yield f"init.{name}", value, f"must lie in ({r.low}, {r.high})"
        if "weight_decay" in tune and self.weight_decay > 0:
            yield "weight_decay", self.weight_decay, "must be 0 when weight_decay is tuned"

    def build(self, model: nn.Module, total_steps: int) -> StnPlugin:
        """Convert ``model`` in place into an STN and build its plugin (:func:`build_stn`)."""
        return build_stn(self, model, total_steps)


def perturbation_seed(run_seed: int, rank: int) -> int:
    """A seed per (run, rank): every worker perturbs independently, reproducibly."""
    return (run_seed * 1_000_003 + 104_729 * (rank + 1)) % 2**63


class StnPlugin(OptimizerPlugin):
    """Four torch optimizers (general, response, h, s) and the STN step logic."""

    def __init__(self, cfg: StnConfig, model: nn.Module, stn: StnModel, total_steps: int, run_seed: int = 0) -> None:
        self.cfg = cfg
        self.stn = stn
        self.space = stn.space
        self.total_steps = total_steps
        self.centered = cfg.variant == "delta"
        self.general_params = stn.general_parameters(model)
        self.response_params = stn.response_parameters()
        self.general_opt = torch.optim.SGD(self.general_params, lr=cfg.lr, momentum=cfg.momentum,
                                           weight_decay=cfg.weight_decay)
        self.response_opt = torch.optim.SGD(self.response_params, lr=cfg.response_lr or cfg.lr,
                                            momentum=cfg.momentum)
        hyper_cls = torch.optim.RMSprop if cfg.hyper_optimizer == "rmsprop" else torch.optim.Adam
        self.hyper_opt = hyper_cls([self.space.h], lr=cfg.hyper_lr)
        self.scale_opt = hyper_cls([self.space.s], lr=cfg.scale_lr)
        self.optimizers = [self.general_opt, self.response_opt, self.hyper_opt, self.scale_opt]
        self.validation_fraction = cfg.val_fraction if cfg.val_steps > 0 else 0.0
        self.pre_average = consensus_pre_average(stn) if cfg.averaging == "jacobian" else None
        self.generator = torch.Generator(device=self.space.h.device)
        self.generator.manual_seed(perturbation_seed(run_seed, dist.rank()))
        names = self.space.names
        self._data_columns = {n: names.index(n) for n in DATA_HYPERPARAMETERS if n in names}
        self._decay_column = names.index("weight_decay") if "weight_decay" in names else None
        self._last_lr = float("nan")
        self.last_val_loss: torch.Tensor | None = None

    # ------------------------------------------------------------------ schedule
    def lr(self, step: int) -> float:
        return self.cfg.lr_at_step(step, self.total_steps)

    def is_hyper_step(self, step: int) -> bool:
        c = self.cfg
        if c.val_steps == 0 or step < c.hyper_warmup_steps:
            return False
        return (step - c.hyper_warmup_steps) % (c.train_steps + c.val_steps) >= c.train_steps

    def uses_train_batch(self, step: int) -> bool:
        """A hyper step trains on validation batches only, so the trainer draws no training batch for it."""
        return not self.is_hyper_step(step)

    def _set_lrs(self, lr: float) -> None:
        if lr == self._last_lr:
            return
        response_lr = (self.cfg.response_lr or self.cfg.lr) * lr / self.cfg.lr
        for opt, value in ((self.general_opt, lr), (self.response_opt, response_lr)):
            for group in opt.param_groups:
                group["lr"] = value
        self._last_lr = lr

    # ------------------------------------------------------------------ one local step
    def train_step(self, model: nn.Module, batch: Batch | None, step: int, ctx: StepContext) -> StepOutput:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ConfigError("optimizer=stn needs local SGD (its steps take several backward passes); "
                              "schedule=ddp is not supported")
        if self.is_hyper_step(step):  # the trainer passes batch=None here (uses_train_batch); any batch is unused
            if ctx.next_val_batch is None:
                raise ConfigError("optimizer=stn: no validation batches (StepContext.next_val_batch is None); "
                                  "the trainer provides them when optimizer.val_fraction > 0")
            return self.hyper_step(model, ctx.next_val_batch(), ctx.loss_fn)
        batch = require_batch(batch, step)
        self._set_lrs(ctx.lr_override if ctx.lr_override is not None else self.lr(step) * ctx.lr_scale)
        if not model.training:
            model.train()
        if self.cfg.val_steps == 0:  # nothing is tuned: plain training at the current (fixed) hyperparameters
            return self.general_step(model, batch, ctx)
        if not self.centered:
            return self.stn_step(model, batch, ctx)
        out = self.general_step(model, batch, ctx)
        self.response_step(model, batch, ctx.loss_fn)
        return out

    def general_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], ctx: StepContext) -> StepOutput:
        """Delta-STN (a): the general parameters at the unperturbed h (δ = 0, data path at h)."""
        x, y = batch
        h = self.space.sample(len(y), perturb=False).detach()
        values = self.space.constrained(h)
        with self.stn.context.use(None, values, self.generator):
            logits = model(self._data_path(x, values))
        loss = ctx.loss_fn(logits, y)
        self._descend([self.general_opt], self.general_params, loss + self._penalty(values, None),
                      lambda: ctx.after_backward(model) if ctx.after_backward is not None else None)
        return StepOutput(loss.detach(), int(y.shape[0]), logits.detach(), y)

    def response_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                      loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Delta-STN (b): the response parameters at h̃ = h + σ ε (δ = h̃ − h, data path at h̃)."""
        x, y = batch
        h_tilde = self.space.sample(len(y), perturb=True, generator=self.generator).detach()
        values = self.space.constrained(h_tilde)
        delta = self.space.hnet_input(h_tilde, centered=True)
        x = self._data_path(x, values)
        if self.cfg.linearize:
            logits = linearized_forward(model, self.stn, x, delta, values, self.generator)
        else:
            with self.stn.context.use(delta, values, self.generator):
                logits = model(x)
        loss = loss_fn(logits, y)
        self._descend([self.response_opt], self.response_params, loss + self._penalty(values, delta[0]))
        return loss.detach()

    def stn_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], ctx: StepContext) -> StepOutput:
        """Plain STN: every weight at the perturbed, uncentred input δ = h̃ (Algorithm 1's train step)."""
        x, y = batch
        h_tilde = self.space.sample(len(y), perturb=True, generator=self.generator).detach()
        values = self.space.constrained(h_tilde)
        with self.stn.context.use(h_tilde, values, self.generator):
            logits = model(self._data_path(x, values))
        loss = ctx.loss_fn(logits, y)
        self._descend([self.general_opt, self.response_opt], self.general_params + self.response_params,
                      loss + self._penalty(values, h_tilde[0]),
                      lambda: ctx.after_backward(model) if ctx.after_backward is not None else None)
        return StepOutput(loss.detach(), int(y.shape[0]), logits.detach(), y)

    def hyper_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                   loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> StepOutput:
        """(h, s) ← descent on L_V(ŵ(h̃)) − τ·H: eval mode, no data path, gradient only through ŵ."""
        x, y = batch
        model.eval()
        try:
            h_tilde = self.space.sample(len(y), perturb=self.cfg.tune_scales, generator=self.generator)
            with self.stn.context.use(self.space.hnet_input(h_tilde, self.centered), None, self.generator):
                logits = model(x)
            loss = loss_fn(logits, y)
            objective = loss - self.cfg.entropy_weight * self.space.entropy()
            if self.cfg.tune_scales:
                self._descend([self.hyper_opt, self.scale_opt], [self.space.h, self.space.s], objective)
            else:
                self._descend([self.hyper_opt], [self.space.h], objective)
        finally:
            model.train()
        self.last_val_loss = loss.detach()
        return StepOutput(loss.detach(), int(y.shape[0]), logits.detach(), y)

    # ------------------------------------------------------------------ pieces
    @staticmethod
    def _descend(optimizers: list[torch.optim.Optimizer], params: list[nn.Parameter], loss: torch.Tensor,
                 after_backward: Callable[[], Any] | None = None) -> None:
        # Gradients of exactly these parameters: nothing else gets a .grad, so no step can move
        # another group's parameters (h and s stay bit-identical through training steps).
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g
        if after_backward is not None:
            after_backward()
        for opt in optimizers:
            opt.step()
        for p in params:
            p.grad = None

    def _data_path(self, x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        if not self._data_columns:
            return x
        return apply_data_path(x, {n: values[:, i] for n, i in self._data_columns.items()}, self.generator)

    def _penalty(self, values: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor | float:
        """(wd/2)·Σ‖W(δ)‖² over the best-response weights, wd the minibatch's tuned weight decay."""
        if self._decay_column is None:
            return 0.0
        total = sum(
            (layer.weights_at(delta)[0] if delta is not None else layer.general_weight).square().sum()
            for layer in self.stn.layers
        )
        return 0.5 * values[0, self._decay_column].detach() * total

    # ------------------------------------------------------------------ logging and checkpoints
    def log_values(self) -> dict[str, float]:
        out = {f"hp/{k}": v for k, v in self.space.values().items()}
        out.update({f"hp_sigma/{k}": v for k, v in self.space.scales().items()})
        out["stn_val_loss"] = float(self.last_val_loss) if self.last_val_loss is not None else math.nan
        return out

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["generator"] = self.generator.get_state()
        state["last_val_loss"] = None if self.last_val_loss is None else float(self.last_val_loss)
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
        value = state.get("last_val_loss")
        self.last_val_loss = None if value is None else torch.tensor(value)
        self._last_lr = float("nan")


def linearized_forward(model: nn.Module, stn: StnModel, x: torch.Tensor, delta: torch.Tensor,
                       values: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
    """f(x; δ=0) + J_δ f(x; δ=0)·δ by one forward-mode pass (Delta-STN's linearisation).

    Gradients reach the response parameters through the tangent, which is linear in them per layer.
    """

    def outputs(d: torch.Tensor) -> torch.Tensor:
        with stn.context.use(d, values, generator):
            return model(x)

    primal, tangent = torch.func.jvp(outputs, (torch.zeros_like(delta),), (delta,))
    return primal + tangent


def build_stn(cfg: StnConfig, model: nn.Module, total_steps: int) -> StnPlugin:
    """Convert ``model`` in place into an STN (see :mod:`localsgd.stn.convert`) and build its plugin.

    The response weights are drawn from a generator seeded by the run seed (``torch.initial_seed()``,
    which the trainer set on every rank before building the model), so all ranks build one replica.
    """
    bad = [f"optimizer.{k}={v!r}: {why}" for k, v, why in StnConfig.problems(cfg)]
    if bad:
        raise ConfigError("invalid config: " + "; ".join(bad))
    run_seed = torch.initial_seed()
    if find(model) is not None:
        raise ConfigError("optimizer=stn: the model is already a Self-Tuning Network; build a fresh model")
    init_gen = torch.Generator().manual_seed(perturbation_seed(run_seed, -1))
    try:
        stn = to_stn(model, list(cfg.tune), dict(cfg.init), cfg.init_scale, centered=cfg.variant == "delta",
                     generator=init_gen)
    except ValueError as exc:
        raise ConfigError(f"optimizer=stn: {exc}") from None
    return StnPlugin(cfg, model, stn, total_steps, run_seed)
