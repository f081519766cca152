"""Block-code micro-benchmark: the native codec (``localsgd/engine/codec.c``) against the torch path.

One fragment sync of ``compress=int8|int4`` encodes this rank's pseudo-gradient Δ = x_ref − x (+ the
error-feedback residual e) into block codes and scales, then decodes the K ranks' codes into
x_ref − (1/K) Σ_k decode(code_k) (:mod:`localsgd.engine.compress`). Both paths compute the same bits
(``tests/test_native_codec.py``); this measures what each costs, on one thread (as each rank of a
training run has), with the buffers the engine keeps between syncs:

* ``encode``: the engine's torch path (``compress.encode_delta`` with its kept buffers) against
  ``native_codec.encode``;
* ``decode``: the torch path (``compress.decode_mean``) against ``native_codec.decode_mean``, K = 2;
* ``land``: what a fragment's landing does with ``merge=progress`` (decode, x_ref ← x̄, live ← live +
  (x̄ − sent)): the torch path's three steps against ``native_codec.land``'s one pass, K = 2.

The native encode reads the live values and writes the copy a delayed merge keeps in the same pass
(``copy_out``), with a one-block scratch and a kept wire buffer, as ``StreamingSync`` calls it; the torch
encode is given the gathered copy it needs (the gather pass is not timed on either side).

Sizes: 275K values (one of the 4 fragments of ``benchmarks/slowlink.py``'s 1.1M-parameter MLP) and
4M (a fragment of a ~16M-parameter model; ``--quick`` skips it). Method: after warm-up, repetitions
interleave the two paths in a random order per repetition; a path's time is the median over
repetitions, each repetition the mean of ``--inner`` calls. ``ratio_native_vs_torch`` = native / torch
(below 1: the native codec is faster). The last line of output is one JSON object.

Run ``python benchmarks/codec.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.provenance import git_state, source_digest  # noqa: E402

BLOCK = 256


def paths(n: int, compress: str, world: int = 2) -> dict[str, dict[str, object]]:
    """For each operation, the two callables (torch, native) on the same kept buffers."""
    import torch

    from localsgd.engine import compress as codec
    from localsgd.engine import native_codec

    g = torch.Generator().manual_seed(0)
    ref = torch.randn(n, generator=g)
    send = ref - 1e-3 * torch.randn(n, generator=g)
    residual = 1e-5 * torch.randn(n, generator=g)
    delta, grid, mean = torch.empty(n), torch.empty(n), torch.empty(n)
    work, copy = torch.empty(native_codec.work_numel(n, BLOCK)), torch.empty(n)
    wires = torch.cat([codec.encode_delta(ref, send, residual.clone(), compress, BLOCK)] * world)
    wire = torch.empty(wires.numel() // world, dtype=torch.uint8)
    live, sent = send + 1e-4 * torch.randn(n, generator=g), send.clone()
    ref_a, ref_b, live_a, live_b = ref.clone(), ref.clone(), live.clone(), live.clone()

    def torch_encode() -> object:  # StreamingSync._encode's torch path, with its kept buffers
        return codec.encode_delta(ref, send, residual, compress, BLOCK, delta=delta, grid=grid)

    def native_encode() -> object:  # reads the live values and takes the copy in the same pass
        return native_codec.encode(ref, send, residual, work, compress, BLOCK, copy_out=copy, wire=wire)

    def torch_decode() -> object:  # StreamingSync._decode's torch path
        return codec.decode_mean(ref, wires, world, compress, BLOCK, out=mean, grid=grid)

    def native_decode() -> object:
        return native_codec.decode_mean(ref, wires, world, mean, compress, BLOCK, work=work)

    # the landing updates x_ref and the live values in place; each side keeps its own, restored every call
    def torch_land() -> object:  # StreamingSync._land: decode, x_ref ← x̄, live ← live + (x̄ − sent)
        ref_a.copy_(ref)
        live_a.copy_(live)
        average = codec.decode_mean(ref_a, wires, world, compress, BLOCK, out=mean, grid=grid)
        ref_a.copy_(average)
        return live_a.add_(torch.sub(average, sent, out=delta))

    def native_land() -> object:
        ref_b.copy_(ref)
        live_b.copy_(live)
        return native_codec.land(ref_b, wires, world, work, compress, BLOCK, update_ref=True, live=live_b, sent=sent)

    return {"encode": {"torch": torch_encode, "native": native_encode},
            "decode": {"torch": torch_decode, "native": native_decode},
            "land": {"torch": torch_land, "native": native_land}}


def measure(fns: dict[str, object], reps: int, warmup: int, inner: int, seed: int) -> dict[str, float]:
    order = list(fns)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {k: [] for k in order}
    for rep in range(warmup + reps):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            start = time.perf_counter()
            for _ in range(inner):
                fn()  # type: ignore[operator]
            if rep >= warmup:
                times[name].append((time.perf_counter() - start) / inner)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="the 275K size only, fewer repetitions (< 15 s)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--inner", type=int, default=5, help="calls per timed repetition")
    args = ap.parse_args(argv)
    import torch

    from localsgd.engine import native_codec

    torch.set_num_threads(1)
    code = source_digest(), git_state()
    if native_codec.library() is None:
        print(f"the native codec is not available here: {native_codec.why_not}")
        print(json.dumps({"benchmark": "codec", "native": False, "why_not": native_codec.why_not}))
        return
    sizes = [275_000] if args.quick else [275_000, 4_000_000]
    reps = args.reps or (15 if args.quick else 40)
    results: dict[str, dict[str, dict[str, float]]] = {}
    print(f"one fragment's block code, 1 thread, median of {reps} interleaved repetitions of {args.inner} calls "
          f"(decode, land: 2 ranks' codes; land includes restoring x_ref and the live values, both sides); "
          f"torch {torch.__version__}")
    print(f"{'code':<6}{'values':>10}{'op':>8}{'torch us':>11}{'native us':>11}{'native/torch':>14}")
    for compress in ("int8", "int4"):
        for n in sizes:
            for op, fns in paths(n, compress).items():
                t = measure(fns, reps, warmup=3, inner=args.inner, seed=n)
                ratio = t["native"] / t["torch"]
                results.setdefault(compress, {})[f"{op}_{n}"] = {
                    "torch_us": round(t["torch"] * 1e6, 1), "native_us": round(t["native"] * 1e6, 1),
                    "ratio_native_vs_torch": round(ratio, 3)}
                print(f"{compress:<6}{n:>10}{op:>8}{t['torch'] * 1e6:>11.1f}{t['native'] * 1e6:>11.1f}{ratio:>14.3f}")
    worst = max(r["ratio_native_vs_torch"] for per in results.values() for r in per.values())
    print(json.dumps({"benchmark": "codec", "native": True, "block": BLOCK, "results": results,
                      "worst_ratio_native_vs_torch": worst, "torch": torch.__version__,
                      "localsgd_source_sha256_12": code[0], "git": code[1]}))


if __name__ == "__main__":
    main()
