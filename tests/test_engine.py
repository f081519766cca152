"""LocalSGD in one process: schedule bookkeeping, policies, errors and the world-size-1 anchor."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import localsgd
from localsgd.schedules import Fixed, OneShot


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.1), nn.Linear(16, 3))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, sync: localsgd.LocalSGD | None) -> list[bool]:
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(2)
    flags = []
    for _ in range(steps):
        x = torch.randn(8, 6, generator=gen)
        y = torch.randint(0, 3, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sync is not None:
            flags.append(sync.step(loss=loss))
    if sync is not None:
        sync.finalize()
    return flags


@pytest.mark.parametrize("H", [1, 3, 7])
@pytest.mark.parametrize("opt_cls", ["sgd", "adamw"])
def test_world_size_one_equals_plain_training_bit_for_bit(H: int, opt_cls: str) -> None:
    def make(model: nn.Module) -> torch.optim.Optimizer:
        if opt_cls == "sgd":
            return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3)
        return torch.optim.AdamW(model.parameters(), lr=1e-2)

    ref = _model()
    _train(ref, make(ref), 20, None)
    ours = _model()
    opt = make(ours)
    sync = localsgd.LocalSGD(ours, opt, schedule=Fixed(H))
    flags = _train(ours, opt, 20, sync)
    assert [i + 1 for i, f in enumerate(flags) if f] == list(range(H, 21, H))
    for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
        assert torch.equal(a, b), name
    assert sync.stats.rounds == 20 // H + (1 if 20 % H else 0)


def test_fixed_schedule_syncs_after_multiples_of_H_and_resumes() -> None:
    s = Fixed(4)
    syncs = []
    for step in range(1, 14):
        if s.should_sync(step):
            syncs.append(step)
            s.advance(step)
    assert syncs == [4, 8, 12]
    copy = Fixed(4)
    copy.load_state_dict(s.state_dict())
    assert [t for t in range(14, 30) if copy.should_sync(t) and (copy.advance(t) or True)] == [16, 20, 24, 28]
    with pytest.raises(ValueError, match="schedule 'fixed'"):
        OneShot().load_state_dict(s.state_dict())


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_fixed_rejects_bad_H(bad: float) -> None:
    with pytest.raises(ValueError, match="H >= 1"):
        Fixed(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "msg"), [({"buffers": "avg"}, "buffers='avg'"),
                                         ({"optimizer_state": "zero"}, "optimizer_state='zero'"),
                                         ({"on_nonfinite": "ignore"}, "on_nonfinite='ignore'"),
                                         ({"bucket_cap_mb": 0}, "bucket_cap_mb")])
def test_bad_policies_are_named(kw: dict, msg: str) -> None:
    m = _model()
    with pytest.raises(ValueError, match=msg):
        localsgd.LocalSGD(m, None, schedule=Fixed(2), **kw)


def test_schedule_is_required() -> None:
    with pytest.raises(ValueError, match="needs a schedule"):
        localsgd.LocalSGD(_model(), None)


def test_parameters_live_in_flat_buckets_and_layout_survives_a_move() -> None:
    m = _model()
    sync = localsgd.LocalSGD(m, None, schedule=Fixed(1), bucket_cap_mb=200 / 2**20)  # 50 floats/bucket
    n_params = sum(p.numel() for p in m.parameters())
    n_buffers = sum(b.numel() for b in m.buffers() if b.is_floating_point())
    assert sync.elements == n_params + n_buffers
    assert len(sync.layout.buffers[0].buckets) == -(-sync.elements // 50)
    flat = sync.layout.buffers[0].flat
    for p in m.parameters():
        assert p.untyped_storage().data_ptr() == flat.untyped_storage().data_ptr()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.double()  # re-materialises every parameter: the engine must notice and rebuild its layout
    sync.step()
    assert sync.layout.buffers[0].flat.dtype == torch.float64
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k].to(v.dtype)), k


def test_nonfinite_loss_raises_naming_rank_and_step() -> None:
    m = _model()
    sync = localsgd.LocalSGD(m, None, schedule=Fixed(3))
    sync.step(loss=torch.tensor(1.0))
    sync.step(loss=torch.tensor(float("nan")))
    with pytest.raises(localsgd.NonFiniteError, match="rank 0 at step 2"):
        sync.step(loss=torch.tensor(1.0))
    assert sync.stats.rounds == 0


def test_skip_round_restores_last_synced_state() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    sync = localsgd.LocalSGD(m, opt, schedule=Fixed(2), on_nonfinite="skip_round", max_skipped_rounds=1)
    _train(m, opt, 2, None)
    assert sync.step() is False and sync.step() is True
    good = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        next(m.parameters()).fill_(float("inf"))
    sync.step()
    sync.step()  # the sync finds inf, rolls back
    assert sync.stats.skipped_rounds == 1 and sync.stats.rounds == 1
    for k, v in m.state_dict().items():
        assert torch.equal(v, good[k]), k
    with torch.no_grad():
        next(m.parameters()).fill_(float("nan"))
    sync.step()
    with pytest.raises(localsgd.NonFiniteError):
        sync.step()  # a second consecutive skip exceeds max_skipped_rounds=1


def test_optimizer_state_reset_clears_momentum() -> None:
    m = _model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    sync = localsgd.LocalSGD(m, opt, schedule=Fixed(2), optimizer_state="reset")
    _train(m, opt, 1, None)
    assert len(opt.state) > 0
    sync.step()
    assert len(opt.state) > 0
    sync.step()
    assert len(opt.state) == 0


def test_engine_state_dict_round_trip() -> None:
    m = _model()
    sync = localsgd.LocalSGD(m, None, schedule=Fixed(3))
    for _ in range(7):
        sync.step()
    other = localsgd.LocalSGD(_model(), None, schedule=Fixed(3))
    other.load_state_dict(sync.state_dict())
    assert (other.local_step, other.last_sync_step, other.stats.rounds) == (7, 6, 2)
    assert [other.step() for _ in range(2)] == [False, True]


@pytest.mark.parametrize("floats_per_bucket", [1, 7, 40, 100, 112, 115, 119, 1000])
def test_check_words_always_ride_in_the_last_bucket(floats_per_bucket: int) -> None:
    """The fused check writes its words right before the last launch; no earlier bucket may hold
    any of them (it would already be in flight). 110 data floats + 10 words: cutting the whole
    buffer into equal buckets would split the words at caps 1, 7 and 112-119."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))  # 56 + 54 = 110 parameters
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(1), bucket_cap_mb=floats_per_bucket * 4 / 2**20)
    g = sync.layout.buffers[0]
    assert g.check_numel == 10 and g.data_numel == 110
    starts, ends = [s for s, _ in g.buckets], [e for _, e in g.buckets]
    assert starts[0] == 0 and ends[-1] == g.flat.numel() and starts[1:] == ends[:-1]  # contiguous cover
    assert starts[-1] <= g.data_numel  # the whole tail is in the last bucket
    assert all(e - s <= floats_per_bucket for s, e in g.buckets[:-1])
    for _ in range(3):
        assert sync.step()  # world size 1: the fused path runs and passes its own check


def test_layout_is_not_rebuilt_when_the_check_group_is_not_launched_last() -> None:
    """float64 first in model order (so it holds the check words) with buffers in both groups: the
    full layout check of finalize() must see the layout unchanged, and keep the fused check on."""
    model = nn.Module()
    model.a = nn.BatchNorm1d(4).double()
    model.b = nn.BatchNorm1d(4)
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(2))
    groups, version = sync.layout.buffers, sync.layout.version
    assert [g.flat.dtype for g in groups] == [torch.float64, torch.float32] and groups[0].check_numel
    for _ in range(4):
        sync.step()
    sync.finalize()  # in sync: only the layout check runs
    assert sync.layout.version == version and sync.fused_check_active


def test_adaptive_schedule_decides_from_the_rate_the_next_round_runs_at() -> None:
    """QSR (H = max(H_base, floor((alpha/lr)^2))) with a 10x LR drop due at local step 8: the round
    that starts at the sync after step 8 runs at the dropped rate, so its length must come from it
    (syncs 4, 8, then 8 + 100), not one round late from the rate of step 8 itself (which gives 8+4)."""
    from localsgd.schedules import QSR

    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def rate(step: int) -> float:  # the rate local step ``step`` (0-based) runs at
        return 0.1 if step < 8 else 0.01

    for next_lr, want in ((rate, [4, 8, 108]), (None, [4, 8, 12])):
        sync = localsgd.LocalSGD(model, opt, schedule=QSR(H_base=4, alpha=0.1), next_lr=next_lr)
        synced = []
        for step in range(110):
            for g in opt.param_groups:
                g["lr"] = rate(step)  # the trainer sets each step's rate before it runs
            if sync.step():
                synced.append(step + 1)
        assert synced[:3] == want


def test_payloads_above_fused_max_mb_are_checked_before_they_are_averaged() -> None:
    """The fused check backs up what it sends; above ``fused_max_mb`` a separate check is cheaper,
    so every sync then carries the full check and no check words. (The bytes of each path are
    counted in the multi-process tests: a group of one sends nothing, and counts nothing.)"""
    for fused_max_mb, fused_after_first in ((4.0, True), (0.0, False)):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 6))
        sync = localsgd.LocalSGD(model, None, schedule=Fixed(1), fused_max_mb=fused_max_mb)
        for _ in range(3):
            assert sync.step()
        assert sync.fused_check_active is fused_after_first
        assert sync.stats.rounds == 3 and sync.stats.check_bytes == 0 and sync.stats.bytes == 0
    with pytest.raises(ValueError, match="fused_max_mb"):
        localsgd.LocalSGD(model, None, schedule=Fixed(1), fused_max_mb=-1)
