"""Reproduction: Stich's linear speed-up of local SGD in the number of workers, and where it breaks in H.

Claim (Stich, "Local SGD Converges Fast and Communicates Little", ICLR 2019, arXiv 1805.09767,
Theorem 2.2 and Corollary 2.3): on a strongly convex problem, K workers averaging every H local steps
(per-worker mini-batch b) converge at the rate of mini-batch SGD with batch K·b, i.e. K times
faster in iterations than one worker, as long as H = O(√(T/(K·b))), T the iterations run.

Measured with :mod:`localsgd.sim` on the problem of :mod:`benchmarks.convex_sim` (ℓ2-regularised
logistic regression, 16,000 training rows, 300 binary features, λ = 1e-3, b = 8, plain SGD with the
inverse-time step γ_t = γ0/(1 + t/t0), Stich's c/(a + t), γ0 = 0.3, t0 = 300, the same for every K
and H): T_ε(K, H), the first local step at which f(x̄) − f* ≤ ε, for K ∈ {1, 2, 4, …, 256} and
H ∈ {1, 4, 16, 64, 256, 1024}; the median over seeds. Speed-up S(K, H) = T_ε(1)/T_ε(K, H); the break
H_max(K) is the largest H of the grid with T_ε(K, H) ≤ 1.25·T_ε(K, 1) (no more than 25 % slower than
averaging every step), set beside the bound's √(T_ε(K, 1)/(K·b)).

    python benchmarks/stich.py            # K up to 256, ε ∈ {1e-2, 1e-3}, 3 seeds (about 5 min on 2 cores)
    python benchmarks/stich.py --quick    # K ∈ {1, 4, 16, 64}, H ∈ {1, 8, 64}, ε = 1e-2, 2 seeds (under 60 s)

Writes ``results/stich[_quick].png`` (speed-up against K, one line per H) and prints a table; the last
line is JSON: ``speedup`` and ``steps_to_eps`` per ε, K and H, ``h_max`` and ``h_bound`` per ε and K,
``linear_up_to`` (per ε, the largest K whose H = 1 speed-up is at least K/2).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.convex_sim import PROBLEM, Run, f_star, run_all  # noqa: E402
from benchmarks.figures import pyplot, save_figure  # noqa: E402
from benchmarks.provenance import git_state  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAM, BATCH = 1e-3, 8
LR = ["optimizer.lr=0.3", "optimizer.lr_decay=inverse_time", "optimizer.decay_t0=300"]
SLOWER_OK = 1.25  # H "keeps the rate" while T_ε(K, H) ≤ 1.25·T_ε(K, 1)


def median_steps(results: list[dict], eps: float) -> float | None:
    """The median over seeds of the steps to ε (None if any seed never reached it)."""
    steps = [r["steps_to"][str(eps)] for r in results]
    return None if any(s is None for s in steps) else statistics.median(steps)


def h_max(steps_by_h: dict[int, float | None]) -> int | None:
    """The largest H whose steps to ε are at most SLOWER_OK × those of H = 1 (every smaller H too)."""
    base = steps_by_h.get(1)
    if base is None:
        return None
    best = None
    for h in sorted(steps_by_h):
        s = steps_by_h[h]
        if s is None or s > SLOWER_OK * base:
            break
        best = h
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="K ∈ {1, 4, 16, 64}, H ∈ {1, 8, 64}, ε = 1e-2, 2 seeds")
    p.add_argument("--processes", type=int, default=None, help="worker processes (default: the cores)")
    args = p.parse_args(argv)
    quick = args.quick
    ks = [1, 4, 16, 64] if quick else [1, 2, 4, 8, 16, 32, 64, 128, 256]
    hs = [1, 8, 64] if quick else [1, 4, 16, 64, 256, 1024]
    targets = [1e-2] if quick else [1e-2, 1e-3]
    seeds = [0, 1] if quick else [0, 1, 2]
    t0, commit = time.perf_counter(), git_state()
    fstar, gnorm, gap0 = f_star(PROBLEM, LAM)
    print(f"f* = {fstar:.12f} (|grad| {gnorm:.1e}), f(0) - f* = {gap0:.4f}; targets {targets}", flush=True)

    # One worker first: its steps to the smallest ε bound everybody else's run length (2x its own).
    single = run_all([Run("K=1", LR, 1, LAM, fstar, 40_000, targets, s) for s in seeds], args.processes)
    cap = 2 * max(r["steps"] for r in single)
    runs = [Run(f"K={k} H={h}", [*LR, f"schedule.H={h}"], k, LAM, fstar, cap, targets, s)
            for k in ks[1:] for h in hs for s in seeds]
    results = run_all(runs, args.processes)
    by = {(1, h): single for h in hs}
    for run, res in zip(runs, results):
        by.setdefault((run.workers, int(run.overrides[-1].split("=")[1])), []).append(res)

    out: dict[str, object] = {"benchmark": "stich", "quick": quick, "commit": commit, "f_star": fstar,
                              "gap0": gap0, "batch": BATCH, "lam": LAM, "ks": ks, "hs": hs,
                              "steps_to_eps": {}, "speedup": {}, "h_max": {}, "h_bound": {}, "linear_up_to": {}}
    for eps in targets:
        e = str(eps)
        steps = {k: {h: median_steps(by[(k, h)], eps) for h in hs} for k in ks}
        t1 = steps[1][1]
        speed = {k: {h: (t1 / s if s and t1 else None) for h, s in row.items()} for k, row in steps.items()}
        out["steps_to_eps"][e] = {str(k): {str(h): s for h, s in row.items()} for k, row in steps.items()}
        out["speedup"][e] = {str(k): {str(h): v for h, v in row.items()} for k, row in speed.items()}
        out["h_max"][e] = {str(k): h_max(steps[k]) for k in ks}
        out["h_bound"][e] = {str(k): (math.sqrt(steps[k][1] / (k * BATCH)) if steps[k][1] else None) for k in ks}
        linear = [k for k in ks if speed[k][1] is not None and speed[k][1] >= k / 2]
        out["linear_up_to"][e] = max(linear) if linear else None
        print(f"\nε = {eps}: steps to ε (median of {len(seeds)} seeds) and speed-up over K = 1")
        print("   K | " + " | ".join(f"H={h:<4d} steps  S " for h in hs) + " | H_max | √(T/(Kb))")
        for k in ks:
            cells = " | ".join(f"{steps[k][h] if steps[k][h] is not None else '—':>10} {speed[k][h] or 0:5.1f}"
                               for h in hs)
            bound = out["h_bound"][e][str(k)]
            print(f"{k:4d} | {cells} | {out['h_max'][e][str(k)]!s:>5} | {bound if bound is None else round(bound, 2)}")

    plt = pyplot()
    fig, axes = plt.subplots(1, len(targets), figsize=(5.5 * len(targets), 4.2), squeeze=False)
    for ax, eps in zip(axes[0], targets):
        sp = out["speedup"][str(eps)]
        for h in hs:
            pts = [(k, sp[str(k)][str(h)]) for k in ks if sp[str(k)][str(h)]]
            ax.plot([a for a, _ in pts], [b for _, b in pts], marker="o", label=f"H = {h}")
        ax.plot(ks, ks, "k--", lw=0.8, label="linear (S = K)")
        ax.set(xscale="log", yscale="log", xlabel="workers K", ylabel="speed-up T_ε(1)/T_ε(K, H)",
               title=f"ε = {eps}")
        ax.legend(fontsize=8)
    save_figure(fig, RESULTS / f"stich{'_quick' if quick else ''}.png")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
