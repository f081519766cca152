"""Reproduction 3: the gradient noise scale B_simple over training, and the batch schedule it drives.

McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training" (arXiv 1812.06162)
report that B_simple = tr(Σ)/|G|² grows during training as the loss falls
(McCandlish et al., arXiv 1812.06162, §2.2 and Fig. 4). This script runs the real trainer (two Gloo workers under
``torch.distributed.run``) on MNIST-1D with the small 1-D CNN, fixed H = 4 and ``ramp=noise_scale``,
which measures B_simple with the two-batch estimator (B_small = b, B_big = K·b) at the first local
step of every second round and sets the per-worker batch to clip(round(B_simple/K), b_min, b_max),
only ever raising it (at most ×2 per measurement) with the LR scaled linearly with the batch.
It reads ``metrics.jsonl`` (``loss``, ``b_simple``, ``batch_size`` per train record), plots them
against the step, and reports whether B_simple grew: the ratio of the median over the last quarter
of the records to the median over the first quarter, and the rank correlation with the loss.

Run from the repository root:  python benchmarks/noise_scale.py [--quick]
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
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.figures import pyplot, save_figure  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def train_command(steps: int, log_every: int, run_dir: Path, measure_every: int, H: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "localsgd.train",
            "ramp=noise_scale", f"ramp.measure_every_rounds={measure_every}", f"schedule.H={H}",
            f"trainer.max_steps={steps}", "checkpoint=off", "trainer.eval_every=0", f"trainer.log_every={log_every}",
            f"hydra.run.dir={run_dir}"]


def read_records(path: Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    train, final = [], {}
    with path.open() as fh:
        for line in fh:
            rec = json.loads(line)
            if rec.get("event") == "train":
                train.append(rec)
            elif rec.get("event") == "final":
                final = rec
    return train, final


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def plot(steps: np.ndarray, bs: np.ndarray, loss: np.ndarray, batch: np.ndarray, K: int, path: Path,
         title: str) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax = axes[0]
    ax.semilogy(steps, bs, color="C0", label="B_simple (EMA estimate)")
    ax.set_xlabel("step (per worker)")
    ax.set_ylabel("B_simple", color="C0")
    ax.grid(True, which="both", alpha=0.3)
    ax2 = ax.twinx()
    ax2.semilogy(steps, loss, color="C3", alpha=0.8, label="training loss")
    ax2.set_ylabel("training loss (window mean)", color="C3")
    ax.set_title("B_simple and loss")
    ax = axes[1]
    ax.step(steps, batch, where="post", color="C2", label="per-worker batch b")
    ax.step(steps, batch * K, where="post", color="C2", ls="--", label=f"global batch K·b (K={K})")
    ax.plot(steps, bs / K, color="C0", alpha=0.5, lw=0.8, label="B_simple / K (ramp target)")
    ax.set_yscale("log")
    ax.set_xlabel("step (per worker)")
    ax.set_ylabel("batch size")
    ax.set_title("batch schedule chosen by ramp=noise_scale")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[2]
    sc = ax.scatter(loss, bs, c=steps, s=8, cmap="viridis")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training loss")
    ax.set_ylabel("B_simple")
    ax.set_title("B_simple against loss (colour: step)")
    ax.grid(True, which="both", alpha=0.3)
    fig.colorbar(sc, ax=ax)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer steps (< 60 s)")
    p.add_argument("--steps", type=int, default=None, help="trainer.max_steps (default 4000; quick 600)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--H", type=int, default=4)
    p.add_argument("--measure-every", type=int, default=2, help="ramp.measure_every_rounds")
    p.add_argument("--keep", type=Path, default=None, help="run directory to keep (default: a temporary one)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    quick = bool(args.quick)
    steps = args.steps or (600 if quick else 4000)
    K = 2
    wall = time.perf_counter()
    tmp = None
    if args.keep is not None:
        run_dir = args.keep.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="localsgd_noise_scale_")
        run_dir = Path(tmp)
    cmd = train_command(steps, args.log_every, run_dir, args.measure_every, args.H)
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    shown = " ".join(["python", *cmd[1:-1], "hydra.run.dir=<tmp>"])
    print(f"running: TQDM_DISABLE=1 {shown}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            print(proc.stdout[-4000:], proc.stderr[-4000:], sep="\n", file=sys.stderr)
            raise SystemExit(f"trainer exited with {proc.returncode}")
        train, final = read_records(run_dir / "metrics.jsonl")
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    train_seconds = time.perf_counter() - wall

    st = np.asarray([r["step"] for r in train], dtype=float)
    loss = np.asarray([r["loss"] for r in train], dtype=float)
    batch = np.asarray([r["batch_size"] for r in train], dtype=float)
    bs = np.asarray([r.get("b_simple", math.nan) for r in train], dtype=float)
    ok = np.isfinite(bs) & (bs > 0)
    if ok.sum() < 8:
        raise SystemExit(f"only {int(ok.sum())} finite B_simple records; run more steps")
    bv, lv = bs[ok], loss[ok]
    q = max(1, len(bv) // 4)
    early, late = float(np.median(bv[:q])), float(np.median(bv[-q:]))
    loss_early, loss_late = float(np.median(lv[:q])), float(np.median(lv[-q:]))
    ratio = late / early
    rho = spearman(bv, lv)
    milestones: list[tuple[int, int]] = [(int(st[0]), int(batch[0]))]  # first record at b >= each power of 2
    for s_i, b_i in zip(st, batch):
        if b_i >= 2 * milestones[-1][1] or (b_i > milestones[-1][1] and s_i == st[-1]):
            milestones.append((int(s_i), int(b_i)))
    quarters = np.array_split(np.arange(len(bv)), 4)
    bs_quarters = [float(np.median(bv[i])) for i in quarters]
    loss_quarters = [float(np.median(lv[i])) for i in quarters]
    grows = ratio > 1.0 and rho < 0

    print(f"\n{len(train)} train records over {steps} steps (K = {K}, H = {args.H}, measured every "
          f"{args.measure_every} rounds = {args.measure_every * args.H} steps)")
    print(f"{'':<24}{'first quarter':>14}{'last quarter':>14}{'ratio':>8}")
    print(f"{'median B_simple':<24}{early:>14.1f}{late:>14.1f}{ratio:>8.2f}")
    print(f"{'median training loss':<24}{loss_early:>14.3g}{loss_late:>14.3g}{loss_late / loss_early:>8.2g}")
    print(f"B_simple range {bv.min():.1f} … {bv.max():.1f}; Spearman ρ(B_simple, loss) = {rho:.2f}")
    print("median B_simple by quarter: " + ", ".join(f"{v:.1f}" for v in bs_quarters)
          + "; median loss by quarter: " + ", ".join(f"{v:.3g}" for v in loss_quarters))
    print("per-worker batch milestones (step: b): " + ", ".join(f"{s}: {b}" for s, b in milestones))
    print(f"final: eval accuracy {final.get('final_eval_accuracy', math.nan):.3f}, "
          f"{final.get('comm_rounds', 0)} rounds, ramp {final.get('ramp', '?')}")
    print(f"B_simple grows as the loss falls: {'YES' if grows else 'NO'} "
          f"(late/early median ratio {ratio:.2f}, ρ = {rho:.2f})")

    plots: list[str] = []
    if not args.no_plots:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"noise_scale{'_quick' if quick else ''}.png"
        title = (f"MNIST-1D, cnn1d, K={K} workers, fixed H={args.H}, ramp=noise_scale "
                 f"(measure every {args.measure_every} rounds), {steps} steps")
        plot(st[ok], bv, lv, batch[ok], K, path, title)
        plots.append(os.path.relpath(path, Path(__file__).resolve().parent))
        print("plot: " + plots[0])
    out = {"benchmark": "noise_scale", "quick": quick, "steps": steps, "K": K, "H": args.H,
           "measure_every_rounds": args.measure_every, "records": len(train),
           "b_simple_early_median": round(early, 3), "b_simple_late_median": round(late, 3),
           "b_simple_late_over_early": round(ratio, 3), "b_simple_min": round(float(bv.min()), 3),
           "b_simple_max": round(float(bv.max()), 3), "loss_early_median": float(f"{loss_early:.4g}"),
           "loss_late_median": float(f"{loss_late:.4g}"), "spearman_b_simple_loss": round(rho, 3),
           "b_simple_grows_as_loss_falls": bool(grows), "b_simple_quarter_medians": [round(v, 2) for v in bs_quarters],
           "loss_quarter_medians": [float(f"{v:.4g}") for v in loss_quarters], "batch_milestones": milestones,
           "final_batch_size": int(batch[-1]), "final_eval_accuracy": final.get("final_eval_accuracy"),
           "comm_rounds": final.get("comm_rounds"), "train_seconds": round(train_seconds, 1),
           "plots": plots, "seconds": round(time.perf_counter() - wall, 1)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
