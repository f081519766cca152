"""Wrapping a model in ``LocalSGD`` holds no second copy of its parameters (``localsgd.engine.layout``).

The flat buffer is allocated uninitialised and each parameter's old storage is freed once it is
copied in, so the peak while building is one copy plus the largest tensor. The engine before the
split allocated the buffer with ``torch.zeros`` (every page written) while the old parameters were
still alive: its peak grew by one full copy (about 1.0x the parameter bytes on this test's model).

Measured in a fresh interpreter so nothing else this test session allocated blurs the peak: the
peak RSS (VmHWM) is reset through ``/proc/self/clear_refs`` right before the build and read after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# What runs in the child. It prints one JSON line: the measurement, or why it cannot measure.
CHILD = r"""
import json, re, sys
import torch
from torch import nn
import localsgd

def status_kib(key):
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M).group(1))

torch.manual_seed(0)
model = nn.Sequential(*[nn.Linear(1768, 1768, bias=False) for _ in range(8)])  # 25.0M float32, 100 MB
params = list(model.parameters())
param_bytes = sum(p.numel() * p.element_size() for p in params)
samples = [p.detach().flatten()[::997].clone() for p in params]
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
except OSError as e:
    print(json.dumps({"skip": f"cannot reset the peak RSS through /proc/self/clear_refs: {e}"}))
    sys.exit(0)
before, rss = status_kib("VmHWM"), status_kib("VmRSS")
if before - rss > 4096:
    print(json.dumps({"skip": f"/proc/self/clear_refs did not reset VmHWM ({before} kB, RSS {rss} kB)"}))
    sys.exit(0)
sync = localsgd.LocalSGD(model, None, schedule=localsgd.schedules.Fixed(1))
peak = status_kib("VmHWM")
(flat,) = sync.param_buffers()
lo, hi = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
print(json.dumps({
    "param_bytes": param_bytes,
    "growth_bytes": (peak - before) * 1024,
    "params_in_flat": all(lo <= p.data_ptr() < hi for p in params),
    "values_kept": all(torch.equal(p.detach().flatten()[::997], s) for p, s in zip(params, samples)),
}))
"""


@pytest.mark.slow  # a fresh interpreter imports torch: about 3-7 s on two shared cores
def test_building_local_sgd_holds_no_second_copy_of_the_parameters() -> None:
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux /proc to read the peak RSS")
    # glibc raises its mmap threshold (up to 32 MiB) after a large free, and freed memory below it
    # stays in the heap: then RSS keeps what the engine released and the measurement is the
    # allocator's, not the engine's. A fixed threshold keeps every large tensor an mmap of its own.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    proc = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skip" in result:
        pytest.skip(result["skip"])
    assert result["params_in_flat"] and result["values_kept"]
    growth = result["growth_bytes"] / result["param_bytes"]
    assert growth < 0.5, (f"building LocalSGD grew the peak RSS by {growth:.2f}x the parameter bytes "
                          f"({result['growth_bytes'] / 2**20:.0f} MiB for {result['param_bytes'] / 2**20:.0f} MiB "
                          "of parameters): a second copy of the parameters was alive")
