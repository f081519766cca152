"""``benchmarks/slowlink.py``: its DDP shortcut is DDP's update, its summary computes what it names,
a missing peer is skipped by name, and a tiny loopback run prints the JSON keys the issue names."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from localsgd.testing.ranks import run_ok

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import slowlink  # noqa: E402


def _real_ddp(rank: int, world: int, seeds: list[int], steps: int) -> list[list[float]]:
    from torch.nn import functional as fn
    from torch.nn.parallel import DistributedDataParallel

    x_train, y_train, _, _ = slowlink.load_data()
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = slowlink.make_model()
        ddp = DistributedDataParallel(model)
        optimizer = torch.optim.SGD(model.parameters(), lr=slowlink.LR, momentum=slowlink.MOMENTUM)
        idx = slowlink.batch_indices(seed, rank, steps, len(y_train))
        for t in range(steps):
            optimizer.zero_grad(set_to_none=True)
            fn.cross_entropy(ddp(x_train[idx[t]]), y_train[idx[t]]).backward()
            optimizer.step()
        out.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().tolist())
    return out


@pytest.mark.long
@pytest.mark.slow
def test_the_in_process_ddp_trajectory_is_ddp() -> None:
    seeds, steps = [0, 3], slowlink.H  # one snapshot per seed
    real = run_ok(_real_ddp, 2, seeds, steps, timeout_s=120)
    for i, seed in enumerate(seeds):
        sim = slowlink._ddp_trajectory(seed, steps, slowlink.load_data())[-1][1]
        for rank_result in real:
            assert torch.allclose(torch.tensor(rank_result[i]), sim, rtol=0, atol=1e-5)


def _run(name: str, seed: int, steps: int, wall: float, sent: int, curve: list[tuple[int, float, float]]
         ) -> dict[str, Any]:
    return {"name": name, "seed": seed, "steps": steps, "wall": wall, "sent": sent, "curve": curve,
            "phases": [wall / 2, wall / 4, wall / 8, 0.001, wall / 16]}


def test_summary_figures_follow_from_the_runs() -> None:
    steps = 32
    rank0 = [
        _run("floor", 0, steps, 0.32, 0, [(16, 0.16, 50.0), (32, 0.32, 60.0)]),
        _run("ours_blocking", 0, steps, 0.64, 100, [(16, 0.3, 40.0), (32, 0.64, 60.0)]),
        _run("ours_streaming_compressed", 0, steps, 0.40, 30, [(16, 0.2, 58.0), (32, 0.40, 59.8)]),
        _run("torch_averager", 0, steps, 0.96, 200, [(16, 0.5, 40.0), (32, 0.96, 60.0)]),
        _run("ddp", 0, 4, 0.8, 4_000_000, [(4, 0.8, 10.0)]),
        {"name": "ddp_trajectory", "seed": 0, "curve": [(16, None, 50.0), (32, None, 61.0)]},
    ]
    rank1 = [{**r, "wall": r["wall"] * 1.25 if r["name"] == "ours_blocking" else r["wall"]}
             for r in rank0 if r["name"] != "ddp_trajectory"]
    names = ["floor", "ddp", "torch_averager", "ours_blocking", "ours_streaming_compressed"]
    s = slowlink.summarise([{"runs": rank0}, {"runs": rank1}], names, steps, None, 100.0)
    c = s["contenders"]
    assert c["floor"]["ms_per_step"] == 10.0
    assert [c["floor"][k] for k in slowlink.PHASES] == [5.0, 2.5, 1.25, 1.0, 0.62]  # per step; final sync in ms
    assert c["ours_blocking"]["ms_per_step"] == 25.0  # the slower rank: 0.8 s / 32 steps
    assert c["ours_blocking"]["ratio_vs_compute_floor"] == 2.5
    assert c["ours_streaming_compressed"]["accuracy_delta_vs_blocking"] == -0.2
    assert s["target_accuracy"] == 57.0  # 95 % of ours_blocking's 60.0
    assert c["ours_streaming_compressed"]["seconds_to_target"] == 0.2
    assert c["ours_blocking"]["seconds_to_target"] == 0.64
    assert c["ddp"]["ms_per_step"] == 200.0 and c["ddp"]["test_accuracy"] == 61.0
    assert c["ddp"]["seconds_to_target"] == 6.4  # its trajectory reaches 57 % at step 32, at 200 ms a step
    assert c["ddp"]["mb_sent"] == 64.0  # 8 MB over its 4 timed steps, scaled to 32
    assert c["ours_streaming_compressed"]["speedup_vs_best_peer"] == round(30.0 / 12.5, 3)
    assert c["ours_streaming_compressed"]["speedup_to_target_vs_ddp"] == 32.0
    assert s["best"] == "ours_streaming_compressed"  # fastest of ours within 0.5 points of blocking


def test_a_worse_accuracy_disqualifies_a_faster_configuration() -> None:
    rank0 = [_run("floor", 0, 16, 0.16, 0, [(16, 0.16, 50.0)]),
             _run("ours_blocking", 0, 16, 0.32, 1, [(16, 0.32, 60.0)]),
             _run("ours_compressed", 0, 16, 0.17, 1, [(16, 0.17, 59.0)])]
    s = slowlink.summarise([{"runs": rank0}, {"runs": rank0}], ["floor", "ours_blocking", "ours_compressed"],
                           16, 55.0, None)
    assert s["contenders"]["ours_compressed"]["accuracy_delta_vs_blocking"] == -1.0
    assert s["best"] == "ours_blocking"


def test_streaming_options_override_every_streaming_contender_only_when_given() -> None:
    names = ["ours_blocking", "ours_streaming_compressed", "ours_streaming_compressed_f1"]
    none = {"fragments": None, "delay": None, "mix": None, "merge": None}
    own = slowlink.contender_options(names, none)
    assert own["ours_streaming_compressed"][1] == {**slowlink.STREAMING, "compress": "int8"}
    assert own["ours_streaming_compressed_f1"][1] == {"fragments": 1, "delay": 2, "mix": 0.0, "merge": "progress",
                                                      "compress": "int8"}
    both = slowlink.contender_options(names, {**none, "delay": 1})
    assert [both[n][1]["delay"] for n in names[1:]] == [1, 1]
    assert both["ours_streaming_compressed_f1"][1]["fragments"] == 1 and both["ours_blocking"] == own["ours_blocking"]


def test_a_missing_peer_is_skipped_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    real = slowlink.importlib.util.find_spec
    monkeypatch.setattr(slowlink.importlib.util, "find_spec", lambda n: None if n == "torchft" else real(n))
    keep, missing = slowlink.available(["floor", "torchft_diloco", "ours_blocking"])
    assert keep == ["floor", "ours_blocking"]
    assert missing == ["torchft_diloco: needs `torchft` (pip install -e '.[bench]')"]


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_tiny_loopback_run_prints_the_issue_keys() -> None:
    proc = subprocess.run([sys.executable, "benchmarks/slowlink.py", "--no-link", "--steps", "32", "--ddp-steps",
                           "2", "--reps", "1", "--contenders",
                           "floor,ddp,ours_blocking,ours_streaming_compressed,ours_streaming_compressed_torchcodec"],
                          cwd=ROOT, capture_output=True, text=True, timeout=230)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("ratio_vs_compute_floor", "speedup_vs_best_peer", "speedup_vs_streaming_peer",
                "accuracy_delta_vs_blocking"):
        assert key in result
        for d in result["contenders"].values():
            assert key in d
    assert set(result["contenders"]) == {"floor", "ddp", "ours_blocking", "ours_streaming_compressed",
                                         "ours_streaming_compressed_torchcodec"}
    # the native codec and the torch path compute the same bits: the twins end on the same accuracy per seed
    native, torch_path = (result["contenders"][n] for n in ("ours_streaming_compressed",
                                                             "ours_streaming_compressed_torchcodec"))
    assert native["test_accuracy_seeds"] == torch_path["test_accuracy_seeds"]
    assert result["contenders"]["ours_blocking"]["accuracy_delta_vs_blocking"] == 0.0


def test_without_root_the_benchmark_stops_with_one_line_naming_the_cause(monkeypatch: pytest.MonkeyPatch) -> None:
    from benchmarks import averaging

    def refuse(cmd: list[str], **kw: Any) -> Any:
        if cmd[:3] == ["ip", "netns", "add"]:
            raise subprocess.CalledProcessError(2, cmd, stderr="mount --make-shared /run/netns failed: Operation "
                                                              "not permitted")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(averaging.subprocess, "run", refuse)
    with pytest.raises(SystemExit) as stop:
        slowlink.main(["--quick", "--contenders", "floor"])
    message = str(stop.value)
    assert message.startswith("slowlink: --link-mbit needs root and iproute2") and "not permitted" in message
    assert "\n" not in message


def test_a_rate_that_is_not_positive_is_refused() -> None:
    with pytest.raises(SystemExit):
        slowlink.main(["--link-mbit", "-5"])
