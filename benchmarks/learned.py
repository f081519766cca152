"""Reproduction of issue 5: both meta-learned update rules, in one command.

Runs the two halves side by side (one process each, so ``--quick`` uses both cores) and prints their
tables, then one JSON object with both results as the last line:

* ``benchmarks/learned_lopt.py`` — the learned optimizer (``optimizer=learned``) against SGD (untuned
  and tuned) and Adam on held-out tasks, and on MNIST-1D under local SGD with 2 workers;
* ``benchmarks/learned_unsupervised.py`` — the neuron-local unsupervised rule of Metz,
  Maheswaranathan, Cheung & Sohl-Dickstein (ICLR 2019, arXiv 1804.00222): few-shot accuracy on
  held-out digit classes against random init, a random-θ rule and a backprop autoencoder, and its
  transfer to another width and depth.

Each half is also runnable alone and documents its own protocol. Usage, from the repository root:
``python benchmarks/learned.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HALVES = {"learned_optimizer": "learned_lopt.py", "unsupervised_rule": "learned_unsupervised.py"}


def run(quick: bool) -> dict[str, Any]:
    start = time.perf_counter()
    procs = {name: subprocess.Popen([sys.executable, str(HERE / script), *(["--quick"] if quick else [])],
                                    cwd=HERE.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, script in HALVES.items()}
    out: dict[str, Any] = {"benchmark": "learned", "quick": quick}
    failed = []
    for name, proc in procs.items():
        text, _ = proc.communicate()
        lines = text.rstrip().splitlines()
        print(f"===== {HALVES[name]} (exit {proc.returncode})")
        print("\n".join(lines[:-1]))
        try:
            out[name] = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
        except json.JSONDecodeError:
            out[name] = None
        if out[name] is None:
            failed.append(HALVES[name])
            print("\n".join(lines[-20:]), file=sys.stderr)
    out["failed"] = failed
    out["seconds"] = round(time.perf_counter() - start, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="both halves in quick mode, in parallel (< 60 s)")
    args = p.parse_args(argv)
    result = run(args.quick)
    print(json.dumps(result))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
