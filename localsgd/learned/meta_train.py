"""Meta-train the learned optimizer (:mod:`.lopt`) on the offline tasks of :mod:`.tasks`: ``localsgd-meta-train``.

Metz, Maheswaranathan, Cheung & Sohl-Dickstein (ICLR 2019, arXiv 1804.00222) meta-learn an update
rule's parameters θ by differentiating a task loss through unrolled training; long unrolls are cut
into truncations. Two estimators of ∇_θ of the meta-loss:

* ``pes`` (default): antithetic truncated Persistent Evolution Strategies (Vicol, Metz &
  Sohl-Dickstein, ICML 2021, PMLR 139 "vicol21a", arXiv 2112.13835). Every task runs twice, with
  θ + ε and θ − ε (a fresh ε ~ N(0, σ²I) each truncation), each keeping its own inner state across
  truncations, and the task accumulates ξ = Σ ε since its inner run began. With L± the truncation's
  meta-loss, ĝ = mean over tasks of (L⁺ − L⁻)/(2σ²)·ξ, which is unbiased for the gradient of the
  whole-horizon objective despite the truncation (their §3, in its antithetic form).
* ``tbptt``: backpropagation through each K-step truncation (second order, ``create_graph``), then
  the inner state is detached: cheaper per sample, biased towards short horizons.

Meta-loss of a truncation: mean over its K steps of log(training minibatch loss), clipped above at
log(3 × the task's loss at initialisation); NaN counts as the clip. θ takes Adam steps (lr 3e-3) on ĝ
after clipping its norm to 1. Inner runs last T ~ U{``horizon_min``..``horizon_max``} steps; the first
horizon of each group is shortened at random so resets are staggered.

Batching: a *group* is one task spec (:class:`~localsgd.learned.tasks.TaskSpec`) with ``pairs``
task instances (fewer for large students: at most ``max_group_elements`` = 20,000 inner-run parameters
per group, to bound CPU time); its S·M·R inner runs (S = 2 signs for PES, M instances, R replicas) are flat
parameter vectors stacked on a leading dimension. The students' gradients come from one batched
autograd call; the update is :func:`~localsgd.learned.lopt.lopt_update` under ``torch.func.vmap``.

With ``replicas`` R > 1 and ``average_every`` H > 0, each run is R replicas that draw their own
minibatches and are averaged every H steps, parameters and (per ``state_policy``) the optimizer
state: the rule is meta-trained on what a local-SGD sync does to its inputs.

All tunables below are defaults for 2 CPU cores, not values from the papers: σ = 0.01, K = 10, 4 groups
× 4 pairs, Adam 3e-3 and clip 1 are the design's; T ∈ [100, 300] (the design says up to 400) and 600
iterations keep the bundled checkpoint's meta-training to minutes. Runs are deterministic for a seed on
one torch version and thread count (one ``torch.Generator`` draws everything); ``--state`` files
make them resumable, and a resumed run equals an uninterrupted one.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch.func import vmap

from . import tasks as task_lib
from .lopt import (
    DEFAULT_SPEC,
    FEATURE_VERSION,
    LOptSpec,
    Segments,
    init_theta,
    lopt_update,
    save_checkpoint,
    zero_state,
)

ESTIMATORS = ("pes", "tbptt")
STATE_POLICIES = ("average", "reset", "keep")
LOSS_CAP_FACTOR = 3.0  # a truncation loss above 3x the task's initial loss counts as 3x (and NaN too)
LOG_LOSS_FLOOR = math.log(1e-6)


@dataclass
class MetaConfig:
    """Everything that determines a meta-training run (stored in its outputs)."""

    seed: int = 0
    iters: int = 600
    estimator: str = "pes"  # pes | tbptt
    groups: int = 4  # task specs advanced each iteration
    pairs: int = 4  # tasks per group (PES: one antithetic pair each), fewer for large students:
    max_group_elements: int = 20_000  # cap on (inner runs x student parameters) per group, for CPU time
    truncation: int = 10  # K inner steps per truncation
    horizon_min: int = 100
    horizon_max: int = 300
    sigma: float = 0.01
    meta_lr: float = 3e-3
    clip_norm: float = 1.0
    replicas: int = 1  # R: inner replicas per run, averaged every average_every steps
    average_every: int = 0  # H; 0 = never
    state_policy: str = "average"  # average | reset | keep: the optimizer state at an inner average
    init: str = "adam"  # adam | random: the starting θ
    eval_every: int = 100  # iterations between evaluations of θ on the validation tasks (0: only start/end)
    eval_steps: int = 100
    log_every: int = 10
    checkpoint_every: int = 100  # iterations between --state saves

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.estimator not in ESTIMATORS:
            yield "estimator", self.estimator, f"must be one of {ESTIMATORS}"
        if self.state_policy not in STATE_POLICIES:
            yield "state_policy", self.state_policy, f"must be one of {STATE_POLICIES}"
        if self.init not in ("adam", "random"):
            yield "init", self.init, "must be adam or random"
        for key in ("iters", "groups", "pairs", "max_group_elements", "truncation", "replicas", "eval_steps",
                    "log_every", "checkpoint_every"):
            if getattr(self, key) < 1:
                yield key, getattr(self, key), "must be >= 1"
        if not self.truncation <= self.horizon_min <= self.horizon_max:
            yield "horizon_min", self.horizon_min, "must satisfy truncation <= horizon_min <= horizon_max"
        for key in ("sigma", "meta_lr", "clip_norm"):
            if not getattr(self, key) > 0:
                yield key, getattr(self, key), "must be > 0"
        if self.average_every < 0 or self.eval_every < 0:
            yield "average_every/eval_every", (self.average_every, self.eval_every), "must be >= 0"
        if self.average_every and self.replicas < 2:
            yield "average_every", self.average_every, "needs replicas >= 2"


# ---------------------------------------------------------------------------------------------- inner runs
class Unroll:
    """S×M×R inner training runs of M tasks of one spec, advanced one step at a time, all together.

    Run index = (sign·M + task)·R + replica. Parameters and optimizer state are flat (the tensors of a
    student concatenated), so one vmapped :func:`lopt_update` call with per-tensor :class:`Segments`
    updates every tensor of every run.
    """

    def __init__(self, batch: task_lib.TaskBatch, signs: int, replicas: int, horizon: int,
                 spec: LOptSpec = DEFAULT_SPEC, average_every: int = 0, state_policy: str = "average") -> None:
        self.tasks, self.signs, self.replicas, self.horizon, self.spec = batch, signs, replicas, horizon, spec
        self.average_every, self.state_policy = average_every, state_policy
        self.m = batch.size
        self.n = signs * self.m * replicas
        self.shapes = [tuple(p.shape[1:]) for p in batch.init]
        self.numels = [math.prod(s) for s in self.shapes]
        self.segments = Segments.of(self.numels)
        start = torch.cat([p.reshape(self.m, -1) for p in batch.init], dim=1)
        self.params = self._expand(start).clone()
        self.state = zero_state(self.params, spec)
        self.t = 0
        self.accum = torch.zeros(self.m, spec.n_params)  # PES: Σ ε since this run began
        with torch.no_grad():
            initial = task_lib.loss_fn(self._unflatten(start), batch.x, batch.y, batch.spec.loss_kind)
        self.log_cap = torch.log(LOSS_CAP_FACTOR * initial)  # (M,)
        self._update = vmap(functools.partial(lopt_update, spec=spec, segments=self.segments),
                            in_dims=(0, 0, 0, 0, None))

    def _expand(self, per_task: torch.Tensor) -> torch.Tensor:
        """(M, ...) → (S·M·R, ...): every sign and replica of a task starts from the task's value."""
        shape = per_task.shape[1:]
        out = per_task[None, :, None].expand(self.signs, self.m, self.replicas, *shape)
        return out.reshape(self.n, *shape)

    def _unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        parts = torch.split(flat, self.numels, dim=-1)
        return [part.reshape(*flat.shape[:-1], *shape) for part, shape in zip(parts, self.shapes)]

    @property
    def done(self) -> bool:
        return self.t >= self.horizon

    def sample_batch(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One minibatch per (task, replica); both signs of a task see the same one (common random numbers)."""
        b = self.tasks.spec.batch_size
        idx = torch.randint(self.tasks.x.shape[1], (self.m, self.replicas, b), generator=gen)
        rows = torch.arange(self.m)[:, None, None]
        x, y = self.tasks.x[rows, idx], self.tasks.y[rows, idx]  # (M, R, B, d), (M, R, B)
        x = x[None].expand(self.signs, *x.shape).reshape(self.n, b, -1)
        y = y[None].expand(self.signs, *y.shape).reshape(self.n, b)
        return x, y

    def step(self, thetas: torch.Tensor, gen: torch.Generator, create_graph: bool = False) -> torch.Tensor:
        """One inner step of every run with its own θ (``thetas`` (N, P)); returns each run's minibatch loss.

        The loss is the one at the parameters *before* the step. ``create_graph`` keeps the graph from
        θ through the update (truncated backprop); otherwise nothing is recorded.
        """
        x, y = self.sample_batch(gen)
        with torch.enable_grad():
            params = self.params if self.params.requires_grad else self.params.detach().requires_grad_()
            losses = task_lib.loss_fn(self._unflatten(params), x, y, self.tasks.spec.loss_kind)
            (grads,) = torch.autograd.grad(losses.sum(), params, create_graph=create_graph)
        with torch.set_grad_enabled(create_graph):
            base = params if create_graph else params.detach()
            self.params, self.state = self._update(thetas, base, grads, self.state, self.t)
            self.t += 1
            if self.replicas > 1 and self.average_every and self.t % self.average_every == 0:
                self._average_replicas()
        return losses if create_graph else losses.detach()

    def _average_replicas(self) -> None:
        def mean(t: torch.Tensor) -> torch.Tensor:
            grouped = t.reshape(self.signs * self.m, self.replicas, -1)
            return grouped.mean(dim=1, keepdim=True).expand_as(grouped).reshape(t.shape)

        self.params = mean(self.params)
        if self.state_policy == "average":
            self.state = tuple(mean(s) for s in self.state)
        elif self.state_policy == "reset":
            self.state = tuple(torch.zeros_like(s) for s in self.state)

    def clipped_log(self, losses: torch.Tensor) -> torch.Tensor:
        """log(loss) per run, clipped to [log 1e-6, log(3·initial loss)]; NaN becomes the upper clip."""
        cap = self._expand(self.log_cap)
        logs = torch.log(losses)
        logs = torch.where(torch.isnan(logs), cap, logs)
        return torch.minimum(logs, cap).clamp(min=LOG_LOSS_FLOOR)

    def detach(self) -> None:
        self.params = self.params.detach()
        self.state = tuple(s.detach() for s in self.state)

    def state_dict(self) -> dict[str, Any]:
        return {"spec": asdict(self.tasks.spec), "x": self.tasks.x, "y": self.tasks.y, "init": self.tasks.init,
                "signs": self.signs, "replicas": self.replicas, "horizon": self.horizon, "params": self.params,
                "state": list(self.state), "t": self.t, "accum": self.accum,
                "average_every": self.average_every, "state_policy": self.state_policy}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any], spec: LOptSpec = DEFAULT_SPEC) -> Unroll:
        task_spec = task_lib.TaskSpec(**{k: tuple(v) if k == "hidden" else v for k, v in d["spec"].items()})
        out = cls(task_lib.TaskBatch(task_spec, d["x"], d["y"], list(d["init"])), d["signs"], d["replicas"],
                  d["horizon"], spec, d["average_every"], d["state_policy"])
        out.params, out.state, out.t, out.accum = d["params"], tuple(d["state"]), int(d["t"]), d["accum"]
        return out


# ---------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(theta: torch.Tensor, steps: int, suite: list[tuple[task_lib.TaskSpec, int]] | None = None,
             seed: int = 0, spec: LOptSpec = DEFAULT_SPEC) -> float:
    """Mean over tasks of (mean minibatch loss over ``steps`` steps) / (loss at initialisation).

    A fixed, positive summary of how fast θ trains (1 = no progress); the default suite is
    :func:`tasks.validation_suite`. Its own generator, so evaluating never changes a training run.
    """
    gen = torch.Generator().manual_seed(seed)
    by_spec: dict[task_lib.TaskSpec, list[int]] = {}
    for task_spec, task_seed in suite or task_lib.validation_suite():
        by_spec.setdefault(task_spec, []).append(task_seed)
    ratios = []
    for task_spec, seeds in by_spec.items():  # tasks of one spec run together
        run = Unroll(task_lib.make_tasks(task_spec, seeds), signs=1, replicas=1, horizon=steps, spec=spec)
        initial = torch.exp(run.log_cap) / LOSS_CAP_FACTOR
        total = torch.zeros(run.n)
        for _ in range(steps):
            total += torch.nan_to_num(run.step(theta.expand(run.n, -1), gen), nan=float("inf")).clamp(max=1e6)
        ratios += (total / steps / initial).tolist()
    return sum(ratios) / len(ratios)


# ---------------------------------------------------------------------------------------------- meta-training
class MetaTrainer:
    """θ, its Adam state, the groups of inner runs and the history; one :meth:`iteration` per meta-step."""

    def __init__(self, cfg: MetaConfig, spec: LOptSpec = DEFAULT_SPEC,
                 validation: list[tuple[task_lib.TaskSpec, int]] | None = None) -> None:
        bad = list(cfg.problems())
        if bad:
            raise ValueError("invalid meta-training config: " + "; ".join(f"{k}={v!r} {m}" for k, v, m in bad))
        self.cfg, self.spec, self.validation = cfg, spec, validation
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.theta = init_theta(spec, cfg.init, self.gen)
        self.theta_param = torch.nn.Parameter(self.theta.clone())
        self.outer = torch.optim.Adam([self.theta_param], lr=cfg.meta_lr)
        self.iteration_done = 0
        self.history: dict[str, list[Any]] = {"meta_loss": [], "grad_norm": [], "eval": []}
        self.seconds = 0.0
        self.groups = [self._new_group(first=True) for _ in range(cfg.groups)]

    def _new_group(self, first: bool = False) -> Unroll:
        c = self.cfg
        task_spec = task_lib.sample_spec(self.gen)
        signs = 2 if c.estimator == "pes" else 1
        n_params = sum(o * i + o for o, i in task_spec.layer_sizes())
        pairs = max(1, min(c.pairs, c.max_group_elements // (signs * c.replicas * n_params)))
        seeds = torch.randint(2**31 - 1, (pairs,), generator=self.gen).tolist()
        horizon = int(torch.randint(c.horizon_min, c.horizon_max + 1, (1,), generator=self.gen))
        if first:  # stagger: the first runs end at different iterations, so resets spread out
            horizon = int(torch.randint(c.truncation, horizon + 1, (1,), generator=self.gen))
        return Unroll(task_lib.make_tasks(task_spec, seeds), signs, c.replicas, horizon, self.spec, c.average_every,
                      c.state_policy)

    def gradient_estimate(self) -> tuple[torch.Tensor, float]:
        """The meta-gradient of one truncation of every group (by ``cfg.estimator``) and its meta-loss.

        Advances the inner runs by one truncation; :meth:`iteration` clips it and takes the Adam step.
        """
        return self._pes_gradient() if self.cfg.estimator == "pes" else self._tbptt_gradient()

    def _pes_gradient(self) -> tuple[torch.Tensor, float]:
        c, theta = self.cfg, self.theta_param.detach()
        total, count, losses = torch.zeros_like(theta), 0, []
        for run in self.groups:
            eps = torch.randn(run.m, theta.numel(), generator=self.gen) * c.sigma
            run.accum += eps
            thetas = self._signed_thetas(run, theta, eps)
            meta = torch.zeros(run.n)
            with torch.no_grad():
                for _ in range(c.truncation):
                    meta += run.clipped_log(run.step(thetas, self.gen))
            per_task = (meta / c.truncation).reshape(2, run.m, run.replicas).mean(dim=2)  # (sign, task)
            coef = (per_task[0] - per_task[1]) / (2 * c.sigma**2)
            total += (coef[:, None] * run.accum).sum(dim=0)
            count += run.m
            losses.append(float(per_task.mean()))
        return total / count, sum(losses) / len(losses)

    @staticmethod
    def _signed_thetas(run: Unroll, theta: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(N, P): θ + ε_task for sign 0, θ − ε_task for sign 1, shared by the task's replicas."""
        signed = torch.stack([theta + eps, theta - eps])  # (2, M, P)
        return signed[:, :, None].expand(2, run.m, run.replicas, -1).reshape(run.n, -1)

    def _tbptt_gradient(self) -> tuple[torch.Tensor, float]:
        c = self.cfg
        theta = self.theta_param.detach().requires_grad_()
        meta_total, losses = torch.zeros(()), []
        for run in self.groups:
            thetas = theta.expand(run.n, -1)
            meta = torch.zeros(run.n)
            for _ in range(c.truncation):
                meta = meta + run.clipped_log(run.step(thetas, self.gen, create_graph=True))
            group_loss = (meta / c.truncation).mean()
            meta_total = meta_total + group_loss / len(self.groups)
            losses.append(float(group_loss.detach()))
        (grad,) = torch.autograd.grad(meta_total, theta)
        for run in self.groups:
            run.detach()
        return torch.nan_to_num(grad, nan=0.0), sum(losses) / len(losses)

    def iteration(self) -> None:
        """One meta-step: a truncation of every group, a gradient estimate, an Adam step on θ; resets."""
        start = time.perf_counter()
        c = self.cfg
        grad, meta_loss = self.gradient_estimate()
        norm = float(grad.norm())
        if norm > c.clip_norm:
            grad = grad * (c.clip_norm / norm)
        self.outer.zero_grad(set_to_none=True)
        self.theta_param.grad = grad
        self.outer.step()
        self.theta = self.theta_param.detach().clone()
        self.groups = [self._new_group() if run.done else run for run in self.groups]
        self.iteration_done += 1
        self.history["meta_loss"].append(meta_loss)
        self.history["grad_norm"].append(norm)
        self.seconds += time.perf_counter() - start

    def evaluate_now(self) -> float:
        start = time.perf_counter()
        value = evaluate(self.theta, self.cfg.eval_steps, self.validation, spec=self.spec)
        self.history["eval"].append([self.iteration_done, value])
        self.seconds += time.perf_counter() - start
        return value

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"config": asdict(self.cfg), "spec": self.spec.to_dict(), "iteration": self.iteration_done,
                "theta": self.theta_param.detach().clone(), "outer": self.outer.state_dict(),
                "generator": self.gen.get_state(), "groups": [g.state_dict() for g in self.groups],
                "history": self.history, "seconds": self.seconds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = {k: v for k, v in state["config"].items() if k != "iters"}
        mine = {k: v for k, v in asdict(self.cfg).items() if k != "iters"}
        if saved != mine:
            diff = ", ".join(f"{k}: {saved.get(k)!r} -> {mine.get(k)!r}" for k in sorted(mine)
                             if saved.get(k) != mine.get(k))
            raise ValueError(f"the meta-training state was made with another config ({diff}); only --iters may "
                             "change on resume")
        if LOptSpec.from_dict(state["spec"]) != self.spec:
            raise ValueError("the meta-training state was made for another learned-optimizer spec")
        with torch.no_grad():
            self.theta_param.copy_(state["theta"])
        self.theta = self.theta_param.detach().clone()
        self.outer.load_state_dict(state["outer"])
        self.gen.set_state(state["generator"])
        self.groups = [Unroll.from_state_dict(g, self.spec) for g in state["groups"]]
        self.iteration_done = int(state["iteration"])
        self.history = state["history"]
        self.seconds = float(state["seconds"])


def _save_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def run(cfg: MetaConfig, out: Path | None = None, state_path: Path | None = None, resume: bool = False,
        command: str = "", quiet: bool = False, spec: LOptSpec = DEFAULT_SPEC,
        validation: list[tuple[task_lib.TaskSpec, int]] | None = None) -> MetaTrainer:
    """Meta-train for ``cfg.iters`` iterations (resuming from ``state_path`` if asked); write ``out`` (+ .json).

    ``validation``: the tasks θ is evaluated on as it goes (default :func:`tasks.validation_suite`).
    """
    trainer = MetaTrainer(cfg, spec, validation)
    if resume and state_path is not None and state_path.is_file():
        trainer.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
        if not quiet:
            print(f"resumed from {state_path} at iteration {trainer.iteration_done}", flush=True)
    say = (lambda *a: None) if quiet else functools.partial(print, flush=True)
    if not trainer.history["eval"]:
        say(f"iteration 0: validation loss ratio {trainer.evaluate_now():.4f}")
    window_start = time.perf_counter()
    window_iters = 0
    while trainer.iteration_done < cfg.iters:
        trainer.iteration()
        window_iters += 1
        i = trainer.iteration_done
        if cfg.eval_every and i % cfg.eval_every == 0 and i < cfg.iters:
            trainer.evaluate_now()
        if i % cfg.log_every == 0 or i == cfg.iters:
            per_it = (time.perf_counter() - window_start) / window_iters
            recent = trainer.history["meta_loss"][-cfg.log_every:]
            last_eval = trainer.history["eval"][-1]
            say(f"iteration {i}/{cfg.iters}  meta-loss {sum(recent) / len(recent):+.4f}  "
                f"|ĝ| {trainer.history['grad_norm'][-1]:.3g}  validation {last_eval[1]:.4f} (it {last_eval[0]})  "
                f"{per_it:.2f} s/it  eta {per_it * (cfg.iters - i) / 60:.1f} min")
            window_start, window_iters = time.perf_counter(), 0
        if state_path is not None and (i % cfg.checkpoint_every == 0 or i == cfg.iters):
            _save_atomic(trainer.state_dict(), state_path)
    if trainer.history["eval"][-1][0] != trainer.iteration_done:
        say(f"final validation loss ratio {trainer.evaluate_now():.4f}")
    if out is not None:
        meta = summary(trainer, command)
        save_checkpoint(out, trainer.theta, spec, {k: v for k, v in meta.items() if k != "validation_curve"})
        out.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
        say(f"wrote {out} ({out.stat().st_size} bytes) and {out.with_suffix('.json').name}")
    return trainer


def summary(trainer: MetaTrainer, command: str) -> dict[str, Any]:
    """What the checkpoint's metadata records: how to remake it and how meta-training went."""
    losses = trainer.history["meta_loss"]
    fifth = max(1, len(losses) // 5)
    evals = trainer.history["eval"]
    return {"feature_version": FEATURE_VERSION, "seed": trainer.cfg.seed, "command": command,
            "config": asdict(trainer.cfg), "iterations": trainer.iteration_done,
            "meta_loss_first_20pct": sum(losses[:fifth]) / fifth, "meta_loss_last_20pct": sum(losses[-fifth:]) / fifth,
            "validation_loss_ratio_start": evals[0][1], "validation_loss_ratio_end": evals[-1][1],
            "validation_curve": evals, "meta_train_seconds": round(trainer.seconds, 1), "torch": str(torch.__version__),
            "threads": torch.get_num_threads()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="localsgd-meta-train", description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(MetaConfig):
        default = f.default
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(default), default=default,
                       help=f"(default {default})")
    p.add_argument("--out", type=Path, default=Path("lopt.pt"), help="where to write θ (+ a .json summary)")
    p.add_argument("--state", type=Path, default=None, help="meta-training state file, saved every "
                   "--checkpoint-every iterations")
    p.add_argument("--resume", action="store_true", help="continue from --state if it exists")
    p.add_argument("--threads", type=int, default=1, help="torch threads (results depend on it; default 1)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = MetaConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MetaConfig)})
    command = "localsgd-meta-train " + " ".join(sys.argv[1:] if argv is None else argv)
    run(cfg, args.out, args.state, args.resume, command, args.quiet)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
