"""Reproduction: the Metz et al. neuron-local unsupervised update rule (ICLR 2019, arXiv 1804.00222), scaled down.

The paper's claims (Metz et al., ICLR 2019) at toy scale: a rule meta-trained for few-shot
linear readout on some classes improves the representation of classes it never saw, and keeps doing so
on wider and deeper networks than the one it was meta-trained on.

Protocol: scikit-learn's 8x8 digits, classes 5–9 (held out from meta-training, which used 0–4), each
class split in halves: the pool half supplies the unlabeled batches (32 images) and the 10-shot support
set, the query half is scored. One episode per seed: a base network at the released initialisation and a
random pixel permutation; every method starts seed k from the same network and permutation, sees the
same unlabeled batches and is scored with the same support set (paired). Score: accuracy of the
closed-form ridge readout (ridge 0.1) from the 32-dim representation, as the meta-objective.

A third table repeats the worker-loop plugin's setting (all ten classes, the ``data=digits`` split) and
compares how three readouts use the learned features.

Methods: the network at initialisation; a random-θ rule (freshly initialised, same architecture); the
bundled θ (``localsgd/learned/checkpoints/metz_unsupervised.pt``); an autoencoder trained by backprop
(the same encoder, a mirrored ReLU decoder, Adam 1e-3 on the reconstruction MSE, same steps and batches);
and ridge on the raw pixels as a reference. Step counts are tunable choices of this benchmark.

Run from the repository root:  python benchmarks/learned_unsupervised.py [--quick]
The last line printed is one JSON object with the key figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.figures import pyplot, save_figure  # noqa: E402
from benchmarks.provenance import git_state, source_digest  # noqa: E402
from localsgd.learned.meta_train_unsupervised import (  # noqa: E402
    HeldOutEpisodes,
    held_out_episodes,
    rule_accuracy_curve,
)
from localsgd.learned.unsupervised import (  # noqa: E402
    BaseNet,
    MetzRule,
    init_base_net,
    load_rule,
    representation,
    ridge_meta_loss,
    stack_nets,
)

RESULTS = Path(__file__).resolve().parent / "results"
BASE_SIZES = [64, 64, 64, 32]  # the design's base model (§B4): 64 pixels -> 64 -> 64 -> 32
TRANSFER_SIZES = {"narrow/shallow 64-32-32": [64, 32, 32], "width 128, depth 4": [64, 128, 128, 128, 32],
                  "width 64, depth 6": [64, 64, 64, 64, 64, 64, 32]}


def autoencoder_accuracy(episodes: HeldOutEpisodes, steps: int, batch: int = 32, lr: float = 1e-3) -> list[float]:
    """Backprop baseline: encoder = the base network (same init), decoder mirrors it, Adam on pixel MSE."""
    trained = []
    gen = torch.Generator().manual_seed(20_000 + episodes.seeds[0])
    rows_all = [episodes.batch_rows(batch, gen) for _ in range(steps)]  # the rules' batches, in order
    for k, seed in enumerate(episodes.seeds):
        net = BaseNet([w[k].clone().requires_grad_() for w in episodes.nets.weights],
                      [b[k].clone().requires_grad_() for b in episodes.nets.biases], [])
        torch.manual_seed(seed)
        widths = net.sizes[::-1]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(widths) - 2 else [])
        decoder = nn.Sequential(*layers)
        opt = torch.optim.Adam([*net.weights, *net.biases, *decoder.parameters()], lr=lr)
        pool = episodes.data.pool[:, episodes.perms[k]]
        for rows in rows_all:
            x = pool[rows[k]]
            loss = (decoder(representation(net, x)) - x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        trained.append(net.detach())
    stacked = stack_nets([BaseNet(n.weights, n.biases, [w.clone() for w in n.weights]) for n in trained])
    return episodes.accuracy(stacked)


def pixel_accuracy(episodes: HeldOutEpisodes) -> list[float]:
    """Ridge on the (permuted) raw pixels: what the representation is compared against."""
    d, out = episodes.data, []
    for k in range(len(episodes.seeds)):
        s = episodes.support[k]
        _, acc = ridge_meta_loss(d.pool[s], d.pool_labels[s], d.query, d.query_labels, d.num_classes)
        out.append(float(acc))
    return out


def worker_loop_probes(rule: MetzRule, rule_lr: float, seeds: list[int], rule_steps: int = 100,
                       sgd_steps: int = 200) -> dict[str, dict[str, float]]:
    """The plugin's setting: all ten classes of ``data=digits`` (its train/test split), ``rule_steps`` rule steps
    on the unlabeled train split, then three probes of the same features, averaged over ``seeds``: the
    closed-form ridge readout (the meta-objective's, fitted on the whole train split), SGD on the softmax
    readout only (``finetune=readout``) and SGD on every layer (``finetune=all``), each with the plugin's
    defaults (lr 0.05, momentum 0.9, batch 32)."""
    from localsgd.data import DigitsConfig, build
    from localsgd.learned.unsupervised import ridge_readout, step_many

    ds = build(DigitsConfig())
    x_tr, y_tr, x_te, y_te = ds.x_train, ds.y_train, ds.x_test, ds.y_test
    results: dict[str, dict[str, list[float]]] = {"random init": {}, "bundled rule": {}}
    for seed in seeds:
        net0 = stack_nets([init_base_net(BASE_SIZES, torch.Generator().manual_seed(10_000 + seed))])
        net, gen = net0, torch.Generator().manual_seed(20_000 + seed)
        with torch.no_grad():
            for _ in range(rule_steps):
                net = step_many(rule, net, x_tr[torch.randint(0, len(y_tr), (1, 32), generator=gen)], rule_lr)
        for name, stacked in (("random init", net0), ("bundled rule", net)):
            single = BaseNet([w[0] for w in stacked.weights], [b[0] for b in stacked.biases], [])
            with torch.no_grad():
                w = ridge_readout(representation(single, x_tr), y_tr, ds.num_classes)
                ridge = torch.cat([representation(single, x_te), torch.ones(len(y_te), 1)], 1) @ w
            accs = results[name]
            accs.setdefault("ridge readout", []).append(float((ridge.argmax(1) == y_te).float().mean()))
            for probe, train_all in (("SGD readout only", False), ("SGD all layers", True)):
                accs.setdefault(probe, []).append(_sgd_probe(single, x_tr, y_tr, x_te, y_te, train_all, sgd_steps,
                                                             seed))
    return {name: {probe: round(float(np.mean(v)), 4) for probe, v in accs.items()} for name, accs in results.items()}


def _sgd_probe(net: BaseNet, x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor,
               train_all: bool, steps: int, seed: int) -> float:
    torch.manual_seed(seed)
    ws = [w.clone().requires_grad_(train_all) for w in net.weights]
    bs = [b.clone().requires_grad_(train_all) for b in net.biases]
    readout = nn.Linear(ws[-1].shape[0], int(y_tr.max()) + 1)
    params = [*readout.parameters(), *((*ws, *bs) if train_all else ())]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(40_000 + seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y_tr), (32,), generator=gen)
        loss = nn.functional.cross_entropy(readout(representation(BaseNet(ws, bs, []), x_tr[idx])), y_tr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return float((readout(representation(BaseNet(ws, bs, []), x_te)).argmax(1) == y_te).float().mean())


def _summary(values: list[float], ref: list[float] | None = None) -> dict[str, Any]:
    v = np.array(values)
    out: dict[str, Any] = {"mean": round(float(v.mean()), 4), "sd": round(float(v.std(ddof=1)), 4)}
    if ref is not None:
        diff = v - np.array(ref)
        out.update({"gain_vs_init": round(float(diff.mean()), 4), "gain_sd": round(float(diff.std(ddof=1)), 4),
                    "seeds_better": int((diff > 0).sum())})
    return out


def run(quick: bool) -> dict[str, Any]:
    """Both tables (and, in full mode, the accuracy-versus-steps plot); returns the JSON figures."""
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rule, meta = load_rule()
    rule_lr = float(meta["config"]["rule_lr"])
    torch.manual_seed(1234)
    random_rule = MetzRule(rule.spec).requires_grad_(False)
    n_seeds = 10 if quick else 20
    steps = 50 if quick else 300
    seeds = list(range(n_seeds))
    curve_points = [steps] if quick else [0, 10, 25, 50, 100, 200, 300, 600]

    episodes = held_out_episodes(seeds, BASE_SIZES)
    init = episodes.accuracy(episodes.nets)
    learned_curve = rule_accuracy_curve(rule, episodes, curve_points, lr=rule_lr)
    random_curve = rule_accuracy_curve(random_rule, episodes, curve_points, lr=rule_lr)
    methods = {
        "random init": init,
        "random-θ rule": random_curve[steps],
        "bundled rule": learned_curve[steps],
        "autoencoder (backprop)": autoencoder_accuracy(episodes, steps),
        "raw pixels (no network)": pixel_accuracy(episodes),
    }
    table = {name: _summary(acc, init) for name, acc in methods.items()}
    print(f"\nHeld-out digits 5–9, 10-shot ridge accuracy after {steps} unsupervised steps, base network "
          f"{'-'.join(map(str, BASE_SIZES))}, {n_seeds} paired seeds (rule lr {rule_lr:g})")
    print(f"{'method':<26} {'accuracy':>14} {'gain vs init':>14} {'seeds better':>13}")
    for name, s in table.items():
        print(f"{name:<26} {s['mean']:>8.3f} ± {s['sd']:.3f} {s['gain_vs_init']:>+8.3f} ± {s['gain_sd']:.3f} "
              f"{s['seeds_better']:>8}/{n_seeds}")

    transfer: dict[str, Any] = {}
    print(f"\nTransfer to other architectures (meta-trained on {'-'.join(map(str, meta['config']['sizes']))}), "
          f"{steps} steps, {n_seeds} seeds")
    print(f"{'architecture':<26} {'init':>7} {'bundled rule':>13} {'gain':>8} {'seeds better':>13}")
    archs = dict(list(TRANSFER_SIZES.items())[:2]) if quick else TRANSFER_SIZES
    for name, sizes in archs.items():
        ep = held_out_episodes(seeds, sizes)
        a0 = ep.accuracy(ep.nets)
        a1 = rule_accuracy_curve(rule, ep, [steps], lr=rule_lr)[steps]
        s = _summary(a1, a0)
        transfer[name] = {"sizes": sizes, "init": _summary(a0)["mean"], "rule": s["mean"], "gain": s["gain_vs_init"],
                          "gain_sd": s["gain_sd"], "seeds_better": s["seeds_better"]}
        print(f"{name:<26} {transfer[name]['init']:>7.3f} {s['mean']:>13.3f} {s['gain_vs_init']:>+8.3f} "
              f"{s['seeds_better']:>8}/{n_seeds}")

    probe_seeds = seeds[:2] if quick else seeds[:5]
    probes = worker_loop_probes(rule, rule_lr, probe_seeds)
    print(f"\nThe worker-loop setting: all 10 classes of data=digits, 100 rule steps (the plugin's default), "
          f"then probes of the 32-dim features ({len(probe_seeds)} seeds; test accuracy)")
    print(f"{'features':<16} " + " ".join(f"{p:>18}" for p in probes["random init"]))
    for name, accs in probes.items():
        print(f"{name:<16} " + " ".join(f"{a:>18.3f}" for a in accs.values()))

    out: dict[str, Any] = {
        "benchmark": "learned_unsupervised", "quick": quick, "seeds": n_seeds, "steps": steps,
        "base_sizes": BASE_SIZES, "rule_lr": rule_lr, "methods": table, "transfer": transfer,
        "worker_loop_probes": probes,
        "gain_vs_init": table["bundled rule"]["gain_vs_init"],
        "gain_vs_random_theta": round(float(np.mean(np.array(methods["bundled rule"])
                                                    - np.array(methods["random-θ rule"]))), 4),
        "checkpoint_meta": {k: meta.get(k) for k in ("command", "seconds", "torch", "version")},
        "git": git_state(), "localsgd_source_sha256_12": source_digest(), "torch": torch.__version__,
    }
    if not quick:
        out["curve"] = {"steps": curve_points,
                        "bundled": [round(float(np.mean(learned_curve[t])), 4) for t in curve_points],
                        "random_theta": [round(float(np.mean(random_curve[t])), 4) for t in curve_points]}
        print("\nAccuracy versus unsupervised steps (bundled rule; meta-training horizons were "
              f"{meta['config']['min_horizon']}–{meta['config']['max_horizon']} steps)")
        print("  ".join(f"{t}: {a:.3f}" for t, a in zip(curve_points, out["curve"]["bundled"])))
        out["plot"] = plot(out["curve"], {"random init": table["random init"]["mean"],
                                          "raw pixels": table["raw pixels (no network)"]["mean"]}, meta)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


def plot(curve: dict[str, list[float]], references: dict[str, float], meta: dict[str, Any]) -> str:
    """Accuracy versus steps for the bundled and the random-θ rule, with horizontal reference levels."""
    plt = pyplot()

    RESULTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(curve["steps"], curve["bundled"], "o-", label="bundled rule")
    ax.plot(curve["steps"], curve["random_theta"], "s--", label="random-θ rule")
    for (name, level), style in zip(references.items(), (":", "-.")):
        ax.axhline(level, color="gray", lw=1, ls=style, label=name)
    ax.axvspan(meta["config"]["min_horizon"], meta["config"]["max_horizon"], color="C0", alpha=0.08,
               label="meta-training horizons")
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("unsupervised steps (held-out classes 5–9)")
    ax.set_ylabel("10-shot ridge accuracy")
    ax.legend(loc="center right", fontsize=8)
    ax.grid(alpha=0.3)
    path = RESULTS / "unsup_steps.png"
    save_figure(fig, path)
    return os.path.relpath(path, Path(__file__).resolve().parent)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="10 seeds, 50 steps, two transfer architectures (< 60 s)")
    args = p.parse_args(argv)
    print(json.dumps(run(args.quick)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
