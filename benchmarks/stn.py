"""Reproduction: Self-Tuning Networks' Table 2 in small, inside local SGD (MacKay et al., ICLR 2019, arXiv
1903.03088, Tables 1 and 2), with Delta-STN (Bae & Grosse, NeurIPS 2020, arXiv 2010.13514).

Task: MNIST-1D (Greydanus & Kobak, arXiv 2011.14439), a ``--train-size`` subset of its training split
(small, so that regularisation matters), the ``cnn1d`` model (3 Conv1d layers) and five tuned
hyperparameters: dropout after each conv activation (3) and the 1-D ``shift`` and ``stretch``
augmentations of ``localsgd.stn.augment``. Every method trains on the same samples; 15% of them are
held out as validation data (per-worker shards for STN, the selection set for the searches), and
every method is scored by its final loss on MNIST-1D's test split.

Methods, all local SGD simulated exactly in one process (K replicas, each with its own data shard,
validation shard and perturbation RNG; every H local steps all parameters, h and s included, are
replaced by their mean; optimizer state kept per worker, the engine's default):

* ``stn K=2`` / ``stn K=4``: ``optimizer=stn`` defaults (Delta-STN, plain averaging) except the
  2 : 1 train/validation cycle of the official STN code; K = 4 runs half the local steps of K = 2, so
  both process the same number of samples.
* ``grid`` / ``random``: N configurations each (a grid over one shared dropout rate × shift ×
  stretch; uniform random draws of all five), each trained at fixed hyperparameters with K = 2 for
  the number of steps that makes the search's total compute equal STN's; the configuration with the
  lowest validation loss is reported. Compute is counted in forward-backward passes over one
  minibatch: an STN training step costs 2 (general and response step), a hyper step 1, a
  fixed-hyperparameter step 1.
* ``STN schedule, retrained``: a fresh model trained at fixed-hyperparameter steps (K = 2, as many
  steps as ``stn K=2``) following ``stn K=2``'s schedule (its consensus hyperparameters after each
  sync); ``STN final, fixed``: the same at ``stn K=2``'s final values (the paper's Table 1 point: the
  schedule, not the final value, matters). ``grid best, full length``: the grid's chosen
  configuration retrained for as many steps as ``stn K=2`` (extra compute; shows what the search lost
  by being budget-matched).

Tunable defaults of this script (not from the papers): lr 0.05, momentum 0.9, batch 32 per worker,
H = 8, warm-up 200 steps (about 5 epochs of a worker's shard, the papers' warm-up), ranges and the
grid values below.

Run from the repository root:  python benchmarks/stn.py [--quick]
The last line printed is one JSON object with the key figures.
"""

from __future__ import annotations

import argparse
import bisect
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run against this checkout

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.figures import pyplot, save_figure  # noqa: E402
from benchmarks.provenance import git_state, source_digest  # noqa: E402
from localsgd.data import MNIST1DConfig  # noqa: E402
from localsgd.data import build as build_data  # noqa: E402
from localsgd.models import CNN1D  # noqa: E402
from localsgd.optim import StepContext  # noqa: E402
from localsgd.optim.stn import StnConfig, StnPlugin, build_stn, perturbation_seed  # noqa: E402
from localsgd.sampler import ShardSampler, ValidationShard  # noqa: E402
from localsgd.stn import move_to_hyperparameters_  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TUNE = ["dropout", "shift", "stretch"]
NAMES = ["dropout.0", "dropout.1", "dropout.2", "shift", "stretch"]
EPS = 1e-3  # "zero" for a hyperparameter whose range is open at 0
GRID = {"dropout": (EPS, 0.15, 0.3), "shift": (EPS, 0.1), "stretch": (EPS, 0.15)}
RANDOM_HIGH = {"dropout": 0.5, "shift": 0.25, "stretch": 0.3}
LR, MOMENTUM, BATCH, H, VAL_FRACTION = 0.05, 0.9, 32, 8, 0.15


@dataclass
class Data:
    x: torch.Tensor
    y: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


@dataclass
class Run:
    test_loss: float
    test_accuracy: float
    val_loss: float
    compute: int  # forward-backward minibatch passes, all workers
    schedule: list[tuple[int, dict[str, float]]] = field(default_factory=list)  # (step, values) after syncs
    seconds: float = 0.0


def load(train_size: int, num_samples: int = 10_000) -> Data:
    """The first ``train_size`` samples of the training split of a ``num_samples`` MNIST-1D set, and its test split."""
    ds = build_data(MNIST1DConfig(num_samples=num_samples))
    if train_size > len(ds.y_train):
        raise ValueError(f"train_size={train_size} exceeds the {len(ds.y_train)} training samples of "
                         f"num_samples={num_samples}")
    return Data(ds.x_train[:train_size], ds.y_train[:train_size], ds.x_test, ds.y_test)


def values_to_init(values: dict[str, float]) -> dict[str, float]:
    """Per-name values → ``StnConfig.init`` (one dropout init for all sites) plus per-site overrides."""
    return {"dropout": values["dropout.0"], "shift": values["shift"], "stretch": values["stretch"]}


def simulate(data: Data, K: int, steps: int, seed: int, channels: int, *, tune: bool, warmup: int,
             fixed: dict[str, float] | None = None,
             schedule: Callable[[int], dict[str, float]] | None = None, jacobian: bool = False) -> Run:
    """K-worker local SGD in one process: STN (``tune``) or training at fixed/scheduled hyperparameters."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    base = CNN1D(1, 40, 10, channels)
    cfg = StnConfig(lr=LR, momentum=MOMENTUM, tune=TUNE, train_steps=2, val_steps=1 if tune else 0,
                    hyper_warmup_steps=warmup, val_fraction=VAL_FRACTION,
                    averaging="jacobian" if jacobian else "plain",
                    init=values_to_init(fixed) if fixed else {})
    models, plugins, shards, samplers = [], [], [], []
    for k in range(K):
        model = copy.deepcopy(base)
        torch.manual_seed(seed)  # build_stn draws the response weights from the run seed: one replica
        plugin = build_stn(cfg, model, steps)
        plugin.generator.manual_seed(perturbation_seed(seed, k))  # each worker its own perturbations
        if fixed:
            set_values(plugin, fixed)
        shard = ValidationShard(data.x, data.y, VAL_FRACTION, BATCH, k, K, seed)
        models.append(model)
        plugins.append(plugin)
        shards.append(shard)
        samplers.append(ShardSampler(len(shard.train_index), k, K, seed))
    x, y = data.x[shards[0].train_index], data.y[shards[0].train_index]
    ctxs = [StepContext(F.cross_entropy, s.next_batch) for s in shards]
    compute, trajectory = 0, []
    for step in range(steps):
        if schedule is not None:
            for plugin in plugins:
                set_values(plugin, schedule(step))
        hyper = tune and plugins[0].is_hyper_step(step)
        compute += K * (1 if hyper or not tune else 2)
        for k in range(K):
            batch = None  # as in the trainer: a hyper step draws no training batch
            if plugins[k].uses_train_batch(step):
                idx = samplers[k].next_indices(BATCH)
                batch = (x[idx], y[idx])
            plugins[k].train_step(models[k], batch, step, ctxs[k])
        if (step + 1) % H == 0 or step + 1 == steps:
            average(models, plugins, jacobian)
            trajectory.append((step + 1, plugins[0].space.values()))
    model = models[0].eval()
    val_x = torch.cat([s.x for s in shards])
    val_y = torch.cat([s.y for s in shards])
    with torch.no_grad():
        logits = model(data.x_test)
        test_loss = float(F.cross_entropy(logits, data.y_test))
        accuracy = float((logits.argmax(1) == data.y_test).double().mean())
        val_loss = float(F.cross_entropy(model(val_x), val_y))
    return Run(test_loss, accuracy, val_loss, compute, trajectory, time.perf_counter() - start)


@torch.no_grad()
def set_values(plugin: StnPlugin, values: dict[str, float]) -> None:
    space = plugin.space
    space.h.copy_(torch.tensor([spec.to_unconstrained(values[spec.name]) for spec in space.specs]))


@torch.no_grad()
def average(models: list[torch.nn.Module], plugins: list[StnPlugin], jacobian: bool) -> None:
    """What LocalSGD does at a sync: (optionally move to the consensus h, then) the mean of everything."""
    if jacobian:
        h_bar = torch.stack([p.space.h for p in plugins]).mean(0)
        for p in plugins:
            move_to_hyperparameters_(p.stn, h_bar)
    for params in zip(*[m.parameters() for m in models]):
        mean = torch.stack([p.detach() for p in params]).mean(0)
        for p in params:
            p.copy_(mean)


def grid_configs() -> list[dict[str, float]]:
    out = []
    for d in GRID["dropout"]:
        for s in GRID["shift"]:
            for r in GRID["stretch"]:
                out.append({"dropout.0": d, "dropout.1": d, "dropout.2": d, "shift": s, "stretch": r})
    return out


def random_configs(n: int, seed: int) -> list[dict[str, float]]:
    gen = torch.Generator().manual_seed(10_000 + seed)
    out = []
    for _ in range(n):
        u = torch.rand(5, generator=gen).tolist()
        highs = [RANDOM_HIGH["dropout"]] * 3 + [RANDOM_HIGH["shift"], RANDOM_HIGH["stretch"]]
        out.append({name: max(EPS, ui * hi) for name, ui, hi in zip(NAMES, u, highs)})
    return out


def search(data: Data, configs: list[dict[str, float]], budget: int, seed: int, channels: int) -> tuple[Run, dict]:
    steps = max(1, budget // (2 * len(configs)))  # K = 2 workers, one pass per step
    runs = [(simulate(data, 2, steps, seed, channels, tune=False, warmup=0, fixed=c), c) for c in configs]
    best, config = min(runs, key=lambda rc: rc[0].val_loss)
    best.compute = sum(r.compute for r, _ in runs)
    best.seconds = sum(r.seconds for r, _ in runs)
    return best, config


INITIAL = {name: 0.05 for name in NAMES}  # StnConfig's default initial values


def schedule_of(run: Run) -> Callable[[int], dict[str, float]]:
    """Before step t: the consensus values of the last sync at or before t (the initial ones before the first)."""
    ends = [s for s, _ in run.schedule]

    def at(step: int) -> dict[str, float]:
        i = bisect.bisect_right(ends, step) - 1
        return INITIAL if i < 0 else run.schedule[i][1]

    return at


def one_seed(data: Data, seed: int, steps: int, warmup: int, n_random: int, channels: int, full: bool,
             log: Callable[[str], None]) -> dict[str, Run]:
    out: dict[str, Run] = {}
    out["stn K=2"] = simulate(data, 2, steps, seed, channels, tune=True, warmup=warmup)
    log(f"seed {seed}: stn K=2 done ({out['stn K=2'].seconds:.0f} s)")
    out["stn K=4"] = simulate(data, 4, steps // 2, seed, channels, tune=True, warmup=warmup // 2)
    if full:
        out["stn K=4 jacobian"] = simulate(data, 4, steps // 2, seed, channels, tune=True, warmup=warmup // 2,
                                           jacobian=True)
    budget = out["stn K=2"].compute
    out["grid"], grid_best = search(data, grid_configs(), budget, seed, channels)
    out["random"], _ = search(data, random_configs(n_random, seed), budget, seed, channels)
    log(f"seed {seed}: searches done")
    out["STN schedule, retrained"] = simulate(data, 2, steps, seed, channels, tune=False, warmup=0,
                                              fixed=INITIAL, schedule=schedule_of(out["stn K=2"]))
    out["STN final, fixed"] = simulate(data, 2, steps, seed, channels, tune=False, warmup=0,
                                       fixed=out["stn K=2"].schedule[-1][1])
    out["grid best, full length"] = simulate(data, 2, steps, seed, channels, tune=False, warmup=0, fixed=grid_best)
    return out


def plot(per_seed: list[dict[str, Run]], path: Path, title: str) -> None:
    plt = pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(NAMES), figsize=(3.2 * len(NAMES), 3.0), sharex=False)
    for name, ax in zip(NAMES, axes):
        for key, K, style in (("stn K=2", 2, "-"), ("stn K=4", 4, "--")):
            for i, runs in enumerate(per_seed):
                run = runs[key]
                samples = [s * K * BATCH for s, _ in run.schedule]
                ax.plot(samples, [v[name] for _, v in run.schedule], style, color=f"C{i}", lw=1.2,
                        label=f"{key}, seed {i}")
        ax.set_title(name)
        ax.set_xlabel("samples, all workers (thousands)")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1000:g}"))
    axes[0].legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)


def summarize(per_seed: list[dict[str, Run]]) -> dict[str, dict[str, Any]]:
    out = {}
    for key in per_seed[0]:
        losses = [r[key].test_loss for r in per_seed]
        accs = [r[key].test_accuracy for r in per_seed]
        out[key] = {"test_loss_mean": statistics.fmean(losses),
                    "test_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                    "test_accuracy_mean": statistics.fmean(accs), "test_losses": losses,
                    "compute": per_seed[0][key].compute, "seconds": round(sum(r[key].seconds for r in per_seed), 1)}
    stn_final = {name: [r["stn K=2"].schedule[-1][1][name] for r in per_seed] for name in NAMES}
    out["stn K=2"]["final_hparams_mean"] = {k: statistics.fmean(v) for k, v in stn_final.items()}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller data, fewer steps and configs, 1 seed (< 60 s)")
    p.add_argument("--steps", type=int, default=None, help="local steps of stn K=2 (default 2000; quick 300)")
    p.add_argument("--seeds", type=int, default=None, help="seeds 0..n-1 (default 3; quick 1)")
    p.add_argument("--train-size", type=int, default=None, help="MNIST-1D training samples used (3000; quick 1500)")
    p.add_argument("--channels", type=int, default=None, help="cnn1d channels (default 32; quick 16)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    quick = bool(args.quick)
    steps = args.steps or (300 if quick else 2000)
    seeds = list(range(args.seeds or (1 if quick else 3)))
    channels = args.channels or (16 if quick else 32)
    train_size = args.train_size or (1500 if quick else 3000)
    warmup = 50 if quick else 200
    n_random = len(grid_configs())
    torch.set_num_threads(1)
    wall = time.perf_counter()
    code = source_digest(), git_state()
    data = load(train_size)
    print(f"MNIST-1D: {len(data.y)} training samples ({VAL_FRACTION:.0%} held out for validation), "
          f"{len(data.y_test)} test; cnn1d({channels}); b={BATCH} per worker, H={H}, lr {LR}, momentum "
          f"{MOMENTUM}; stn K=2: {steps} steps (warm-up {warmup}, then 2 train : 1 hyper); "
          f"{len(grid_configs())} grid and {n_random} random configurations", flush=True)

    def log(msg: str) -> None:
        print(f"  [{time.perf_counter() - wall:.0f} s] {msg}", file=sys.stderr, flush=True)

    per_seed = [one_seed(data, s, steps, warmup, n_random, channels, not quick, log) for s in seeds]
    summary = summarize(per_seed)
    print(f"\n{'method':<26} {'test loss':>18} {'test acc':>9} {'compute':>8}   (mean ± std over {len(seeds)} seed(s))")
    for key, s in summary.items():
        print(f"{key:<26} {s['test_loss_mean']:>10.4f} ± {s['test_loss_std']:<6.4f} {s['test_accuracy_mean']:>9.4f} "
              f"{s['compute']:>8}")
    finals = summary["stn K=2"]["final_hparams_mean"]
    print("stn K=2 final hyperparameters (mean over seeds): " + ", ".join(f"{k}={v:.3f}" for k, v in finals.items()))
    plots: list[str] = []
    if not args.no_plots:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"stn_schedule{'_quick' if quick else ''}.png"
        plot(per_seed, path, f"STN hyperparameter schedules, MNIST-1D cnn1d({channels}), {train_size} samples, "
                             f"local SGD H={H}; solid K=2, dashed K=4 (same samples)")
        plots.append(os.path.relpath(path, Path(__file__).resolve().parent))
        print("plot: " + plots[0])
    out = {"benchmark": "stn", "quick": quick, "steps_K2": steps, "seeds": seeds, "train_size": train_size,
           "channels": channels, "batch": BATCH, "H": H, "lr": LR, "warmup": warmup,
           "grid_size": len(grid_configs()), "random_size": n_random, "results": summary, "plots": plots,
           "seconds": round(time.perf_counter() - wall, 1), "localsgd_source_sha256_12": code[0], "git": code[1],
           "torch": torch.__version__}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
