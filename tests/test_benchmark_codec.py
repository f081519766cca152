"""``benchmarks/codec.py`` in a tiny run: both paths timed on every code and operation, and the last line
is the JSON object RESULTS quotes (or, without a native codec, one that says why)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_codec_benchmark_prints_a_ratio_per_code_and_operation() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/codec.py", "--quick", "--reps", "2", "--inner", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if not result["native"]:
        assert result["why_not"]
        return
    assert set(result["results"]) == {"int8", "int4"}
    for per in result["results"].values():
        assert set(per) == {"encode_275000", "decode_275000", "land_275000"}
        for r in per.values():
            assert r["torch_us"] > 0 and r["native_us"] > 0
            assert r["ratio_native_vs_torch"] == pytest.approx(r["native_us"] / r["torch_us"], abs=2e-3)
    assert result["worst_ratio_native_vs_torch"] == max(r["ratio_native_vs_torch"] for per in result["results"].values()
                                                        for r in per.values())
