"""K virtual local-SGD workers in one process: stacked replicas, one vectorised step for all of them.

Local SGD (Stich, ICLR 2019, arXiv 1805.09767, Algorithm 1) with K workers is K independent SGD
trajectories x_k, each on its own shard, replaced by their mean x̄ = (1/K) Σ_k x_k at the steps the
schedule picks. Nothing in a local step couples the workers, so the K replicas can live in one tensor
per parameter with a leading worker dimension (shape ``(K, *p.shape)``) and take their steps together:
the per-worker gradients come from ``torch.func.vmap`` over ``torch.func.grad`` of the model's
``functional_call``, and the update is the run's own torch optimizer applied to the stacked tensors
(SGD's and AdamW's updates are elementwise, so a stacked tensor is exactly K optimizers side by side).

No second copy of any component's logic: the schedule, the batch ramp, the outer optimizer, the LR
schedule, the optimizer and the per-worker :class:`~localsgd.sampler.ShardSampler` are the objects the
distributed trainer builds from the same config (:class:`~localsgd.config.TrainConfig`); only the
collective is replaced, by a mean over the worker dimension (groups of consecutive workers for a
hierarchical schedule, as its process subgroups are). The order of events at a sync is the engine's
(:meth:`localsgd.engine.LocalSGD._sync`): average, outer step (global syncs only, with the last step's
inner LR), ``schedule.observe`` with the workers' mean round loss and the next step's LR, then
``schedule.advance``; ``finalize`` averages a partial last round (and takes its outer step).

Exactness: in float64 a simulated trajectory equals a real Gloo run of :class:`~localsgd.engine.LocalSGD`
with the same config and seed to within rounding (the summation order of an all-reduce over K > 2 ranks
is the collective's; ``tests/test_sim.py`` and ``benchmarks/sim.py`` check max |Δ| ≤ 1e-12 against
:mod:`localsgd.testing.gloo_reference`). Dropout draws differ from a real run's (per-worker noise
comes from ``vmap(randomness="different")``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from .. import data as data_lib
from .. import models as model_lib
from .. import optim as optim_lib
from .. import outer as outer_lib
from .. import ramps as ramp_lib
from ..config import TrainConfig, check_batch_fits_shard
from ..engine.streaming import BLOCKING_DEFAULTS, streaming_options
from ..errors import ConfigError
from ..sampler import ShardGroup
from ..trainer import build_schedule, seed_everything, step_lr


@dataclass
class SyncRecord:
    """One average: after local step ``step``, over groups of ``group_size`` workers (K: global)."""

    step: int
    group_size: int
    round_loss: float  # the workers' mean of their mean training loss over the round
    lr: float  # the inner LR of the round's last step


@dataclass
class SimResult:
    """What a simulated run leaves: the final averaged parameters, the syncs and the final evaluation."""

    workers: int
    steps: int
    params: dict[str, torch.Tensor]
    syncs: list[SyncRecord]
    eval: dict[str, float]
    seconds: float
    samples: int  # training samples drawn, summed over workers
    final_batch_size: int

    @property
    def rounds(self) -> int:
        return len(self.syncs)

    @property
    def worker_steps_per_second(self) -> float:
        return self.workers * self.steps / self.seconds if self.seconds > 0 else float("nan")

    def flat_params(self) -> torch.Tensor:
        return torch.cat([p.reshape(-1) for p in self.params.values()])


def unsupported(cfg: TrainConfig) -> list[str]:
    """What the simulator cannot run (each named by its key), so it refuses instead of simulating something else."""
    out = []
    sc = cfg.schedule
    if hasattr(sc, "build_communicator"):
        out.append(f"schedule={sc.name}: the simulator averages parameters; DDP's every-step gradient average "
                   "is schedule=fixed schedule.H=1 for plain SGD")
    if getattr(sc, "paper_lr", False):
        out.append("schedule.paper_lr=true: Stich's weighted iterate average is a trainer hook the simulator "
                   "does not run")
    if not getattr(type(cfg.optimizer), "plain_step", False):
        out.append(f"optimizer={getattr(cfg.optimizer, 'name', cfg.optimizer)}: the simulator runs the plain "
                   "torch optimizers (sgd, adamw)")
    tc = cfg.trainer
    if tc.precision != "fp32" or tc.grad_accum_steps != 1 or tc.grad_clip > 0 or tc.compile:
        out.append("trainer.precision/grad_accum_steps/grad_clip/compile: the simulator runs the plain fp32 step")
    s = cfg.sync
    for key in streaming_options(**{k: getattr(s, k) for k in BLOCKING_DEFAULTS}):
        out.append(f"sync.{key}={getattr(s, key)!r}: the simulator runs the blocking average")
    if s.optimizer_state != "keep":
        out.append(f"sync.optimizer_state={s.optimizer_state!r}: the simulator keeps each worker's optimizer state")
    if getattr(cfg.ramp, "name", "") == "noise_scale":
        out.append("ramp=noise_scale: the simulator does not run the trainer's noise-scale probe")
    return out


class Simulator:
    """Run ``cfg`` with ``workers`` virtual workers in this process (see the module docstring).

    ``dtype`` is the replicas' and the data's floating type (float64 for exactness checks);
    ``on_sync(sim, record)``, if given, is called after every average (for example to evaluate the
    averaged model's objective, :meth:`objective`); when it returns True the run stops there, with
    every replica equal to the average (a benchmark's "iterations to ε"), and the result's ``steps``
    are the local steps taken. With ``measure_noise`` (K ≥ 2), the first step after every global
    average also measures the gradient noise scale for free: there the K workers' gradients are taken
    at one point, on K disjoint batches of b, so McCandlish et al.'s two-batch estimator (arXiv
    1812.06162, App. A.1) gets its small batch (one worker's, b) and its big one (their mean, K·b);
    :attr:`noise` lists ``(step, |G|² estimate, tr Σ estimate)``, B_simple = tr Σ/|G|².
    A schedule that observes the noise scale (``schedule=noise_adaptive``) is fed as the trainer's
    probe feeds it: at those points, every ``measure_every_rounds`` global rounds, through the same
    EMA estimator, with the round's global batch K·b.
    """

    def __init__(self, cfg: TrainConfig, workers: int, *, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu",
                 on_sync: Callable[[Simulator, SyncRecord], bool | None] | None = None,
                 measure_noise: bool = False) -> None:
        if int(workers) != workers or workers < 1:
            raise ConfigError(f"invalid simulation: workers={workers!r}: must be an integer >= 1")
        problems = unsupported(cfg)
        if problems:
            raise ConfigError("cannot simulate: " + "; ".join(problems))
        self.cfg, self.K, self.dtype, self.device = cfg, int(workers), dtype, torch.device(device)
        self.on_sync = on_sync
        if measure_noise and workers < 2:
            raise ConfigError("invalid simulation: measure_noise needs workers >= 2 (two batch sizes)")
        self.measure_noise = measure_noise
        self.noise: list[tuple[int, float, float]] = []
        self._at_average = True  # the replicas are equal (the start, or right after a global average)
        tc = cfg.trainer
        self.T = tc.max_steps
        seed_everything(tc.seed)
        data = data_lib.build(cfg.data)
        if not isinstance(data, data_lib.Dataset):
            raise ConfigError(f"cannot simulate: data={cfg.data.name}: the simulator needs an in-memory data set")
        self.data = data
        model = model_lib.build(cfg.model, data.input_shape, data.num_classes)
        if any(True for _ in model.buffers()):
            raise ConfigError(f"cannot simulate: model={cfg.model.name} has buffers (e.g. batch-norm statistics); "
                              "the simulator stacks parameters only")
        self.model = model.to(device=self.device, dtype=dtype)
        self.names = [n for n, _ in self.model.named_parameters()]
        # K identical replicas (the trainer broadcasts rank 0's weights; here they are copies of one init).
        self.replicas = nn.ParameterList([nn.Parameter(p.detach().unsqueeze(0).repeat(self.K, *([1] * p.dim())))
                                          for _, p in self.model.named_parameters()])
        holder = nn.Module()
        holder.replicas = self.replicas
        self.plugin = optim_lib.build(cfg.optimizer, holder, self.T)  # one torch optimizer over the stacks
        self.optimizer = self.plugin.optimizers[0]
        self.ramp = ramp_lib.build(cfg.ramp, tc.batch_size, self.T, world_size=self.K)
        check_batch_fits_shard(cfg, self.ramp, data.num_train, self.K)
        # one node: a hierarchical schedule's groups default to all workers, as torchrun's would
        self.schedule = build_schedule(cfg, self.K, self.K)
        self.group_size = getattr(self.schedule, "group_size", None)
        # a schedule acting on B_simple is fed as the trainer's probe feeds it, at the same points
        self.noise_feed = (ramp_lib.NoiseScaleFeed(cfg.schedule, self.schedule, self.K)
                           if getattr(self.schedule, "observes_noise_scale", False) else None)
        self.global_rounds = 0  # global averages so far, as the engine's stats.rounds counts them
        if self.group_size is not None and (self.group_size < 1 or self.K % self.group_size):
            raise ConfigError(f"invalid simulation: hierarchical group_size {self.group_size} does not divide "
                              f"workers={self.K}")
        self.outer = outer_lib.build(cfg.outer)
        self.shards = ShardGroup(data.num_train, self.K, tc.seed)  # worker k's stream is rank k's ShardSampler
        self.x_train = data.x_train.to(self.device, dtype)
        self.y_train = data.y_train.to(self.device)
        self.loss_fn = data.loss_fn
        self._grad = vmap(grad_and_value(self._loss_of), randomness="different")
        self._global = torch.cat([p.detach()[0].reshape(-1) for p in self.replicas]).clone()  # x_t
        self.local_step = 0
        self.last_global_sync_step = 0
        self.syncs: list[SyncRecord] = []
        self._round_loss = torch.zeros(self.K, dtype=torch.float64, device=self.device)
        self._round_count = 0
        self._last_lr = float("nan")

    # ------------------------------------------------------------------ the workers' step
    def _loss_of(self, params: tuple[torch.Tensor, ...], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(functional_call(self.model, dict(zip(self.names, params)), (x,)), y)

    def local_step_all(self, step: int) -> torch.Tensor:
        """One optimizer step on every worker, each on its own next batch; returns the K losses."""
        b = self.ramp.batch_size(step)
        lr = step_lr(self.cfg, self.plugin, self.ramp, step)
        if lr != self._last_lr:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self._last_lr = lr
        idx = self.shards.next_indices(b).to(self.device)
        grads, losses = self._grad(tuple(p.detach() for p in self.replicas), self.x_train[idx], self.y_train[idx])
        feed = self.noise_feed is not None and self._at_average and self.noise_feed.due(self.global_rounds)
        if self._at_average and (self.measure_noise or feed):
            small, big = self._gradient_norms(grads)
            if self.measure_noise:
                self.noise.append((step, *ramp_lib.two_batch_estimates(small, big, b, self.K * b)))
            if feed:
                self.noise_feed.feed(small, big, b, step)
        self._at_average = False
        for p, g in zip(self.replicas, grads):
            p.grad = g
        self.optimizer.step()
        return losses.detach()

    def _gradient_norms(self, grads: tuple[torch.Tensor, ...]) -> tuple[float, float]:
        """The two batches' squared norms from K gradients at one point: |g_k|² averaged over the workers
        (batch b) and |mean_k g_k|² (batch K·b), as the trainer's probe all-reduces them."""
        flat = torch.cat([g.reshape(self.K, -1).double() for g in grads], dim=1)
        mean = flat.mean(dim=0)
        return float((flat * flat).sum(dim=1).mean()), float(mean @ mean)

    # ------------------------------------------------------------------ the average
    def _average(self, group_size: int) -> None:
        with torch.no_grad():
            for p in self.replicas:
                g = p.view(self.K // group_size, group_size, *p.shape[1:])
                g.copy_((g.sum(dim=1, keepdim=True) / group_size).expand_as(g))

    def _outer_step(self) -> None:
        """The outer optimizer on the (identical) averaged replicas, as the engine's flat buffer sees them."""
        with torch.no_grad():
            averaged = torch.cat([p[0].reshape(-1) for p in self.replicas])
            self.outer.step([self._global], [averaged], inner_lr=float(self.optimizer.param_groups[0]["lr"]) or 1.0)
            self._global.copy_(averaged)
            offset = 0
            for p in self.replicas:
                n = p[0].numel()
                p.copy_(averaged[offset:offset + n].view(p.shape[1:]).expand_as(p))
                offset += n

    def _sync(self, advance_schedule: bool = True) -> bool:
        """Average (and step the outer optimizer); True when ``on_sync`` asks the run to stop."""
        step = self.local_step
        is_global = self.group_size is None or not advance_schedule or self.schedule.is_global(step)
        size = self.K if is_global else self.group_size
        if not bool(torch.isfinite(self._round_loss).all()):
            bad = int((~torch.isfinite(self._round_loss)).nonzero()[0])
            raise FloatingPointError(f"simulated worker {bad} reached a non-finite loss before step {step}; "
                                     "lower optimizer.lr")
        round_loss = float(self._round_loss.mean() / self._round_count) if self._round_count else float("nan")
        self._round_loss.zero_()
        self._round_count = 0
        self._average(size)
        if is_global:
            self._outer_step()
            self.last_global_sync_step = step
            self._at_average = True
            self.global_rounds += advance_schedule  # finalize()'s average is the run's end, not a round
        record = SyncRecord(step, size, round_loss, float(self.optimizer.param_groups[0]["lr"]))
        self.syncs.append(record)
        if advance_schedule:
            # the LR the next round's first step (0-based ``step``) runs at, as the trainer's next_lr gives it
            self.schedule.observe(step=step, loss=round_loss, lr=step_lr(self.cfg, self.plugin, self.ramp, step))
            self.schedule.advance(step)
        return self.on_sync is not None and bool(self.on_sync(self, record))

    # ------------------------------------------------------------------ the run
    def run(self) -> SimResult:
        start = time.perf_counter()
        for step in range(self.local_step, self.T):
            losses = self.local_step_all(step)
            self.local_step = step + 1
            self._round_loss += losses.float().double()  # as the engine folds the losses: float32, summed in float64
            self._round_count += 1
            if self.schedule.should_sync(self.local_step) and self._sync():
                break
        if not (self.local_step == self.last_global_sync_step and self.syncs):
            self._sync(advance_schedule=False)  # finalize(): every replica ends identical
        seconds = time.perf_counter() - start
        params = {n: p.detach()[0].clone() for n, p in zip(self.names, self.replicas)}
        return SimResult(self.K, self.local_step, params, self.syncs, self.evaluate(params), seconds,
                         self.K * self.shards.samples_seen, self.ramp.batch_size(self.local_step - 1))

    # ------------------------------------------------------------------ evaluation
    def averaged_params(self) -> dict[str, torch.Tensor]:
        """x̄ over all workers now (between syncs the replicas differ)."""
        return {n: p.detach().mean(dim=0) for n, p in zip(self.names, self.replicas)}

    @torch.no_grad()
    def objective(self, params: dict[str, torch.Tensor] | None = None, split: str = "train",
                  batch_size: int = 8192, samples: int | None = None) -> tuple[float, float]:
        """(mean loss, accuracy) of ``params`` (default: the current average) over a split (its first ``samples``)."""
        params = self.averaged_params() if params is None else params
        if split == "train":
            x, y = self.x_train, self.y_train
        else:
            x, y = self.data.x_test.to(self.device, self.dtype), self.data.y_test.to(self.device)
        if samples is not None:
            x, y = x[:samples], y[:samples]
        total, correct = 0.0, 0
        was_training = self.model.training
        self.model.eval()
        for i in range(0, len(y), batch_size):
            out = functional_call(self.model, params, (x[i:i + batch_size],))
            total += float(self.loss_fn(out, y[i:i + batch_size])) * len(out)
            correct += int((out.argmax(-1) == y[i:i + batch_size]).sum())
        self.model.train(was_training)
        n = len(y)
        return total / n, correct / n

    def evaluate(self, params: dict[str, torch.Tensor]) -> dict[str, float]:
        loss, acc = self.objective(params, split="test")
        return {"eval_loss": loss, "eval_accuracy": acc}
