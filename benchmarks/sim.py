"""The simulator (``localsgd.sim``) against the real engine: exactness at K = 2 and worker-steps per second.

1. **Exactness.** The same configs (logistic regression, float64: fixed H = 4, and fixed H = 5 with
   DiLoCo's Nesterov outer step) run on two real Gloo ranks (:mod:`localsgd.testing.gloo_reference`,
   the engine :class:`~localsgd.engine.LocalSGD` in the trainer's loop body) and in the simulator at
   K = 2; ``max_abs_diff_vs_gloo`` is the largest parameter difference after ``finalize``.
2. **Throughput.** Worker-steps per second (K × local steps / loop seconds, float32) of the real
   engine at K = 2 (two processes sharing this machine's cores, one thread each) and of the simulator
   at K = 2 … 1,024 (logistic regression on 300 features) and K = 2 … 64 (the MNIST-1D CNN), measured
   in rounds that interleave real and simulated runs, ``--repeats`` times. The ratio is each
   simulated run's over the real engine's median.

    python benchmarks/sim.py            # 200 steps per run, 3 repeats (about 3 min on 2 cores)
    python benchmarks/sim.py --quick    # 40 steps, 1 repeat (under 60 s)

The last line is JSON: ``max_abs_diff_vs_gloo``, ``max_workers`` (the largest K simulated),
``worker_steps_per_s`` (per workload and K, medians), ``real_worker_steps_per_s`` and
``speedup_vs_real`` (per workload, the simulator at its largest K over the real engine at K = 2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import git_state  # noqa: E402
from localsgd.sim import Simulator, sim_config  # noqa: E402
from localsgd.testing.gloo_reference import gloo_reference  # noqa: E402
from localsgd.testing.ranks import run_ok  # noqa: E402

EXACT = ["data=synthetic_logreg", "data.n_samples=2000", "data.n_features=20", "model=logreg", "optimizer=sgd",
         "optimizer.lr=0.2", "trainer.batch_size=8", "trainer.max_steps=80"]
EXACT_CASES = [["schedule.H=4"], ["schedule.H=5", "outer=nesterov"]]
WORKLOADS = {
    "logreg": (["data=synthetic_logreg", "data.n_samples=40000", "model=logreg", "optimizer=sgd",
                "trainer.batch_size=8", "schedule.H=8"], [2, 16, 64, 256, 1024]),
    "cnn1d": (["trainer.batch_size=32", "schedule.H=8"], [2, 16, 64]),
}


def exactness() -> float:
    cfgs = [sim_config(*EXACT, *c, workers=2) for c in EXACT_CASES]
    real = run_ok(gloo_reference, 2, cfgs, timeout_s=300)[0]
    worst = 0.0
    for cfg, ref in zip(cfgs, real):
        sim = Simulator(cfg, 2, dtype=torch.float64).run()
        worst = max(worst, (sim.flat_params() - torch.from_numpy(ref["params"])).abs().max().item())
    return worst


def real_worker_steps(overrides: list[str], steps: int) -> float:
    cfg = sim_config(*overrides, f"trainer.max_steps={steps}", workers=2)
    out = run_ok(gloo_reference, 2, [cfg], torch.float32, timeout_s=300)
    return 2 * steps / max(r[0]["seconds"] for r in out)


def sim_worker_steps(overrides: list[str], workers: int, steps: int) -> float:
    cfg = sim_config(*overrides, f"trainer.max_steps={steps}", workers=workers)
    return Simulator(cfg, workers).run().worker_steps_per_second


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="40 steps per run, 1 repeat (under 60 s)")
    p.add_argument("--steps", type=int, default=None, help="local steps per throughput run (default 200)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    args = p.parse_args(argv)
    steps = args.steps or (40 if args.quick else 200)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    diff = exactness()
    print(f"exactness at K=2 (float64, fixed H=4 and H=5 + nesterov, 80 steps): max |sim - gloo| = {diff:.3g}")
    real: dict[str, list[float]] = {w: [] for w in WORKLOADS}
    sim: dict[str, dict[int, list[float]]] = {w: {k: [] for k in ks} for w, (_, ks) in WORKLOADS.items()}
    for _ in range(repeats):  # real and simulated runs interleaved, so a noisy spell hits both
        for name, (overrides, ks) in WORKLOADS.items():
            real[name].append(real_worker_steps(overrides, steps))
            for k in ks:
                sim[name][k].append(sim_worker_steps(overrides, k, steps))
    print(f"\nworker-steps per second ({steps} local steps per run, median of {repeats}; real engine: 2 Gloo ranks)")
    print(f"{'workload':<8} {'K':>5} {'engine':<9} {'worker-steps/s':>15} {'x real K=2':>11}")
    medians: dict[str, dict[str, float]] = {}
    for name, (_, ks) in WORKLOADS.items():
        r = statistics.median(real[name])
        print(f"{name:<8} {2:>5} {'real':<9} {r:>15.0f} {1.0:>11.2f}")
        medians[name] = {}
        for k in ks:
            s = statistics.median(sim[name][k])
            medians[name][str(k)] = round(s, 1)
            print(f"{name:<8} {k:>5} {'sim':<9} {s:>15.0f} {s / r:>11.2f}")
    out = {
        "max_abs_diff_vs_gloo": diff,
        "max_workers": max(k for _, ks in WORKLOADS.values() for k in ks),
        "worker_steps_per_s": medians,
        "real_worker_steps_per_s": {w: round(statistics.median(v), 1) for w, v in real.items()},
        "speedup_vs_real": {w: round(medians[w][str(ks[-1])] / statistics.median(real[w]), 2)
                            for w, (_, ks) in WORKLOADS.items()},
        "steps": steps, "repeats": repeats, "seconds": round(time.perf_counter() - t0, 1), "commit": git_state(),
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
