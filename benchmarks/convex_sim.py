"""The strongly convex problem of the simulator reproductions (``benchmarks/stich.py``, ``patel_dieuleveut.py``).

ℓ2-regularised logistic regression, the problem of the local-SGD analyses (Stich, ICLR 2019,
arXiv 1805.09767, §4; Patel & Dieuleveut, NeurIPS 2019, arXiv 1904.11325):

    f(θ) = (1/n) Σ_i CE(W x_i + c, y_i) + (λ/2)‖θ‖²,   θ = (W, c),

with the trainer's own pieces: ``data=synthetic_logreg`` (planted, w8a-like {0, 1} features),
``model=logreg`` started at θ = 0, and ``optimizer=sgd`` without momentum whose ``weight_decay`` is λ
(torch's weight decay adds λθ to the gradient, which is the gradient of the (λ/2)‖θ‖² term). Every
run is :class:`localsgd.sim.Simulator` in float64, so the schedule, LR schedule and sampler are the
trainer's objects. f* comes from L-BFGS on the full objective (strong Wolfe line search) until
‖∇f‖ < 1e-8, so f* is exact to ‖∇f‖²/(2λ) ≤ 5e-14 (strong convexity), far below every gap reported;
f(x̄) − f* is then measured at syncs on a geometric grid of steps (×1.05).

Runs are independent, so :func:`run_all` spreads them over the machine's cores (one thread each).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

import torch
from torch.func import functional_call

from localsgd.sim import Simulator, sim_config

PROBLEM = ["data=synthetic_logreg", "data.n_samples=20000", "data.n_features=300", "model=logreg",
           "model.zero_init=true", "optimizer=sgd", "optimizer.momentum=0", "trainer.batch_size=8"]
GRID_FACTOR = 1.05  # f(x̄) − f* is evaluated at the first sync at or after each point of this geometric grid


def objective(sim: Simulator, params: dict[str, torch.Tensor], lam: float) -> float:
    """f(θ) on the whole training split."""
    loss, _ = sim.objective(params, "train")
    return loss + 0.5 * lam * sum(float((p * p).sum()) for p in params.values())


def f_star(problem: Sequence[str], lam: float) -> tuple[float, float, float]:
    """(f*, ‖∇f(θ*)‖, f(0) − f*) of the problem ``problem`` (overrides) defines, by full-batch L-BFGS in float64."""
    sim = Simulator(sim_config(*problem, f"optimizer.weight_decay={lam}", "trainer.max_steps=1",
                               workers=1), 1, dtype=torch.float64)
    start = sim.averaged_params()
    theta = {n: p.clone().requires_grad_(True) for n, p in start.items()}
    opt = torch.optim.LBFGS(list(theta.values()), lr=1.0, max_iter=1000, tolerance_grad=1e-12,
                            tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        out = functional_call(sim.model, theta, (sim.x_train,))
        f = sim.loss_fn(out, sim.y_train) + 0.5 * lam * sum((p * p).sum() for p in theta.values())
        f.backward()
        return f

    for _ in range(10):
        opt.step(closure)
        closure()
        gnorm = math.sqrt(sum(float((p.grad * p.grad).sum()) for p in theta.values()))
        if gnorm < 1e-8:
            break
    best = objective(sim, {n: p.detach() for n, p in theta.items()}, lam)
    return best, gnorm, objective(sim, start, lam) - best


@dataclass
class Run:
    """One simulated run: its overrides (beyond ``problem``), K, and the targets that may stop it."""

    label: str
    overrides: list[str]
    workers: int
    lam: float
    fstar: float
    max_steps: int
    targets: list[float] = field(default_factory=list)  # stop once f(x̄) − f* ≤ min(targets); [] runs to the end
    seed: int = 0
    problem: list[str] = field(default_factory=lambda: list(PROBLEM))


def run_one(run: Run) -> dict:
    """Simulate ``run``; returns plain values (picklable): steps to each target, the curve, rounds, seconds."""
    torch.set_num_threads(1)
    cfg = sim_config(*run.problem, *run.overrides, f"optimizer.weight_decay={run.lam}",
                     f"trainer.max_steps={run.max_steps}", f"trainer.seed={run.seed}", workers=run.workers)
    curve: list[tuple[int, float]] = []
    reached: dict[float, int] = {}
    next_check = [1]

    def on_sync(sim: Simulator, record) -> bool:
        if record.step < next_check[0] and record.step < run.max_steps:
            return False
        next_check[0] = max(record.step + 1, math.ceil(record.step * GRID_FACTOR))
        gap = objective(sim, sim.averaged_params(), run.lam) - run.fstar
        curve.append((record.step, gap))
        for eps in run.targets:
            if gap <= eps and eps not in reached:
                reached[eps] = record.step
        return bool(run.targets) and len(reached) == len(run.targets)

    start = time.perf_counter()
    sim = Simulator(cfg, run.workers, dtype=torch.float64, on_sync=on_sync)
    result = sim.run()
    final_gap = objective(sim, result.params, run.lam) - run.fstar
    return {"label": run.label, "workers": run.workers, "seed": run.seed, "steps": result.steps,
            "rounds": result.rounds, "final_gap": final_gap, "curve": curve,
            "steps_to": {str(eps): reached.get(eps) for eps in run.targets},
            "seconds": time.perf_counter() - start}


def run_all(runs: Sequence[Any], processes: int | None = None, fn: Callable[[Any], dict] = run_one,
            cost: Callable[[Any], float] = lambda r: r.max_steps * (1 + r.workers / 64)) -> list[dict]:
    """``fn`` (default :func:`run_one`) for every run, in ``processes`` worker processes (default: the cores).

    ``fn`` must be importable (a module-level function): the workers are spawned. The runs start in
    order of decreasing ``cost``, so no core idles at the end behind one long run.
    """
    processes = processes or max(1, min(len(runs), os.cpu_count() or 1))
    if processes == 1:
        return [fn(r) for r in runs]
    order = sorted(range(len(runs)), key=lambda i: -cost(runs[i]))
    with ProcessPoolExecutor(processes, mp_context=get_context("spawn")) as pool:
        done = dict(zip(order, pool.map(fn, [runs[i] for i in order])))
    return [done[i] for i in range(len(runs))]
