"""Meta-train the Metz et al. unsupervised update rule (ICLR 2019, arXiv 1804.00222) on 2 CPU cores.

Truncated backprop through unrolled unsupervised training, as the paper describes its meta-training
(section number not checked against the PDF; the scaled-down settings are ours and unverified against
the paper; the released code cannot meta-train, so nothing here is from source): every
meta-step advances ``tasks`` inner problems by ``unroll`` applications of the rule θ, evaluates the
closed-form ridge few-shot meta-objective (:func:`localsgd.learned.unsupervised.ridge_meta_loss`) on the
representation at the window's end, back-propagates into θ through the window, then detaches the base
network and continues from where it stopped. Each inner problem is reset (new base network, new pixel
permutation) after a horizon drawn uniformly from [``min_horizon``, ``max_horizon``] steps; the problems
start at staggered points so resets do not coincide.

Data: scikit-learn's 8x8 digits (no download), each class split into alternate halves. Meta-training uses
classes 0–4 (unlabeled batches, support and query all from the first half) with a random pixel
permutation per inner problem, as the design asks; because every per-unit network of the rule is
neuron-local, relabelling the input units only permutes W_1's columns (tested), so the permutation is a
check rather than an augmentation here. Classes 5–9 are held out (:func:`evaluate_rule`): the rule trains
on unlabeled images of their first half, the 10-shot support set comes from that half too, and the query
is their whole second half.

All settings are tunable defaults of this scale-down (the paper meta-trains at a far larger scale). The
outer Adam step is 3e-3 (the design suggests 1e-3, which learned more slowly here); the gradient-norm
clip 1.0 follows the design. Regeneration is deterministic for a seed on one torch version and machine
(two runs of the bundled command gave bit-identical θ).

Run:  localsgd-meta-train-unsupervised [--out FILE.pt]   (or python -m localsgd.learned.meta_train_unsupervised)
Without ``--out`` it writes ``metz_unsupervised.pt`` (and ``.json``) in the current directory; the bundled
``localsgd/learned/checkpoints/metz_unsupervised.pt`` came from the defaults below with ``--out`` pointing there
(about 4 minutes on a loaded 2-core machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .unsupervised import (
    CHECKPOINT_VERSION,
    BaseNet,
    MetzRule,
    RuleSpec,
    few_shot_eval_many,
    init_base_net,
    save_rule,
    stack_nets,
    step_many,
)

META_TRAIN_CLASSES = (0, 1, 2, 3, 4)
HELD_OUT_CLASSES = (5, 6, 7, 8, 9)


# ---------------------------------------------------------------------------------------------- data
@dataclass
class ClassData:
    """Images of some digit classes, labels renumbered 0..K-1, split into an unlabeled pool and a query half."""

    pool: torch.Tensor  # [N, 64] unlabeled training images; the support set is drawn from here too
    pool_labels: torch.Tensor
    query: torch.Tensor  # the other half: evaluation only
    query_labels: torch.Tensor
    num_classes: int


def digits_classes(classes: Sequence[int]) -> ClassData:
    """sklearn's digits restricted to ``classes``; alternate examples of each class go to pool and query."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = torch.from_numpy(np.asarray(bunch.data, dtype=np.float32) / 16.0)
    y = torch.from_numpy(np.asarray(bunch.target, dtype=np.int64))
    pool_idx, query_idx = [], []
    for c in classes:
        idx = (y == c).nonzero().flatten()
        pool_idx.append(idx[0::2])
        query_idx.append(idx[1::2])
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[torch.tensor(list(classes))] = torch.arange(len(classes))
    p, q = torch.cat(pool_idx), torch.cat(query_idx)
    return ClassData(x[p], remap[y[p]], x[q], remap[y[q]], len(classes))


def sample_per_class(labels: torch.Tensor, per_class: int, num_classes: int, generator: torch.Generator
                     ) -> torch.Tensor:
    """Indices of ``per_class`` random examples of every class."""
    out = []
    for c in range(num_classes):
        idx = (labels == c).nonzero().flatten()
        out.append(idx[torch.randperm(len(idx), generator=generator)[:per_class]])
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------- meta-training
@dataclass
class MetaTrainConfig:
    """Defaults are the bundled checkpoint's settings (the design's base model 64-64-64-32)."""

    seed: int = 0
    iters: int = 400
    tasks: int = 4  # inner problems per meta-step (their meta-losses are averaged)
    unroll: int = 5  # rule applications per truncation window
    min_horizon: int = 20
    max_horizon: int = 300
    batch: int = 32  # unlabeled examples per rule step
    shots: int = 10  # support (and query) examples per class in the meta-objective
    sizes: list[int] = field(default_factory=lambda: [64, 64, 64, 32])  # base network: pixels -> ... -> output
    rule_lr: float = 1e-3
    meta_lr: float = 3e-3
    clip: float = 1.0
    threads: int = 1  # one intra-op thread: the ops are small, and a second thread mostly waits
    log_every: int = 25
    spec: RuleSpec = field(default_factory=RuleSpec)


class InnerProblems:
    """``tasks`` unsupervised training runs side by side: stacked base networks, pixel permutations, clocks."""

    def __init__(self, cfg: MetaTrainConfig, data: ClassData, gen: torch.Generator) -> None:
        self.cfg, self.data, self.gen = cfg, data, gen
        self.nets = stack_nets([init_base_net(cfg.sizes, gen) for _ in range(cfg.tasks)])
        self.perms = torch.stack([torch.randperm(data.pool.shape[1], generator=gen) for _ in range(cfg.tasks)])
        self.horizons = torch.randint(cfg.min_horizon, cfg.max_horizon + 1, (cfg.tasks,), generator=gen)
        # Staggered clocks, so the problems' resets (and their high-loss first windows) spread out.
        self.steps = (torch.rand(cfg.tasks, generator=gen) * self.horizons).long()

    def reset_finished(self) -> None:
        done = (self.steps >= self.horizons).nonzero().flatten().tolist()
        if not done:
            return
        tensors = [t.clone() for t in self.nets.tensors()]
        for k in done:
            fresh = init_base_net(self.cfg.sizes, self.gen)
            for t, f in zip(tensors, fresh.tensors()):
                t[k] = f
            self.perms[k] = torch.randperm(self.data.pool.shape[1], generator=self.gen)
            self.horizons[k] = int(torch.randint(self.cfg.min_horizon, self.cfg.max_horizon + 1, (1,),
                                                 generator=self.gen))
            self.steps[k] = 0
        n = len(self.nets.weights)
        self.nets = BaseNet(tensors[:n], tensors[n:2 * n], tensors[2 * n:])

    def permuted(self, rows: torch.Tensor) -> torch.Tensor:
        """Pool rows [tasks, N] -> images [tasks, N, pixels], each task's pixels in its own order."""
        images = self.data.pool[rows]
        return torch.gather(images, 2, self.perms.unsqueeze(1).expand(-1, rows.shape[1], -1))


def meta_train(cfg: MetaTrainConfig, log: Any = None) -> tuple[MetzRule, list[dict[str, float]]]:
    """Meta-train θ from ``cfg.seed``; returns the rule and one record per meta-step."""
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    data = digits_classes(META_TRAIN_CLASSES)
    rule = MetzRule(cfg.spec)
    opt = torch.optim.Adam(rule.parameters(), lr=cfg.meta_lr)
    problems = InnerProblems(cfg, data, gen)
    history: list[dict[str, float]] = []
    for it in range(cfg.iters):
        problems.reset_finished()
        nets = problems.nets
        for _ in range(cfg.unroll):
            rows = torch.randint(0, data.pool.shape[0], (cfg.tasks, cfg.batch), generator=gen)
            nets = step_many(rule, nets, problems.permuted(rows), cfg.rule_lr)
        support = torch.stack([sample_per_class(data.pool_labels, cfg.shots, data.num_classes, gen)
                               for _ in range(cfg.tasks)])
        query = torch.stack([sample_per_class(data.pool_labels, cfg.shots, data.num_classes, gen)
                             for _ in range(cfg.tasks)])
        losses, accuracy = few_shot_eval_many(nets, problems.permuted(support), data.pool_labels[support],
                                              problems.permuted(query), data.pool_labels[query], data.num_classes)
        loss = losses.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(rule.parameters(), cfg.clip))
        if math.isfinite(grad_norm):  # a non-finite meta-gradient skips the step instead of poisoning θ
            opt.step()
        # Truncation: the next window starts from here, with no gradient path into this one.
        problems.nets = nets.detach()
        problems.steps += cfg.unroll
        history.append({"iter": it, "meta_loss": float(loss.detach()), "accuracy": float(accuracy.mean()),
                        "grad_norm": grad_norm})
        if log is not None and (it + 1) % cfg.log_every == 0:
            recent = history[-cfg.log_every:]
            log(f"iter {it + 1:>5}  meta-loss {np.mean([r['meta_loss'] for r in recent]):.4f}  "
                f"few-shot acc {np.mean([r['accuracy'] for r in recent]):.3f}  "
                f"|g| {np.median([r['grad_norm'] for r in recent]):.3g}")
    rule.requires_grad_(False)
    return rule, history


# ---------------------------------------------------------------------------------------------- evaluation
@dataclass
class HeldOutEpisodes:
    """Paired few-shot episodes, one per seed: a base network at init, a pixel permutation, a support set.

    Every method scored on these episodes starts seed k from the same network and permutation and is
    scored with the same support set (``shots`` per class from the pool half) and the same query set
    (the whole query half of the classes' images).
    """

    data: ClassData
    seeds: list[int]
    nets: BaseNet  # stacked: one network per seed
    perms: torch.Tensor  # [seeds, pixels]
    support: torch.Tensor  # [seeds, shots * classes] rows of the pool

    def permute(self, images: torch.Tensor) -> torch.Tensor:
        """Images [seeds, N, pixels] -> each seed's pixel order."""
        return torch.gather(images, 2, self.perms.unsqueeze(1).expand(-1, images.shape[1], -1))

    def batch_rows(self, batch: int, gen: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.data.pool.shape[0], (len(self.seeds), batch), generator=gen)

    @torch.no_grad()
    def accuracy(self, nets: BaseNet) -> list[float]:
        n, d = len(self.seeds), self.data
        _, acc = few_shot_eval_many(nets, self.permute(d.pool[self.support]), d.pool_labels[self.support],
                                    self.permute(d.query.expand(n, -1, -1)), d.query_labels.expand(n, -1),
                                    d.num_classes)
        return acc.tolist()


def held_out_episodes(seeds: Sequence[int], sizes: Sequence[int], classes: Sequence[int] = HELD_OUT_CLASSES,
                      shots: int = 10) -> HeldOutEpisodes:
    data = digits_classes(classes)
    inits = [torch.Generator().manual_seed(10_000 + s) for s in seeds]
    nets = stack_nets([init_base_net(list(sizes), g) for g in inits])
    perms = torch.stack([torch.randperm(data.pool.shape[1], generator=g) for g in inits])
    support = torch.stack([sample_per_class(data.pool_labels, shots, data.num_classes,
                                            torch.Generator().manual_seed(30_000 + s)) for s in seeds])
    return HeldOutEpisodes(data, list(seeds), nets, perms, support)


@torch.no_grad()
def rule_accuracy_curve(rule: MetzRule | None, episodes: HeldOutEpisodes, checkpoints: Sequence[int],
                        batch: int = 32, lr: float = 1e-3) -> dict[int, list[float]]:
    """Few-shot accuracy per seed after each number of rule steps in ``checkpoints`` (None: no steps)."""
    out: dict[int, list[float]] = {}
    nets, done = episodes.nets, 0
    gen = torch.Generator().manual_seed(20_000 + episodes.seeds[0])  # the same batches for every rule
    for target in sorted(set(checkpoints)):
        while rule is not None and done < target:
            rows = episodes.batch_rows(batch, gen)
            nets = step_many(rule, nets, episodes.permute(episodes.data.pool[rows]), lr)
            done += 1
        out[target] = episodes.accuracy(nets)
    return out


def evaluate_rule(rules: dict[str, MetzRule | None], seeds: Sequence[int], steps: int, sizes: Sequence[int],
                  classes: Sequence[int] = HELD_OUT_CLASSES, shots: int = 10, batch: int = 32, lr: float = 1e-3
                  ) -> dict[str, list[float]]:
    """Few-shot accuracy per seed after ``steps`` steps of each rule (None: the network at initialisation),
    on paired :class:`HeldOutEpisodes`; all seeds run side by side (:func:`step_many`)."""
    episodes = held_out_episodes(seeds, sizes, classes, shots)
    return {name: rule_accuracy_curve(rule, episodes, [steps], batch, lr)[steps] for name, rule in rules.items()}


# ---------------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    defaults = MetaTrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("metz_unsupervised.pt"),
                   help="where to write θ (.pt; .json beside it); the bundled file is never overwritten by default")
    for f in dataclasses.fields(MetaTrainConfig):
        if f.name in ("spec", "sizes"):
            continue
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                       default=getattr(defaults, f.name))
    p.add_argument("--sizes", default=",".join(map(str, defaults.sizes)), help="base network widths, input first")
    p.add_argument("--eval-seeds", type=int, default=20, help="held-out seeds scored after training (0: skip)")
    p.add_argument("--eval-steps", type=int, default=100)
    args = p.parse_args(argv)
    cfg = MetaTrainConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(MetaTrainConfig)
                             if f.name not in ("spec", "sizes")}, sizes=[int(s) for s in args.sizes.split(",")])
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    rule, history = meta_train(cfg, log=lambda m: print(m, file=sys.stderr, flush=True))
    seconds = time.perf_counter() - t0
    n = max(1, len(history) // 5)
    first = float(np.mean([r["meta_loss"] for r in history[:n]]))
    last = float(np.mean([r["meta_loss"] for r in history[-n:]]))
    meta: dict[str, Any] = {
        "version": CHECKPOINT_VERSION, "torch": str(torch.__version__), "seconds": round(seconds, 1),
        "command": " ".join(["localsgd-meta-train-unsupervised", *(argv if argv is not None else sys.argv[1:])]),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items()},
        "meta_loss_first_20pct": first, "meta_loss_last_20pct": last,
        "meta_train_classes": list(META_TRAIN_CLASSES), "held_out_classes": list(HELD_OUT_CLASSES),
    }
    if args.eval_seeds > 0:
        acc = evaluate_rule({"init": None, "rule": rule}, range(args.eval_seeds), args.eval_steps, cfg.sizes,
                            lr=cfg.rule_lr)
        meta["held_out_eval"] = {"seeds": args.eval_seeds, "steps": args.eval_steps,
                                 "accuracy_init": float(np.mean(acc["init"])),
                                 "accuracy_rule": float(np.mean(acc["rule"]))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_rule(rule, args.out, meta)
    args.out.with_suffix(".json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(json.dumps(meta))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
