"""Self-Tuning Networks on real 2-rank Gloo groups: averaging at every sync, tuning end to end, torchrun."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from .distributed import run_ok
from .launch_helpers import TINY, output, records, torchrun

pytestmark = pytest.mark.slow


def _gather(t: torch.Tensor, world: int) -> list[torch.Tensor]:
    import torch.distributed as tdist

    out = [torch.empty_like(t) for _ in range(world)]
    tdist.all_gather(out, t.detach().contiguous())
    return out


def _sync_rule_worker(rank: int, world: int, averaging: str) -> dict[str, Any]:
    """STN local SGD with H = 3 on per-rank random data; check every sync against its definition."""
    import torch.nn.functional as F

    from localsgd.engine import LocalSGD
    from localsgd.models import MLP
    from localsgd.optim import StepContext
    from localsgd.optim.stn import StnConfig, build_stn
    from localsgd.schedules import Fixed

    torch.manual_seed(0)  # the same replica on every rank (as the trainer's seed + broadcast)
    model = MLP(10, [12], 3)
    plugin = build_stn(StnConfig(tune=["dropout", "input_noise"], hyper_warmup_steps=2, train_steps=1, val_steps=1,
                                 hyper_lr=0.05, averaging=averaging), model, 40)
    sync = LocalSGD(model, plugin.optimizers, Fixed(3), pre_average=plugin.pre_average)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on each rank: the replicas drift apart

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randn(16, 10, generator=gen), torch.randint(0, 3, (16,), generator=gen)

    ctx = StepContext(loss_fn=F.cross_entropy, next_val_batch=batch)
    space, layers = plugin.space, plugin.stn.layers
    checked, max_h_spread = 0, 0.0
    for step in range(18):
        out = plugin.train_step(model, batch(), step, ctx)
        if (step + 1) % 3:
            sync.step(loss=out.loss)
            continue
        hs = _gather(space.h, world)
        max_h_spread = max(max_h_spread, float((hs[0] - hs[1]).abs().max()))
        pre = {name: _gather(p, world) for name, p in model.named_parameters()}
        assert sync.step(loss=out.loss)
        h_bar = (hs[0] + hs[1]) / 2  # in unconstrained space
        after = _gather(space.h, world)
        assert torch.equal(after[0], after[1]), "h differs across ranks after a sync"
        torch.testing.assert_close(space.h.detach(), h_bar, rtol=0, atol=1e-7)
        for name, p in model.named_parameters():
            if averaging == "jacobian" and name.endswith(("general_weight", "general_bias")):
                continue  # moved before the average: checked below
            expected = (pre[name][0] + pre[name][1]) / 2
            torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7, msg=name)
        if averaging == "jacobian":
            # W_e ← mean_k [W_e,k + (V_k (h̄ − h_k)) ⊙ W_h,k]: each rank's own response at h̄.
            for layer in layers:
                prefix = next(n for n, m in model.named_modules() if m is layer)
                moved_w, moved_b = [], []
                for k in range(world):
                    out_units = layer.out_units
                    V = pre[f"{prefix}.hyper_bottleneck.weight"][k]
                    d = h_bar - hs[k]
                    moved_w.append(pre[f"{prefix}.general_weight"][k]
                                   + (V[:out_units] @ d)[:, None] * pre[f"{prefix}.response_weight"][k])
                    moved_b.append(pre[f"{prefix}.general_bias"][k]
                                   + (V[out_units:] @ d) * pre[f"{prefix}.response_bias"][k])
                torch.testing.assert_close(layer.general_weight.detach(), (moved_w[0] + moved_w[1]) / 2,
                                           rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(layer.general_bias.detach(), (moved_b[0] + moved_b[1]) / 2,
                                           rtol=1e-6, atol=1e-7)
        checked += 1
    return {"checked": checked, "max_h_spread": max_h_spread}


# ---------------------------------------------------------------------------------------------- end to end
SEEDS = (0, 1, 2)
E2E_STEPS = 400


def _end_to_end_worker(rank: int, world: int, seeds: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per seed: 2-rank local SGD (H = 4) on a 400-sample digits subset, STN tuning dropout vs dropout 0.05.

    Calibrated once (in-process simulation, not these random streams): STN's held-out loss was 4-19%
    below the baseline's on each seed.
    """
    import torch.nn.functional as F

    from localsgd.data import DigitsConfig
    from localsgd.data import build as build_data
    from localsgd.engine import LocalSGD
    from localsgd.models import MLP
    from localsgd.optim import StepContext
    from localsgd.optim.stn import StnConfig, build_stn
    from localsgd.optim.torch_optim import SGDConfig, build_sgd
    from localsgd.sampler import ShardSampler, ValidationShard
    from localsgd.schedules import Fixed

    ds = build_data(DigitsConfig())
    x_all, y_all = ds.x_train[:400], ds.y_train[:400]  # small, so that the MLP overfits without dropout
    out = []
    for seed in seeds:
        result: dict[str, Any] = {"seed": seed}
        for mode in ("stn", "fixed"):
            torch.manual_seed(seed)
            model = MLP(64, [64, 64], 10, dropout=0.0 if mode == "stn" else 0.05)
            if mode == "stn":
                plugin = build_stn(StnConfig(lr=0.05, train_steps=2, val_steps=1, hyper_warmup_steps=80,
                                             val_fraction=0.25), model, E2E_STEPS)
            else:
                plugin = build_sgd(SGDConfig(lr=0.05, momentum=0.9), list(model.parameters()), E2E_STEPS)
            # Both train on the same samples; STN validates on its held-out shard, the baseline ignores it.
            val = ValidationShard(x_all, y_all, 0.25, 32, rank, world, seed)
            x, y = x_all[val.train_index], y_all[val.train_index]
            sampler = ShardSampler(len(y), rank, world, seed)
            sync = LocalSGD(model, plugin.optimizers, Fixed(4), pre_average=plugin.pre_average)
            torch.manual_seed(seed * 10 + rank)  # per-rank dropout noise for the baseline
            ctx = StepContext(loss_fn=F.cross_entropy, next_val_batch=val.next_batch)
            for step in range(E2E_STEPS):
                idx = sampler.next_indices(32)
                sync.step(loss=plugin.train_step(model, (x[idx], y[idx]), step, ctx).loss)
            sync.finalize()
            model.eval()
            with torch.no_grad():
                result[f"{mode}_loss"] = float(F.cross_entropy(model(ds.x_test), ds.y_test))
            if mode == "stn":
                result["dropout"] = plugin.space.values()
        out.append(result)
    return out


def _all_worker(rank: int, world: int) -> dict[str, Any]:
    # One launch for every Gloo check: spawning ranks costs more than the checks themselves.
    return {"plain": _sync_rule_worker(rank, world, "plain"), "jacobian": _sync_rule_worker(rank, world, "jacobian"),
            "end_to_end": _end_to_end_worker(rank, world, SEEDS)}


@pytest.fixture(scope="module")
def two_ranks() -> list[dict[str, Any]]:
    return run_ok(_all_worker, 2, timeout_s=280)


@pytest.mark.long
@pytest.mark.timeout(300)
@pytest.mark.parametrize("averaging", ["plain", "jacobian"])
def test_every_sync_averages_h_in_unconstrained_space_and_keeps_it_identical(
        two_ranks: list[dict[str, Any]], averaging: str) -> None:
    for r in two_ranks:
        assert r[averaging]["checked"] == 6
        assert r[averaging]["max_h_spread"] > 1e-3  # the hyper steps really made the ranks disagree before syncs


@pytest.mark.timeout(300)
def test_stn_tunes_dropout_away_from_its_start_and_is_no_worse_than_fixed_dropout(
        two_ranks: list[dict[str, Any]]) -> None:
    results = two_ranks[0]["end_to_end"]
    assert results == two_ranks[1]["end_to_end"]  # both ranks end with the same averaged model
    moved = [max(abs(v - 0.05) for v in r["dropout"].values()) for r in results]
    assert min(moved) > 0.01 and sum(moved) / len(moved) > 0.03, results  # dropout left its initial 0.05
    for r in results:
        assert r["stn_loss"] <= 1.15 * r["fixed_loss"], r  # never clearly worse on a seed...
    mean = {k: sum(r[k] for r in results) / len(SEEDS) for k in ("stn_loss", "fixed_loss")}
    assert mean["stn_loss"] <= mean["fixed_loss"], (mean, results)  # ...and no worse on average


# ---------------------------------------------------------------------------------------------- torchrun
STN_RUN = [*TINY, "optimizer=stn", "optimizer.hyper_warmup_steps=4", "optimizer.train_steps=2",
           "optimizer.averaging=jacobian", "schedule.H=2", "checkpoint.every_rounds=1", "checkpoint.keep_latest_k=3",
           "trainer.max_steps=16", "trainer.log_every=1"]


@pytest.mark.long
@pytest.mark.timeout(300)
def test_torchrun_optimizer_stn_logs_hyperparameters_and_resumes_after_a_kill(tmp_path: Path) -> None:
    # Rank 1 dies after step 9; torchrun restarts both, which resume from the step-8 checkpoint
    # (model with h and s, four optimizers, perturbation RNG, validation sampler).
    run = torchrun(tmp_path, tmp_path / "run", STN_RUN, max_restarts=1, LOCALSGD_FAULT="kill:rank=1,step=9")
    assert run.returncode == 0, output(run)
    starts = records(tmp_path / "run", "start")
    assert [s["restart_count"] for s in starts] == [0, 1] and starts[1]["resumed"] and starts[1]["step"] == 8
    train = records(tmp_path / "run", "train")
    assert [r["step"] for r in train] == list(range(1, 17))  # none lost or repeated
    assert {"hp/dropout.0", "hp_sigma/dropout.0", "stn_val_loss"} <= set(train[-1])
    trajectory = [r["hp/dropout.0"] for r in train]
    assert trajectory[0] == pytest.approx(0.05, rel=1e-5) and len(set(trajectory[4:])) > 1  # it moves after warm-up
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["optimizer"] == "stn" and summary["final_eval_accuracy"] > 0.3
    final = torch.load(tmp_path / "run" / "checkpoints/step-16/model.pt")
    # The checkpointed (averaged) h is what the last record logged: dropout = 0.95·sigmoid(h).
    assert 0.95 * float(torch.sigmoid(final["stn_hyper.h"][0])) == pytest.approx(trajectory[-1], rel=1e-6)
