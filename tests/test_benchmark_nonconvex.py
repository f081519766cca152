"""The pure helpers of ``benchmarks/nonconvex.py``: the equal-sample budget, the LR milestones moved with a
batch ramp, the Hydra overrides each run gets, and the per-config summary."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from benchmarks.nonconvex import (
    DECAY_FRACTIONS,
    SCHEDULES,
    RunPlan,
    RunResult,
    aligned_milestones,
    cumulative_samples,
    make_ramp,
    plan_runs,
    read_metrics,
    step_fraction,
    steps_for_budget,
    summarize,
)
from localsgd.config import check_config, register_configs
from localsgd.optim import first_decay_step, lr_at
from localsgd.train import config_dir


@pytest.mark.timeout(30)
def test_constant_batch_budget_and_milestones_are_the_plain_ones() -> None:
    assert steps_for_budget(lambda n: make_ramp("none", 32, n), 1200 * 32) == 1200
    cum = cumulative_samples(make_ramp("none", 32, 1200), 1200)
    assert cum[-1] == 1200 * 32 and cum[800] == 800 * 32
    assert [int(m * 1200) for m in aligned_milestones(cum, DECAY_FRACTIONS)] == [600, 900]


@pytest.mark.timeout(30)
def test_ramped_run_is_the_closest_step_count_to_the_sample_budget() -> None:
    budget = 1200 * 32

    def total(n: int) -> int:
        return int(cumulative_samples(make_ramp("linear", 32, n), n)[-1])

    t = steps_for_budget(lambda n: make_ramp("linear", 32, n), budget)
    # The ramp 32 -> 64 over the first quarter averages 0.25 * 48 + 0.75 * 64 = 60 per step: 1200 * 32 / 60 = 640
    # steps, up to the ramp's integer rounding.
    assert abs(t - 640) <= 2
    assert abs(total(t) - budget) <= min(abs(total(t - 1) - budget), abs(total(t + 1) - budget))
    assert abs(total(t) - budget) <= 64 // 2  # within half the largest batch


@pytest.mark.timeout(30)
def test_ramped_lr_decays_when_the_same_fraction_of_samples_is_consumed() -> None:
    t = 686
    ramp = make_ramp("linear", 32, t)
    cum = cumulative_samples(ramp, t)
    milestones = aligned_milestones(cum, DECAY_FRACTIONS)
    lrs = [lr_at(s, 0.05, warmup_steps=0, decay="step", total_steps=t, milestones=milestones, factor=0.1)
           for s in range(t)]
    decay_steps = [s for s in range(1, t) if lrs[s] < lrs[s - 1]]
    assert len(decay_steps) == 2
    for q, s in zip(DECAY_FRACTIONS, decay_steps):
        # The first step whose preceding samples reach q of the total, as the trainer's lr_at computes it.
        assert cum[s] >= q * cum[-1] > cum[s - 1]
    assert first_decay_step("step", t, milestones) == decay_steps[0]  # post_local's switch_step=-1


@pytest.mark.parametrize(("step", "total"), [(454, 853), (800, 1600), (1, 3), (86, 160), (600, 1200), (7, 7)])
@pytest.mark.timeout(10)
def test_step_fraction_is_the_smallest_fraction_that_maps_back_to_the_step(step: int, total: int) -> None:
    f = step_fraction(step, total)
    assert int(f * total) == step
    assert int(math.nextafter(f, -math.inf) * total) < step
    assert float(repr(f)) == f  # what the Hydra override string carries


@pytest.mark.timeout(60)
def test_overrides_compose_to_the_planned_run() -> None:
    plans = plan_runs(SCHEDULES, ("none", "linear"), [2], 4, 32, 1200)
    assert [p.key for p in plans] == [f"{s}/{r}" for r in ("none", "linear") for s in SCHEDULES]
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        for plan in (p for p in plans if p.schedule in ("post_local", "adacomm")):
            cfg = check_config(compose("config", overrides=plan.overrides(4, 32)))
            assert cfg.trainer.max_steps == plan.steps and cfg.trainer.seed == 2 and cfg.trainer.threads == 1
            assert list(cfg.optimizer.decay_milestones) == plan.milestones  # exact float round trip
            assert cfg.ramp.name == plan.ramp
            if plan.schedule == "post_local":
                assert (cfg.schedule.H, cfg.schedule.switch_step) == (16, -1)
            if plan.ramp == "linear":
                assert (cfg.ramp.b_end, cfg.ramp.start, cfg.ramp.end) == (64, 0.0, 0.25)
            if plan.schedule == "adacomm":
                assert (cfg.schedule.tau0, cfg.schedule.interval_steps) == (16, plan.every)
            assert not cfg.checkpoint.enable and cfg.logging.wandb == "disabled"


def _result(schedule: str, seed: int, acc: float, rounds: int, ok: bool = True) -> RunResult:
    plan = RunPlan(schedule, "none", seed, 100, [0.5, 0.75], 12800, 6)
    return RunResult(plan, ok, acc if ok else math.nan, 0.1, rounds if ok else 0, 10 * rounds, 12800,
                     error="" if ok else "NonFiniteError: non-finite loss")


@pytest.mark.timeout(10)
def test_summary_uses_the_seeds_that_finished_and_keeps_the_failures() -> None:
    rs = [_result("H=16", 0, 0.90, 7), _result("H=16", 1, 0.94, 7), _result("H=16", 2, 0.0, 0, ok=False),
          _result("H=1", 0, 0.95, 100)]
    s = summarize(rs)
    h16 = s["H=16/none"]
    assert h16["accuracy_mean"] == pytest.approx(0.92)
    assert h16["accuracy_std"] == pytest.approx(statistics.stdev([0.90, 0.94]))
    assert h16["rounds_mean"] == 7 and h16["failed"] == ["NonFiniteError: non-finite loss"]
    assert math.isnan(s["H=1/none"]["accuracy_std"])  # one seed: no spread to report


@pytest.mark.timeout(10)
def test_read_metrics_joins_each_eval_to_its_train_record(tmp_path: Path) -> None:
    recs = [{"event": "start", "step": 0},
            {"event": "train", "step": 5, "samples": 640, "comm_rounds": 1},
            {"event": "eval", "step": 5, "eval_accuracy": 0.5},
            {"event": "train", "step": 10, "samples": 1280, "comm_rounds": 2},
            {"event": "eval", "step": 10, "eval_accuracy": 0.7},
            {"event": "train", "step": 12, "samples": 1536, "comm_rounds": 3},
            {"event": "final", "step": 12, "steps": 12, "samples": 1536, "comm_rounds": 3,
             "final_eval_accuracy": 0.8}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    curve, final = read_metrics(path)
    assert [(p["step"], p["samples"], p["rounds"], p["accuracy"]) for p in curve] == [
        (5, 640, 1, 0.5), (10, 1280, 2, 0.7), (12, 1536, 3, 0.8)]
    assert final["final_eval_accuracy"] == 0.8
