"""Local SGD on a slow link: ours (blocking, streaming, compressed, both) against every peer.

Two ranks run in two network namespaces joined by a veth pair whose ends are shaped to
``--link-mbit`` with ``tc tbf`` (the ``ShapedLink`` of ``benchmarks/averaging.py``; root and
iproute2 needed; the namespaces are removed on exit). Every contender trains the same 1.1M-parameter
MLP (40 -> 1024 -> 1024 -> 10, 4.4 MB of fp32) on MNIST-1D with the same inner optimizer, seeds,
per-rank batch draws and number of steps, at H = 16 local steps per round:

- ``floor``: no communication at all (the compute floor);
- ``ddp``: torch ``DistributedDataParallel`` (one gradient all-reduce per step). It is timed on the
  link for ``--ddp-steps`` steps only (at 100 Mbit/s each step costs about 0.4 s); its accuracy per step
  is computed in one process on the two ranks' batches together, which is the same update (the mean
  of two equal-size batch means is the mean over their union);
- ``torch_averager``: ``torch.distributed.algorithms.model_averaging.PeriodicModelAverager``;
- ``accelerate_localsgd``: ``accelerate.local_sgd.LocalSGD``;
- ``torchft_localsgd``, ``torchft_diloco`` and ``torchft_streaming_diloco``: torchft's ``LocalSGD``
  and ``DiLoCo`` (each rank a replica group of one, Gloo, a lighthouse in rank 0's namespace), and
  two streaming ``DiLoCo`` settings (its fragments are modules: the MLP's middle layer holds 95 % of
  the parameters, so F = 2 is {fc2} and {fc1, fc3}, with tau = 7; and F = 1 with tau = 15);
- ``ours_*``: :class:`localsgd.LocalSGD` blocking, streaming (Douillard et al. 2025, "Streaming
  DiLoCo", arXiv 2501.18512: F fragments, each all-reduced asynchronously at its own offset and applied
  tau steps later, mixed with weight alpha), compressed (int8 blocks of 256 with error feedback; Seide
  et al. 2014, Karimireddy et al. 2019, arXiv 1901.09847) and both; and the DiLoCo variants (Nesterov
  outer step, lr 0.7, momentum 0.9; Douillard et al. 2023, arXiv 2311.08105). The streaming ones use
  F = 4, tau = 3 (a fragment's code then has 3 steps to cross a 100 Mbit/s link) except
  ``ours_streaming_compressed_f1`` and ``..._int4_f1``, the setting for a fast link: the whole model as one fragment,
  applied tau = 2 steps after it leaves (at 1 Gbit/s its code lands within a step, and one sync a
  round pays the fixed costs of a collective and its coding once instead of F times). The block codes run in
  the native codec (``localsgd.engine.native_codec``) where it builds; the ``*_torchcodec`` contenders
  run the same int8 and int4 streaming on the torch path (the same bits), so what the fused C pass buys
  is measured inside one run.

The peers are an optional extra (``pip install -e '.[bench]'``); a peer that is not installed is
skipped and named. Per repetition the contenders run in a seeded random order (interleaved, so a
noisy moment hurts no one contender), each repetition with its own seed; the figures are medians over
repetitions (accuracy: means). Per contender: ms per step (the slower rank's wall time over the steps,
the final sync included), its ratio to the compute floor and the time beyond it, final test accuracy
(rank 0's replica, after the final sync), the wall seconds until the test accuracy first reaches the
target (evaluated after training on snapshots taken every round; the snapshot time is not counted),
and the bytes the two ranks' link interfaces sent (``/proc/self/net/dev``: payload, scales, checks,
rendezvous, RPCs and TCP/IP headers).

Run ``python benchmarks/slowlink.py [--quick] [--link-mbit 100]``; ``--no-link`` runs on loopback
(no root; only accuracy and plumbing mean anything there). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run against this checkout

from benchmarks.averaging import ShapedLink  # noqa: E402
from benchmarks.provenance import git_state, source_digest  # noqa: E402
from localsgd.testing.ranks import free_port, run_ranks  # noqa: E402

H = 16
# 128 samples per rank: one step then takes about as long as in the measurement that asked for this
# benchmark (23.6 ms with no communication), so a 16-step round has ~0.4 s of compute to hide a sync in
BATCH = 128
LR, MOMENTUM = 0.05, 0.9
OUTER_LR, OUTER_MOMENTUM = 0.7, 0.9
NUM_SAMPLES, DATA_SEED = 10000, 42
WIDTH = 1024

# name -> (kind, options). "peer" kinds need their package; the blocking peers are the ones
# speedup_vs_best_peer compares with.
# ours streaming: F = 4 fragments, each applied tau = 3 steps after it leaves (the most H/F = 4 allows),
# added to the progress made meanwhile (merge=progress); Streaming DiLoCo's alpha-mix is --merge mix --mix A
STREAMING = {"fragments": 4, "delay": 3, "mix": 0.0, "merge": "progress"}
# for a fast link: the whole model as one fragment, applied tau = 2 steps after it leaves. At 1 Gbit/s its
# int8 code (1.1 MB, ~9 ms) lands within a step, and one sync a round pays the per-collective costs
# (Gloo's launch, the coding passes) once instead of F times; at 100 Mbit/s (~90 ms) it would wait
STREAMING_ONE = {"fragments": 1, "delay": 2, "mix": 0.0, "merge": "progress"}
CONTENDERS: dict[str, tuple[str, dict[str, Any]]] = {
    "floor": ("floor", {}),
    "ddp": ("ddp", {}),
    "torch_averager": ("torch", {}),
    "accelerate_localsgd": ("accelerate", {}),
    "torchft_localsgd": ("torchft_localsgd", {}),
    "torchft_diloco": ("torchft_diloco", {"fragments": 1, "delay": 0}),
    # its fragments are modules: F = 2 is {fc2} (95 % of the parameters) and {fc1, fc3}; F = 1 with
    # tau = H - 1 overlaps the whole model's average with the next 15 steps
    "torchft_streaming_diloco": ("torchft_diloco", {"fragments": 2, "delay": 7, "mix": 0.5}),
    "torchft_streaming_diloco_f1": ("torchft_diloco", {"fragments": 1, "delay": 15, "mix": 0.5}),
    "ours_blocking": ("ours", {}),
    "ours_streaming": ("ours", dict(STREAMING)),
    "ours_compressed": ("ours", {"compress": "int8"}),
    "ours_streaming_compressed": ("ours", {**STREAMING, "compress": "int8"}),
    "ours_streaming_compressed_int4": ("ours", {**STREAMING, "compress": "int4"}),
    "ours_streaming_compressed_f1": ("ours", {**STREAMING_ONE, "compress": "int8"}),
    "ours_streaming_compressed_int4_f1": ("ours", {**STREAMING_ONE, "compress": "int4"}),
    "ours_diloco": ("ours", {"outer": True}),
    "ours_streaming_compressed_diloco": ("ours", {**STREAMING, "compress": "int8", "outer": True}),
    # the same two runs with the block codes on the torch path instead of the native codec (the same bits):
    # what the fused C pass buys, measured inside one run, interleaved with the others
    "ours_streaming_compressed_torchcodec": ("ours", {**STREAMING, "compress": "int8", "codec": "torch"}),
    "ours_streaming_compressed_int4_torchcodec": ("ours", {**STREAMING, "compress": "int4", "codec": "torch"}),
}
BLOCKING_PEERS = ("torch_averager", "accelerate_localsgd", "torchft_localsgd", "torchft_diloco")
PEER_PACKAGES = {"accelerate": "accelerate", "torchft_localsgd": "torchft", "torchft_diloco": "torchft"}
QUICK = ("floor", "ddp", "torch_averager", "torchft_diloco", "ours_blocking", "ours_streaming_compressed")
# ms per step in forward + backward, optimizer.step and the sync call; the final sync (ms, once); and of
# the sync call, ms per step blocked on a fragment still in flight (ours streaming only)
PHASES = ("ms_forward_backward", "ms_optimizer_step", "ms_sync_call", "ms_final_sync", "ms_waiting")
# The targets of the issue that asked for this benchmark (100 Mbit/s unless noted).
TARGETS = {"ratio_vs_compute_floor": 1.15, "ratio_vs_compute_floor_1gbit": 1.05, "speedup_vs_best_peer": 1.7,
           "speedup_vs_streaming_peer": 1.0, "speedup_to_target_vs_ddp": 5.0, "accuracy_delta_vs_blocking": -0.5}


# ----------------------------------------------------------------------------------------- the task
def make_model() -> Any:
    from torch import nn

    return nn.Sequential(nn.Linear(40, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))


def load_data() -> tuple[Any, Any, Any, Any]:
    """MNIST-1D (generated, cached): the first 80 % train, the rest test, as ``data=mnist1d`` splits."""
    import torch

    from localsgd.data.mnist1d import load_arrays

    x, y = load_arrays(NUM_SAMPLES, DATA_SEED)
    split = int(len(y) * 0.8)
    xt, yt = torch.from_numpy(x).float(), torch.from_numpy(y).long()
    return xt[:split], yt[:split], xt[split:], yt[split:]


def batch_indices(seed: int, rank: int, steps: int, n_train: int) -> Any:
    """Rank ``rank``'s batch draws for a run: the same for every contender with this seed."""
    import torch

    g = torch.Generator().manual_seed(seed * 1009 + rank)
    return torch.randint(n_train, (steps, BATCH), generator=g)


def accuracy(model: Any, flat: Any, x: Any, y: Any) -> float:
    import torch

    torch.nn.utils.vector_to_parameters(flat, model.parameters())
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100.0


def tx_bytes(iface: str | None) -> int:
    """Bytes this process's network namespace sent on ``iface`` (loopback: the ``lo`` counter)."""
    name = iface or "lo"
    with open("/proc/self/net/dev") as f:
        for line in f:
            head, _, rest = line.partition(":")
            if head.strip() == name:
                return int(rest.split()[8])
    return 0


# ------------------------------------------------------------------------------------ the contenders
class Contender:
    """One training run's communication: ``step(loss)`` after the optimizer step, ``finish()`` at the end.

    ``model`` is what the loop calls forward on (a wrapper for DDP and accelerate).
    """

    def __init__(self, model: Any, optimizer: Any) -> None:
        self.model, self.optimizer = model, optimizer
        self.stack = contextlib.ExitStack()

    def step(self, loss: Any) -> None:
        pass

    def finish(self) -> None:
        self.stack.close()


class DDPRun(Contender):
    def __init__(self, model: Any, optimizer: Any) -> None:
        from torch.nn.parallel import DistributedDataParallel

        super().__init__(DistributedDataParallel(model), optimizer)


class TorchAveragerRun(Contender):
    def __init__(self, model: Any, optimizer: Any) -> None:
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

        super().__init__(model, optimizer)
        self.params = list(model.parameters())
        self.averager = PeriodicModelAverager(period=H, warmup_steps=0)
        self.averager.step = 1  # its first round would otherwise be one step long (it averages at step 0)

    def step(self, loss: Any) -> None:
        self.averager.average_parameters(self.params)
        self.steps = getattr(self, "steps", 0) + 1

    def finish(self) -> None:  # it has no final sync: average a partial last round, as the others do
        import torch
        import torch.distributed as tdist

        if self.steps % H == 0:
            return  # the last step averaged
        with torch.no_grad():
            flat = torch.nn.utils.parameters_to_vector(self.params)
            tdist.all_reduce(flat)
            torch.nn.utils.vector_to_parameters(flat / tdist.get_world_size(), self.params)


class AccelerateRun(Contender):
    def __init__(self, model: Any, optimizer: Any) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.local_sgd import LocalSGD as AccelerateLocalSGD

        accelerator = Accelerator(cpu=True)
        torch.set_num_threads(1)  # accelerate may set its own count; every contender runs on one thread
        wrapped, optimizer = accelerator.prepare(model, optimizer)
        super().__init__(wrapped, optimizer)
        self.local = self.stack.enter_context(
            AccelerateLocalSGD(accelerator=accelerator, model=wrapped, local_sgd_steps=H, enabled=True))

    def step(self, loss: Any) -> None:
        self.local.step()


class TorchftRun(Contender):
    """A torchft Manager for this rank (a replica group of one) and its LocalSGD or DiLoCo."""

    def __init__(self, model: Any, optimizer: Any, *, kind: str, addr: str, lighthouse: str,
                 fragments: int = 1, delay: int = 0, mix: float = 0.0) -> None:
        import torch
        from torch.distributed import TCPStore
        from torchft import Manager, ProcessGroupGloo
        from torchft.local_sgd import DiLoCo, LocalSGD

        super().__init__(model, optimizer)
        timeout = datetime.timedelta(seconds=120)
        port = free_port(addr)
        self.store = TCPStore(addr, port, is_master=True, wait_for_workers=False)
        self.manager = Manager(
            pg=ProcessGroupGloo(timeout=timeout), load_state_dict=None, state_dict=None, min_replica_size=2,
            use_async_quorum=kind == "torchft_localsgd", timeout=timeout, quorum_timeout=timeout,
            connect_timeout=timeout, rank=0, world_size=1, store_addr=addr, store_port=port,
            lighthouse_addr=lighthouse, replica_id=f"replica{_rank()}", hostname=addr, init_sync=False)
        self.stack.callback(self.manager.shutdown, wait=False)
        if kind == "torchft_localsgd":
            self.stack.enter_context(LocalSGD(self.manager, model, optimizer, sync_every=H))
            return
        layers = [m for m in model if isinstance(m, torch.nn.Linear)]
        parts = [model] if fragments == 1 else [layers[1], torch.nn.ModuleList([layers[0], layers[2]])]
        if fragments not in (1, 2):
            raise ValueError("torchft streaming: the MLP splits into 1 or 2 module fragments")
        outers = [torch.optim.SGD(p.parameters(), lr=OUTER_LR, momentum=OUTER_MOMENTUM, nesterov=True)
                  for p in parts]
        self.stack.enter_context(DiLoCo(self.manager, parts, optimizer, outers, sync_every=H,
                                        fragment_sync_delay=delay, fragment_update_alpha=mix))


class OursRun(Contender):
    def __init__(self, model: Any, optimizer: Any, *, outer: bool = False, codec: str = "native",
                 **streaming: Any) -> None:
        from localsgd import LocalSGD
        from localsgd.engine import native_codec
        from localsgd.outer import NesterovOuter
        from localsgd.schedules import Fixed

        super().__init__(model, optimizer)
        # codec="torch": the block codes on the torch path for this contender (restored in finish)
        self.saved_env = os.environ.get(native_codec.ENV)
        if codec == "torch":
            os.environ[native_codec.ENV] = "0"
            native_codec.reset()
        self.local = LocalSGD(model, optimizer, Fixed(H), outer=NesterovOuter(OUTER_LR, OUTER_MOMENTUM) if outer
                              else None, **streaming)
        sync = self.local.streaming
        self.codec_path = sync.codec_path if sync is not None else ""
        assert codec != "torch" or self.codec_path == f"{native_codec.ENV}=0", self.codec_path

    def step(self, loss: Any) -> None:
        self.local.step(loss)

    def finish(self) -> None:
        from localsgd.engine import native_codec

        self.wait_seconds = self.local.stats.wait_seconds  # in the steps' sync calls, not the final sync
        self.local.finalize()
        if os.environ.get(native_codec.ENV) != self.saved_env:
            if self.saved_env is None:
                del os.environ[native_codec.ENV]
            else:
                os.environ[native_codec.ENV] = self.saved_env
            native_codec.reset()


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


# --------------------------------------------------------------------------------- one rank's work
def _start_lighthouse(addr: str) -> tuple[Any, str]:
    """Rank 0: a torchft lighthouse in this namespace; every rank gets its address."""
    import torch.distributed as tdist

    server, address = None, [""]
    if _rank() == 0:
        from torchft._torchft import LighthouseServer

        port = free_port(addr)
        server = LighthouseServer(bind=f"[::]:{port}", min_replicas=2)
        address = [f"http://{addr}:{port}"]
    tdist.broadcast_object_list(address, src=0)
    return server, address[0]


def _train(kind: str, options: dict[str, Any], seed: int, steps: int, data: tuple[Any, ...], addr: str,
           iface: str | None) -> dict[str, Any]:
    import torch
    import torch.distributed as tdist
    from torch.nn import functional as fn

    x_train, y_train, _, _ = data
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    server = None
    if kind.startswith("torchft"):
        server, lighthouse = _start_lighthouse(addr)
        run: Contender = TorchftRun(model, optimizer, kind=kind, addr=addr, lighthouse=lighthouse, **options)
    else:
        build: dict[str, Callable[..., Contender]] = {
            "floor": Contender, "ddp": DDPRun, "torch": TorchAveragerRun, "accelerate": AccelerateRun,
            "ours": OursRun}
        run = build[kind](model, optimizer, **options)
    idx = batch_indices(seed, _rank(), steps, len(y_train))
    snapshots: list[tuple[int, float, Any]] = []
    excluded = 0.0
    tdist.barrier()
    tx0, start = tx_bytes(iface), time.perf_counter()
    phases = [0.0, 0.0, 0.0]  # forward + backward, optimizer.step (torchft syncs in its hook), the sync call
    clock = time.perf_counter
    for t in range(steps):
        t0 = clock()
        xb, yb = x_train[idx[t]], y_train[idx[t]]
        optimizer.zero_grad(set_to_none=True)
        loss = fn.cross_entropy(run.model(xb), yb)
        loss.backward()
        t1 = clock()
        optimizer.step()
        t2 = clock()
        run.step(loss.detach())
        t3 = clock()
        phases[0] += t1 - t0
        phases[1] += t2 - t1
        phases[2] += t3 - t2
        if (t + 1) % H == 0 and t + 1 < steps:
            mark = time.perf_counter()
            snapshots.append((t + 1, mark - start - excluded, torch.nn.utils.parameters_to_vector(model.parameters())
                              .detach().clone()))
            excluded += time.perf_counter() - mark
    mark = clock()
    run.finish()
    final = clock() - mark
    wall = time.perf_counter() - start - excluded
    sent = tx_bytes(iface) - tx0
    snapshots.append((steps, wall, torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()))
    tdist.barrier()
    if server is not None:
        server.shutdown()
    return {"wall": wall, "sent": sent, "snapshots": snapshots, "phases": [*phases, final],
            "wait": getattr(run, "wait_seconds", 0.0)}


def _ddp_trajectory(seed: int, steps: int, data: tuple[Any, ...]) -> list[tuple[int, Any]]:
    """DDP's iterates, computed in one process: each step on the union of the two ranks' batches."""
    import torch
    from torch.nn import functional as fn

    x_train, y_train, _, _ = data
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    idx = torch.cat([batch_indices(seed, r, steps, len(y_train)) for r in range(2)], dim=1)
    out = []
    for t in range(steps):
        optimizer.zero_grad(set_to_none=True)
        fn.cross_entropy(model(x_train[idx[t]]), y_train[idx[t]]).backward()
        optimizer.step()
        if (t + 1) % H == 0 or t + 1 == steps:
            out.append((t + 1, torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()))
    return out


def _bench_rank(rank: int, world: int, plan: list[tuple[int, str, str, dict[str, Any]]], steps: int, ddp_steps: int,
                addrs: list[str], ifaces: list[str | None]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    data = load_data()
    runs = []
    for seed, name, kind, options in plan:
        n = ddp_steps if name == "ddp" else steps
        res = _train(kind, options, seed, n, data, addrs[rank], ifaces[rank])
        runs.append({"name": name, "seed": seed, "steps": n, "wall": res["wall"], "sent": res["sent"],
                     "phases": [*res["phases"], res["wait"]],
                     "snapshots": res["snapshots"] if rank == 0 else None})
    if rank != 0:
        return {"runs": [{k: v for k, v in r.items() if k != "snapshots"} for r in runs]}
    # evaluate after all timing: test accuracy of rank 0's replica at each snapshot
    _, _, x_test, y_test = data
    model = make_model()
    for r in runs:
        r["curve"] = [(t, clock, accuracy(model, flat, x_test, y_test)) for t, clock, flat in r.pop("snapshots")]
    for seed in sorted({p[0] for p in plan}):
        if any(p[1] == "ddp" for p in plan):
            runs.append({"name": "ddp_trajectory", "seed": seed, "curve": [
                (t, None, accuracy(model, flat, x_test, y_test)) for t, flat in _ddp_trajectory(seed, steps, data)]})
    return {"runs": runs}


# ------------------------------------------------------------------------------------------ summary
def summarise(ranks: list[dict[str, Any]], names: list[str], steps: int, target_acc: float | None,
              link_mbit: float | None) -> dict[str, Any]:
    """Per contender: medians over repetitions of the slower rank's figures; accuracy means over seeds."""
    by_rank = [r["runs"] for r in ranks]
    runs0 = [r for r in by_rank[0] if r["name"] != "ddp_trajectory"]
    ddp_curves = {r["seed"]: r["curve"] for r in by_rank[0] if r["name"] == "ddp_trajectory"}
    per: dict[str, dict[str, Any]] = {}
    for i, r in enumerate(runs0):
        walls = [by_rank[k][i]["wall"] for k in range(len(by_rank))]
        d = per.setdefault(r["name"], {"ms": [], "sent": [], "acc": {}, "curve": {}, "steps": r["steps"],
                                       "phases": []})
        d["ms"].append(max(walls) / r["steps"] * 1e3)
        phases = [statistics.mean(by_rank[k][i]["phases"][j] for k in range(len(by_rank))) for j in range(5)]
        d["phases"].append([v / r["steps"] * 1e3 for v in phases[:3]] + [phases[3] * 1e3, phases[4] / r["steps"] * 1e3])
        d["sent"].append(sum(by_rank[k][i]["sent"] for k in range(len(by_rank))))
        d["acc"][r["seed"]] = r["curve"][-1][2]
        d["curve"][r["seed"]] = r["curve"]
    if "ddp" in per:  # DDP: ms/step on the link over its short run, accuracy from the in-process trajectory
        ms = statistics.median(per["ddp"]["ms"])
        per["ddp"]["acc"] = {s: c[-1][2] for s, c in ddp_curves.items()}
        per["ddp"]["curve"] = {s: [(t, t * ms / 1e3, a) for t, _, a in c] for s, c in ddp_curves.items()}
        per["ddp"]["sent"] = [b / per["ddp"]["steps"] * steps for b in per["ddp"]["sent"]]  # scaled to `steps`
    blocking_acc = per.get("ours_blocking", {}).get("acc", {})
    target = target_acc
    if target is None and blocking_acc:
        target = round(0.95 * statistics.mean(blocking_acc.values()), 2)
    out: dict[str, Any] = {}
    floor_ms = statistics.median(per["floor"]["ms"]) if "floor" in per else None
    for name in names:
        if name not in per:
            continue
        d = per[name]
        ms = statistics.median(d["ms"])
        # per seed, the first snapshot at or above the target (inf: never, within the run)
        reach = [next((clock for _, clock, a in c if target is not None and a >= target), math.inf)
                 for c in d["curve"].values()]
        reach_median = statistics.median(reach)
        deltas = [d["acc"][s] - blocking_acc[s] for s in d["acc"] if s in blocking_acc]
        out[name] = {
            "ms_per_step": round(ms, 2),
            "ms_per_step_reps": [round(v, 2) for v in d["ms"]],
            "ratio_vs_compute_floor": round(ms / floor_ms, 3) if floor_ms else None,
            "ms_beyond_compute": round(ms - floor_ms, 2) if floor_ms else None,
            "test_accuracy": round(statistics.mean(d["acc"].values()), 2),
            "test_accuracy_seeds": {str(s): round(a, 2) for s, a in sorted(d["acc"].items())},
            "accuracy_delta_vs_blocking": round(statistics.mean(deltas), 2) if deltas else None,
            "seconds_to_target": round(reach_median, 2) if math.isfinite(reach_median) else None,
            "seeds_reaching_target": sum(math.isfinite(v) for v in reach),
            "mb_sent": round(statistics.median(d["sent"]) / 1e6, 2),
            # where the time goes (ms per step, mean over ranks, median over repetitions; the final sync in ms)
            **{key: round(statistics.median(p[j] for p in d["phases"]), 2) for j, key in enumerate(PHASES)},
            "curve": d["curve"][min(d["curve"])],  # the first seed's (step, seconds, accuracy), for the plot
        }
    peers = [n for n in BLOCKING_PEERS if n in out]
    best_peer_ms = min((out[n]["ms_per_step"] for n in peers), default=None)
    stream_peer_ms = min((d["ms_per_step"] for n, d in out.items() if n.startswith("torchft_streaming")),
                         default=None)  # torchft's streaming DiLoCo at the better of its settings
    ddp_reach = out.get("ddp", {}).get("seconds_to_target")
    for d in out.values():
        d["speedup_vs_best_peer"] = round(best_peer_ms / d["ms_per_step"], 3) if best_peer_ms else None
        d["speedup_vs_streaming_peer"] = round(stream_peer_ms / d["ms_per_step"], 3) if stream_peer_ms else None
        d["speedup_to_target_vs_ddp"] = (round(ddp_reach / d["seconds_to_target"], 2)
                                         if ddp_reach and d["seconds_to_target"] else None)
    # our best configuration: the fastest of ours whose accuracy holds (within 0.5 points of blocking)
    ours = [n for n in out if n.startswith("ours_")
            and (out[n]["accuracy_delta_vs_blocking"] or 0.0) >= TARGETS["accuracy_delta_vs_blocking"]]
    best = min(ours, key=lambda n: out[n]["ms_per_step"]) if ours else None
    return {"contenders": out, "best": best, "target_accuracy": target, "blocking_peers": peers,
            "link_mbit": link_mbit}


def table(s: dict[str, Any]) -> str:
    cols = {"ms_per_step": "ms/step", "ratio_vs_compute_floor": "x floor", "ms_forward_backward": "fwd+bwd",
            "ms_optimizer_step": "opt.step", "ms_sync_call": "sync call", "ms_waiting": "waiting",
            "ms_final_sync": "final ms",
            "test_accuracy": "acc %", "accuracy_delta_vs_blocking": "d acc", "seconds_to_target": "s to target",
            "mb_sent": "MB sent", "speedup_vs_best_peer": "vs best peer"}
    width = max([34, *(len(n) + 3 for n in s["contenders"])])
    head = f"{'contender':{width}s}" + "".join(f"{c:>12s}" for c in cols.values())
    lines = [head]
    for name, d in s["contenders"].items():
        cells = "".join(f"{'-' if d[c] is None else d[c]:>12}" for c in cols)
        lines.append(f"{name + (' *' if name == s['best'] else ''):{width}s}{cells}")
    return "\n".join(lines)


def plot(s: dict[str, Any], path: Path) -> Path:
    """Two panels: ms per step per contender (the compute floor dashed), and accuracy against wall time."""
    from benchmarks.figures import pyplot, save_figure

    plt = pyplot()
    c = s["contenders"]
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(13, 5))
    names = sorted(c, key=lambda n: c[n]["ms_per_step"])
    colors = ["tab:green" if n.startswith("ours") else "tab:gray" if n == "floor" else "tab:orange" for n in names]
    bars.barh(names, [c[n]["ms_per_step"] for n in names], color=colors)
    if "floor" in c:
        bars.axvline(c["floor"]["ms_per_step"], color="k", linestyle="--", linewidth=1)
    bars.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    bars.xaxis.set_major_formatter(ScalarFormatter())  # plain numbers, no overlapping minor labels
    bars.xaxis.set_minor_formatter(NullFormatter())
    bars.set_xlabel("ms per step (log; dashed: no communication)")
    where = "loopback" if s["link_mbit"] is None else f"{s['link_mbit']:g} Mbit/s"
    bars.set_title(f"2 ranks, {where}, H = {H}")
    for n in names:
        steps, clock, acc = zip(*c[n]["curve"])
        curves.plot(clock, acc, label=n, linestyle="-" if n.startswith("ours") else "--")
    if s["target_accuracy"] is not None:
        curves.axhline(s["target_accuracy"], color="k", linewidth=0.8)
    curves.set_xscale("log")
    curves.set_xlabel("wall seconds (log)")
    curves.set_ylabel("test accuracy (%)")
    curves.legend(fontsize=7)
    return save_figure(fig, path)


def available(names: list[str]) -> tuple[list[str], list[str]]:
    """The contenders whose packages are installed, and a line per one that is not."""
    keep, missing = [], []
    for n in names:
        pkg = PEER_PACKAGES.get(CONTENDERS[n][0])
        if pkg and importlib.util.find_spec(pkg) is None:
            missing.append(f"{n}: needs `{pkg}` (pip install -e '.[bench]')")
        else:
            keep.append(n)
    return keep, missing


def run(contenders: dict[str, tuple[str, dict[str, Any]]], reps: int, steps: int, ddp_steps: int,
        link: ShapedLink | None, timeout_s: float, seed: int) -> list[dict[str, Any]]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the ranks inherit these before they import torch
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's manager and lighthouse log every quorum at info
    order = random.Random(seed)
    plan = []
    for rep in range(reps):
        names_rep = list(contenders)
        order.shuffle(names_rep)
        plan += [(seed + rep, n, *contenders[n]) for n in names_rep]
    if link is None:
        addrs, ifaces, where = ["127.0.0.1"] * 2, [None, None], {"master_addr": "127.0.0.1"}
    else:
        addrs, ifaces = list(link.addrs), list(link.ifaces)
        where = {"master_addr": link.master_addr, "prepare_rank": link.enter}
    out = run_ranks(_bench_rank, 2, plan, steps, ddp_steps, addrs, ifaces, timeout_s=timeout_s,
                    collective_timeout_s=300.0, **where)
    errors = [f"rank {r}: {v}" for r, (s, v) in enumerate(out) if s != "ok"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [v for _, v in out]


def contender_options(names: list[str], given: dict[str, Any]) -> dict[str, tuple[str, dict[str, Any]]]:
    """(kind, options) per contender: the streaming options ``given`` (None: not given) override those of every
    ``ours_streaming*`` contender; each keeps its own otherwise."""
    out = {}
    for n in names:
        kind, options = CONTENDERS[n]
        if n.startswith("ours_streaming"):
            options = {**options, **{k: v for k, v in given.items() if v is not None}}
        out[n] = (kind, options)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset of contenders, 1 repetition, 96 steps")
    ap.add_argument("--link-mbit", type=float, default=100.0, help="rate of the shaped veth link (default 100)")
    ap.add_argument("--mtu", type=int, default=9000,
                    help="MTU of the veth pair (default 9000, jumbo frames: at 1500 the kernel's per-packet work "
                         "on this 2-core machine slows the ranks' compute while a transfer runs)")
    ap.add_argument("--no-link", action="store_true", help="loopback instead of a shaped link (no root needed)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions, each with its own seed (default 3)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default 400)")
    ap.add_argument("--ddp-steps", type=int, default=None, help="steps DDP is timed over (default 48)")
    ap.add_argument("--contenders", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--fragments", type=int, default=None, help="sync.fragments of every ours_streaming* contender "
                    f"(default: each its own, {STREAMING['fragments']}, or {STREAMING_ONE['fragments']} for *_f1)")
    ap.add_argument("--delay", type=int, default=None, help="sync.delay of every ours_streaming* contender "
                    f"(default: each its own, {STREAMING['delay']}, or {STREAMING_ONE['delay']} for *_f1)")
    ap.add_argument("--mix", type=float, default=None, help="sync.mix of every ours_streaming* contender")
    ap.add_argument("--merge", default=None, help="sync.merge of every ours_streaming* contender")
    ap.add_argument("--target-acc", type=float, default=None,
                    help="test accuracy (%%) for seconds_to_target (default: 95%% of ours_blocking's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plot", type=Path, default=None, help="write the two-panel figure to this PNG")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before the ranks are stopped")
    args = ap.parse_args(argv)
    if not args.no_link and not 0 < args.link_mbit < 1e6:
        ap.error(f"--link-mbit must be a rate in Mbit/s > 0, got {args.link_mbit:g} (or --no-link for loopback)")
    names = [n for n in args.contenders.split(",") if n] or list(QUICK if args.quick else CONTENDERS)
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        ap.error(f"unknown contender(s) {', '.join(unknown)}; choose from {', '.join(CONTENDERS)}")
    names, missing = available(names)
    for line in missing:
        print(f"skipped {line}")
    reps = args.reps or (1 if args.quick else 3)
    steps = args.steps or (96 if args.quick else 400)
    ddp_steps = args.ddp_steps or (8 if args.quick else 48)
    if steps % H:
        ap.error(f"--steps must be a multiple of H = {H}, got {steps}")
    given = {"fragments": args.fragments, "delay": args.delay, "mix": args.mix, "merge": args.merge}
    contenders = contender_options(names, given)

    import torch

    code = source_digest(), git_state()
    load_data()  # generate and cache MNIST-1D once, before the ranks start
    start = time.perf_counter()
    link_mbit = None if args.no_link else args.link_mbit
    try:
        if link_mbit is None:
            ranks = run(contenders, reps, steps, ddp_steps, None, args.timeout, args.seed)
        else:
            with ShapedLink(link_mbit, args.mtu) as link:
                ranks = run(contenders, reps, steps, ddp_steps, link, args.timeout, args.seed)
    except RuntimeError as exc:
        sys.exit(f"slowlink: {exc}")
    s = summarise(ranks, names, steps, args.target_acc, link_mbit)
    where = ("on loopback" if link_mbit is None
             else f"in two network namespaces over a veth link shaped to {link_mbit:g} Mbit/s (tc tbf)")
    print(f"2 Gloo ranks {where}; MLP 1.1M params, MNIST-1D, H={H}, batch "
          f"{BATCH}/rank, {steps} steps, {reps} repetition(s) in seeded random order; torch {torch.__version__}")
    print(table(s))
    print(f"* our best configuration; target accuracy {s['target_accuracy']} %; DDP timed over {ddp_steps} steps")
    if args.plot is not None:
        print(f"figure: {plot(s, args.plot)}")
    for d in s["contenders"].values():
        d.pop("curve")
    best = s["contenders"].get(s["best"] or "", {})
    result = {
        "benchmark": "slowlink",
        "quick": args.quick,
        "best": s["best"],
        **{k: best.get(k) for k in ("ratio_vs_compute_floor", "speedup_vs_best_peer", "speedup_vs_streaming_peer",
                                    "accuracy_delta_vs_blocking", "speedup_to_target_vs_ddp")},
        "targets": TARGETS,
        "target_accuracy": s["target_accuracy"],
        "ours_options": {n: o for n, (k, o) in contenders.items() if k == "ours"},
        "link_mbit": link_mbit,
        "mtu": None if link_mbit is None else args.mtu,
        "steps": steps, "ddp_steps": ddp_steps, "reps": reps, "H": H,
        "skipped": missing,
        "localsgd_source_sha256_12": code[0],
        "git": code[1],
        "torch": torch.__version__,
        "wall_seconds": round(time.perf_counter() - start, 1),
        "contenders": s["contenders"],
    }
    print(json.dumps(result, sort_keys=True))


if __name__ == "__main__":
    main()
