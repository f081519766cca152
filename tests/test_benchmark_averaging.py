"""``benchmarks/averaging.py`` end to end in a tiny run: every method agrees with torch's average
before it is timed, and the last line is the JSON object whose keys the issue names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_averaging_benchmark_prints_the_issue_keys() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/averaging.py", "--quick", "--reps", "3", "--warmup", "1",
                           "--models", "many_small"], cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("ratio_vs_floor", "ratio_vs_torch", "floor_avg_vs_floor", "ratio_vs_floor_avg", "guarded_vs_floor_avg",
                "ratio_vs_guarded_avg"):
        assert isinstance(result[key], float) and result[key] > 0, key
    times = result["models"]["many_small"]["seconds"]
    assert set(times) == {"ours", "ours_before", "torch", "per_param", "floor", "floor_avg", "guarded_avg"}
    assert result["link_mbit"] is None and result["world_size"] == 2
