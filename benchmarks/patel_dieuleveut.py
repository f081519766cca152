"""Reproduction: Patel & Dieuleveut's growing local steps in their large-step regime, against H = 1 and one-shot.

Claim (Patel & Dieuleveut, "Communication trade-offs for synchronized distributed SGD with large
step size", NeurIPS 2019, arXiv 1904.11325): with the large step size γ_k = ν·k^(−α), α ∈ (½, 1),
P workers reach mini-batch SGD's (H = 1's) rate with only C ≍ √(T·P) communication rounds when the
local phases grow (N_t ∝ t), while one-shot averaging (a single round at the end) does not: its error
keeps a term that P does not divide.

Measured with :mod:`localsgd.sim` on the objective of :mod:`benchmarks.convex_sim` (ℓ2-regularised
logistic regression, λ = 1e-3) over 16,000 rows of 20 dense Gaussian features (``data.features=gaussian``:
well conditioned, so that T ≤ 2000 steps reach the noise-dominated regime the claim is about, where
one-shot averaging is clearly worse than H = 1; the 300 binary features of ``benchmarks/stich.py``
stay bias-dominated that long and every schedule ties), per-worker batch 8, plain SGD,
``optimizer.lr_decay=poly`` with ν = 1: for each (T, P), the final f(x̄) − f* of
* ``H=1`` (T rounds) and ``one_shot`` (1 round),
* ``pd``: ``schedule=patel_dieuleveut`` with N_t = ⌈N₁·t⌉ and N₁ = 2T/C², which gives about C rounds,
* ``fixed``: H = ⌈T/C⌉, the same number of rounds spent evenly,
for C on a grid; the mean over seeds (every schedule sees the same draws), since the claim bounds
E f(x̄_T) − f* and one draw near the optimum swings by up to 10×. ``rounds_needed`` is the
fewest rounds (log-interpolated on the grid) at which pd ends within 1.25× of H = 1's suboptimality,
and the exponent of a least-squares fit log C_needed = a + s·log √(T·P) tests C ≍ √(TP) (s = 1).
The α sweep (0.6, 0.75, 0.9) runs at one (T, P).

    python benchmarks/patel_dieuleveut.py          # 8 cases, 5 seeds (about 16 min on 2 cores)
    python benchmarks/patel_dieuleveut.py --quick  # P ∈ {4, 16, 64} at T = 400, α = 0.75 (under 60 s)

Writes ``results/patel_dieuleveut[_quick].png`` (final suboptimality against rounds, one panel per
(T, P)) and prints tables; the last line is JSON: ``final_gap`` per case and method, ``one_shot_vs_h1``,
``rounds_needed``, ``fit_exponent``, ``pd_vs_fixed`` (pd's gap over fixed H's at equal rounds, per case and C).
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
LAM, NU = 1e-3, 1.0
# the shared problem with 20 dense Gaussian features in place of 300 binary ones
GAUSSIAN = [*(o for o in PROBLEM if not o.startswith("data.n_features=")), "data.n_features=20",
            "data.features=gaussian", "data.sparsity=1.0"]
WITHIN = 1.25  # pd "matches" H = 1 when its final suboptimality is at most 1.25x H = 1's


def lr(alpha: float) -> list[str]:
    return [f"optimizer.lr={NU}", "optimizer.lr_decay=poly", f"optimizer.decay_power={alpha}"]


def methods(steps: int, rounds: list[int]) -> dict[str, list[str]]:
    """The schedules compared at one step budget: label -> overrides."""
    out = {"H=1": ["schedule.H=1"], "one_shot": ["schedule=one_shot"]}
    for c in rounds:
        out[f"pd C~{c}"] = ["schedule=patel_dieuleveut", f"schedule.N1={2 * steps / c**2:.6g}"]
        out[f"fixed C~{c}"] = [f"schedule.H={math.ceil(steps / c)}"]
    return out


def rounds_needed(points: list[tuple[int, float]], target: float) -> float | None:
    """Fewest rounds at which the (rounds, gap) curve is at or below ``target``, log-interpolated; None if never."""
    points = sorted(points)
    if not points or points[-1][1] > target:
        return None
    prev = None
    for c, g in points:
        if g <= target:
            if prev is None or prev[1] <= target:
                return float(c)
            (c0, g0), (c1, g1) = prev, (c, g)
            w = (math.log(g0) - math.log(target)) / (math.log(g0) - math.log(g1))
            return math.exp(math.log(c0) + w * (math.log(c1) - math.log(c0)))
        prev = (c, g)
    return None


def fit_exponent(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y on log x."""
    if len(xs) < 2:
        return None
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sxx if sxx else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="P ∈ {4, 16, 64} at T = 400, α = 0.75, 1 seed")
    p.add_argument("--processes", type=int, default=None, help="worker processes (default: the cores)")
    p.add_argument("--case", action="append", default=None, metavar="T,P,ALPHA",
                   help="run only these cases (repeatable), e.g. --case 1000,64,0.9")
    p.add_argument("--grid", default=None, help="round counts C, comma-separated (default 4,8,16,32,64)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per run (default 5; 1 with --quick)")
    p.add_argument("--problem", action="append", default=[], metavar="OVERRIDE",
                   help="an extra data override for the problem (repeatable), e.g. data.scale=0.05")
    args = p.parse_args(argv)
    quick = args.quick
    if quick:
        cases = [(400, 4, 0.75), (400, 16, 0.75), (400, 64, 0.75)]
        grid, seeds = [4, 8, 16], [0]
    else:
        cases = [(1000, 4, 0.75), (1000, 16, 0.75), (1000, 64, 0.75), (1000, 256, 0.75),
                 (250, 16, 0.75), (2000, 16, 0.75), (1000, 64, 0.6), (1000, 64, 0.9)]
        grid, seeds = [4, 8, 16, 32, 64], [0, 1, 2, 3, 4]
    if args.case:
        cases = [(int(t), int(w), float(a)) for t, w, a in (c.split(",") for c in args.case)]
    grid = [int(c) for c in args.grid.split(",")] if args.grid else grid
    seeds = list(range(args.seeds)) if args.seeds else seeds
    problem = [*GAUSSIAN, *args.problem]
    t0, commit = time.perf_counter(), git_state()
    fstar, gnorm, gap0 = f_star(problem, LAM)
    print(f"f* = {fstar:.12f} (|grad| {gnorm:.1e}), f(0) - f* = {gap0:.4f}", flush=True)

    runs, keys = [], []
    for steps, workers, alpha in cases:
        for label, ov in methods(steps, [c for c in grid if c < steps]).items():
            for s in seeds:
                runs.append(Run(label, [*lr(alpha), *ov], workers, LAM, fstar, steps, [], s, problem))
                keys.append(((steps, workers, alpha), label))
    results = run_all(runs, args.processes)
    table: dict[tuple, dict[str, list[dict]]] = {}
    for key, res in zip(keys, results):
        table.setdefault(key[0], {}).setdefault(key[1], []).append(res)

    out: dict[str, object] = {"benchmark": "patel_dieuleveut", "quick": quick, "commit": commit,
                              "problem": args.problem, "f_star": fstar, "gap0": gap0, "nu": NU, "lam": LAM,
                              "seeds": len(seeds),
                              "final_gap": {}, "rounds": {}, "one_shot_vs_h1": {}, "rounds_needed": {},
                              "pd_vs_fixed": {}}
    fit_x, fit_y = [], []
    for case, by_label in table.items():
        steps, workers, alpha = case
        name = f"T={steps} P={workers} alpha={alpha}"
        # the theorem bounds E f(x̄_T) − f*: the mean over seeds (one draw swings by up to 10x near the optimum)
        gap = {lab: statistics.fmean(r["final_gap"] for r in rs) for lab, rs in by_label.items()}
        rounds = {lab: rs[0]["rounds"] for lab, rs in by_label.items()}
        out["final_gap"][name], out["rounds"][name] = gap, rounds
        out["one_shot_vs_h1"][name] = gap["one_shot"] / gap["H=1"]
        pd = [(rounds[lab], g) for lab, g in gap.items() if lab.startswith("pd")]
        need = rounds_needed(pd, WITHIN * gap["H=1"])
        out["rounds_needed"][name] = need
        out["pd_vs_fixed"][name] = {lab.split("~")[1]: gap[lab] / gap["fixed C~" + lab.split("~")[1]]
                                    for lab in gap if lab.startswith("pd")}
        if alpha == 0.75 and need is not None:
            fit_x.append(math.sqrt(steps * workers))
            fit_y.append(need)
        print(f"\n{name}: final f(x̄) − f* (mean of {len(seeds)} seeds); H=1 {gap['H=1']:.3e}, "
              f"one-shot {gap['one_shot']:.3e} ({gap['one_shot'] / gap['H=1']:.2f}x H=1)")
        print("   C~ | pd rounds  pd gap     ×H=1 | fixed rounds  fixed gap  ×H=1 | pd/fixed")
        for c in [c for c in grid if c < steps]:
            a, b = f"pd C~{c}", f"fixed C~{c}"
            print(f"{c:5d} | {rounds[a]:9d}  {gap[a]:.3e} {gap[a] / gap['H=1']:5.2f} | {rounds[b]:12d}  "
                  f"{gap[b]:.3e} {gap[b] / gap['H=1']:5.2f} | {gap[a] / gap[b]:.2f}")
        sq = math.sqrt(steps * workers)
        print(f"rounds pd needs to be within {WITHIN}x of H=1: {need if need is None else round(need, 1)} "
              f"(√(TP) = {sq:.0f})")
    out["fit_exponent"] = fit_exponent(fit_x, fit_y)
    out["fit_points"] = [[x, y] for x, y in zip(fit_x, fit_y)]
    print(f"\nfit C_needed ∝ (√(TP))^s over the α = 0.75 cases: s = {out['fit_exponent']}")

    plt = pyplot()
    fig, axes = plt.subplots(1, len(table), figsize=(3.6 * len(table), 3.6), squeeze=False)
    for ax, (name, gap) in zip(axes[0], out["final_gap"].items()):
        rounds = out["rounds"][name]
        for prefix, style in (("pd", "o-"), ("fixed", "s--")):
            pts = sorted((rounds[lab], g) for lab, g in gap.items() if lab.startswith(prefix))
            ax.plot([a for a, _ in pts], [b for _, b in pts], style, label=prefix)
        ax.axhline(gap["H=1"], color="k", lw=0.8, label="H=1")
        ax.axhline(gap["one_shot"], color="r", lw=0.8, label="one-shot")
        ax.set(xscale="log", yscale="log", xlabel="rounds", title=name.replace(" alpha=", " α="))
        ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("final f(x̄) − f*")
    axes[0][0].legend(fontsize=7)
    custom = args.case or args.grid or args.seeds or args.problem  # a side check keeps the main plots
    save_figure(fig, RESULTS / f"patel_dieuleveut{'_custom' if custom else '_quick' if quick else ''}.png")
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
