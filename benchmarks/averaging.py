"""Averaging-call micro-benchmark: seconds per sync on 2 Gloo ranks.

On a CPU machine with Gloo the cost of one averaging call is dominated by latency and by the passes
over memory around the collective, not by bandwidth, so this is where a framework can win or lose
against its peers. Several ways to average the same parameters are timed on two localhost Gloo ranks
(spawned here, one intra-op thread each):

* ``ours``: ``LocalSGD(model, None, schedule=Fixed(1))`` and ``sync.step()``, which averages on every
  call. This includes everything a real sync does: the layout check, the non-finite scan, the small
  MAX all-reduce of the agreement fingerprint, the sum all-reduce of the flat buffer and the division.
* ``torch``: ``torch.distributed.algorithms.model_averaging.utils.average_parameters`` (the averager
  under ``PeriodicModelAverager`` / ``PostLocalSGDOptimizer``): ``torch.cat`` into a new flat buffer,
  divide, one blocking all-reduce, re-point the parameters at slices of that buffer.
* ``per_param``: one blocking sum all-reduce per parameter, then a division (the accelerate
  ``LocalSGD`` / torchft ``LocalSGD`` pattern).
* ``floor``: a bare all-reduce of one pre-flattened tensor with the same number of elements: no copy,
  no division, no check. Nothing that averages these parameters on Gloo can be faster.
* ``floor_avg``: the same bare all-reduce with ``ReduceOp.AVG`` (Gloo averages inside the collective
  since recent PyTorch releases; skipped where it cannot). It measures what the division alone costs
  on this backend, which every averaging method pays and ``floor`` does not: ``ours / floor_avg``
  isolates the engine's own overhead (the check, the finiteness pass, Python).
* ``guarded_avg``: ``floor_avg`` plus the work the engine's guarantees need and nothing else, written
  inline: a copy of the payload into a kept backup (a failed check must leave every replica as it
  was), the finiteness test of the payload (nothing non-finite is averaged), and check words written
  into the tail of the buffer and read back after the all-reduce. ``guarded_avg / floor_avg`` is
  what those guarantees cost on this machine; ``ours / guarded_avg`` what the engine adds beyond them
  (Python, the layout check, the bookkeeping).

Two models stress the two regimes: ``few_large`` (4 tensors, 4M floats in full mode, 1M with
``--quick``: bandwidth and memory passes) and ``many_small`` (200 tensors of 1,024 floats: per-call
and per-tensor latency).

Method: each method gets its own copy of the model (the same shapes and values per rank, different
values on the two ranks). After warm-up repetitions, the timed repetitions are interleaved: in every
repetition each method runs once, in a random order drawn anew each repetition (the same on both
ranks; a fixed rotation would keep every method behind the same predecessor, whose after-effects on
caches and on Gloo's threads then bias it), each call preceded by a barrier. A call's time is the
maximum over the ranks (one MAX all-reduce of all per-rank times at the end), and a method's time is
the median over repetitions. Ratios are ours / floor and ours / torch
(ratio of medians; the median of the per-repetition paired ratios is reported too). The issue's
targets are ours <= 1.10x the floor and <= 1.0x torch on both models.

The default link is loopback, where a bare all-reduce moves data at memory speed, so every pass over
memory that averaging needs (the division above all) weighs most. ``--link-mbit R`` instead runs the
two ranks in two network namespaces joined by a veth pair shaped to R Mbit/s by a token-bucket filter
(``tc qdisc ... tbf``; root and iproute2 needed; the namespaces are removed afterwards): a real,
if small, cluster link.

Run ``python benchmarks/averaging.py [--quick] [--link-mbit R]``; the last line of output is one JSON
object.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run against this checkout

from benchmarks.provenance import git_state, source_digest  # noqa: E402
from localsgd.testing.ranks import run_ranks  # noqa: E402

METHODS = ("ours", "ours_before", "torch", "per_param", "floor", "floor_avg", "guarded_avg")
TARGET_VS_FLOOR = 1.10
TARGET_VS_TORCH = 1.0


def model_shapes(name: str, quick: bool) -> list[tuple[int, ...]]:
    if name == "few_large":
        rows = 512 if quick else 1024
        return [(rows, 512)] * 4 if quick else [(rows, 1024)] * 4  # 1M floats quick, 4M full
    if name == "many_small":
        return [(32, 32)] * 200  # 200 x 1,024 floats
    raise ValueError(name)


def _make_model(shapes: list[tuple[int, ...]], rank: int) -> Any:
    import torch
    from torch import nn

    gen = torch.Generator().manual_seed(1234 + rank)  # different replicas on the two ranks
    model = nn.Module()
    model.weights = nn.ParameterList(nn.Parameter(torch.randn(s, generator=gen)) for s in shapes)
    return model


def _bench_model(name: str, quick: bool, warmup: int, reps: int, rank: int, world: int) -> dict[str, Any]:
    import torch
    import torch.distributed as tdist
    from torch.distributed.algorithms.model_averaging.utils import average_parameters

    from localsgd import LocalSGD
    from localsgd.engine.check_words import fused_tail_words
    from localsgd.engine.state import all_finite
    from localsgd.schedules import Fixed

    shapes = model_shapes(name, quick)
    group = tdist.group.WORLD
    ours_model = _make_model(shapes, rank)
    before_model = _make_model(shapes, rank)
    torch_model = _make_model(shapes, rank)
    per_param_model = _make_model(shapes, rank)
    n_params = sum(p.numel() for p in ours_model.parameters())
    floor_buf = torch.zeros(n_params)  # zeros: repeated unscaled sums stay finite
    floor_avg_buf = torch.randn(n_params, generator=torch.Generator().manual_seed(99 + rank))

    sync = LocalSGD(ours_model, None, schedule=Fixed(1))
    sync_before = LocalSGD(before_model, None, schedule=Fixed(1), agreement_check="before")

    def ours() -> None:
        assert sync.step()

    def ours_before() -> None:
        assert sync_before.step()

    def torch_avg() -> None:
        average_parameters(torch_model.parameters(), group)

    def per_param() -> None:
        with torch.no_grad():
            for p in per_param_model.parameters():
                tdist.all_reduce(p.data, group=group)
                p.data.div_(world)

    def floor() -> None:
        tdist.all_reduce(floor_buf, group=group)

    def floor_avg() -> None:
        tdist.all_reduce(floor_avg_buf, op=tdist.ReduceOp.AVG, group=group)

    tail_words = fused_tail_words(world)
    guarded_buf = torch.randn(n_params + tail_words, generator=torch.Generator().manual_seed(99 + rank))
    guarded_backup = torch.empty_like(guarded_buf)
    words = torch.zeros(tail_words)

    def guarded_avg() -> None:
        guarded_backup.copy_(guarded_buf)
        if not all_finite(guarded_buf[:n_params]):
            raise AssertionError("guarded_avg: the benchmark's payload went non-finite")
        guarded_buf[n_params:].copy_(words)
        tdist.all_reduce(guarded_buf, op=tdist.ReduceOp.AVG, group=group)
        guarded_buf[n_params:].tolist()

    calls = {"ours": ours, "ours_before": ours_before, "torch": torch_avg, "per_param": per_param,
             "floor": floor, "floor_avg": floor_avg, "guarded_avg": guarded_avg}
    methods = list(METHODS)
    try:
        floor_avg()
    except RuntimeError:  # an older Gloo without ReduceOp.AVG rejects it on every rank before sending
        methods.remove("floor_avg")
        methods.remove("guarded_avg")

    # Sanity: the averaging methods agree after their first call.
    for m in ("ours", "ours_before", "torch", "per_param"):
        calls[m]()
    ref = torch.cat([p.detach().reshape(-1) for p in torch_model.parameters()])
    for m, model in (("ours", ours_model), ("ours_before", before_model), ("per_param", per_param_model)):
        got = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        if not torch.allclose(got, ref, atol=1e-5):
            raise AssertionError(f"{name}: {m} does not average like torch's average_parameters")

    for _ in range(warmup):
        for m in methods:
            tdist.barrier()
            calls[m]()
    order = torch.Generator().manual_seed(2024)  # the same seed on every rank: the same order
    times = torch.zeros(len(methods), reps, dtype=torch.float64)
    for r in range(reps):
        for i in torch.randperm(len(methods), generator=order).tolist():
            tdist.barrier()
            t0 = time.perf_counter()
            calls[methods[i]]()
            times[i, r] = time.perf_counter() - t0
    tdist.all_reduce(times, op=tdist.ReduceOp.MAX)  # a call lasts until the slowest rank is done
    per_method = {m: times[i].tolist() for i, m in enumerate(methods)}
    return {"n_params": n_params, "n_tensors": len(shapes), "times": per_method,
            "ours_stats_rounds": sync.stats.rounds}


class ShapedLink:
    """Two network namespaces joined by a veth pair, each end shaped to ``rate_mbit`` by a tbf qdisc."""

    SUBNET = "10.231.77"

    def __init__(self, rate_mbit: float, mtu: int | None = None) -> None:
        tag = f"{os.getpid() % 100000}"
        self.mtu = mtu  # None: the veth default (1500); 9000: jumbo frames, as cluster links use
        self.names = [f"lsgdb{tag}a", f"lsgdb{tag}b"]
        self.ifaces = [f"lsgv{tag}a", f"lsgv{tag}b"]
        self.addrs = [f"{self.SUBNET}.1", f"{self.SUBNET}.2"]
        self.rate_mbit = rate_mbit

    def __enter__(self) -> ShapedLink:
        rate_bytes = self.rate_mbit * 1e6 / 8
        burst = max(32_000, int(rate_bytes / 1000))  # 1 ms of traffic: small messages are shaped too
        cmds = [["ip", "netns", "add", n] for n in self.names]
        cmds.append(["ip", "link", "add", self.ifaces[0], "type", "veth", "peer", "name", self.ifaces[1]])
        mtu = self.mtu
        for ns, iface, addr in zip(self.names, self.ifaces, self.addrs):
            cmds += [["ip", "link", "set", iface, "netns", ns],
                     ["ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", iface],
                     *([["ip", "-n", ns, "link", "set", iface, "mtu", str(mtu)]] if mtu else []),
                     ["ip", "-n", ns, "link", "set", iface, "up"],
                     ["ip", "-n", ns, "link", "set", "lo", "up"],
                     ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", iface, "root", "tbf",
                      "rate", f"{self.rate_mbit}mbit", "burst", str(burst), "latency", "100ms"]]
        try:
            for cmd in cmds:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            self.__exit__()
            detail = getattr(exc, "stderr", "") or str(exc)
            raise RuntimeError(f"--link-mbit needs root and iproute2 (ip netns, veth, tc tbf): "
                               f"{' '.join(map(str, getattr(exc, 'cmd', [])))} failed: {detail.strip()}") from exc
        return self

    def __exit__(self, *exc: object) -> None:
        for ns in self.names:  # deleting a namespace deletes its end of the veth pair, and so the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)

    @property
    def master_addr(self) -> str:
        return self.addrs[0]  # rank 0's end of the link hosts the rendezvous

    def enter(self, rank: int) -> None:
        """Put this rank's process on its end of the link (``run_ranks``'s ``prepare_rank``)."""
        _enter_netns(self.names[rank])
        os.environ["GLOO_SOCKET_IFNAME"] = self.ifaces[rank]


def _enter_netns(name: str) -> None:
    """Move this process's main thread into network namespace ``name``, before it opens a socket.

    A namespace belongs to a thread, and threads inherit it when they are created: Gloo's and the
    rendezvous store's threads, started later from the main thread, are on the link too.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    with open(f"/var/run/netns/{name}") as f:
        if libc.setns(f.fileno(), 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name} failed")


def _bench_models(rank: int, world: int, quick: bool, warmup: int, reps: int, models: list[str]) -> dict[str, Any]:
    return {name: _bench_model(name, quick, warmup, reps, rank, world) for name in models}


def run(quick: bool, warmup: int, reps: int, models: list[str], timeout_s: float,
        link: ShapedLink | None = None) -> dict[str, Any]:
    # The ranks inherit this before they import torch: one intra-op thread each from the start.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    where = {} if link is None else {"master_addr": link.master_addr, "prepare_rank": link.enter}
    out = run_ranks(_bench_models, 2, quick, warmup, reps, models, timeout_s=timeout_s,
                    collective_timeout_s=120.0, **where)
    errors = [f"rank {r}: {v}" for r, (s, v) in enumerate(out) if s != "ok"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return out[0][1]


def summarise(raw: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for name, res in raw.items():
        t = res["times"]
        med = {m: statistics.median(t[m]) for m in t}
        paired_floor = statistics.median(a / b for a, b in zip(t["ours"], t["floor"]))
        paired_torch = statistics.median(a / b for a, b in zip(t["ours"], t["torch"]))
        avg = {}
        if "floor_avg" in t:
            avg = {"floor_avg_vs_floor": med["floor_avg"] / med["floor"],
                   "ratio_vs_floor_avg": med["ours"] / med["floor_avg"],
                   "paired_ratio_vs_floor_avg": statistics.median(a / b for a, b in zip(t["ours"], t["floor_avg"])),
                   "guarded_vs_floor_avg": med["guarded_avg"] / med["floor_avg"],
                   "ratio_vs_guarded_avg": med["ours"] / med["guarded_avg"]}
        out[name] = {
            "n_params": res["n_params"],
            "n_tensors": res["n_tensors"],
            "seconds": med,
            "seconds_p25_p75": {m: list(statistics.quantiles(t[m], n=4)[::2]) for m in t},
            "ratio_vs_floor": med["ours"] / med["floor"],
            "ratio_vs_torch": med["ours"] / med["torch"],
            "ratio_vs_per_param": med["ours"] / med["per_param"],
            "before_ratio_vs_floor": med["ours_before"] / med["floor"],
            "before_ratio_vs_torch": med["ours_before"] / med["torch"],
            "torch_vs_floor": med["torch"] / med["floor"],
            "paired_ratio_vs_floor": paired_floor,
            "paired_ratio_vs_torch": paired_torch,
            **avg,
        }
    return out


def _worst(models: dict[str, Any], key: str) -> float | None:
    values = [d[key] for d in models.values() if key in d]
    return max(values) if values else None


def table(models: dict[str, Any]) -> str:
    head = f"{'model':<11} {'params':>9} {'tensors':>7} " + " ".join(f"{m + ' ms':>13}" for m in METHODS)
    head += f" {'ours/floor':>10} {'ours/torch':>10} {'bef/floor':>10} {'bef/torch':>10}"
    head += f" {'avg/floor':>10} {'ours/avg':>10} {'grd/avg':>10} {'ours/grd':>10}"
    lines = [head, "-" * len(head)]
    for name, d in models.items():
        ms = " ".join(f"{1e3 * d['seconds'][m]:>13.3f}" if m in d["seconds"] else f"{'-':>13}" for m in METHODS)
        avg = (f" {d['floor_avg_vs_floor']:>10.3f} {d['ratio_vs_floor_avg']:>10.3f}"
               f" {d['guarded_vs_floor_avg']:>10.3f} {d['ratio_vs_guarded_avg']:>10.3f}" if "ratio_vs_floor_avg" in d
               else f" {'-':>10} {'-':>10} {'-':>10} {'-':>10}")
        lines.append(f"{name:<11} {d['n_params']:>9} {d['n_tensors']:>7} {ms} "
                     f"{d['ratio_vs_floor']:>10.3f} {d['ratio_vs_torch']:>10.3f} "
                     f"{d['before_ratio_vs_floor']:>10.3f} {d['before_ratio_vs_torch']:>10.3f}{avg}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1M-float few_large, fewer repetitions (<60 s)")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per method and model")
    ap.add_argument("--warmup", type=int, default=None, help="untimed repetitions per method and model")
    ap.add_argument("--models", default="few_large,many_small", help="comma-separated: few_large,many_small")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds before the ranks are killed")
    ap.add_argument("--link-mbit", type=float, default=0.0,
                    help="run the ranks in two network namespaces over a veth link shaped to this many Mbit/s "
                         "(root; default 0: loopback)")
    args = ap.parse_args(argv)
    reps = args.reps or (60 if args.quick else 300)
    warmup = args.warmup if args.warmup is not None else (5 if args.quick else 20)
    models = [m for m in args.models.split(",") if m]
    for m in models:
        model_shapes(m, args.quick)

    import torch

    code = source_digest(), git_state()  # before measuring: the code that is imported now
    start = time.perf_counter()
    if args.link_mbit > 0:
        with ShapedLink(args.link_mbit) as link:
            raw = run(args.quick, warmup, reps, models, args.timeout, link)
        where = f"over a veth link shaped to {args.link_mbit:g} Mbit/s between two network namespaces"
    else:
        raw = run(args.quick, warmup, reps, models, args.timeout)
        where = "on localhost (loopback)"
    models_out = summarise(raw)
    print(f"seconds per sync, 2 Gloo ranks {where}, 1 thread each; median of {reps} repetitions in "
          f"random order after {warmup} warm-up (per repetition: max over ranks); torch {torch.__version__}")
    print(table(models_out))
    worst_floor = max(d["ratio_vs_floor"] for d in models_out.values())
    worst_torch = max(d["ratio_vs_torch"] for d in models_out.values())
    print(f"worst ours/floor = {worst_floor:.3f} (target <= {TARGET_VS_FLOOR}): "
          f"{'met' if worst_floor <= TARGET_VS_FLOOR else 'NOT met'}")
    print(f"worst ours/torch = {worst_torch:.3f} (target <= {TARGET_VS_TORCH}): "
          f"{'met' if worst_torch <= TARGET_VS_TORCH else 'NOT met'}")
    print("ours = sync.agreement_check=fused (default: the check rides in the average); "
          "bef = before (a separate check collective first)")
    result = {
        "benchmark": "averaging",
        "quick": args.quick,
        "ratio_vs_floor": worst_floor,
        "ratio_vs_torch": worst_torch,
        "target_vs_floor": TARGET_VS_FLOOR,
        "target_vs_torch": TARGET_VS_TORCH,
        "meets_floor_target": worst_floor <= TARGET_VS_FLOOR,
        "meets_torch_target": worst_torch <= TARGET_VS_TORCH,
        "before_ratio_vs_floor": max(d["before_ratio_vs_floor"] for d in models_out.values()),
        "before_ratio_vs_torch": max(d["before_ratio_vs_torch"] for d in models_out.values()),
        # what the division alone costs on this backend (a bare AVG all-reduce over the bare SUM one),
        # and ours over that: the engine's own overhead; None where the backend has no AVG
        "floor_avg_vs_floor": _worst(models_out, "floor_avg_vs_floor"),
        "ratio_vs_floor_avg": _worst(models_out, "ratio_vs_floor_avg"),
        # what the guarantees alone cost over the bare AVG (backup, finiteness test, check words), and
        # ours over that: the engine beyond its guarantees
        "guarded_vs_floor_avg": _worst(models_out, "guarded_vs_floor_avg"),
        "ratio_vs_guarded_avg": _worst(models_out, "ratio_vs_guarded_avg"),
        "world_size": 2,
        "link_mbit": args.link_mbit or None,  # None: loopback
        "localsgd_source_sha256_12": code[0],
        "git": code[1],
        "backend": "gloo",
        "torch": torch.__version__,
        "reps": reps,
        "warmup": warmup,
        "wall_seconds": round(time.perf_counter() - start, 2),
        "models": models_out,
    }
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
