"""``benchmarks/overhead.py``: the interleaved diagnostic's loops step the models they name, and a tiny
end-to-end run prints the JSON keys RESULTS.md quotes (no timing is asserted: the machines are noisy)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _params(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_the_interleaved_hook_times_each_chunk_and_steps_the_plain_model_and_the_trainers_model() -> None:
    from benchmarks.overhead import Interleave, Plain

    plain = Plain("mlp")
    ours = copy.deepcopy(plain.model)
    hook = Interleave(plain, chunk=2)
    before_plain, before_ours = _params(plain.model), _params(ours)
    hook.after_step(1, ours)  # inside a chunk: nothing
    hook.after_step(2, ours)  # the warm-up chunk ends: the loops start, nothing is timed
    assert hook.times == {"ours": [], "plain": [], "plain_on_our_model": []}
    hook.after_step(4, ours)
    assert {k: len(v) for k, v in hook.times.items()} == {"ours": 1, "plain": 1, "plain_on_our_model": 1}
    assert all(not torch.equal(a, b) for a, b in zip(_params(ours), before_ours))  # the twin trained ours
    assert all(not torch.equal(a, b) for a, b in zip(_params(plain.model), before_plain))
    # Two runs of the plain loop from its initial state train the same trajectory.
    plain.run(0, 3)
    first = _params(plain.model)
    plain.run(0, 3)
    assert all(torch.equal(a, b) for a, b in zip(first, _params(plain.model)))


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_overhead_benchmark_prints_its_keys_with_the_interleaved_diagnostic() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/overhead.py", "--workloads", "mlp", "--steps", "20", "--reps",
                           "1", "--chunks", "3"], cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("ratio_vs_plain", "ratio_vs_plain_flat", "cpu_ratio_vs_plain"):
        assert isinstance(result[key], float) and result[key] > 0, key
    mlp = result["workloads"]["mlp"]
    assert mlp["timed_steps"] == 20 and mlp["reps"] == 1
    inter = mlp["interleaved"]
    assert inter["chunks"] == 3 and inter["chunk_steps"] == 50
    assert set(inter["us_per_step"]) == {"ours", "plain", "plain_on_our_model"}
    assert all(inter[k] > 0 for k in ("paired_ratio_vs_plain", "plain_on_our_model_vs_plain"))
