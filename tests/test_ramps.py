"""Batch ramps, Goyal LR coupling and the noise-scale estimator (McCandlish et al., arXiv 1812.06162)."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from localsgd.optim import lr_at
from localsgd.ramps import (
    RAMPS,
    BatchRamp,
    GeometricRampConfig,
    LinearRampConfig,
    NoiseScaleEstimator,
    NoiseScaleRamp,
    NoiseScaleRampConfig,
    NoneRampConfig,
    PhasesRampConfig,
    SmithRamp,
    SmithRampConfig,
    StepRampConfig,
    build,
    coupled_lr,
    mccandlish_lr_multiplier,
    two_batch_estimates,
)

T = 1000  # total local steps of the ramps below

DETERMINISTIC = [
    NoneRampConfig(),
    StepRampConfig(milestones=[0.3, 0.6, 0.9], factor=3.0, b_max=500),
    LinearRampConfig(b_end=200, start=0.1, end=0.7),
    GeometricRampConfig(factor=1.5, every_steps=70, b_max=700),
    SmithRampConfig(milestones=[0.3, 0.6, 0.8], decay_factor=0.2, b_max=5000),
]


def test_phases_give_each_phase_its_batch_and_lr_and_are_never_coupled_again() -> None:
    """Phase i runs from int(starts[i]·T) at round(b0·B_i) and LR × L_i; L = B is linear scaling, by hand."""
    cfg = PhasesRampConfig(starts=[0.0, 0.25, 0.6], batch_factors=[1.0, 2.5, 8.0], lr_factors=[1.0, 2.5, 3.0])
    ramp = build(cfg, 6, T)
    assert [ramp.batch_size(t) for t in (0, 249, 250, 599, 600, T - 1)] == [6, 6, 15, 15, 48, 48]
    assert [ramp.lr_factor(t) for t in (0, 249, 250, 600)] == [1.0, 1.0, 2.5, 3.0]
    # the trainer's linear coupling does not multiply the phase's factor by b/b0 a second time
    assert ramp.lr_scale(600, 48, 6, coupling=True) == ramp.lr_scale(600, 48, 6, coupling=False) == 3.0
    shrinking = build(PhasesRampConfig(starts=[0.0, 0.5], batch_factors=[4.0, 1.0], lr_factors=[1.0, 1.0]), 8, T)
    assert [shrinking.batch_size(t) for t in (0, 500)] == [32, 8]  # a later phase may use a smaller batch


def test_a_phase_warms_its_lr_up_from_the_previous_phase_over_its_first_steps() -> None:
    # T = 1000; phase 1 runs steps 250..599 (350 steps): warm-up over round(0.2 * 350) = 70 of them
    cfg = PhasesRampConfig(starts=[0.0, 0.25, 0.6], batch_factors=[1.0, 2.0, 8.0], lr_factors=[1.0, 2.0, 8.0],
                           warmup=0.2)
    ramp = build(cfg, 4, T)
    assert ramp.warmup_steps == [0, 70, 80]  # phase 2: 400 steps, round(0.2 * 400)
    assert [ramp.lr_factor(t) for t in (0, 249)] == [1.0, 1.0]  # the first phase has no earlier LR to leave
    assert [ramp.lr_factor(t) for t in (250, 251, 318, 319, 599)] == pytest.approx(
        [1 + 1 / 70, 1 + 2 / 70, 1 + 69 / 70, 2.0, 2.0])
    assert [ramp.lr_factor(t) for t in (600, 639, 679, 680)] == pytest.approx([2 + 6 / 80, 2 + 6 * 40 / 80, 8.0, 8.0])
    assert ramp.batch_size(250) == 8  # the batch jumps; only the LR ramps
    falling = build(PhasesRampConfig(starts=[0.0, 0.5], batch_factors=[1.0, 1.0], lr_factors=[4.0, 1.0],
                                     warmup=1.0), 4, T)
    assert falling.lr_factor(500) == pytest.approx(4 - 3 / 500) and falling.lr_factor(999) == 1.0
    assert "after 70 warm-up steps" in ramp.describe()
    bad = [k for k, _, _ in PhasesRampConfig(warmup=1.5).problems()]
    assert bad == ["warmup"]


def _ids(cfgs: list) -> list[str]:
    return [c.name for c in cfgs]


# ---------------------------------------------------------------------------------------------- generic


def test_every_ramp_is_registered_and_default_configs_are_valid() -> None:
    assert RAMPS.names() == ["geometric", "linear", "noise_scale", "none", "phases", "smith", "step"]
    for entry in RAMPS.entries():
        cfg = entry.config_cls()
        assert list(cfg.problems()) == [], entry.name
        ramp = build(cfg, 32, T, world_size=4)
        assert isinstance(ramp, BatchRamp) and ramp.name == entry.name
        assert ramp.batch_size(0) >= 1 and ramp.lr_factor(0) == 1.0


@pytest.mark.parametrize("cfg", DETERMINISTIC, ids=_ids(DETERMINISTIC))
def test_batch_never_decreases_and_stays_under_b_max(cfg) -> None:
    ramp = build(cfg, 32, T)
    sizes = [ramp.batch_size(s) for s in range(T + 50)]
    assert sizes[0] == 32
    assert all(b2 >= b1 for b1, b2 in zip(sizes, sizes[1:]))
    cap = getattr(cfg, "b_max", None) or getattr(cfg, "b_end", None)
    if cap is not None:
        assert max(sizes) <= cap
    if cfg.name != "none":
        assert max(sizes) > 32


@pytest.mark.parametrize("cfg", DETERMINISTIC, ids=_ids(DETERMINISTIC))
def test_state_round_trip(cfg) -> None:
    ramp = build(cfg, 32, T)
    other = build(cfg, 32, T)
    other.load_state_dict(copy.deepcopy(ramp.state_dict()))
    assert [other.batch_size(s) for s in range(T)] == [ramp.batch_size(s) for s in range(T)]
    assert [other.lr_factor(s) for s in range(T)] == [ramp.lr_factor(s) for s in range(T)]
    with pytest.raises(ValueError, match="checkpoint holds batch ramp"):
        other.load_state_dict({"name": "something_else"})


def test_negative_step_is_refused() -> None:
    with pytest.raises(ValueError, match="step"):
        build(NoneRampConfig(), 8, T).batch_size(-1)


def test_step_ramp_values_and_cap() -> None:
    ramp = build(StepRampConfig(milestones=[0.5, 0.75], factor=2.0), 16, T)
    assert [ramp.batch_size(s) for s in (0, 499, 500, 749, 750, 999)] == [16, 16, 32, 32, 64, 64]
    capped = build(StepRampConfig(milestones=[0.5, 0.75], factor=2.0, b_max=48), 16, T)
    assert [capped.batch_size(s) for s in (0, 500, 750)] == [16, 32, 48]


def test_linear_ramp_values() -> None:
    ramp = build(LinearRampConfig(b_end=116, start=0.1, end=0.6), 16, T)  # steps 100..600
    assert ramp.batch_size(0) == ramp.batch_size(100) == 16
    assert ramp.batch_size(350) == 66  # halfway
    assert ramp.batch_size(600) == ramp.batch_size(999) == 116
    jump = build(LinearRampConfig(b_start=8, b_end=64, start=0.5, end=0.5), 16, T)
    assert (jump.batch_size(499), jump.batch_size(500)) == (8, 64)


def test_geometric_ramp_values_and_cap_without_overflow() -> None:
    ramp = build(GeometricRampConfig(factor=2.0, every_steps=100, b_max=100), 10, 10**9)
    assert [ramp.batch_size(s) for s in (0, 99, 100, 200, 300, 400)] == [10, 10, 20, 40, 80, 100]
    assert ramp.batch_size(10**9 - 1) == 100  # 2**(10**7) would overflow a float


# ------------------------------------------------------------------------------------------------ smith


@pytest.mark.parametrize("decay_factor, b_max", [(0.2, 5000), (0.1, None), (0.3, 2000), (0.5, 128)])
def test_smith_keeps_the_noise_scale_of_the_lr_decay_schedule(decay_factor: float, b_max: int | None) -> None:
    """lr·N/b equals the LR-decay schedule's lr·N/b₀ at every step, within 1e-12 relative."""
    n_data, base_lr, b0, milestones = 50_000, 0.1, 128, [0.3, 0.6, 0.8]
    ramp = build(SmithRampConfig(milestones=milestones, decay_factor=decay_factor, b_max=b_max), b0, T)
    assert isinstance(ramp, SmithRamp)
    switch = ramp.switch_step()
    for step in range(T):
        original = lr_at(step, base_lr, warmup_steps=0, decay="step", total_steps=T, milestones=milestones,
                         factor=decay_factor) * n_data / b0
        ours = base_lr * ramp.lr_factor(step) * n_data / ramp.batch_size(step)
        assert ours == pytest.approx(original, rel=1e-12), step
        if switch is None or step < switch:
            assert ramp.lr_factor(step) <= 1.0
            if decay_factor in (0.2, 0.1):  # 1/f is an integer: the batch absorbs the whole decay
                assert ramp.lr_factor(step) == 1.0
        else:
            assert ramp.batch_size(step) == b_max and ramp.lr_factor(step) < 1.0


def test_smith_batches_and_switch_to_lr_decay() -> None:
    # b0 = 128, ×5 at 300, 600, 800: 128 → 640 → 3200 → 16000 (capped at 5000, LR × 0.2³·5000/128)
    ramp = build(SmithRampConfig(milestones=[0.3, 0.6, 0.8], decay_factor=0.2, b_max=5000), 128, T)
    assert [ramp.batch_size(s) for s in (0, 299, 300, 600, 800)] == [128, 128, 640, 3200, 5000]
    assert [ramp.lr_factor(s) for s in (0, 300, 600)] == [1.0, 1.0, 1.0]
    assert ramp.lr_factor(800) == pytest.approx(0.2**3 * 5000 / 128, rel=1e-12)
    assert ramp.switch_step() == 800
    assert build(SmithRampConfig(b_max=None), 128, T).switch_step() is None


# ---------------------------------------------------------------------------------------------- goyal


def test_coupled_lr_warmup_and_linear_scaling() -> None:
    base, ref, batch, warm = 0.1, 256, 8192, 50
    target = base * batch / ref
    assert coupled_lr(base, batch, ref, 0, warm) == base
    assert coupled_lr(base, batch, ref, warm, warm) == pytest.approx(target, rel=1e-15)
    assert coupled_lr(base, batch, ref, 500, warm) == pytest.approx(target, rel=1e-15)
    values = [coupled_lr(base, batch, ref, s, warm) for s in range(warm + 1)]
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(d == pytest.approx((target - base) / warm, rel=1e-9) for d in steps)  # linear in between
    assert coupled_lr(base, batch, ref, 0, 0) == pytest.approx(target)  # no warm-up


def test_coupled_lr_follows_the_current_global_batch_of_a_ramp() -> None:
    workers, base, ref = 4, 0.05, 128
    ramp = build(GeometricRampConfig(factor=2.0, every_steps=100, b_max=256), 32, T)
    for step in range(0, T, 7):
        lr = coupled_lr(base, ramp.global_batch(step, workers), ref, step, warmup_steps=20)
        if step >= 20:
            assert lr == pytest.approx(base * workers * ramp.batch_size(step) / ref, rel=1e-15)
    assert coupled_lr(base, ramp.global_batch(350, workers), ref, 350, 20) == pytest.approx(base * 4 * 256 / 128)


@pytest.mark.parametrize("args", [(0.0, 8, 8, 0, 0), (0.1, 0, 8, 0, 0), (0.1, 8, 0, 0, 0), (0.1, 8, 8, -1, 0),
                                  (0.1, 8, 8, 0, -1), (math.nan, 8, 8, 0, 0)])
def test_coupled_lr_rejects_bad_arguments(args: tuple) -> None:
    with pytest.raises(ValueError, match="coupled_lr"):
        coupled_lr(*args)


# ------------------------------------------------------------------------------------ noise-scale ramp


def test_noise_scale_ramp_only_increases_and_clips() -> None:
    ramp = build(NoiseScaleRampConfig(b_min=16, b_max=256, warmup_measurements=0), 16, T, world_size=8)
    assert isinstance(ramp, NoiseScaleRamp)
    assert ramp.batch_size(0) == 16
    ramp.observe_noise_scale(8 * 40.4, step=10)  # round(40.4) = 40, but at most x2 per measurement
    assert ramp.batch_size(11) == 32
    ramp.observe_noise_scale(8 * 40.4, step=15)
    assert ramp.batch_size(16) == 40
    ramp.observe_noise_scale(8 * 20.0, step=20)  # a smaller estimate never lowers the batch
    assert ramp.batch_size(21) == 40
    for bad in (math.nan, math.inf, -5.0, 0.0):
        ramp.observe_noise_scale(bad, step=30)
        assert ramp.batch_size(31) == 40
    growth = []
    for k in range(4):
        ramp.observe_noise_scale(1e30, step=40 + k)
        growth.append(ramp.batch_size(41 + k))
    assert growth == [80, 160, 256, 256]  # doubling, then capped at b_max
    low = build(NoiseScaleRampConfig(b_min=24, b_max=256, warmup_measurements=0), 16, T, world_size=8)
    assert low.batch_size(0) == 24  # b_min above the trainer's batch
    low.observe_noise_scale(8.0, step=0)
    assert low.batch_size(1) == 24


def test_noise_scale_ramp_is_monotone_under_random_estimates_and_round_trips() -> None:
    gen = torch.Generator().manual_seed(5)
    ramp = build(NoiseScaleRampConfig(b_max=512), 32, T, world_size=4)
    sizes = []
    for step in range(0, 400, 4):
        ramp.observe_noise_scale(float(torch.rand(1, generator=gen)) * 3000, step)
        sizes.append(ramp.batch_size(step))
        if step == 200:
            saved = copy.deepcopy(ramp.state_dict())
            at_save = ramp.batch_size(step)
    assert all(b2 >= b1 for b1, b2 in zip(sizes, sizes[1:])) and max(sizes) <= 512
    restored = build(NoiseScaleRampConfig(b_max=512), 32, T, world_size=4)
    restored.load_state_dict(saved)
    assert restored.batch_size(201) == at_save and restored.last_step == 200
    ramp2 = build(NoiseScaleRampConfig(b_max=512), 32, T, world_size=4)
    ramp2.load_state_dict(saved)
    for b_simple in (100.0, 1500.0, 900.0):
        restored.observe_noise_scale(b_simple, 300)
        ramp2.observe_noise_scale(b_simple, 300)
        assert restored.batch_size(300) == ramp2.batch_size(300)


# --------------------------------------------------------------------------------- noise-scale estimator


def _draw(gen: torch.Generator, n: int, workers: int, b: int, d: int, sigma2: float,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """n measurements: per-example gradients g_i = e₁ + ξ_i, ξ ~ N(0, σ²I); returns (mean_k |g_k|², |ḡ|²)."""
    g = torch.randn(n, workers, b, d, generator=gen, dtype=dtype) * math.sqrt(sigma2)
    g[..., 0] += 1.0
    per_worker = g.mean(dim=2)  # (n, K, d): each worker's mean over its b examples
    small = per_worker.square().sum(-1).mean(-1)  # mean over workers of |G_small|²
    big = g.mean(dim=(1, 2)).square().sum(-1)  # |G_big|², the mean over all K·b examples
    return small, big


def test_noise_scale_estimate_within_5_percent_on_synthetic_gradients() -> None:
    """G = e₁, Σ = 0.01·I, d = 1000 ⇒ B_simple = 10. The ±5 % tolerance is ours."""
    gen = torch.Generator().manual_seed(1234)
    est = NoiseScaleEstimator(b_small=8, b_big=64, ema=0.95)
    assert math.isnan(est.b_simple())
    for _ in range(20):  # 20 chunks of 100 = 2000 updates
        small, big = _draw(gen, 100, workers=8, b=8, d=1000, sigma2=0.01, dtype=torch.float32)
        for s, b in zip(small.tolist(), big.tolist()):
            est.update(s, b)
    assert est.count == 2000
    assert est.b_simple() == pytest.approx(10.0, rel=0.05)
    assert est.trace_sigma() == pytest.approx(10.0, rel=0.05)
    assert est.grad_sq() == pytest.approx(1.0, rel=0.05)


def test_two_batch_estimates_are_unbiased() -> None:
    """Means over 10⁴ draws within 3 standard errors of tr Σ and |G|² (d = 50, σ² = 0.1: tr Σ = 5)."""
    gen = torch.Generator().manual_seed(99)
    grad_sq, trace = [], []
    for _ in range(10):
        small, big = _draw(gen, 1000, workers=8, b=8, d=50, sigma2=0.1, dtype=torch.float64)
        g2, s = two_batch_estimates(small, big, 8, 64)
        grad_sq.append(g2)
        trace.append(s)
    for values, truth in ((torch.cat(grad_sq), 1.0), (torch.cat(trace), 5.0)):
        assert values.numel() == 10_000
        se = float(values.std()) / math.sqrt(values.numel())
        assert abs(float(values.mean()) - truth) < 3 * se, (float(values.mean()), truth, se)


def test_estimator_nan_until_both_emas_positive_and_bias_correction() -> None:
    est = NoiseScaleEstimator(b_small=4, b_big=16, ema=0.9)
    assert math.isnan(est.b_simple()) and math.isnan(est.grad_sq())
    # |𝒢|² = (16·0.5 − 4·3.0)/12 < 0 → no ratio yet
    est.update(3.0, 0.5)
    assert est.last_grad_sq < 0 and math.isnan(est.b_simple())
    est2 = NoiseScaleEstimator(b_small=4, b_big=16, ema=0.9)
    est2.update(3.0, 1.5)  # |𝒢|² = (24 − 12)/12 = 1; 𝒮 = 1.5/(1/4 − 1/16) = 8
    assert est2.grad_sq() == pytest.approx(1.0) and est2.trace_sigma() == pytest.approx(8.0)  # bias-corrected
    assert est2.b_simple() == pytest.approx(8.0)
    with pytest.raises(ValueError, match="non-finite"):
        est2.update(math.nan, 1.0)


def test_estimator_discards_the_first_draws_from_its_emas() -> None:
    """An outlier first draw (initialisation) does not leak into the EMAs when discarded."""
    est = NoiseScaleEstimator(b_small=4, b_big=16, ema=0.95, discard_first=2)
    ref = NoiseScaleEstimator(b_small=4, b_big=16, ema=0.95)
    est.update(100.0, 1.0)  # B_simple of this draw alone is huge
    est.update(3.0, 1.5)
    assert math.isnan(est.b_simple()) and est.count == 0 and est.seen == 2
    assert (est.last_grad_sq, est.last_trace_sigma) == two_batch_estimates(3.0, 1.5, 4, 16)
    for small, big in ((3.0, 1.5), (2.5, 1.25)):
        est.update(small, big)
        ref.update(small, big)
    assert est.b_simple() == ref.b_simple() and est.count == ref.count == 2
    restored = NoiseScaleEstimator(b_small=4, b_big=16, ema=0.95, discard_first=2)
    restored.load_state_dict(copy.deepcopy(est.state_dict()))
    assert restored.state_dict() == est.state_dict()
    with pytest.raises(ValueError, match="discard_first"):
        NoiseScaleEstimator(4, 16, discard_first=-1)


def test_estimator_batch_override_and_state_round_trip() -> None:
    est = NoiseScaleEstimator(b_small=4, b_big=16)
    est.update(3.0, 1.5)
    est.update(2.0, 1.25, b_small=8, b_big=32)  # the batch ramp doubled b
    assert (est.b_small, est.b_big) == (8, 32)
    g2, s = two_batch_estimates(2.0, 1.25, 8, 32)
    assert (est.last_grad_sq, est.last_trace_sigma) == (g2, s)
    other = NoiseScaleEstimator(b_small=4, b_big=16)
    other.load_state_dict(copy.deepcopy(est.state_dict()))
    est.update(2.5, 1.0)
    other.update(2.5, 1.0)
    assert other.state_dict() == est.state_dict() and other.b_simple() == est.b_simple()
    with pytest.raises(ValueError, match="EMA"):
        NoiseScaleEstimator(4, 16, ema=0.5).load_state_dict(est.state_dict())
    with pytest.raises(ValueError, match="b_small < b_big"):
        NoiseScaleEstimator(b_small=8, b_big=8)
    with pytest.raises(ValueError, match="ema"):
        NoiseScaleEstimator(4, 16, ema=1.0)


# ---------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "cfg, fields",
    [
        (StepRampConfig(milestones=[0.0, 0.5]), ["milestones"]),
        (PhasesRampConfig(starts=[0.2, 0.5]), ["starts"]),
        (PhasesRampConfig(starts=[0.0, 0.5, 0.5], batch_factors=[1, 2, 3], lr_factors=[1, 1, 1]), ["starts"]),
        (PhasesRampConfig(starts=[0.0, 1.0]), ["starts"]),
        (PhasesRampConfig(batch_factors=[1.0]), ["batch_factors"]),
        (PhasesRampConfig(lr_factors=[1.0, 0.0]), ["lr_factors"]),
        (StepRampConfig(milestones=[1.5]), ["milestones"]),
        (StepRampConfig(factor=0.5), ["factor"]),
        (StepRampConfig(b_max=0), ["b_max"]),
        (LinearRampConfig(b_start=0), ["b_start"]),
        (LinearRampConfig(b_end=0), ["b_end"]),
        (LinearRampConfig(b_start=64, b_end=32), ["b_end"]),
        (LinearRampConfig(start=-0.1), ["start"]),
        (LinearRampConfig(start=0.6, end=0.5), ["end"]),
        (LinearRampConfig(end=1.5), ["end"]),
        (GeometricRampConfig(factor=0.9), ["factor"]),
        (GeometricRampConfig(every_steps=0), ["every_steps"]),
        (GeometricRampConfig(b_max=None), ["b_max"]),  # type: ignore[arg-type]
        (SmithRampConfig(decay_factor=0.0), ["decay_factor"]),
        (SmithRampConfig(decay_factor=2.0), ["decay_factor"]),
        (SmithRampConfig(milestones=[0.5, 2.0]), ["milestones"]),
        (SmithRampConfig(b_max=-3), ["b_max"]),
        (NoiseScaleRampConfig(b_min=0), ["b_min"]),
        (NoiseScaleRampConfig(b_max=0), ["b_max"]),
        (NoiseScaleRampConfig(b_min=64, b_max=32), ["b_max"]),
        (NoiseScaleRampConfig(ema=1.0), ["ema"]),
        (NoiseScaleRampConfig(measure_every_rounds=0), ["measure_every_rounds"]),
    ],
)
def test_bad_configs_are_named(cfg, fields: list[str]) -> None:
    assert [p[0] for p in cfg.problems()] == fields


@pytest.mark.parametrize(
    "cfg, match",
    [
        (StepRampConfig(b_max=16), "b_max=16 is below"),
        (GeometricRampConfig(b_max=16), "b_max=16 is below"),
        (SmithRampConfig(b_max=16), "b_max=16 is below"),
        (NoiseScaleRampConfig(b_max=16), "b_max=16 is below"),
        (LinearRampConfig(b_end=16), "b_start <= b_end"),
    ],
)
def test_builders_check_against_the_base_batch(cfg, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build(cfg, 32, T)


def test_noise_scale_ramp_ignores_its_first_estimates() -> None:
    ramp = build(NoiseScaleRampConfig(b_max=256, warmup_measurements=2), 16, T, world_size=2)
    ramp.observe_noise_scale(2000.0, step=0)  # one noisy draw would otherwise double the batch
    ramp.observe_noise_scale(2000.0, step=4)
    assert ramp.batch_size(5) == 16
    ramp.observe_noise_scale(2000.0, step=8)
    assert ramp.batch_size(9) == 32
    again = build(NoiseScaleRampConfig(b_max=256, warmup_measurements=2), 16, T, world_size=2)
    again.load_state_dict(ramp.state_dict())
    again.observe_noise_scale(2000.0, step=12)
    assert again.batch_size(13) == 64


# ------------------------------------------------------------------------------- capabilities, lr_scale

EVERY_RAMP = [*DETERMINISTIC, NoiseScaleRampConfig(b_max=512, lr_coupling="linear", warmup_measurements=0)]


def test_each_config_builds_its_own_ramp_through_the_registry() -> None:
    for entry in RAMPS.entries():
        cfg = entry.config_cls()
        direct = cfg.build(32, T, world_size=4)
        via_registry = RAMPS.build(cfg, 32, T, world_size=4)
        assert type(direct) is type(via_registry) and direct.describe() == via_registry.describe()


def test_build_accepts_omegaconf_nodes() -> None:
    from omegaconf import OmegaConf

    node = OmegaConf.structured(StepRampConfig(milestones=[0.5], factor=4.0, b_max=100))
    ramp = build(node, 16, T)
    assert [ramp.batch_size(s) for s in (499, 500)] == [16, 64]
    plain = build(OmegaConf.create({"name": "noise_scale", "b_max": 64, "lr_coupling": "capped_linear"}), 16, T, 2)
    assert isinstance(plain, NoiseScaleRamp) and plain.lr_coupling == "capped_linear"


def test_capabilities_replace_ramp_names() -> None:
    ramps = {entry.name: build(entry.config_cls(), 32, T, world_size=4) for entry in RAMPS.entries()}
    assert [n for n, r in ramps.items() if not r.couples_lr] == ["phases", "smith"]
    assert [n for n, r in ramps.items() if r.constant] == ["none"]
    assert [n for n, r in ramps.items() if r.observes_noise_scale] == ["noise_scale"]


def _feed(ramp: BatchRamp, estimates: list[float]) -> None:
    for i, b_simple in enumerate(estimates):
        ramp.observe_noise_scale(b_simple, step=10 * i)


@pytest.mark.parametrize("cfg", EVERY_RAMP, ids=_ids(EVERY_RAMP))
def test_lr_scale_is_the_trainers_former_formula(cfg) -> None:
    """``lr_factor(step) · (b/b₀ if coupling and not smith else 1)``, bit for bit, for every ramp but
    ``noise_scale``'s new default coupling (``lr_coupling=linear`` is the former behaviour)."""
    base = 32
    ramp = build(cfg, base, T, world_size=4)
    _feed(ramp, [4 * 40.0, 4 * 100.0, 4 * 300.0])  # only the noise-scale ramp reacts
    for step in range(0, T, 5):
        for batch in (ramp.batch_size(step), base, 3 * base + 1, 100 * base):
            for coupling in (True, False):
                former = ramp.lr_factor(step) * (batch / base if coupling and cfg.name != "smith" else 1.0)
                assert ramp.lr_scale(step, batch, base, coupling) == former, (step, batch, coupling)


def test_smith_lr_scale_ignores_coupling_after_the_switch() -> None:
    ramp = build(SmithRampConfig(milestones=[0.3, 0.6, 0.8], decay_factor=0.2, b_max=5000), 128, T)
    assert ramp.lr_scale(900, ramp.batch_size(900), 128, coupling=True) == ramp.lr_factor(900) < 1.0


def _mccandlish(b_noise: float, k: int, b: int, b0: int) -> float:
    """McCandlish et al. eq. 2.6 relative to the base batch, global batches K·b and K·b₀."""
    return (1 + b_noise / (k * b0)) / (1 + b_noise / (k * b))


def test_noise_scale_default_coupling_is_mccandlish_eq_2_6() -> None:
    k, b0 = 4, 16
    assert NoiseScaleRampConfig().lr_coupling == "mccandlish"
    ramp = build(NoiseScaleRampConfig(b_max=4096, warmup_measurements=0), b0, T, world_size=k)
    assert ramp.lr_scale(0, b0, b0, coupling=True) == 1.0  # no estimate yet
    assert ramp.lr_scale(0, 64, b0, coupling=True) == 1.0  # ... whatever the batch: B_noise is unknown
    for b_simple in (300.0, 2000.0, 9000.0):
        ramp.observe_noise_scale(b_simple, step=0)
        for b in (b0, 17, 64, ramp.batch_size(1), 4096):
            assert ramp.lr_scale(1, b, b0, coupling=True) == _mccandlish(b_simple, k, b, b0)
        assert ramp.lr_scale(1, 64, b0, coupling=False) == 1.0
    ramp.observe_noise_scale(math.nan, step=5)  # an unusable estimate keeps the last usable noise scale
    assert ramp.lr_scale(6, 64, b0, coupling=True) == _mccandlish(9000.0, k, 64, b0)


def test_mccandlish_multiplier_never_exceeds_eps_max_over_eps_b0() -> None:
    gen = torch.Generator().manual_seed(7)
    k, b0 = 8, 32
    for _ in range(300):
        b_noise = float(10 ** (torch.rand(1, generator=gen) * 7 - 1))  # 0.1 .. 1e6 samples
        ramp = build(NoiseScaleRampConfig(b_max=10**6, warmup_measurements=0), b0, T, world_size=k)
        ramp.observe_noise_scale(b_noise, step=0)
        bound = 1 + b_noise / (k * b0)  # ε_max / ε_opt(b₀)
        previous = 1.0
        for b in (b0, 2 * b0, 128 * b0, 10**6, 10**12):
            m = ramp.lr_scale(1, b, b0, coupling=True)
            assert previous <= m <= bound and m <= b / b0
            previous = m


def test_noise_scale_ramp_no_longer_scales_the_lr_with_a_128x_batch() -> None:
    """The reported run: the batch ramped 128x and linear coupling took the LR 0.05 to 6.4 (momentum 0.9).

    Early estimates far above the settled noise scale grow the batch, which never shrinks; once B_noise
    settles at 2·K·b₀ the LR multiplier is McCandlish's, below its bound 1 + 2 = 3, not 128.
    """
    k, b0, base_lr = 4, 16, 0.05
    cfg = NoiseScaleRampConfig(b_max=128 * b0, warmup_measurements=0)
    ramp = build(cfg, b0, T, world_size=k)
    linear = build(dataclasses.replace(cfg, lr_coupling="linear"), b0, T, world_size=k)
    estimates = [1e6] * 7 + [float(k * 2 * b0)] * 5  # x2 per measurement: 16 -> 2048 in 7 measurements
    _feed(ramp, estimates)
    _feed(linear, estimates)
    batch = ramp.batch_size(200)
    assert batch == linear.batch_size(200) == 128 * b0
    assert base_lr * linear.lr_scale(200, batch, b0, coupling=True) == pytest.approx(6.4)
    lr = base_lr * ramp.lr_scale(200, batch, b0, coupling=True)
    assert lr == base_lr * _mccandlish(k * 2.0 * b0, k, batch, b0) and lr < 3 * base_lr


def test_capped_linear_coupling() -> None:
    ramp = build(NoiseScaleRampConfig(lr_coupling="capped_linear", max_lr_scale=6.0), 16, T, world_size=2)
    assert [ramp.lr_scale(0, b, 16, coupling=True) for b in (16, 48, 96, 97, 4096)] == [1.0, 3.0, 6.0, 6.0, 6.0]
    assert ramp.lr_scale(0, 4096, 16, coupling=False) == 1.0


def test_noise_scale_lr_coupling_survives_a_checkpoint() -> None:
    cfg = NoiseScaleRampConfig(b_max=512, warmup_measurements=0)
    ramp = build(cfg, 16, T, world_size=4)
    _feed(ramp, [500.0, 800.0, math.nan])
    restored = build(cfg, 16, T, world_size=4)
    restored.load_state_dict(copy.deepcopy(ramp.state_dict()))
    assert restored.lr_scale(40, 64, 16, True) == ramp.lr_scale(40, 64, 16, True) == _mccandlish(800.0, 4, 64, 16)


@pytest.mark.parametrize("cfg, fields", [
    (NoiseScaleRampConfig(lr_coupling="sqrt"), ["lr_coupling"]),
    (NoiseScaleRampConfig(max_lr_scale=0.5), ["max_lr_scale"]),
    (NoiseScaleRampConfig(max_lr_scale=math.inf), ["max_lr_scale"]),
])
def test_bad_lr_coupling_configs_are_named(cfg, fields: list[str]) -> None:
    assert [p[0] for p in cfg.problems()] == fields
    with pytest.raises(ValueError, match=fields[0]):
        build(cfg, 16, T, world_size=2)


def test_mccandlish_lr_multiplier_rejects_an_unusable_noise_scale() -> None:
    assert mccandlish_lr_multiplier(100.0, 400, 100) == (1 + 100.0 / 100) / (1 + 100.0 / 400)
    for bad in (math.nan, math.inf, 0.0, -1.0):
        with pytest.raises(ValueError, match="noise scale"):
            mccandlish_lr_multiplier(bad, 400, 100)
