"""Step hooks: what a component needs at a moment of the local step, without the loop naming it.

The worker loop (:mod:`localsgd.trainer`) calls, for every hook that defines them,
``before_step(step, batch_size, ctx)`` before the local step (it may set ``ctx.lr_override`` or
``ctx.after_backward``), ``after_step(done, model)`` after it and before the communicator decides,
``record()`` when a train record is written, and ``finish(communicator)`` once after the final
average. A hook with a ``state_dict`` is checkpointed under its ``name``.

The hooks here:

* :class:`NoiseScaleProbe` — McCandlish et al. (arXiv 1812.06162, App. A.1) two-batch estimate of
  the gradient noise scale, for ramps that observe it (``ramp.observes_noise_scale``).
* :class:`StichIterateAverage` — Stich (ICLR 2019, arXiv 1805.09767, Theorem 2.2): step size
  η_t = 4/(μ(a+t)) and the output x̂_T = Σ_t w_t x_t / Σ_t w_t with w_t = (a+t)², for
  ``schedule=stich schedule.paper_lr=true``.
* :class:`FaultHook` — the fault injector of the reliability tests (``LOCALSGD_FAULT``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from . import dist
from .optim.base import StepContext
from .ramps.noise_scale import NoiseScaleFeed
from .schedules.stich import WeightedIterateAverage, stich_lr
from .testing.faults import FaultInjector


class StepHook:
    """Base class: override only the moments a hook needs (the loop calls only those)."""

    name = "hook"

    def before_step(self, step: int, batch_size: int, ctx: StepContext) -> None: ...

    def after_step(self, done: int, model: nn.Module) -> None: ...

    def record(self) -> dict[str, Any]:
        return {}

    def finish(self, communicator: Any) -> None: ...

    def summary(self) -> dict[str, Any]:
        return {}


def overriding(hooks: list[StepHook], method: str) -> list[Any]:
    """The bound ``method`` of each hook that overrides it: the loop pays only for what is used."""
    bound = [getattr(h, method) for h in hooks]
    return [m for m in bound if getattr(m, "__func__", None) is not getattr(StepHook, method)]


class NoiseScaleProbe(StepHook):
    """Measure B_simple at a common point and feed it to the ramp.

    Right after a sync all replicas hold the same parameters, so at the first local step of every
    ``measure_every_rounds``-th round each worker's gradient (batch b) and the all-reduced mean
    gradient (batch K·b) are the two batches of the estimator. One extra all-reduce of one gradient
    (plus its squared norm) per measurement, counted in ``bytes``.
    """

    name = "noise_scale"

    def __init__(self, cfg: Any, observer: Any, world: int, communicator: Any) -> None:
        # observer: the ramp or schedule that acts on B_simple (observe_noise_scale(b_simple, step, K·b))
        self.world, self.communicator = world, communicator
        self.feed = NoiseScaleFeed(cfg, observer, world)
        self.bytes = 0

    def before_step(self, step: int, batch_size: int, ctx: StepContext) -> None:
        c = self.communicator
        due = c.in_sync and self.feed.due(c.stats.rounds)
        ctx.after_backward = self._measure(step, batch_size) if due else None

    def _measure(self, step: int, batch_size: int) -> Any:
        def measure(model: nn.Module) -> None:
            grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
            flat = torch.cat(grads).double()
            buf = torch.cat([flat, flat.pow(2).sum().reshape(1)])
            dist.all_reduce_sum_(buf, what="noise-scale gradient all-reduce")
            self.bytes += buf.numel() * buf.element_size()
            small = float(buf[-1]) / self.world  # mean over workers of |g_k|^2 (lower variance)
            big = float((buf[:-1] / self.world).pow(2).sum())
            self.feed.feed(small, big, batch_size, step)

        return measure

    def record(self) -> dict[str, Any]:
        return {"b_simple": self.feed.last_b_simple}

    def summary(self) -> dict[str, Any]:
        return {"noise_scale_bytes": self.bytes}

    def state_dict(self) -> dict[str, Any]:
        return {"estimator": self.feed.estimator.state_dict(), "bytes": self.bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.feed.estimator.load_state_dict(state["estimator"])
        self.bytes = int(state["bytes"])


class StichIterateAverage(StepHook):
    """Stich's step size before every step and the weighted iterate average as the output."""

    name = "stich"

    def __init__(self, communicator: Any, a: float, mu: float, lr_numerator: float, resumed_done: Any) -> None:
        self.communicator = communicator
        self.average = WeightedIterateAverage(communicator.param_buffers(), a)
        self.mu, self.lr_numerator = mu, lr_numerator
        self.finished = resumed_done  # () -> bool: the run was already complete when it started

    def before_step(self, step: int, batch_size: int, ctx: StepContext) -> None:
        self.average.accumulate(self.communicator.param_buffers(), step)
        ctx.lr_override = stich_lr(step, self.mu, self.average.a, self.lr_numerator)

    def finish(self, communicator: Any) -> None:
        if not self.finished():  # the output is x̂_T, not the last iterate
            communicator.stats.bytes += self.average.finalize_into(communicator.param_buffers())

    def state_dict(self) -> dict[str, Any]:
        return self.average.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.average.load_state_dict(state)


class RoundLengthHistory(StepHook):
    """The current H in every train record, and its history (``[step, H]`` at each change) in the summary.

    Read when a record is written, so it costs nothing between records and the history has the
    records' resolution; checkpointed, so a resumed run reports the whole run's history.
    """

    name = "round_lengths"

    def __init__(self, communicator: Any) -> None:
        self.communicator = communicator
        self.history: list[list[int]] = [[communicator.local_step, communicator.round_steps]]

    def record(self) -> dict[str, Any]:
        h = self.communicator.round_steps
        if not self.history or self.history[-1][1] != h:
            self.history.append([self.communicator.local_step, h])
        return {"H": h}

    def summary(self) -> dict[str, Any]:
        return {"final_H": self.communicator.round_steps, "h_history": self.history}

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [list(map(int, pair)) for pair in state["history"]]


class FaultHook(StepHook):
    """Injected faults (NaN, sleep, kill) at a rank and step, for the reliability tests."""

    name = "faults"

    def __init__(self) -> None:
        self.injector = FaultInjector()
        if self.injector.faults:
            self.after_step = self.injector.after_step  # type: ignore[method-assign]

    def during_save(self, step: int, stage: str) -> None:
        self.injector.during_save(step, stage)
