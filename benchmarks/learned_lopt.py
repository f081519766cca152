"""Reproduction: a meta-learned optimizer against hand-designed ones (``optimizer=learned``).

Metz, Maheswaranathan, Cheung & Sohl-Dickstein (ICLR 2019, arXiv 1804.00222) meta-learn the learning
rule itself; ``localsgd/learned/lopt.py`` is a per-parameter MLP rule in the style of ``MLPLOpt``
(arXiv 1810.10180), meta-trained by ``localsgd-meta-train`` on small offline tasks
(a scaled-down TinyLOpt-style rule). Two tables, with the bundled checkpoint at ``lr`` 1.0:

1. **Held-out tasks** (``localsgd.learned.tasks.heldout_suite``: hidden width 48, input dim 24, digits
   with permuted pixels, two-hidden-layer nets, 3-class mixtures; none sampled in meta-training). Each
   task is trained for T steps from the same initialisation with the same minibatches by: the learned
   rule (constant multiplier: T is within its meta-training horizons); SGD at lr 0.01 without
   momentum ("untuned"); SGD with momentum 0.9 at the best lr of a grid, chosen per task on the final
   training loss itself (an oracle, so an upper bound for tuned SGD); Adam at its default lr 1e-3; and
   (full mode) Adam at the per-task best of a grid. Score: final full-batch training loss.
2. **MNIST-1D under local SGD with 2 workers**: the real trainer (``torch.distributed.run``, two Gloo
   processes, one thread each), the project's default 1-D CNN, H = 8, batch 32 per worker, evaluated
   on the test split with the averaged model. Optimizers: learned (its default cosine decay of the
   step multiplier); SGD with momentum 0.9 at lr 0.05 (the project default); AdamW 1e-3. Full mode
   adds: SGD 0.01 (untuned), learned at a constant multiplier, learned with
   ``sync.optimizer_state=average``, momentum SGD at 0.02 and 0.1, and SGD+m 0.05 and AdamW 1e-3 with
   the same cosine decay as the learned rule.

Quick mode: 10 held-out tasks, T = 100, SGD grid {0.03, 0.1, 0.3}; 200 MNIST-1D steps, 3 optimizers.
Full mode: 20 tasks, T = 300, SGD grid {0.003, 0.01, 0.03, 0.1, 0.3, 1}, Adam grid {3e-4, 1e-3, 3e-3,
1e-2, 3e-2}; 2000 MNIST-1D steps. Step counts and grids are choices of this benchmark.

Run from the repository root:  python benchmarks/learned_lopt.py [--quick]
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.figures import pyplot, save_figure  # noqa: E402
from benchmarks.provenance import git_state, source_digest  # noqa: E402
from localsgd.learned import tasks  # noqa: E402
from localsgd.learned.lopt import BUNDLED_CHECKPOINT, LearnedOptimizer, load_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
MakeOpt = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


# ---------------------------------------------------------------------------------------------- held-out tasks
def _grid_best(spec: tasks.TaskSpec, seed: int, steps: int, make: Callable[[float], MakeOpt],
               grid: list[float]) -> tuple[float, float]:
    """(best final loss, its lr) over ``grid``, chosen on the final training loss itself."""
    results = [(tasks.train_module(spec, seed, make(lr), steps), lr) for lr in grid]
    return min(results)


def heldout_table(quick: bool) -> dict[str, Any]:
    steps = 100 if quick else 300
    suite = tasks.heldout_suite()[: 10 if quick else 20]
    sgd_grid = [0.03, 0.1, 0.3] if quick else [0.003, 0.01, 0.03, 0.1, 0.3, 1.0]
    adam_grid = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]

    def sgd_momentum(lr: float) -> MakeOpt:
        return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9)

    def adam(lr: float) -> MakeOpt:
        return lambda ps: torch.optim.Adam(ps, lr=lr)

    names = ["learned", "SGD 0.01 (untuned)", "SGD+m tuned (oracle)", "Adam 1e-3"] + ([] if quick else
                                                                                    ["Adam tuned (oracle)"])
    rows: list[dict[str, Any]] = []
    for spec, seed in suite:
        losses = {"learned": tasks.train_module(spec, seed, lambda ps: LearnedOptimizer(ps), steps),
                  "SGD 0.01 (untuned)": tasks.train_module(spec, seed, lambda ps: torch.optim.SGD(ps, lr=0.01), steps),
                  "Adam 1e-3": tasks.train_module(spec, seed, adam(1e-3), steps)}
        best_sgd, sgd_lr = _grid_best(spec, seed, steps, sgd_momentum, sgd_grid)
        losses["SGD+m tuned (oracle)"] = best_sgd
        row: dict[str, Any] = {"task": spec.describe(), "seed": seed, "sgd_tuned_lr": sgd_lr}
        if not quick:
            best_adam, adam_lr = _grid_best(spec, seed, steps, adam, adam_grid)
            losses["Adam tuned (oracle)"] = best_adam
            row["adam_tuned_lr"] = adam_lr
        row["loss"] = {k: losses[k] for k in names}
        rows.append(row)

    learned = np.array([r["loss"]["learned"] for r in rows])
    summary: dict[str, Any] = {}
    print(f"\nHeld-out tasks: final training loss after {steps} steps ({len(rows)} tasks, same init and batches)")
    print(f"{'optimizer':<22} {'median loss':>12} {'learned better on':>18} {'geo-mean learned/it':>20}")
    for name in names:
        vals = np.array([r["loss"][name] for r in rows])
        wins = int((learned < vals).sum())
        ratio = float(np.exp(np.mean(np.log(np.maximum(learned, 1e-12) / np.maximum(vals, 1e-12)))))
        summary[name] = {"median_loss": round(float(np.median(vals)), 5), "learned_wins": wins,
                         "geomean_ratio_learned_over": round(ratio, 4)}
        better = "—" if name == "learned" else f"{wins}/{len(rows)}"
        print(f"{name:<22} {np.median(vals):>12.4f} {better:>18} {'' if name == 'learned' else f'{ratio:.3f}':>20}")
    families: dict[str, dict[str, float]] = {}
    for r in rows:
        families.setdefault(r["task"], {k: 0.0 for k in names})
        for k in names:
            families[r["task"]][k] += r["loss"][k] / sum(1 for q in rows if q["task"] == r["task"])
    print("\nmean final loss per held-out task kind:")
    print(f"{'task':<52}" + "".join(f"{n[:14]:>15}" for n in names))
    for task, vals in families.items():
        print(f"{task:<52}" + "".join(f"{vals[n]:>15.4f}" for n in names))
    return {"steps": steps, "tasks": len(rows), "sgd_grid": sgd_grid, "adam_grid": None if quick else adam_grid,
            "summary": summary, "rows": rows}


# ---------------------------------------------------------------------------------------------- MNIST-1D, 2 workers
def _train_command(overrides: list[str], steps: int, run_dir: Path) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
            "localsgd.train", "data=mnist1d", "model=cnn1d", "schedule=fixed", "schedule.H=8", "trainer.batch_size=32",
            f"trainer.max_steps={steps}", "trainer.eval_every=0", f"trainer.log_every={max(10, steps // 30)}",
            "trainer.threads=1", "checkpoint=off", "logging.wandb=disabled", *overrides, f"hydra.run.dir={run_dir}"]


def _run_trainer(overrides: list[str], steps: int, tmp: Path) -> dict[str, Any]:
    run_dir = tmp / f"run{len(list(tmp.iterdir()))}"
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(_train_command(overrides, steps, run_dir), cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=3600)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"trainer exited with {proc.returncode} for {overrides}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    final = next(r for r in records if r["event"] == "final")
    train = [(r["step"], r["loss"]) for r in records if r["event"] == "train"]
    return {"overrides": overrides, "final_eval_loss": final["final_eval_loss"],
            "final_eval_accuracy": final["final_eval_accuracy"], "comm_rounds": final["comm_rounds"],
            "train_seconds": final["wall_seconds"], "launch_seconds": round(time.perf_counter() - start, 1),
            "train_curve": train}


def mnist1d_table(quick: bool) -> dict[str, Any]:
    steps = 200 if quick else 2000
    runs: dict[str, list[str]] = {
        "learned (cosine)": ["optimizer=learned"],
        "SGD+m 0.05 (default)": ["optimizer=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9"],
        "AdamW 1e-3": ["optimizer=adamw", "optimizer.lr=0.001"],
    }
    if not quick:  # each launch costs seconds of start-up: quick mode keeps three
        runs.update({
            "SGD 0.01 (untuned)": ["optimizer=sgd", "optimizer.lr=0.01", "optimizer.momentum=0.0"],
            "learned, constant": ["optimizer=learned", "optimizer.lr_decay=none"],
            "learned (cos), state avg": ["optimizer=learned", "sync.optimizer_state=average"],
            "SGD+m 0.02": ["optimizer=sgd", "optimizer.lr=0.02", "optimizer.momentum=0.9"],
            "SGD+m 0.1": ["optimizer=sgd", "optimizer.lr=0.1", "optimizer.momentum=0.9"],
            "SGD+m 0.05 cosine": ["optimizer=sgd", "optimizer.lr=0.05", "optimizer.momentum=0.9",
                                  "optimizer.lr_decay=cosine"],
            "AdamW 1e-3 cosine": ["optimizer=adamw", "optimizer.lr=0.001", "optimizer.lr_decay=cosine"],
        })
    tmp = Path(tempfile.mkdtemp(prefix="localsgd_learned_"))
    try:
        results = {name: _run_trainer(ov, steps, tmp) for name, ov in runs.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nMNIST-1D, 1-D CNN, local SGD with 2 workers (H = 8, b = 32 per worker), {steps} steps per worker; "
          "averaged model on the test split")
    print(f"{'optimizer':<26} {'eval loss':>10} {'eval acc':>9} {'rounds':>7} {'train s':>8}")
    for name, r in results.items():
        print(f"{name:<26} {r['final_eval_loss']:>10.4f} {r['final_eval_accuracy']:>9.3f} {r['comm_rounds']:>7} "
              f"{r['train_seconds']:>8.1f}")
    sgd_tuned = min((r["final_eval_loss"], n) for n, r in results.items() if n.startswith("SGD+m"))
    print(f"best momentum SGD by eval loss: {sgd_tuned[1]}")
    return {"steps": steps, "H": 8, "workers": 2, "runs": results, "best_sgd_momentum": sgd_tuned[1]}


# ---------------------------------------------------------------------------------------------- plots
def plot(held: dict[str, Any], mnist: dict[str, Any], quick: bool) -> list[str]:
    plt = pyplot()

    RESULTS.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if quick else ""
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(held["summary"])
    x = np.arange(held["tasks"])
    for k, name in enumerate(names):
        vals = [r["loss"][name] for r in held["rows"]]
        ax.scatter(x + (k - len(names) / 2) * 0.12, vals, s=14, label=name)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{r['task'].split()[0][:12]} {i}" for i, r in enumerate(held["rows"])], rotation=70,
                  fontsize=6)
    ax.set_ylabel(f"final training loss after {held['steps']} steps")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path = RESULTS / f"learned_heldout{suffix}.png"
    save_figure(fig, path)
    paths.append(path)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in mnist["runs"].items():
        steps, losses = zip(*r["train_curve"])
        ax.plot(steps, losses, label=f"{name} (test acc {r['final_eval_accuracy']:.3f})")
    ax.set_yscale("log")
    ax.set_xlabel("local step (2 workers, H = 8)")
    ax.set_ylabel("training loss (logging window mean)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path = RESULTS / f"learned_mnist1d{suffix}.png"
    save_figure(fig, path)
    paths.append(path)
    return [os.path.relpath(p, Path(__file__).resolve().parent) for p in paths]


def run(quick: bool, plots: bool = True) -> dict[str, Any]:
    """Both tables (and plots); returns the JSON figures."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    _, _, meta = load_checkpoint()
    print(f"bundled checkpoint: {BUNDLED_CHECKPOINT.name}, made by `{meta.get('command')}` "
          f"({meta.get('iterations')} meta-iterations, {meta.get('meta_train_seconds')} s)")
    held = heldout_table(quick)
    mnist = mnist1d_table(quick)
    out: dict[str, Any] = {
        "benchmark": "learned_lopt", "quick": quick,
        "heldout": {k: v for k, v in held.items() if k != "rows"},
        "heldout_rows": [{"task": r["task"], "seed": r["seed"], **{k: round(v, 5) if math.isfinite(v) else None
                                                                      for k, v in r["loss"].items()}}
                         for r in held["rows"]],
        "mnist1d": {**{k: v for k, v in mnist.items() if k != "runs"},
                    "runs": {n: {k: v for k, v in r.items() if k != "train_curve"} for n, r in mnist["runs"].items()}},
        "checkpoint_meta": {k: meta.get(k) for k in ("command", "seed", "iterations", "meta_train_seconds",
                                                      "feature_version", "torch")},
        "git": git_state(), "localsgd_source_sha256_12": source_digest(), "torch": torch.__version__,
    }
    if plots:
        out["plots"] = plot(held, mnist, quick)
        print("plots: " + ", ".join(out["plots"]))
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="10 held-out tasks x 100 steps, 3 MNIST-1D runs of 200 steps (about 60 s of CPU)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    print(json.dumps(run(args.quick, plots=not args.no_plots)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
