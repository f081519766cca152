"""Reproduction 2 (non-convex): MNIST-1D CNN, K workers, four communication schedules, with and without a batch ramp.

What is compared (post-local SGD, Lin et al., ICLR 2020, arXiv 1808.07217; AdaComm; batch ramps),
all through the real worker loop
(``torch.distributed.run`` with K Gloo ranks running ``python -m localsgd.train``):

* ``H=1``: large-batch SGD, the K workers average after every step (global batch K·b).
* ``H=16``: local SGD from the start (Stich, ICLR 2019, arXiv 1805.09767).
* ``post_local``: post-local SGD (Lin, Stich, Patel, Jaggi, ICLR 2020, arXiv 1808.07217, §3): H = 1 until
  the first learning-rate decay, then H = 16. H = 16 is the paper's CIFAR recommendation, unverified here.
* ``adacomm``: AdaComm (Wang & Joshi, SysML 2019, arXiv 1810.08313),
  τ_l = ⌈√((F_l/F₀)·(η₀/η_l))·τ₀⌉ re-evaluated every ``T/16`` local steps (the stand-in for the paper's
  wall-clock interval), τ₀ = 16 so that it starts where ``H=16`` does. τ₀ = 16, the interval and the
  LR exponent 1 (PaddlePaddle's choice) are ours, not the paper's.

Each schedule runs without a ramp (b = 32 per worker throughout) and with ``ramp=linear``: the
per-worker batch grows linearly from 32 to 64 over the first quarter of the local steps, and the LR
follows it by linear scaling (Goyal et al., arXiv 1706.02677; ``trainer.lr_batch_coupling``, on by
default), from 0.05 to 0.1. A growing batch is the alternative to communicating less that Smith et al.
(ICLR 2018, arXiv 1711.00489) propose: fewer steps, hence fewer rounds, for the same samples.

Fairness: every run sees the same number of **samples** (not steps). Without a ramp that is
T·K·b; a ramped run gets the step count T′ whose ramp consumes the closest total to it (computed with
the real ``localsgd.ramps`` class, so it is the batch sequence the trainer will use), and its LR
decay milestones are moved (as step fractions) so that the decays fall at the same fractions (1/2 and
3/4) of the **samples** as without a ramp. Post-local SGD switches at the first of them. All runs share
the model (``cnn1d``, 32 channels), data (MNIST-1D, 10,000 samples, 8,000 for training), optimizer
(SGD, momentum 0.9, base LR 0.05 for b = 32, ×0.1 at each milestone) and seeds. These values (T = 1200,
b = 32, LR 0.05, the milestones, the ramp 32→64 over 25%) are ours, chosen to fit a 2-core CPU: a
peak LR of 0.2 (ramp to 128) diverged at H = 16.

The figures of merit are final test accuracy (mean ± std over seeds) and communication rounds and
bytes. Four ranks on two cores oversubscribe the CPU, so wall-clock times are not results.

Run from the repository root:  python benchmarks/nonconvex.py [--quick]
The last line printed is one JSON object with the key figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run against this checkout

import torch  # noqa: E402

from benchmarks.figures import pyplot, save_figure  # noqa: E402
from benchmarks.provenance import git_state, source_digest  # noqa: E402
from localsgd.optim import first_decay_step, lr_at  # noqa: E402
from localsgd.ramps import BatchRamp, ConstantBatch, LinearRamp  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
SCHEDULES = ("H=1", "H=16", "post_local", "adacomm")
RAMPS = ("none", "linear")
DECAY_FRACTIONS = (0.5, 0.75)  # of the sample budget
DECAY_FACTOR = 0.1
BASE_LR = 0.05
H_LOCAL = 16
RAMP_B_END_FACTOR = 2  # the ramp ends at this multiple of the base batch
RAMP_END = 0.25  # fraction of the local steps over which the ramp grows
CURVE_POINTS = 16  # eval (and train-record) points per run; AdaComm re-evaluates τ as often


# ---------------------------------------------------------------------------------------------- planning
def make_ramp(kind: str, base_batch: int, steps: int) -> BatchRamp:
    """The batch ramp the trainer builds for ``ramp=<kind>`` with this script's overrides."""
    if kind == "none":
        return ConstantBatch(base_batch, steps)
    if kind == "linear":
        return LinearRamp(base_batch, steps, None, RAMP_B_END_FACTOR * base_batch, 0.0, RAMP_END)
    raise ValueError(f"unknown ramp {kind!r}; expected one of {RAMPS}")


def cumulative_samples(ramp: BatchRamp, steps: int) -> np.ndarray:
    """c[s] = samples one worker has consumed before local step s, for s = 0..steps."""
    return np.concatenate([[0], np.cumsum([ramp.batch_size(s) for s in range(steps)])]).astype(np.int64)


def steps_for_budget(build: Callable[[int], BatchRamp], per_worker_samples: int) -> int:
    """The step count whose ramp consumes the total closest to ``per_worker_samples`` (ties: fewer steps).

    A ramp's milestones are fractions of the run, so the total is recomputed for each candidate;
    it grows with the step count, which a bisection for the first count reaching the budget uses.
    """
    if per_worker_samples < 1:
        raise ValueError(f"the sample budget must be >= 1, got {per_worker_samples}")

    def total(steps: int) -> int:
        return int(cumulative_samples(build(steps), steps)[-1])

    lo, hi = 1, per_worker_samples  # every step consumes >= 1 sample, so hi steps reach the budget
    while lo < hi:
        mid = (lo + hi) // 2
        if total(mid) >= per_worker_samples:
            hi = mid
        else:
            lo = mid + 1
    if lo > 1 and per_worker_samples - total(lo - 1) <= total(lo) - per_worker_samples:
        return lo - 1
    return lo


def step_fraction(step: int, total_steps: int) -> float:
    """The smallest float f with int(f·total_steps) == step: how ``lr_at`` turns a fraction back into a step."""
    f = step / total_steps
    while int(f * total_steps) < step:
        f = math.nextafter(f, math.inf)
    return f


def aligned_milestones(cum: np.ndarray, sample_fractions: Sequence[float]) -> list[float]:
    """Step-fraction milestones at which the LR decays once ``sample_fractions`` of the samples are consumed.

    For each fraction q the decay step is the first step s whose preceding samples c[s] reach q·c[T];
    with a constant batch this is int(q·T), i.e. the milestones are q themselves (up to float spelling).
    """
    steps = len(cum) - 1
    return [step_fraction(int(np.searchsorted(cum, q * cum[-1], side="left")), steps) for q in sample_fractions]


@dataclass
class RunPlan:
    schedule: str
    ramp: str
    seed: int
    steps: int
    milestones: list[float]
    samples: int  # all workers
    every: int  # eval/log interval in steps

    @property
    def key(self) -> str:
        return f"{self.schedule}/{self.ramp}"

    def overrides(self, K: int, batch: int) -> list[str]:
        schedule = {
            "H=1": ["schedule=fixed", "schedule.H=1"],
            f"H={H_LOCAL}": ["schedule=fixed", f"schedule.H={H_LOCAL}"],
            "post_local": ["schedule=post_local", f"schedule.H={H_LOCAL}", "schedule.switch_step=-1"],
            "adacomm": ["schedule=adacomm", f"schedule.tau0={H_LOCAL}", f"schedule.interval_steps={self.every}"],
        }[self.schedule]
        ramp = (["ramp=none"] if self.ramp == "none" else
                ["ramp=linear", f"ramp.b_end={RAMP_B_END_FACTOR * batch}", "ramp.start=0.0", f"ramp.end={RAMP_END}"])
        milestones = ",".join(repr(m) for m in self.milestones)
        return [*schedule, *ramp, "data=mnist1d", "model=cnn1d", "optimizer=sgd", f"optimizer.lr={BASE_LR}",
                "optimizer.momentum=0.9", "optimizer.lr_decay=step", f"optimizer.decay_milestones=[{milestones}]",
                f"optimizer.decay_factor={DECAY_FACTOR}", f"trainer.max_steps={self.steps}",
                f"trainer.batch_size={batch}", f"trainer.seed={self.seed}", "trainer.threads=1",
                "trainer.progress=false", f"trainer.eval_every={self.every}", f"trainer.log_every={self.every}",
                "checkpoint=off", "logging.wandb=disabled"]


def plan_runs(schedules: Sequence[str], ramps: Sequence[str], seeds: Sequence[int], K: int, batch: int,
              steps: int) -> list[RunPlan]:
    """One plan per (schedule, ramp, seed), every ramp held to the no-ramp sample budget steps·K·batch."""
    budget = steps * batch
    plans = []
    for ramp in ramps:
        t = steps_for_budget(lambda n, ramp=ramp: make_ramp(ramp, batch, n), budget)
        cum = cumulative_samples(make_ramp(ramp, batch, t), t)
        milestones = aligned_milestones(cum, DECAY_FRACTIONS)
        every = max(1, t // CURVE_POINTS)
        plans += [RunPlan(s, ramp, seed, t, milestones, int(cum[-1]) * K, every) for s in schedules for seed in seeds]
    return plans


def lr_schedule(plan: RunPlan, batch: int) -> list[float]:
    """The LR the trainer uses at each local step of ``plan`` (base schedule × linear batch coupling)."""
    ramp = make_ramp(plan.ramp, batch, plan.steps)
    return [lr_at(s, BASE_LR, warmup_steps=0, decay="step", total_steps=plan.steps, milestones=plan.milestones,
                  factor=DECAY_FACTOR) * ramp.batch_size(s) / batch for s in range(plan.steps)]


# ---------------------------------------------------------------------------------------------- running
@dataclass
class RunResult:
    plan: RunPlan
    ok: bool
    accuracy: float = math.nan
    loss: float = math.nan
    rounds: int = 0
    bytes: int = 0
    samples: int = 0
    seconds: float = 0.0
    error: str = ""
    curve: list[dict[str, float]] = field(default_factory=list)  # step, samples, rounds, accuracy


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(curve points, final record) from a run's ``metrics.jsonl``: evals joined to the train record of their step."""
    train, evals, final = {}, [], {}
    with path.open() as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("event") == "train":
                train[rec["step"]] = rec
            elif rec.get("event") == "eval":
                evals.append(rec)
            elif rec.get("event") == "final":
                final = rec
    curve = []
    for ev in evals:
        tr = train.get(ev["step"])
        if tr is not None:
            curve.append({"step": ev["step"], "samples": tr["samples"], "rounds": tr["comm_rounds"],
                          "accuracy": ev["eval_accuracy"]})
    if final:
        curve.append({"step": final["steps"], "samples": final["samples"], "rounds": final["comm_rounds"],
                      "accuracy": final["final_eval_accuracy"]})
    return curve, final


def run_one(plan: RunPlan, K: int, batch: int, work: Path, timeout: float) -> RunResult:
    run_dir = work / f"{plan.schedule.replace('=', '')}_{plan.ramp}_seed{plan.seed}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={K}", "-m",
           "localsgd.train", *plan.overrides(K, batch), f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return RunResult(plan, False, seconds=time.perf_counter() - start, error=f"timed out after {timeout:.0f} s")
    seconds = time.perf_counter() - start
    summary_path = run_dir / "summary.json"
    if proc.returncode != 0 or not summary_path.exists():
        # Keep the cause (e.g. NonFiniteError: a diverged run is a result, not a crash of the benchmark).
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "Error" in ln or "error:" in ln]
        return RunResult(plan, False, seconds=seconds, error=(lines[-1] if lines else f"exit {proc.returncode}")[:300])
    summary = json.loads(summary_path.read_text())
    curve, _ = read_metrics(run_dir / "metrics.jsonl")
    return RunResult(plan, True, float(summary["final_eval_accuracy"]), float(summary["final_eval_loss"]),
                     int(summary["comm_rounds"]), int(summary["comm_bytes"]), int(summary["samples"]), seconds,
                     curve=curve)


# ---------------------------------------------------------------------------------------------- summary
def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof = 1; NaN for fewer than two values) of the finite values."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else math.nan


def summarize(results: Sequence[RunResult]) -> dict[str, dict[str, Any]]:
    """Per ``schedule/ramp``: accuracy mean ± std over the seeds that finished, rounds, bytes, failures."""
    out: dict[str, dict[str, Any]] = {}
    for key in dict.fromkeys(r.plan.key for r in results):
        rs = [r for r in results if r.plan.key == key]
        done = [r for r in rs if r.ok]
        acc, std = mean_std([r.accuracy for r in done])
        out[key] = {
            "schedule": rs[0].plan.schedule, "ramp": rs[0].plan.ramp, "steps": rs[0].plan.steps,
            "samples": rs[0].plan.samples, "accuracy_mean": acc, "accuracy_std": std,
            "accuracy_per_seed": [r.accuracy for r in rs], "loss_mean": mean_std([r.loss for r in done])[0],
            "rounds_mean": float(np.mean([r.rounds for r in done])) if done else math.nan,
            "rounds_per_seed": [r.rounds for r in rs], "bytes_mean": float(np.mean([r.bytes for r in done]))
            if done else math.nan, "seeds": [r.plan.seed for r in rs], "failed": [r.error for r in rs if not r.ok],
            "samples_measured": sorted({r.samples for r in done}),
        }
    return out


def finite_or_none(obj: Any) -> Any:
    """``obj`` with NaN/inf floats replaced by None, so the JSON line is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(v) for v in obj]
    return obj


def print_table(summary: dict[str, dict[str, Any]]) -> None:
    print(f"\n{'schedule':<11}{'ramp':<8}{'steps':>6}{'samples':>9}{'test accuracy':>18}{'Δ vs H=1':>10}"
          f"{'rounds':>8}{'MB sent':>9}{'failed':>7}")
    for s in summary.values():
        base = summary.get(f"H=1/{s['ramp']}", {}).get("accuracy_mean", math.nan)
        std = f" ± {s['accuracy_std']:.4f}" if math.isfinite(s["accuracy_std"]) else " ± —    "
        delta = s["accuracy_mean"] - base
        delta_text = f"{delta:>+10.4f}" if math.isfinite(delta) else f"{'—':>10}"
        print(f"{s['schedule']:<11}{s['ramp']:<8}{s['steps']:>6}{s['samples']:>9}{s['accuracy_mean']:>9.4f}{std}"
              f"{delta_text}{s['rounds_mean']:>8.0f}{s['bytes_mean'] / 1e6:>9.2f}"
              f"{len(s['failed']):>7}")


def plot(results: Sequence[RunResult], path: Path, title: str) -> None:
    plt = pyplot()

    colors = {s: f"C{i}" for i, s in enumerate(SCHEDULES)}
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.6))
    ax = axes[0]
    for r in results:
        if r.ok:
            filled = r.plan.ramp == "none"
            ax.scatter(r.rounds, r.accuracy, marker="o" if filled else "^", s=36, color=colors[r.plan.schedule],
                       facecolors=colors[r.plan.schedule] if filled else "none")
    for s in SCHEDULES:
        for ramp, marker in (("none", "o"), ("linear", "^")):
            ax.scatter([], [], marker=marker, color=colors[s], facecolors=colors[s] if ramp == "none" else "none",
                       label=f"{s}, ramp={ramp}")
    ax.set_xscale("log")
    ax.set_xlabel("communication rounds")
    ax.set_ylabel("final test accuracy")
    ax.set_title("one marker per run")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    for ax, axis, label in ((axes[1], "samples", "samples (all workers)"), (axes[2], "rounds", "communication rounds")):
        for key in dict.fromkeys(r.plan.key for r in results):
            rs = [r for r in results if r.plan.key == key and r.ok and r.curve]
            if not rs:
                continue
            n = min(len(r.curve) for r in rs)  # seeds of one config share the eval steps
            xs = np.mean([[p[axis] for p in r.curve[:n]] for r in rs], axis=0)
            ys = np.mean([[p["accuracy"] for p in r.curve[:n]] for r in rs], axis=0)
            sched, ramp = rs[0].plan.schedule, rs[0].plan.ramp
            ax.plot(xs, ys, "-" if ramp == "none" else "--", marker="." if ramp == "none" else "^", ms=4,
                    color=colors[sched], label=f"{sched}, ramp={ramp}")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy (mean over seeds)")
        ax.set_ylim(0.5, 1.0)
        if axis == "rounds":
            ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    axes[1].set_title("test accuracy against samples")
    axes[2].set_title("test accuracy against rounds")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="K=2, 1 seed, 200 steps, three configs: H=1, H=16 (no ramp) and post_local with the ramp")
    p.add_argument("--workers", type=int, default=None, help="K (default 4; quick 2)")
    p.add_argument("--steps", type=int, default=None, help="local steps without a ramp (default 1200; quick 200)")
    p.add_argument("--batch", type=int, default=32, help="per-worker batch without a ramp (the ramp's start)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1 (default 3; quick 1)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per run")
    p.add_argument("--keep", type=Path, default=None, help="keep the run directories here (default: a temp dir)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    quick = bool(args.quick)
    K = args.workers or (2 if quick else 4)
    steps = args.steps or (200 if quick else 1200)
    seeds = list(range(args.seeds or (1 if quick else 3)))
    wall = time.perf_counter()
    code = source_digest(), git_state()  # before running: the code the runs import
    plans = plan_runs(SCHEDULES, RAMPS, seeds, K, args.batch, steps)
    if quick:
        wanted = {"H=1/none", "H=16/none", "post_local/linear"}
        plans = [pl for pl in plans if pl.key in wanted]
    for ramp in RAMPS:
        pl = next((x for x in plans if x.ramp == ramp), None)
        if pl is not None:
            lrs = lr_schedule(pl, args.batch)
            decays = [int(m * pl.steps) for m in pl.milestones]
            switch = first_decay_step("step", pl.steps, pl.milestones)  # what post_local's switch_step=-1 uses
            print(f"ramp={ramp}: {pl.steps} local steps, {pl.samples} samples, LR decays at steps {decays} "
                  f"(post-local switch at {switch}), LR {lrs[0]:.4g} → max {max(lrs):.4g} → {lrs[-1]:.4g}, "
                  f"eval every {pl.every} steps", flush=True)

    tmp = None
    if args.keep is not None:
        work = args.keep.resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="localsgd_nonconvex_")
        work = Path(tmp)
    results: list[RunResult] = []
    try:
        for i, pl in enumerate(plans):
            r = run_one(pl, K, args.batch, work, args.timeout)
            results.append(r)
            status = f"acc {r.accuracy:.4f}, {r.rounds} rounds" if r.ok else f"FAILED: {r.error}"
            print(f"[{i + 1}/{len(plans)}] {pl.key:<18} seed {pl.seed}: {status} ({r.seconds:.0f} s)",
                  file=sys.stderr, flush=True)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    summary = summarize(results)
    print(f"\nMNIST-1D, cnn1d, K = {K}, b = {args.batch} per worker (ramp: {args.batch}→"
          f"{RAMP_B_END_FACTOR * args.batch} over the first {RAMP_END:.0%} of the steps, LR × b/{args.batch}), "
          f"{len(seeds)} seed(s), {steps * K * args.batch} samples per run (budget)")
    print_table(summary)
    plots: list[str] = []
    if not args.no_plots and results:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"nonconvex{'_quick' if quick else ''}.png"
        plot(results, path, f"MNIST-1D cnn1d, K={K}, b={args.batch}, {steps * K * args.batch} samples per run, "
                            f"seeds {seeds}; LR ×{DECAY_FACTOR} at 1/2 and 3/4 of the samples; ramp "
                            f"{args.batch}→{RAMP_B_END_FACTOR * args.batch} with linear LR scaling")
        plots.append(os.path.relpath(path, Path(__file__).resolve().parent))
        print("plot: " + plots[0])
    out = {"benchmark": "nonconvex", "quick": quick, "K": K, "batch": args.batch, "steps_no_ramp": steps,
           "sample_budget": steps * K * args.batch, "seeds": seeds, "base_lr": BASE_LR,
           "decay_fractions_of_samples": list(DECAY_FRACTIONS), "decay_factor": DECAY_FACTOR, "H": H_LOCAL,
           "ramp": {"kind": "linear", "b_start": args.batch, "b_end": RAMP_B_END_FACTOR * args.batch,
                    "end_fraction_of_steps": RAMP_END, "lr_coupling": "linear"},
           "results": summary, "failed_runs": sum(not r.ok for r in results), "plots": plots,
           "run_seconds_total": round(sum(r.seconds for r in results), 1),
           "seconds": round(time.perf_counter() - wall, 1),
           "localsgd_source_sha256_12": code[0], "git": code[1], "torch": torch.__version__}
    print(json.dumps(finite_or_none(out)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
