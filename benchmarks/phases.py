"""Reproduction: growing the batch in phases, past linear LR scaling, at an equal sample budget (K = 16).

Claims. Goyal et al. (arXiv 1706.02677, §2.1): when the batch grows k-fold, multiply the LR by k
(linear scaling), which holds up to a batch where it breaks. "ImageNet in 18 minutes" (Bulatov,
Howard et al., fast.ai / DIU, 2018) trains in a few phases, each with its own batch and LR, growing
the batch as training goes on. Smith et al. (ICLR 2018, arXiv 1711.00489): growing the batch acts
like decaying the LR, with fewer steps.

Measured with :mod:`localsgd.sim`: K = 16 workers, MNIST-1D (20,000 samples, 16,000 for training),
the 1-D CNN, SGD with momentum 0.9 and base LR 0.05, per-worker batch b₀ = 8 (global 128), H = 1
(every step averaged: data-parallel SGD), no LR decay, at an equal budget of training samples.
``ramp=phases`` runs three phases, each a third of the samples, at batch × (1, √F, F) for a final
factor F ∈ {4, 16, 64} (global 512 to 8,192), with three LR rules per phase:
* ``linear``: LR × batch factor (Goyal),
* ``sqrt``: LR × √(batch factor),
* ``fixed``: LR × 1 (the batch growth alone, Smith's view),
* ``linear+warmup``: linear, each phase's LR rising from the previous phase's over its first quarter
  (``ramp.warmup=0.25``: Goyal et al.'s gradual warm-up, §2.2, at every batch change),
against the constant batch 128 (``constant``). Reported: test accuracy and loss after the budget
(mean ± std over seeds) and the number of steps (sequential rounds).

    python benchmarks/phases.py           # F ∈ {4, 16, 64}, 8 epochs, 3 seeds (about 100 s on 2 cores)
    python benchmarks/phases.py --quick   # F = 16, 2 epochs, 1 seed (under 60 s)

Writes ``results/phases[_quick].png`` (test accuracy against the final batch factor per LR rule) and
prints a table; the last line is JSON: ``runs`` (per label: steps, test accuracy and loss per seed),
``best`` (the label with the highest mean test accuracy) and ``linear_breaks_at`` (the smallest F at
which linear scaling ends below the sqrt rule's accuracy by more than 1 point, or null).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.convex_sim import run_all  # noqa: E402
from benchmarks.figures import pyplot, save_figure  # noqa: E402
from benchmarks.provenance import git_state  # noqa: E402
from localsgd import data as data_lib  # noqa: E402
from localsgd.sim import Simulator, sim_config  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
K, B0, TRAIN = 16, 8, 16_000
BASE = ["data=mnist1d", "data.num_samples=20000", "model=cnn1d", "optimizer=sgd", "optimizer.lr=0.05",
        "optimizer.lr_decay=none", "schedule=fixed", "schedule.H=1", f"trainer.batch_size={B0}"]
RULES = {"linear": lambda f: f, "sqrt": math.sqrt, "fixed": lambda f: 1.0, "linear+warmup": lambda f: f}
WARMUP = {"linear+warmup": 0.25}  # ramp.warmup of a rule (0 for the others)


@dataclass
class Job:
    label: str
    overrides: list[str]
    steps: int
    seed: int


def phase_plan(final_factor: float, samples: int) -> tuple[list[float], list[float], int]:
    """(starts, batch factors, steps): three phases of a third of ``samples`` each at b₀·(1, √F, F) per worker."""
    factors = [1.0, math.sqrt(final_factor), float(final_factor)]
    steps = [round(samples / 3 / (K * B0 * f)) for f in factors]
    total = sum(steps)
    starts = [0.0, steps[0] / total, (steps[0] + steps[1]) / total]
    return starts, factors, total


def jobs(final_factors: list[float], epochs: int, seeds: list[int]) -> list[Job]:
    samples = epochs * TRAIN
    out = [Job("constant", [], round(samples / (K * B0)), s) for s in seeds]
    for f in final_factors:
        starts, factors, steps = phase_plan(f, samples)
        for rule, lr_of in RULES.items():
            ov = ["ramp=phases", f"ramp.starts=[{','.join(f'{x:.12g}' for x in starts)}]",
                  f"ramp.batch_factors=[{','.join(f'{x:.12g}' for x in factors)}]",
                  f"ramp.lr_factors=[{','.join(f'{lr_of(x):.12g}' for x in factors)}]",
                  f"ramp.warmup={WARMUP.get(rule, 0.0)}"]
            out += [Job(f"{rule} F={f:g}", ov, steps, s) for s in seeds]
    return out


def run_job(job: Job) -> dict:
    torch.set_num_threads(1)
    cfg = sim_config(*BASE, *job.overrides, f"trainer.max_steps={job.steps}", f"trainer.seed={job.seed}",
                     workers=K)
    try:
        res = Simulator(cfg, K).run()
    except FloatingPointError as e:  # a diverged run is a result, not a crash
        return {"label": job.label, "seed": job.seed, "steps": job.steps, "diverged": str(e),
                "eval_accuracy": 0.0, "eval_loss": float("inf"), "samples": 0, "seconds": 0.0}
    return {"label": job.label, "seed": job.seed, "steps": res.steps, "samples": res.samples,
            "eval_accuracy": res.eval["eval_accuracy"], "eval_loss": res.eval["eval_loss"],
            "final_global_batch": K * res.final_batch_size, "seconds": res.seconds}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="F = 16, 2 epochs, 1 seed")
    p.add_argument("--processes", type=int, default=None)
    args = p.parse_args(argv)
    quick = args.quick
    factors, epochs, seeds = ([16.0], 2, [0]) if quick else ([4.0, 16.0, 64.0], 8, [0, 1, 2])
    t0, commit = time.perf_counter(), git_state()
    data_lib.build(sim_config(*BASE, workers=K).data)  # generate and cache the data once, before the workers race
    todo = jobs(factors, epochs, seeds)
    results = run_all(todo, args.processes, fn=run_job, cost=lambda j: j.steps)
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["label"], []).append(r)

    def mean(label: str, key: str) -> float:
        return statistics.fmean(r[key] for r in by[label])

    print(f"K = {K}, b0 = {B0} per worker, {epochs} epochs of {TRAIN} samples, {len(seeds)} seed(s)")
    print(f"{'run':<20} {'steps':>6} {'final batch':>11} {'test acc':>15} {'test loss':>10}")
    for label, rs in by.items():
        accs = [r["eval_accuracy"] for r in rs]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        diverged = sum("diverged" in r for r in rs)
        print(f"{label:<20} {rs[0]['steps']:>6} {rs[0].get('final_global_batch', '-'):>11} "
              f"{statistics.fmean(accs):>8.4f} ± {sd:.4f} {mean(label, 'eval_loss'):>10.4f}"
              + (f"  ({diverged} diverged)" if diverged else ""))
    breaks = [f for f in factors if mean(f"linear F={f:g}", "eval_accuracy") < mean(f"sqrt F={f:g}", "eval_accuracy")
              - 0.01]
    out = {"benchmark": "phases", "quick": quick, "commit": commit, "workers": K, "b0": B0, "epochs": epochs,
           "seeds": len(seeds),
           "runs": {lab: {"steps": rs[0]["steps"], "eval_accuracy": [r["eval_accuracy"] for r in rs],
                          "eval_loss": [r["eval_loss"] for r in rs]} for lab, rs in by.items()},
           "best": max(by, key=lambda lab: mean(lab, "eval_accuracy")),
           "linear_breaks_at": min(breaks) if breaks else None}

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for rule in RULES:
        ax.plot(factors, [mean(f"{rule} F={f:g}", "eval_accuracy") for f in factors], marker="o", label=rule)
    ax.axhline(mean("constant", "eval_accuracy"), color="k", lw=0.8, label="constant batch 128")
    ax.set(xscale="log", xlabel="final batch factor F (global batch 128·F)", ylabel="test accuracy",
           title=f"phases at K = {K}, equal samples ({epochs} epochs)")
    ax.legend(fontsize=8)
    save_figure(fig, RESULTS / f"phases{'_quick' if quick else ''}.png")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
