"""The simulator benchmarks: ``benchmarks/sim.py`` end to end (tiny), and the helpers of the reproductions
``benchmarks/stich.py`` and ``benchmarks/patel_dieuleveut.py`` (f*, steps to ε, the break in H, rounds needed)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import functional_call

from benchmarks import sim as sim_bench
from benchmarks.convex_sim import GRID_FACTOR, PROBLEM, Run, f_star, objective, run_one
from benchmarks.patel_dieuleveut import fit_exponent, methods, rounds_needed
from benchmarks.stich import h_max, median_steps
from localsgd.sim import Simulator, sim_config

SMALL = [*(o for o in PROBLEM if not o.startswith(("data.n_samples=", "data.n_features="))),
         "data.n_samples=1000", "data.n_features=10"]
LR = ["optimizer.lr=0.3", "optimizer.lr_decay=inverse_time", "optimizer.decay_t0=100"]


@pytest.mark.timeout(120)
def test_f_star_is_a_minimum_of_the_regularised_objective() -> None:
    lam = 1e-2
    fs, gnorm, gap0 = f_star(SMALL, lam)
    assert gnorm < 1e-8 and gnorm**2 / (2 * lam) < 1e-14 and gap0 > 0  # f* exact to ‖∇f‖²/(2μ)
    sim = Simulator(sim_config(*SMALL, f"optimizer.weight_decay={lam}", "trainer.max_steps=1", workers=1), 1,
                    dtype=torch.float64)
    x, y = sim.x_train, sim.y_train
    # the objective the benchmarks report is the mean cross-entropy plus (λ/2)‖θ‖², computed by hand here
    theta = {n: torch.randn_like(p, generator=torch.Generator().manual_seed(1)) * 0.1
             for n, p in sim.averaged_params().items()}
    by_hand = float(torch.nn.functional.cross_entropy(functional_call(sim.model, theta, (x,)), y)) \
        + 0.5 * lam * sum(float((p * p).sum()) for p in theta.values())
    assert objective(sim, theta, lam) == pytest.approx(by_hand, rel=1e-12)
    assert objective(sim, theta, lam) > fs


@pytest.mark.timeout(120)
def test_a_run_with_targets_stops_at_the_first_grid_point_below_the_smallest() -> None:
    lam = 1e-2
    fs, _, gap0 = f_star(SMALL, lam)
    targets = [gap0 / 4, gap0 / 40]
    res = run_one(Run("x", [*LR, "schedule.H=2"], 4, lam, fs, 5000, targets, 0, SMALL))
    curve = res["curve"]
    for eps in targets:
        first = next(step for step, gap in curve if gap <= eps)
        assert res["steps_to"][str(eps)] == first
    assert res["steps"] == res["steps_to"][str(min(targets))] == curve[-1][0] < 5000
    steps = [s for s, _ in curve]
    assert all(s % 2 == 0 for s in steps)  # measured at syncs only
    assert all(b >= math.ceil(a * GRID_FACTOR) for a, b in zip(steps, steps[1:]))
    # unreachable: the run goes to its end and says so
    never = run_one(Run("x", [*LR, "schedule.H=2"], 2, lam, fs, 40, [1e-12], 0, SMALL))
    assert never["steps_to"] == {"1e-12": None} and never["steps"] == 40


def test_h_max_is_the_last_h_within_25_percent_of_h1_with_every_smaller_h_too() -> None:
    assert h_max({1: 100, 4: 110, 16: 124, 64: 126, 256: 200}) == 16
    assert h_max({1: 100, 4: 130, 16: 101}) == 1  # a later recovery does not count
    assert h_max({1: 100, 4: None}) == 1 and h_max({1: None, 4: 10}) is None
    runs = [{"steps_to": {"0.01": s}} for s in (30, 10, 20)]
    assert median_steps(runs, 0.01) == 20 and median_steps([*runs, {"steps_to": {"0.01": None}}], 0.01) is None


def test_rounds_needed_interpolates_in_log_space_and_the_fit_recovers_an_exponent() -> None:
    pts = [(4, 8.0), (16, 2.0), (64, 1.0)]
    assert rounds_needed(pts, 4.0) == pytest.approx(8.0)  # halfway between 4 and 16 in log gap and log rounds
    assert rounds_needed(pts, 9.0) == 4.0 and rounds_needed(pts, 0.5) is None
    xs = [10.0, 40.0, 160.0]
    assert fit_exponent(xs, [3 * x**0.5 for x in xs]) == pytest.approx(0.5)
    labels = methods(1000, [4, 16])
    assert labels["pd C~16"] == ["schedule=patel_dieuleveut", "schedule.N1=7.8125"]  # 2T/C²: C(C+1)/2·N1 ≈ T
    assert labels["fixed C~16"] == ["schedule.H=63"] and labels["one_shot"] == ["schedule=one_shot"]


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.timeout(300)
def test_sim_benchmark_is_exact_against_gloo_and_prints_its_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert sim_bench.main(["--steps", "3", "--repeats", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["max_abs_diff_vs_gloo"] <= 1e-12 and out["max_workers"] == 1024
    assert set(out["worker_steps_per_s"]["logreg"]) == {"2", "16", "64", "256", "1024"}
    assert all(v > 0 for v in out["real_worker_steps_per_s"].values())
    assert set(out["speedup_vs_real"]) == {"logreg", "cnn1d"}


def test_phase_plan_spends_a_third_of_the_samples_in_each_phase_through_the_real_ramp() -> None:
    from benchmarks.phases import B0, K, jobs, phase_plan
    from localsgd.ramps import PhasesRampConfig, build

    samples = 8 * 16_000
    starts, factors, steps = phase_plan(16.0, samples)
    assert factors == [1.0, 4.0, 16.0]
    ramp = build(PhasesRampConfig(starts=starts, batch_factors=factors, lr_factors=factors), B0, steps)
    per_phase = [0, 0, 0]
    for t in range(steps):
        per_phase[ramp.phase(t)] += K * ramp.batch_size(t)
    assert sum(per_phase) == pytest.approx(samples, rel=0.01)
    assert all(abs(s - samples / 3) <= K * B0 * 16 for s in per_phase)  # within one step of the last phase
    labels = [j.label for j in jobs([4.0, 16.0], 8, [0])]
    rules = ("linear", "sqrt", "fixed", "linear+warmup")
    assert labels == ["constant", *(f"{r} F={f}" for f in (4, 16) for r in rules)]
