"""Reproductions 3 and 4 of the simulator issue: ``benchmarks/batch_delay.py`` (samples to a target over
global batch × H, the H = 1 fit of McCandlish et al.'s S = S_min + E_min/B) and ``benchmarks/stn_data.py``
(STN's schedule against constant hyperparameters as data grows): their helpers on known inputs, one real
run's checkpoints, and each ``--quick`` end to end (long)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch.func import functional_call

from benchmarks import batch_delay, stn_data
from localsgd.sim import Simulator, sim_config


def test_objective_of_the_first_n_samples_is_their_mean_loss_and_accuracy() -> None:
    cfg = sim_config("data=synthetic_logreg", "model=logreg", "trainer.max_steps=3", workers=2)
    sim = Simulator(cfg, 2, dtype=torch.float64)
    sim.run()
    params = sim.averaged_params()
    for n in (1, 37, 500):
        out = functional_call(sim.model, params, (sim.x_train[:n],))
        loss = float(torch.nn.functional.cross_entropy(out, sim.y_train[:n]))
        acc = float((out.argmax(-1) == sim.y_train[:n]).double().mean())
        got = sim.objective(split="train", samples=n, batch_size=16)  # several chunks for n > 16
        assert got[0] == pytest.approx(loss, rel=1e-12) and got[1] == pytest.approx(acc, abs=1e-15)
    assert sim.objective(split="train", samples=None) == sim.objective(split="train")


def test_the_minibatch_fit_recovers_s_min_and_e_min_and_the_critical_batch() -> None:
    for s_min, e_min in ((200.0, 12_000.0), (35.0, 900.0)):
        points = [(B, s_min + e_min / B) for B in (32, 128, 512, 2048)]
        fit = batch_delay.fit_minibatch(points)
        assert fit["S_min"] == pytest.approx(s_min, rel=1e-9) and fit["E_min"] == pytest.approx(e_min, rel=1e-9)
        assert fit["B_crit"] == pytest.approx(e_min / s_min, rel=1e-9)
    assert batch_delay.fit_minibatch([(32, 10.0)]) is None  # one batch size fixes no line
    assert batch_delay.fit_minibatch([(32, 64.0), (64, 32.0)])["B_crit"] == math.inf  # S ∝ 1/B: no knee in range
    assert batch_delay.fit_minibatch([(32, 10.0), (64, 20.0)])["B_crit"] == 0.0  # more batch, more steps


def _run(lr: float, seed: int, curve: list[tuple]) -> dict:
    return {"cell": "b=8,H=4", "b": 8, "H": 4, "lr": lr, "seed": seed, "curve": curve}


def test_a_cell_takes_the_lr_with_the_fewest_mean_samples_and_a_missed_seed_rules_an_lr_out() -> None:
    nan = float("nan")
    runs = [  # (samples, steps, rounds, loss, B_simple)
        _run(0.1, 0, [(4096, 32, 8, 0.9, 10.0), (8192, 64, 16, 0.4, 20.0)]),
        _run(0.1, 1, [(4096, 32, 8, 0.45, 30.0), (8192, 64, 16, 0.2, nan)]),
        _run(0.2, 0, [(4096, 32, 8, 0.3, nan)]),  # faster on seed 0 ...
        _run(0.2, 1, [(4096, 32, 8, 0.8, nan), (8192, 64, 16, 0.6, nan)]),  # ... but seed 1 never gets to 0.5
        _run(0.4, 0, [(4096, 32, 8, 2.3, nan)]), _run(0.4, 1, []),  # diverged: no checkpoint
    ]
    out = batch_delay.cell_summary(runs, (0.5, 0.25))
    assert out["global_batch"] == 16 * 8
    half = out["per_target"]["0.5"]
    assert half["lr"] == 0.1 and half["samples"] == (8192 + 4096) / 2 and half["steps"] == 48 and half["rounds"] == 12
    assert half["b_simple"] == pytest.approx(25.0)  # mean over the seeds' windows at the first hit
    quarter = out["per_target"]["0.25"]
    assert quarter["samples"] == math.inf and quarter["b_simple"] is None  # seed 0 of lr 0.1 stops at 0.4
    assert out["lowest_loss"] == 0.2 and out["lr_at_grid_edge"] == {"0.5": True}


def test_a_cell_whose_best_lr_is_an_end_of_its_grid_gets_the_next_lr_that_way() -> None:
    def runs(best: float) -> list[dict]:  # reaches 0.5 first at ``best``, later at the others
        return [_run(lr, 0, [(4096 if lr == best else 8192, 32, 8, 0.4, 1.0)]) for lr in (0.05, 0.1, 0.2)]

    assert batch_delay.extension(runs(0.2), "b=8,H=4", (0.5,)) == [0.4]
    assert batch_delay.extension(runs(0.05), "b=8,H=4", (0.5,)) == [0.025]
    assert batch_delay.extension(runs(0.1), "b=8,H=4", (0.5,)) == []  # inside: nothing to add
    missed = [_run(lr, 0, [(8192, 64, 16, 0.9, 1.0)]) for lr in (0.05, 0.1, 0.2)]
    assert batch_delay.extension(missed, "b=8,H=4", (0.5,)) == []  # no LR reached it: no edge to move


@pytest.mark.timeout(120)
def test_a_run_checks_the_averaged_model_at_the_first_sync_after_every_4096_samples() -> None:
    job = batch_delay.Job(b=8, H=4, lr=0.05, seed=0, samples=5 * batch_delay.CHECK_EVERY)
    res = batch_delay.run_job(job)
    assert not res["diverged"]
    drawn = [c[0] for c in res["curve"]]
    assert drawn == [batch_delay.CHECK_EVERY * i for i in range(1, len(drawn) + 1)]  # 4096 = 8 rounds of 16·8·4
    assert all(c[1] == c[0] // (16 * 8) and c[2] == c[1] // 4 for c in res["curve"])  # steps, rounds
    assert all(math.isnan(c[4]) for c in res["curve"])  # no noise measured with H > 1
    if res["curve"][-1][3] > min(batch_delay.TARGETS):
        assert drawn[-1] == job.samples  # the budget's end is the last check
    one = batch_delay.run_job(batch_delay.Job(b=8, H=1, lr=0.05, seed=0, samples=2 * batch_delay.CHECK_EVERY))
    assert all(c[4] > 0 for c in one["curve"])  # H = 1: the window's B_simple
    # the adaptive schedule: a run records the H it set, each the rule's for a global batch of 16·32
    ada = batch_delay.run_job(batch_delay.Job(b=32, H=batch_delay.ADAPTIVE, lr=0.05, seed=0,
                                              samples=8 * batch_delay.CHECK_EVERY))
    assert ada["h_chosen"] and all(1 <= h <= 16 for h in ada["h_chosen"]) and not res["h_chosen"]


def _stn_result(n: int, seed: int, losses: dict[str, float]) -> dict:
    return {"train_size": n, "seed": seed, "stn_final": {k: 0.1 for k in stn_data.stn.NAMES},
            "runs": {m: {"test_loss": losses[m], "test_accuracy": 1 - losses[m], "compute": 7} for m in losses}}


def test_stn_data_answers_per_size_from_the_seeds_losses() -> None:
    def losses(stn, grid, replay, const):
        return {"stn": stn, "grid (equal compute)": grid, "schedule replayed": replay,
                "grid best, full length": const, "no regularisation": const + 0.01}

    results = [_stn_result(4000, 0, losses(0.2, 0.5, 0.15, 0.3)), _stn_result(4000, 1, losses(0.3, 0.4, 0.35, 0.3)),
               _stn_result(100, 0, losses(0.6, 0.5, 0.4, 0.3)), _stn_result(100, 1, losses(0.6, 0.5, 0.2, 0.3))]
    table, answer = stn_data.summarize(results, [100, 4000])
    assert answer[4000] == {"stn_beats_grid_equal_compute": True, "schedule_beats_best_constant": True,
                            "schedule_wins": 1, "seeds": 2}  # mean 0.25 < 0.3, won on seed 0 only
    assert answer[100] == {"stn_beats_grid_equal_compute": False, "schedule_beats_best_constant": False,
                           "schedule_wins": 1, "seeds": 2}  # mean 0.30 is not below 0.30
    assert table[4000]["schedule replayed"]["test_loss"] == [0.15, 0.35]


@pytest.mark.long
@pytest.mark.timeout(300)
@pytest.mark.parametrize("module", [batch_delay, stn_data], ids=["batch_delay", "stn_data"])
def test_quick_reproductions_run_and_print_their_keys(module, capsys: pytest.CaptureFixture[str]) -> None:
    assert module.main(["--quick", "--processes", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["quick"] is True
    if module is batch_delay:
        assert {"cells", "fit", "delay_helps_above_bcrit", "delay_ratios_above_bcrit", "equal_rounds"} <= set(out)
        assert set(out["cells"]) == {f"b={b},H={H}" for b in (2, 8, 32, 128) for H in (1, 16, "adaptive")}
        assert set(out["adaptive_vs_fixed"]["0.5"]) == {"b=2", "b=8", "b=32", "b=128"}
        assert len(out["runs"]) == 12 and all(set(r["samples_to"]) == {"0.5"} for r in out["runs"])
        assert out["fit"]["0.5"]["B_simple"] > 0
    else:
        assert set(out["answer"]) == {"2000", "20000"} and set(out["results"]["2000"]) >= set(stn_data.METHODS)
