"""Block-code micro-benchmark: the native codec (``localsgd/engine/codec.c``) against the torch path.

One fragment sync of ``compress=int8|int4`` encodes this rank's pseudo-gradient Δ = x_ref − x (+ the
error-feedback residual e) into block codes and scales, then decodes the K ranks' codes into
x_ref − (1/K) Σ_k decode(code_k) (:mod:`localsgd.engine.compress`). Both paths compute the same bits
(``tests/test_native_codec.py``); this measures what each costs, on one thread (as each rank of a
training run has), with the buffers the engine keeps between syncs:

* ``encode``: the engine's torch path (``compress.encode_delta`` with its kept buffers) against
  ``native_codec.encode``;
* ``decode``: the torch path (``compress.decode_mean``) against ``native_codec.decode_mean``, K = 2.

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
    wires = torch.cat([codec.encode_delta(ref, send, residual.clone(), compress, BLOCK)] * world)

    def torch_encode() -> object:  # StreamingSync._encode's torch path, with its kept buffers
        return codec.encode_delta(ref, send, residual, compress, BLOCK, delta=delta, grid=grid)

    def native_encode() -> object:
        return native_codec.encode(ref, send, residual, grid, compress, BLOCK)

    def torch_decode() -> object:  # StreamingSync._decode's torch path
        return codec.decode_mean(ref, wires, world, compress, BLOCK, out=mean, grid=grid)

    def native_decode() -> object:
        return native_codec.decode_mean(ref, wires, world, mean, compress, BLOCK)

    return {"encode": {"torch": torch_encode, "native": native_encode},
            "decode": {"torch": torch_decode, "native": native_decode}}


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
          f"(decode: 2 ranks' codes); torch {torch.__version__}")
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
