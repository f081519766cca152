"""Language-model pretraining on the standard-library corpus: DDP vs local SGD vs DiLoCo vs post-local SGD.

The workload local SGD exists for: a GPT (``model=gpt``) on byte-level text (``data=tokens
data.corpus=stdlib``, the running interpreter's ``.py`` files, prepared once into the cache). Two parts:

**Quality at equal tokens.** Every contender trains the same GPT from the same seed on the same number of
tokens (``trainer.max_steps`` x ``trainer.batch_size`` windows per worker, AdamW inside):

* ``ddp``: ``schedule=ddp``, a gradient all-reduce every step (the baseline);
* ``local_sgd``: ``schedule=fixed schedule.H=16``, a parameter average every 16 steps (Stich, ICLR 2019,
  arXiv 1805.09767; Lin et al., ICLR 2020, arXiv 1808.07217);
* ``diloco``: ``schedule.H=64 outer=nesterov`` (DiLoCo: AdamW inside, Nesterov outer step with lr 0.7 and
  momentum 0.9 on the averaged pseudo-gradient; Douillard et al. 2023, arXiv 2311.08105);
* ``post_local``: ``schedule=post_local schedule.H=16``, every step until half the run, then every 16
  (Lin et al., ICLR 2020, post-local SGD).

Each run is a real ``torchrun`` launch of ``localsgd.train`` (K ranks, Gloo, 1 thread each); the script
reads its ``summary.json`` (final validation loss of the averaged model, rounds, bytes, tokens) and its
``metrics.jsonl`` (the evaluation curve, plotted against tokens). Seeds repeat the whole run: the mean
and the sample standard deviation over seeds are reported.

**Throughput at world size 1.** Our trainer's tokens/s against a plain PyTorch loop on the same GPT,
windows and AdamW, timed as ``benchmarks/overhead.py`` times the small models: steps S+1..S+N inside one
``run_training`` call (``schedule=one_shot``, so nothing averages in between) against the same steps
of the plain loop, repetitions interleaved, medians; ``ratio_vs_plain`` = ours / plain seconds per step
(the target is <= 1.03).

Run ``python benchmarks/lm.py [--quick]`` from the repository root (``--quick``: K = 2, one seed, a 0.1M
GPT, under a minute on 2 cores). The last line of output is one JSON object with ``ratio_vs_plain`` and
``final_eval_loss`` (contender@K -> mean over seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run against this checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.overhead import time_run_training  # noqa: E402
from benchmarks.provenance import git_state, source_digest  # noqa: E402
from localsgd import dist  # noqa: E402
from localsgd.config import TrainConfig, check_config, register_configs  # noqa: E402
from localsgd.data import text  # noqa: E402
from localsgd.data.tokens import sequence_cross_entropy, windows  # noqa: E402
from localsgd.models import GPTConfig  # noqa: E402
from localsgd.train import config_dir  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CONTENDERS = {
    "ddp": ["schedule=ddp"],
    "local_sgd": ["schedule=fixed", "schedule.H=16"],
    "diloco": ["schedule=fixed", "schedule.H=64", "outer=nesterov"],
    "post_local": ["schedule=post_local", "schedule.H=16"],
}


@dataclasses.dataclass(frozen=True)
class Size:
    """One GPT and run length: the model, the window, the per-worker batch, the steps."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    batch_size: int
    max_steps: int
    eval_windows: int

    def overrides(self) -> list[str]:
        return ["data=tokens", "data.corpus=stdlib", "model=gpt", f"model.n_layer={self.n_layer}",
                f"model.n_head={self.n_head}", f"model.n_embd={self.n_embd}", f"data.block_size={self.block_size}",
                f"data.eval_windows={self.eval_windows}", "optimizer=adamw", "optimizer.lr=2e-3",
                "optimizer.warmup_steps=20", "optimizer.beta2=0.95", "optimizer.weight_decay=0.1",
                f"trainer.batch_size={self.batch_size}", f"trainer.max_steps={self.max_steps}",
                "trainer.eval_batch_size=32", "trainer.log_every=8", "trainer.progress=false",
                "trainer.threads=1", "checkpoint=off", "logging.wandb=disabled"]


QUICK = Size(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=8, max_steps=64, eval_windows=64)
FULL = Size(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=8, max_steps=400, eval_windows=256)


# ---------------------------------------------------------------------- quality at equal tokens
def run_contender(name: str, K: int, seed: int, size: Size, work: Path, timeout: float) -> dict[str, Any]:
    run_dir = work / f"{name}_K{K}_seed{seed}"
    eval_every = max(1, size.max_steps // 8)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={K}", "-m",
           "localsgd.train", *size.overrides(), *CONTENDERS[name], f"trainer.seed={seed}",
           f"trainer.eval_every={eval_every}", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "TQDM_DISABLE": "1", "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"{name} K={K} seed={seed} failed (exit {proc.returncode}): {' | '.join(tail)}")
    summary = json.loads((run_dir / "summary.json").read_text())
    curve = [(r["step"], r["eval_loss"]) for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if r["event"] == "eval"]
    return {"final_eval_loss": summary["final_eval_loss"], "final_eval_perplexity": summary["final_eval_perplexity"],
            "comm_rounds": summary["comm_rounds"], "comm_bytes": summary["comm_bytes"], "tokens": summary["tokens"],
            "wall_seconds": time.perf_counter() - start,
            "curve": [(step * size.batch_size * size.block_size * K, loss) for step, loss in curve]
            + [(summary["tokens"], summary["final_eval_loss"])]}


def quality(size: Size, worlds: list[int], seeds: list[int], timeout: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="localsgd-lm-") as scratch:
        for K in worlds:
            for seed in seeds:
                for name in CONTENDERS:  # contenders interleaved within each seed
                    run = run_contender(name, K, seed, size, Path(scratch), timeout)
                    out.setdefault(f"{name}@{K}", []).append(run)
                    print(f"  {name:<10} K={K} seed={seed}: eval loss {run['final_eval_loss']:.4f}, "
                          f"{run['comm_rounds']} rounds, {run['comm_bytes'] / 1e6:.1f} MB, "
                          f"{run['wall_seconds']:.0f} s", flush=True)
    return out


# ---------------------------------------------------------------------- throughput at world size 1
def compose(size: Size, max_steps: int) -> TrainConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_configs()
    overrides = [*size.overrides(), "schedule=one_shot", "trainer.eval_every=0", f"trainer.max_steps={max_steps}"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return check_config(hydra_compose(config_name="config", overrides=overrides), world_size=1)


def time_ours(size: Size, warmup: int, steps: int, scratch: Path) -> float:
    """Seconds per step of steps ``warmup+1 .. warmup+steps`` inside one ``run_training`` call."""
    wall, _, _ = time_run_training(compose(size, warmup + steps), warmup, steps, scratch)
    return wall / steps


class PlainLoop:
    """A hand-written loop: the same GPT (same seed), random windows of the same tokens, AdamW, the same LR."""

    def __init__(self, size: Size) -> None:
        cfg = compose(size, 1)
        root = text.prepare_stdlib()
        self.tokens = text.read_tokens(root / "train.bin", text.load_meta(root)["dtype"])
        torch.manual_seed(cfg.trainer.seed)
        self.model = GPTConfig(n_layer=size.n_layer, n_head=size.n_head, n_embd=size.n_embd).build(
            (size.block_size,), 256)
        self.init = {k: v.clone() for k, v in self.model.state_dict().items()}
        o = cfg.optimizer
        self.opt_args = {"lr": o.lr, "betas": (o.beta1, o.beta2), "eps": o.eps, "weight_decay": o.weight_decay}
        self.size = size

    def run(self, warmup: int, steps: int) -> float:
        model, size = self.model, self.size
        model.load_state_dict(self.init)
        opt = torch.optim.AdamW(model.parameters(), **self.opt_args)
        gen = torch.Generator().manual_seed(0)
        cpu = torch.device("cpu")
        t0 = 0.0
        for step in range(warmup + steps):
            if step == warmup:
                t0 = time.perf_counter()
            starts = torch.randint(0, len(self.tokens) - size.block_size - 1, (size.batch_size,), generator=gen)
            x, y = windows(self.tokens, starts.numpy(), size.block_size, cpu)
            loss = sequence_cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return (time.perf_counter() - t0) / steps


def throughput(size: Size, warmup: int, steps: int, reps: int) -> dict[str, Any]:
    torch.set_num_threads(1)
    dist.init()
    try:
        with tempfile.TemporaryDirectory(prefix="localsgd-lm-speed-") as scratch:
            plain = PlainLoop(size)
            time_ours(size, warmup, min(steps, 8), Path(scratch))  # untimed: lazy imports, allocator
            plain.run(warmup, min(steps, 8))
            times: dict[str, list[float]] = {"plain": [], "ours": []}
            for r in range(reps):
                for job in (["plain", "ours"] if r % 2 == 0 else ["ours", "plain"]):
                    times[job].append(time_ours(size, warmup, steps, Path(scratch)) if job == "ours"
                                      else plain.run(warmup, steps))
    finally:
        dist.destroy()
    med = {k: statistics.median(v) for k, v in times.items()}
    tokens_per_step = size.batch_size * size.block_size
    return {"seconds_per_step": med, "tokens_per_second": {k: tokens_per_step / v for k, v in med.items()},
            "ratio_vs_plain": med["ours"] / med["plain"],
            "paired_ratio_vs_plain": statistics.median(o / p for o, p in zip(times["ours"], times["plain"])),
            "all": times, "warmup_steps": warmup, "timed_steps": steps, "reps": reps,
            "n_params": sum(p.numel() for p in plain.model.parameters())}


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def plot(runs: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    worlds = sorted({int(k.split("@")[1]) for k in runs})
    fig, axes = plt.subplots(1, len(worlds), figsize=(5.5 * len(worlds), 4), squeeze=False)
    for ax, K in zip(axes[0], worlds):
        for key, seeds in runs.items():
            if key.endswith(f"@{K}"):
                xs = [t for t, _ in seeds[0]["curve"]]
                ys = np.mean([[v for _, v in s["curve"]] for s in seeds], axis=0)
                ax.plot(xs, ys, marker="o", ms=3, label=key.split("@")[0])
        ax.set(title=f"K = {K} workers", xlabel="tokens (all workers)", ylabel="validation loss (nats/byte)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="K = 2, one seed, a small GPT (under a minute)")
    ap.add_argument("--worlds", default=None, help="comma-separated K (default 2,4; quick 2)")
    ap.add_argument("--seeds", type=int, default=None, help="seeds per contender (default 3; quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="local steps per worker")
    ap.add_argument("--reps", type=int, default=None, help="interleaved throughput repetitions")
    args = ap.parse_args(argv)
    size = QUICK if args.quick else FULL
    if args.steps:
        size = dataclasses.replace(size, max_steps=args.steps)
    worlds = [int(k) for k in (args.worlds or ("2" if args.quick else "2,4")).split(",")]
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    code = source_digest(), git_state()
    text.prepare_stdlib()  # once, before any rank or timer (seconds on a fresh machine, then cached)
    start = time.perf_counter()
    print(f"GPT {size}; contenders {', '.join(CONTENDERS)}; K in {worlds}; seeds {seeds}", flush=True)
    runs = quality(size, worlds, seeds, timeout=3600)
    speed = throughput(size, warmup=4 if args.quick else 10, steps=8 if args.quick else 40,
                       reps=args.reps or (3 if args.quick else 7))

    print(f"\nfinal validation loss (nats per byte) of the averaged model, mean ± sd over {len(seeds)} seed(s), "
          f"{size.max_steps} steps x {size.batch_size} windows x {size.block_size} tokens per worker")
    head = f"{'contender':<12} {'K':>2} {'eval loss':>16} {'perplexity':>11} {'rounds':>7} {'MB sent':>9} {'wall s':>7}"
    print(head)
    print("-" * len(head))
    table: dict[str, Any] = {}
    for key, seeds_runs in runs.items():
        name, K = key.split("@")
        mean, sd = spread([r["final_eval_loss"] for r in seeds_runs])
        table[key] = {"final_eval_loss": mean, "final_eval_loss_sd": sd,
                      "final_eval_loss_all": [r["final_eval_loss"] for r in seeds_runs],
                      "comm_rounds": seeds_runs[0]["comm_rounds"], "comm_bytes": seeds_runs[0]["comm_bytes"],
                      "tokens": seeds_runs[0]["tokens"],
                      "wall_seconds": statistics.fmean(r["wall_seconds"] for r in seeds_runs)}
        print(f"{name:<12} {K:>2} {mean:>9.4f} ± {sd:<5.4f} {math.exp(mean):>11.3f} {table[key]['comm_rounds']:>7} "
              f"{table[key]['comm_bytes'] / 1e6:>9.1f} {table[key]['wall_seconds']:>7.0f}")
    s = speed["seconds_per_step"]
    print(f"\nthroughput at world size 1 ({speed['n_params']:,} parameters, 1 thread): plain "
          f"{speed['tokens_per_second']['plain']:,.0f} tokens/s, ours {speed['tokens_per_second']['ours']:,.0f} "
          f"tokens/s; ours/plain {speed['ratio_vs_plain']:.3f} (paired {speed['paired_ratio_vs_plain']:.3f}; "
          f"{1e3 * s['plain']:.1f} vs {1e3 * s['ours']:.1f} ms a step)")
    RESULTS.mkdir(exist_ok=True)
    figure = RESULTS / f"lm{'_quick' if args.quick else ''}.png"
    plotted = plot(runs, figure)
    out = {"benchmark": "lm", "quick": args.quick, "size": dataclasses.asdict(size), "worlds": worlds,
           "seeds": seeds, "ratio_vs_plain": speed["ratio_vs_plain"],
           "final_eval_loss": {k: v["final_eval_loss"] for k, v in table.items()}, "contenders": table,
           "throughput": speed, "figure": str(figure.relative_to(ROOT)) if plotted else None,
           "seconds": time.perf_counter() - start, "source_digest": code[0], "git": code[1],
           "torch": torch.__version__}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
