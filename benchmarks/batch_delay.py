"""Reproduction 3: can a communication delay H > 1 use a global batch that minibatch SGD cannot?

Claims. McCandlish, Kaplan, Amodei et al. (arXiv 1812.06162, §2, Eq. 2.11 and Fig. 7): at a fixed
target loss the steps S and samples E of minibatch SGD at batch B trade off as
(S/S_min − 1)(E/E_min − 1) = 1, i.e. S = S_min + E_min/B; past the critical batch
B_crit = E_min/S_min a larger batch buys few steps for many samples, and B_crit is predicted by the
gradient noise scale B_simple = tr Σ/|G|² (§2.2, Fig. 4, within an order of magnitude). The question
asked here, from the view "a minibatch step of batch B is B workers each taking one step and
averaging": does letting K workers take H > 1 local steps between averages (Stich, ICLR 2019,
arXiv 1805.09767; Lin et al., "Don't use large mini-batches, use local SGD", ICLR 2020, arXiv
1808.07217) reach a target loss with fewer samples than minibatch SGD at a global batch K·b above
B_crit? And at equal samples *and* rounds (Woodworth et al., ICML 2020, arXiv 2002.07839, compare
local SGD with H steps of b against minibatch SGD of batch H·b per round): which is better?

Measured with :mod:`localsgd.sim`: K = 16 workers, MNIST-1D (20,000 samples, 16,000 for training),
the 1-D CNN, SGD with momentum 0.9 (per-worker state kept across averages), constant LR, per-worker
batch b ∈ {2, 8, 32, 128} (global 32 to 2,048), H ∈ {1, 4, 16}, a 3-point LR grid per cell
(η_b × {½, 1, 2}, η_b = 0.05·√(b/8); where a cell's best LR is an end of its grid, the grid is widened
by a factor 2 that way, twice at most), a budget of 16 epochs (256,000 samples), 3 seeds. The
averaged model's training loss (on the first 4,096 training samples) is measured at the first
average after every 4,096 samples drawn; a cell's samples to a target is the mean over seeds of
the first such point at or below the target, at the LR with the lowest mean (∞ when a seed misses).
B_simple comes from the H = 1 runs (every step follows an average, so the K gradients are at one
point: B_small = b, B_big = K·b, McCandlish et al. App. A.1), as Σ tr Σ / Σ |G|² over the steps
between two checkpoints, read where the run first reaches the target.

    python benchmarks/batch_delay.py           # the full grid, 3 seeds (about 25 core-minutes)
    python benchmarks/batch_delay.py --quick   # H ∈ {1, 16}, the centre LR, 4 epochs, 1 seed (under 60 s)

Writes ``results/batch_delay[_quick].png`` and prints tables; the last line is JSON: ``cells`` (per
"b=…,H=…", H a fixed value or ``adaptive`` for ``schedule=noise_adaptive``: global batch, the LR chosen,
samples / steps / rounds to each target, the lowest loss; the H the adaptive schedule set),
``fit`` (per target: S_min, E_min and B_crit of the H = 1 fit, and B_simple at the target),
``delay_helps_above_bcrit`` (per target: whether some H > 1 needs fewer samples than H = 1 at a global
batch above B_crit), ``delay_ratios_above_bcrit`` (those ratios; 0 where only H > 1 reaches the target,
null where it misses it), ``equal_rounds`` (per target: local SGD (b, H) against minibatch (H·b, 1)),
``adaptive_vs_fixed`` (per target and b: the adaptive schedule's samples and rounds over those of the
fixed H that needed the fewest samples) and ``runs`` (every run's samples to each target).
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
K, TRAIN, EVAL_SAMPLES, CHECK_EVERY = 16, 16_000, 4096, 4096
TARGETS = (0.5, 0.25)  # training losses (MNIST-1D's cnn1d starts at ln 10 = 2.30)
MAX_EXTENSIONS = 2  # rounds of widening a cell's LR grid whose best LR is on its edge
BASE = ["data=mnist1d", "data.num_samples=20000", "model=cnn1d", "optimizer=sgd", "optimizer.lr_decay=none",
        "checkpoint=off"]
ADAPTIVE = "adaptive"  # the H of a schedule=noise_adaptive cell (its defaults: H in [1, 16], measured every 4 rounds)


def centre_lr(b: int) -> float:
    return 0.05 * math.sqrt(b / 8)


@dataclass
class Job:
    b: int
    H: int | str  # a fixed H, or ADAPTIVE
    lr: float
    seed: int
    samples: int  # the budget, all workers

    @property
    def cell(self) -> str:
        return f"b={self.b},H={self.H}"


def run_job(job: Job) -> dict:
    """One run: its checkpoints (samples, steps, rounds, train loss, the window's B_simple) to the tightest target."""
    torch.set_num_threads(1)
    steps = job.samples // (K * job.b)
    schedule = ["schedule=noise_adaptive"] if job.H == ADAPTIVE else ["schedule=fixed", f"schedule.H={job.H}"]
    cfg = sim_config(*BASE, *schedule, f"trainer.batch_size={job.b}", f"optimizer.lr={job.lr:.12g}",
                     f"trainer.max_steps={steps}", f"trainer.seed={job.seed}", workers=K)
    curve: list[tuple[int, int, int, float, float]] = []
    used = [0]  # noise records already folded into a window

    def check(sim: Simulator, record) -> bool:
        drawn = sim.K * sim.shards.samples_seen
        if drawn < (len(curve) + 1) * CHECK_EVERY and sim.local_step < steps:
            return False
        loss = sim.objective(split="train", samples=EVAL_SAMPLES)[0]
        window = sim.noise[used[0]:]
        used[0] = len(sim.noise)
        g2, tr = sum(w[1] for w in window), sum(w[2] for w in window)
        curve.append((drawn, sim.local_step, len(sim.syncs), loss, tr / g2 if window and g2 > 0 else float("nan")))
        return loss <= min(TARGETS)

    t0 = time.perf_counter()
    sim = Simulator(cfg, K, on_sync=check, measure_noise=job.H == 1)
    try:
        sim.run()
        diverged = False
    except FloatingPointError:  # a diverged run is a result: it reaches no target
        diverged = True
    chosen = [h for _, _, h in getattr(sim.schedule, "history", [])]  # noise_adaptive: the H it set
    return {"cell": job.cell, "b": job.b, "H": job.H, "lr": job.lr, "seed": job.seed, "curve": curve,
            "diverged": diverged, "h_chosen": chosen, "seconds": round(time.perf_counter() - t0, 1)}


def first_reach(curve: list, target: float) -> tuple | None:
    return next((c for c in curve if c[3] <= target), None)


def cell_summary(runs: list[dict], targets: tuple[float, ...]) -> dict:
    """Per target, the LR with the fewest mean samples (∞ if a seed misses) and its samples/steps/rounds."""
    by_lr: dict[float, list[dict]] = {}
    for r in runs:
        by_lr.setdefault(r["lr"], []).append(r)
    out: dict = {"global_batch": K * runs[0]["b"], "per_target": {}}
    for t in targets:
        best = None
        for lr, rs in sorted(by_lr.items()):
            hits = [first_reach(r["curve"], t) for r in rs]
            if all(hits):
                mean = {k: statistics.fmean(h[i] for h in hits) for i, k in enumerate(("samples", "steps", "rounds"))}
                b_simple = [h[4] for h in hits if not math.isnan(h[4])]
                mean["b_simple"] = statistics.fmean(b_simple) if b_simple else None
            else:
                mean = {"samples": math.inf, "steps": math.inf, "rounds": math.inf, "b_simple": None}
            mean["lr"] = lr
            if best is None or mean["samples"] < best["samples"]:
                best = mean
        out["per_target"][str(t)] = best
    out["lowest_loss"] = min((c[3] for r in runs for c in r["curve"]), default=math.inf)
    reached = [t for t in targets if math.isfinite(out["per_target"][str(t)]["samples"])]
    out["lr_at_grid_edge"] = {str(t): out["per_target"][str(t)]["lr"] in (min(by_lr), max(by_lr))
                              for t in reached if len(by_lr) > 1}
    return out


def extension(results: list[dict], cell: str, targets: tuple[float, ...]) -> list[float]:
    """The LRs to add to a cell's grid: half its lowest or twice its highest where that edge is the best
    LR for a target the cell reaches, so that no cell's optimum sits on the edge of what was tried."""
    runs = [r for r in results if r["cell"] == cell]
    lrs = sorted({r["lr"] for r in runs})
    out = set()
    for d in cell_summary(runs, targets)["per_target"].values():
        if math.isfinite(d["samples"]) and d["lr"] in (lrs[0], lrs[-1]):
            out.add(lrs[0] / 2 if d["lr"] == lrs[0] else lrs[-1] * 2)
    return sorted(out)


def fit_minibatch(points: list[tuple[int, float]]) -> dict | None:
    """Least squares of S = S_min + E_min/B over (B, S) of H = 1 (McCandlish et al., Eq. 2.11); B_crit = E_min/S_min."""
    if len(points) < 2:
        return None
    xs, ys = [1 / B for B, _ in points], [S for _, S in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    e_min = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    s_min = my - e_min * mx
    # S_min <= 0: steps fall as 1/B over the whole range (no knee in it); E_min <= 0: a larger batch buys no steps
    b_crit = math.inf if s_min <= 0 else 0.0 if e_min <= 0 else e_min / s_min
    return {"S_min": s_min, "E_min": e_min, "B_crit": b_crit}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="H ∈ {1, 16}, the centre LR, 4 epochs, 1 seed")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick 0)")
    p.add_argument("--processes", type=int, default=None)
    args = p.parse_args(argv)
    quick = args.quick
    bs = [2, 8, 32, 128]
    hs, mults, epochs, seeds, targets = (([1, 16], [1.0], 4, [0], TARGETS[:1]) if quick
                                         else ([1, 4, 16], [0.5, 1.0, 2.0], 16, [0, 1, 2], TARGETS))
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",")]
    t0, commit = time.perf_counter(), git_state()
    data_lib.build(sim_config(*BASE, workers=K).data)  # generate and cache the data once, before the workers race
    columns = [*hs, ADAPTIVE]
    jobs = [Job(b, H, centre_lr(b) * m, s, epochs * TRAIN) for b in bs for H in columns for m in mults for s in seeds]
    results = run_all(jobs, args.processes, fn=run_job, cost=lambda j: j.samples / j.b ** 0.7)
    for _ in range(MAX_EXTENSIONS if len(mults) > 1 else 0):  # the best LR of every cell inside its grid
        more = [Job(b, H, lr, s, epochs * TRAIN) for b in bs for H in columns
                for lr in extension(results, f"b={b},H={H}", targets) for s in seeds]
        if not more:
            break
        results += run_all(more, args.processes, fn=run_job, cost=lambda j: j.samples / j.b ** 0.7)
    cells = {}
    for b in bs:
        for H in columns:
            cell = f"b={b},H={H}"
            cells[cell] = cell_summary([r for r in results if r["cell"] == cell], targets)
        chosen = [h for r in results if r["cell"] == f"b={b},H={ADAPTIVE}" for h in r["h_chosen"]]
        cells[f"b={b},H={ADAPTIVE}"]["h_chosen"] = ({"min": min(chosen), "median": statistics.median(chosen),
                                                    "max": max(chosen)} if chosen else None)

    print(f"K = {K}, MNIST-1D cnn1d, {epochs} epochs budget ({epochs * TRAIN} samples), {len(seeds)} seed(s); "
          f"samples (thousands) / rounds to the training loss target, at the best LR of the cell")
    fits, helps, equal_rounds, adaptive = {}, {}, {}, {}
    for t in targets:
        key = str(t)
        print(f"\ntarget {t}:  {'global batch':>12} " + " ".join(f"{f'H={H}':>22}" for H in columns) + "   B_simple")
        for b in bs:
            row = [cells[f"b={b},H={H}"]["per_target"][key] for H in columns]
            bsimp = row[0]["b_simple"]
            print(f"{'':>10}{K * b:>14} " + " ".join(
                f"{r['samples'] / 1000:>9.1f}k /{r['rounds']:>6.0f} (lr {r['lr']:.3g})" if math.isfinite(r["samples"])
                else f"{'not reached':>22}" for r in row) + (f"   {bsimp:8.1f}" if bsimp else "        -"))
        h1 = [(K * b, cells[f"b={b},H=1"]["per_target"][key]["steps"]) for b in bs]
        fit = fit_minibatch([(B, S) for B, S in h1 if math.isfinite(S)])
        b_simple = [cells[f"b={b},H=1"]["per_target"][key]["b_simple"] for b in bs]
        b_simple = [v for v in b_simple if v]
        fits[key] = {**(fit or {}), "B_simple": statistics.fmean(b_simple) if b_simple else None}
        b_crit = fits[key].get("B_crit", math.inf)
        helps[key] = {}
        for b in bs:
            if K * b <= b_crit:
                continue
            base = cells[f"b={b},H=1"]["per_target"][key]["samples"]
            for H in hs[1:]:
                mine = cells[f"b={b},H={H}"]["per_target"][key]["samples"]
                # null: H > 1 misses the target; 0: only H > 1 reaches it
                ratio = mine / base if math.isfinite(base) else (0.0 if math.isfinite(mine) else math.inf)
                helps[key][f"b={b},H={H}"] = ratio if math.isfinite(ratio) else None
        equal_rounds[key] = {}
        for b in bs:
            for H in hs[1:]:
                if H * b in bs:
                    local = cells[f"b={b},H={H}"]["per_target"][key]
                    mini = cells[f"b={H * b},H=1"]["per_target"][key]
                    equal_rounds[key][f"(b={b},H={H}) vs (b={H * b},H=1)"] = {
                        "local_rounds": local["rounds"], "minibatch_rounds": mini["rounds"],
                        "local_samples": local["samples"], "minibatch_samples": mini["samples"]}
        if fit:
            print(f"  H = 1 fit S = S_min + E_min/B: S_min = {fit['S_min']:.0f} steps, E_min = {fit['E_min']:.0f} "
                  f"samples, B_crit = {fit['B_crit']:.0f}; B_simple at the target {fits[key]['B_simple'] or 0:.0f}")
        print("  samples with H > 1 / with H = 1 at global batch > B_crit: "
              + (", ".join(f"{c} {v:.2f}" if v is not None else f"{c} neither" for c, v in helps[key].items())
                 or "none above B_crit"))
        for pair, v in equal_rounds[key].items():
            print(f"  equal rounds {pair}: rounds {v['local_rounds']:.0f} vs {v['minibatch_rounds']:.0f}, "
                  f"samples {v['local_samples'] / 1000:.1f}k vs {v['minibatch_samples'] / 1000:.1f}k")
        adaptive[key] = {}
        for b in bs:
            mine = cells[f"b={b},H={ADAPTIVE}"]["per_target"][key]
            fixed = {H: cells[f"b={b},H={H}"]["per_target"][key] for H in hs}
            reached = [H for H in hs if math.isfinite(fixed[H]["samples"])]
            best = min(reached, key=lambda H: fixed[H]["samples"]) if reached else None  # noqa: B023
            adaptive[key][f"b={b}"] = {
                "samples": mine["samples"], "rounds": mine["rounds"], "best_fixed_H": best,
                "samples_vs_best_fixed": mine["samples"] / fixed[best]["samples"] if best else None,
                "rounds_vs_best_fixed": mine["rounds"] / fixed[best]["rounds"] if best else None,
                "h_chosen": cells[f"b={b},H={ADAPTIVE}"]["h_chosen"]}
            a = adaptive[key][f"b={b}"]
            print(f"  adaptive at b={b}: H chosen {a['h_chosen']}; "
                  + (f"samples x{a['samples_vs_best_fixed']:.2f}, rounds x{a['rounds_vs_best_fixed']:.2f} of the "
                     f"best fixed H={best}" if best and math.isfinite(mine["samples"]) else
                     ("reached, no fixed H did" if math.isfinite(mine["samples"]) else "not reached")))

    plt = pyplot()
    fig, axes = plt.subplots(1, len(targets) + 1, figsize=(5 * (len(targets) + 1), 4))
    for ax, t in zip(axes, targets):
        for H in columns:
            ys = [cells[f"b={b},H={H}"]["per_target"][str(t)]["samples"] for b in bs]
            ax.plot([K * b for b in bs], [y if math.isfinite(y) else float("nan") for y in ys], marker="o",
                    label=f"H = {H}" if H != ADAPTIVE else "noise_adaptive", ls=":" if H == ADAPTIVE else "-")
        f = fits[str(t)]
        if f.get("B_crit") and math.isfinite(f["B_crit"]):
            ax.axvline(f["B_crit"], color="k", ls="--", lw=0.8, label="B_crit (H = 1 fit)")
        if f.get("B_simple"):
            ax.axvline(f["B_simple"], color="C3", ls=":", lw=1, label="B_simple at target")
        ax.set(xscale="log", yscale="log", xlabel="global batch K·b", ylabel="samples to target",
               title=f"training loss ≤ {t}")
        ax.legend(fontsize=8)
    ax = axes[-1]
    for r in results:
        if r["H"] == 1 and r["lr"] == centre_lr(r["b"]) and r["seed"] == 0:
            pts = [(c[3], c[4]) for c in r["curve"] if not math.isnan(c[4])]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=f"b = {r['b']}")
    ax.set(xscale="log", yscale="log", xlabel="training loss", ylabel="B_simple (window)",
           title="noise scale along H = 1 runs")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    save_figure(fig, RESULTS / f"batch_delay{'_quick' if quick else ''}.png")

    def finite(v):
        return v if not (isinstance(v, float) and math.isinf(v)) else None

    out = {"benchmark": "batch_delay", "quick": quick, "commit": commit, "workers": K, "epochs": epochs,
           "seeds": len(seeds), "targets": list(targets),
           "cells": {c: {"global_batch": v["global_batch"], "lowest_loss": v["lowest_loss"],
                         "per_target": {t: {k: finite(x) for k, x in d.items()} for t, d in v["per_target"].items()},
                         "lr_at_grid_edge": v["lr_at_grid_edge"], **({"h_chosen": v["h_chosen"]} if "h_chosen" in v
                                                                      else {})} for c, v in cells.items()},
           "fit": fits, "delay_helps_above_bcrit": {t: any(v is not None and v < 1 for v in d.values())
                                                    for t, d in helps.items()},
           "delay_ratios_above_bcrit": helps,
           "equal_rounds": {t: {p: {k: finite(x) for k, x in v.items()} for p, v in d.items()}
                            for t, d in equal_rounds.items()},
           "adaptive_vs_fixed": {t: {c: {k: finite(x) for k, x in v.items()} for c, v in d.items()}
                                 for t, d in adaptive.items()},
           "seed_list": seeds,
           # every run: the samples at which it first reached each target (null: never), its lowest loss
           "runs": [{"cell": r["cell"], "lr": r["lr"], "seed": r["seed"], "diverged": r["diverged"],
                     "samples_to": {str(t): (h[0] if (h := first_reach(r["curve"], t)) else None) for t in targets},
                     "lowest_loss": min((c[3] for c in r["curve"]), default=None)} for r in results],
           "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
