"""Reproduction 4: do Self-Tuning Networks' hyperparameter schedules still beat constant ones as data grows?

Claim. MacKay et al. (ICLR 2019, arXiv 1903.03088, §4.3, Tables 1–2) find that an STN's online
hyperparameter *schedule* beats the best fixed hyperparameters found by search, and that replaying
the schedule from scratch also beats its own final values (Table 1); Bae & Grosse's Delta-STN
(NeurIPS 2020, arXiv 2010.13514) keeps the claim. Their sets are small enough for regularisation
to matter (CIFAR-10, PTB). Here the question is what happens to the claim when the training set
grows and the tuned hyperparameters (dropout, augmentation) are regularisers.

Set-up: ``benchmarks/stn.py``'s methods and defaults (local SGD simulated exactly in one process,
cnn1d(32), SGD lr 0.05 momentum 0.9, batch 32 per worker, H = 8, Delta-STN tuning 3 dropout rates
and the shift and stretch augmentations, 15% of the training samples held out for validation),
on the first N ∈ {4,000, 20,000, 100,000} samples of the training split of a 125,000-sample
MNIST-1D set, scored on its 25,000-sample test split; every size runs the same 2,000 local steps at
K = 2 (128,000 samples drawn: 37, 7.5 and 1.5 epochs of the training shard), 5 seeds.
Per size and seed:

* ``stn``: ``optimizer=stn`` at K = 2;
* ``grid (equal compute)``: the 12-configuration grid of ``benchmarks/stn.py``, each at K = 2 for the
  steps that make the search's compute equal STN's, the lowest validation loss chosen;
* ``schedule replayed``: a fresh model trained at fixed hyperparameters following ``stn``'s consensus
  schedule (the values after each sync), 2,000 steps;
* ``grid best, full length``: the grid's choice trained for 2,000 steps (the best constant
  hyperparameters at the schedule's own length: the strictest constant baseline);
* ``no regularisation``: every hyperparameter at 0 (1e-3), 2,000 steps.

    python benchmarks/stn_data.py           # 3 sizes × 5 seeds (about 35 min of one core; spread over the cores)
    python benchmarks/stn_data.py --quick   # 2,000 and 20,000 samples, 200 steps, 1 seed (under 60 s)

Prints a table per size (mean ± std test loss over seeds, and on how many seeds a method beats the
schedule replayed) and ends with one JSON line: ``sizes``, ``results`` (per size, per method: the
test losses and accuracies per seed) and ``answer`` (per size: ``stn_beats_grid_equal_compute``,
``schedule_beats_best_constant`` — ``schedule replayed`` below ``grid best, full length`` in mean
test loss — and ``schedule_wins`` on how many seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run against this checkout

from benchmarks import stn  # noqa: E402
from benchmarks.convex_sim import run_all  # noqa: E402
from benchmarks.figures import pyplot, save_figure  # noqa: E402
from benchmarks.provenance import git_state  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
NUM_SAMPLES = 125_000  # 100,000 training samples (the largest size) and a 25,000-sample test split
NONE = {name: stn.EPS for name in stn.NAMES}
METHODS = ["stn", "grid (equal compute)", "schedule replayed", "grid best, full length", "no regularisation"]


@dataclass
class Job:
    train_size: int
    seed: int
    steps: int
    warmup: int
    channels: int
    num_samples: int


def run_job(job: Job) -> dict:
    """Every method of one (size, seed): losses, accuracies and the STN's final hyperparameters."""
    torch.set_num_threads(1)
    data = stn.load(job.train_size, job.num_samples)
    sim = dict(K=2, steps=job.steps, seed=job.seed, channels=job.channels)
    runs: dict[str, stn.Run] = {}
    runs["stn"] = stn.simulate(data, **sim, tune=True, warmup=job.warmup)
    runs["grid (equal compute)"], grid_best = stn.search(data, stn.grid_configs(), runs["stn"].compute, job.seed,
                                                         job.channels)
    runs["schedule replayed"] = stn.simulate(data, **sim, tune=False, warmup=0, fixed=stn.INITIAL,
                                             schedule=stn.schedule_of(runs["stn"]))
    runs["grid best, full length"] = stn.simulate(data, **sim, tune=False, warmup=0, fixed=grid_best)
    runs["no regularisation"] = stn.simulate(data, **sim, tune=False, warmup=0, fixed=NONE)
    return {"train_size": job.train_size, "seed": job.seed,
            "runs": {m: {"test_loss": r.test_loss, "test_accuracy": r.test_accuracy, "compute": r.compute,
                         "seconds": round(r.seconds, 1)} for m, r in runs.items()},
            "grid_choice": grid_best, "stn_final": runs["stn"].schedule[-1][1]}


def summarize(results: list[dict], sizes: list[int]) -> tuple[dict, dict]:
    table, answer = {}, {}
    for n in sizes:
        rs = sorted((r for r in results if r["train_size"] == n), key=lambda r: r["seed"])
        table[n] = {m: {"test_loss": [r["runs"][m]["test_loss"] for r in rs],
                        "test_accuracy": [r["runs"][m]["test_accuracy"] for r in rs],
                        "compute": rs[0]["runs"][m]["compute"]} for m in METHODS}
        table[n]["stn_final_mean"] = {k: statistics.fmean(r["stn_final"][k] for r in rs) for k in stn.NAMES}

        def mean(m: str, n: int = n) -> float:
            return statistics.fmean(table[n][m]["test_loss"])

        replay, const = table[n]["schedule replayed"]["test_loss"], table[n]["grid best, full length"]["test_loss"]
        answer[n] = {"stn_beats_grid_equal_compute": mean("stn") < mean("grid (equal compute)"),
                     "schedule_beats_best_constant": mean("schedule replayed") < mean("grid best, full length"),
                     "schedule_wins": sum(a < b for a, b in zip(replay, const)), "seeds": len(rs)}
    return table, answer


def plot(table: dict, sizes: list[int], path: Path, title: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, m in enumerate(METHODS):
        means = [statistics.fmean(table[n][m]["test_loss"]) for n in sizes]
        sds = [statistics.stdev(table[n][m]["test_loss"]) if len(table[n][m]["test_loss"]) > 1 else 0.0
               for n in sizes]
        ax.errorbar([n * (1 + 0.03 * (i - 2)) for n in sizes], means, yerr=sds, marker="o", capsize=3, label=m)
    ax.set(xscale="log", yscale="log", xlabel="training samples (15% of them validation)", ylabel="test loss",
           title=title)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2,000 and 20,000 samples, 200 steps, 1 seed (< 60 s)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1 (default 5; quick 1)")
    p.add_argument("--processes", type=int, default=None)
    args = p.parse_args(argv)
    quick = args.quick
    sizes = [2_000, 20_000] if quick else [4_000, 20_000, 100_000]
    steps, warmup, channels = (200, 50, 16) if quick else (2000, 200, 32)
    num_samples = 25_000 if quick else NUM_SAMPLES
    seeds = list(range(args.seeds or (1 if quick else 5)))
    t0, commit = time.perf_counter(), git_state()
    stn.load(sizes[-1], num_samples)  # generate and cache the data once, before the workers race
    jobs = [Job(n, s, steps, warmup, channels, num_samples) for n in sizes for s in seeds]
    results = run_all(jobs, args.processes, fn=run_job, cost=lambda j: j.train_size)
    table, answer = summarize(results, sizes)
    print(f"MNIST-1D ({num_samples} generated), cnn1d({channels}), K = 2, H = {stn.H}, b = {stn.BATCH}, "
          f"{steps} local steps at every size, {len(seeds)} seed(s)")
    for n in sizes:
        print(f"\n{n} training samples ({steps * 2 * stn.BATCH / (n * (1 - stn.VAL_FRACTION)):.1f} epochs)")
        print(f"  {'method':<24} {'test loss':>17} {'test acc':>9} {'compute':>8} {'beats replay':>13}")
        replay = table[n]["schedule replayed"]["test_loss"]
        for m in METHODS:
            ls = table[n][m]["test_loss"]
            sd = statistics.stdev(ls) if len(ls) > 1 else 0.0
            wins = sum(a < b for a, b in zip(ls, replay))
            print(f"  {m:<24} {statistics.fmean(ls):>8.4f} ± {sd:.4f} "
                  f"{statistics.fmean(table[n][m]['test_accuracy']):>9.4f} {table[n][m]['compute']:>8} "
                  f"{'' if m == 'schedule replayed' else f'{wins}/{len(ls)}':>13}")
        print("  stn's final values (mean): " + ", ".join(f"{k}={v:.3f}"
                                                           for k, v in table[n]["stn_final_mean"].items()))
    plot(table, sizes, RESULTS / f"stn_data{'_quick' if quick else ''}.png",
         f"STN vs constant hyperparameters as data grows ({len(seeds)} seeds)")
    out = {"benchmark": "stn_data", "quick": quick, "commit": commit, "sizes": sizes, "steps": steps,
           "seeds": len(seeds), "num_samples": num_samples, "results": {str(n): table[n] for n in sizes},
           "answer": {str(n): answer[n] for n in sizes}, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
