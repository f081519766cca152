"""Communication schedules: worked values from the papers, bookkeeping invariants,
exactness of averaging on a quadratic for every schedule, and rank agreement of adaptive decisions."""

from __future__ import annotations

import copy
import math
import random
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist
from torch import nn

import localsgd
from localsgd.errors import ConfigError
from localsgd.schedules import (
    QSR,
    SCHEDULES,
    AdaComm,
    AdaCommConfig,
    AdaptivePD,
    DDPConfig,
    Fixed,
    FixedConfig,
    Hierarchical,
    HierarchicalConfig,
    Lupa,
    LupaConfig,
    OneShot,
    OneShotConfig,
    PatelDieuleveut,
    PatelDieuleveutConfig,
    PostLocal,
    PostLocalConfig,
    QSRConfig,
    RunInfo,
    Stich,
    StichConfig,
    build,
)
from localsgd.schedules.adacomm import adacomm_tau

from .distributed import run_ok


def sync_steps(schedule, total: int) -> list[int]:
    out = []
    for step in range(1, total + 1):
        if schedule.should_sync(step):
            out.append(step)
            schedule.advance(step)
    return out


def test_stich_period_and_round_count() -> None:
    s = Stich(total_steps=10_000, workers=4, batch_size=1)
    assert s.H == 50 and s.rounds() == 200 == round(math.sqrt(10_000 * 4 * 1))
    assert Stich(10_000, 4, 1, H_max=20).H == 20
    assert Stich(10, 4, 8).H == 1  # never below 1


@pytest.mark.parametrize(("n1", "beta", "total"), [(1.0, 1.0, 5050), (1.0, 1.0, 777), (0.25, 1.0, 1000),
                                                    (2.0, 0.5, 3001), (1.0, 2.0, 10_000)])
def test_patel_dieuleveut_phases_cover_the_budget_exactly(n1: float, beta: float, total: int) -> None:
    s = PatelDieuleveut(n1, beta, total)
    lengths = [s.local_steps(r) for r in range(s.rounds())]
    assert lengths == sorted(lengths)  # non-decreasing
    # C is the smallest round count whose phases cover the budget: C - 1 phases fall short.
    assert sum(lengths) >= total > sum(lengths[:-1])
    assert lengths == [max(1, math.ceil(n1 * t**beta - 1e-9)) for t in range(1, s.rounds() + 1)]
    steps = sync_steps(PatelDieuleveut(n1, beta, total), total)
    assert len(steps) == s.rounds() - (0 if steps and steps[-1] == total else 1)


def test_patel_dieuleveut_large_step_size_is_a_polynomial_decay() -> None:
    """γ_k = ν·k^(−α) (Patel & Dieuleveut §2.4), k counted from the end of the warm-up."""
    from localsgd.optim import lr_at
    from localsgd.optim.torch_optim import SGDConfig

    def lr(step: int, warmup: int = 0) -> float:
        return lr_at(step, 0.5, warmup_steps=warmup, decay="poly", total_steps=100, milestones=[], factor=1.0,
                     power=0.75)

    assert [lr(k - 1) for k in (1, 2, 16)] == [0.5, 0.5 * 2**-0.75, 0.5 * 16**-0.75]
    assert lr(4, warmup=5) == 0.5 and lr(5, warmup=5) == 0.5 and lr(6, warmup=5) == 0.5 * 2**-0.75
    bad = [key for key, _, _ in SGDConfig(lr_decay="poly", decay_power=0.4).problems()]
    assert bad == ["decay_power"] and not list(SGDConfig(lr_decay="poly").problems())


def test_inverse_time_decay_is_stichs_c_over_a_plus_t_in_every_optimizer() -> None:
    """γ_t = lr/(1 + t/t0) = (lr·t0)/(t0 + t) (Stich, Theorem 2.2's c/(a + t)), t counted from the warm-up's end;
    every optimizer family reads the same fields (STN once ignored ``decay_power``)."""
    from localsgd.optim.stn import StnConfig
    from localsgd.optim.torch_optim import SGDConfig

    c = SGDConfig(lr=0.8, lr_decay="inverse_time", decay_t0=50.0, warmup_steps=4)
    assert [c.lr_at_step(k, 1000) for k in (0, 3, 4, 54, 154)] == [0.2, 0.8, 0.8, 0.8 / 2.0, 0.8 / 4.0]
    assert [key for key, _, _ in SGDConfig(lr_decay="inverse_time", decay_t0=0.0).problems()] == ["decay_t0"]
    assert not list(SGDConfig(lr_decay="none", decay_t0=0.0).problems())  # only checked when used
    stn = StnConfig(lr=0.5, lr_decay="poly", decay_power=0.6)
    assert stn.lr_at_step(15, 100) == 0.5 * 16**-0.6


def test_patel_dieuleveut_linear_round_count() -> None:
    assert PatelDieuleveut(1.0, 1.0, 5050).rounds() == 100  # smallest C with C(C+1)/2 >= 5050
    assert PatelDieuleveut(1.0, 1.0).rounds(5051) == 101


def test_post_local_switches_to_full_rounds_of_H() -> None:
    steps = sync_steps(PostLocal(switch_step=100, H=4), 120)
    assert steps == [*range(1, 101), 104, 108, 112, 116, 120]


def test_torch_periodic_averager_first_post_warmup_round_is_one_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins the 3-step offset to PyTorch's PeriodicModelAverager(period=4, warmup_steps=100)."""
    from torch.distributed.algorithms.model_averaging import averagers

    calls: list[int] = []
    avg = averagers.PeriodicModelAverager(period=4, warmup_steps=100, process_group=object())
    monkeypatch.setattr(averagers.utils, "average_parameters_or_parameter_groups",
                        lambda params, group: calls.append(avg.step))
    for _ in range(120):
        avg.average_parameters([])
    torch_post = [c + 1 for c in calls]  # 1-based optimizer steps after which torch averages
    ours_post = [s for s in sync_steps(PostLocal(100, 4), 120) if s > 100]
    assert torch_post == [101, 105, 109, 113, 117]
    assert [t + 3 for t in torch_post[:-1]] == ours_post[:-1]


def test_adacomm_worked_values() -> None:
    assert adacomm_tau(0.25, 1.0, 20, 1.0, 1, None) == 10
    assert adacomm_tau(1.0, 1.0, 20, 1.0, 1, None) == 20
    assert adacomm_tau(1.0, 10.0, 20, 1.0, 1, None) == math.ceil(20 * math.sqrt(10)) == 64
    assert adacomm_tau(1e-9, 1.0, 20, 1.0, 1, None) == 1
    assert adacomm_tau(4.0, 1.0, 20, 1.0, 1, 30) == 30


def test_adacomm_period_shrinks_as_loss_falls_at_constant_lr() -> None:
    s = AdaComm(tau0=20, interval_steps=1)
    taus, step = [], 0
    for loss in [2.0, 1.8, 1.5, 1.1, 0.8, 0.5, 0.3, 0.1]:
        step += s.local_steps(s.sync_round)
        s.observe(step=step, loss=loss, lr=0.1)
        s.advance(step)
        taus.append(s.tau)
    assert taus == sorted(taus, reverse=True) and taus[0] == 20 and taus[-1] == math.ceil(math.sqrt(0.05) * 20)


def authors_lupa_syncs(total: int, tau: int, rounds: int, in_floats: bool = False) -> list[int]:
    """Global steps at which the authors' code averages (github.com/mmkamani7/LUPA-SGD: ``main.py --adaptive``
    builds ``local_updates = [τ(1 + α i) for i in 0..C]``; ``utils.SyncHook`` averages in ``before_run``
    when TensorFlow's ``SecondOrStepTimer`` fires: at the first step seen, then at the first global
    step >= last sync + local_updates[count]). Training stops after ``total`` steps.

    ``in_floats`` computes α and τ_i in binary floating point as ``main.py`` does; otherwise exactly.
    """
    if in_floats:
        alpha = 2 / (rounds + 1) * (total / (rounds * tau))
        periods = [tau * (1 + alpha * i) for i in range(rounds + 1)]
    else:
        periods = [tau * (1 + Fraction(2 * total, (rounds + 1) * rounds * tau) * i) for i in range(rounds + 1)]
    syncs: list[int] = []
    count, every = 0, tau
    for global_step in range(total):  # before_run of the step that would bring the count to global_step + 1
        if not syncs or (global_step != syncs[-1] and global_step >= syncs[-1] + every):
            syncs.append(global_step)
            count += 1
            every = periods[count]
    return syncs


def test_lupa_syncs_where_the_authors_code_does() -> None:
    """Random (T, τ, C): after the authors' step-0 average (a no-op for us: replicas start equal) every
    sync falls on the same step as theirs, with their α and τ_i computed exactly."""
    rng = random.Random(1910)
    for _ in range(200):
        total, tau, rounds = rng.randint(1, 4000), rng.randint(1, 120), rng.randint(1, 40)
        theirs = authors_lupa_syncs(total, tau, rounds)
        assert theirs[0] == 0
        assert sync_steps(Lupa(tau, rounds, total), total - 1) == theirs[1:], (total, tau, rounds)


def test_lupa_readme_run_and_the_float_difference() -> None:
    # The README run (epsilon, T = 5469, --sync-step 91, C = 10): gaps ⌈τ_1⌉ = 191, ⌈τ_2⌉ = 290, ...
    readme = [0, 191, 481, 871, 1360, 1949, 2637, 3425, 4312, 5298]
    assert authors_lupa_syncs(5469, 91, 10) == authors_lupa_syncs(5469, 91, 10, in_floats=True) == readme
    assert sync_steps(Lupa(91, 10, 5469), 5468) == readme[1:]
    s = Lupa(tau=91, rounds=10, total_steps=5469)
    assert s.alpha == Fraction(2 * 5469, 11 * 10 * 91) and s.period(0) == 91
    assert [s.local_steps(r) for r in range(3)] == [191, 290, 390] == [math.ceil(s.period(i)) for i in (1, 2, 3)]
    # Σ_{i=1..C} ⌈τ_i⌉ >= Cτ + T: C rounds cover T.
    assert sum(s.local_steps(r) for r in range(9)) < 5469 <= sum(s.local_steps(r) for r in range(10))
    # T = 1068, τ = 159, C = 3: τ_1 = 337 exactly, 337.00000000000006 in floats, so the authors wait 338.
    assert authors_lupa_syncs(1068, 159, 3, in_floats=True) == [0, 338, 853]
    assert authors_lupa_syncs(1068, 159, 3) == [0, 337, 852] == [0, *sync_steps(Lupa(159, 3, 1068), 1067)]


def test_qsr_grows_as_the_lr_decays() -> None:
    s = QSR(H_base=4, alpha=0.1)
    s.observe(step=1, lr=0.1)
    assert s.H == 4
    s.observe(step=2, lr=0.01)
    assert s.H == 100
    s.observe(step=3, lr=0.05)  # (0.3/0.05)² = 36 exactly, though the float quotient is 35.99999...
    assert QSR(H_base=4, alpha=0.3).H == 4 and s.alpha == 0.1
    q = QSR(H_base=4, alpha=0.3)
    q.observe(step=1, lr=0.05)
    assert q.H == 36


def drive(schedule, total: int, lr_at, loss_at=lambda step: 1.0) -> list[int]:
    """Sync steps when, at each sync, ``observe`` gets the LR the next round's first step runs at.

    ``lr_at(k)`` is the LR of 0-based step k, so after the sync at (1-based) step s the next round's
    first step is k = s; this is the order the engine calls ``observe`` and then ``advance`` in.
    """
    out = []
    for step in range(1, total + 1):
        if schedule.should_sync(step):
            out.append(step)
            schedule.observe(step=step, loss=loss_at(step), lr=lr_at(step))
            schedule.advance(step)
    return out


def test_qsr_lengthens_the_round_that_starts_with_a_dropped_lr() -> None:
    """H = max(H_base, ⌊(α/η)²⌋) (Gu et al., ICLR 2024) from the LR the next round runs at: a 10x drop
    due at step 12 makes the round starting after the sync at 12 last ⌊(0.2/0.01)²⌋ = 400 steps."""
    lr_at = lambda k: 0.1 if k < 12 else 0.01  # noqa: E731
    assert drive(QSR(H_base=4, alpha=0.2), 450, lr_at) == [4, 8, 12, 12 + 400]
    # A drop at a step that is not a sync shows at the next sync: rounds 4, 4, 4 (the one the drop
    # falls in, at 0.1 when it started), then 400.
    assert drive(QSR(H_base=4, alpha=0.2), 450, lambda k: 0.1 if k < 10 else 0.01) == [4, 8, 12, 412]
    # ⌊(α/η)²⌋ below H_base keeps H_base: α = 0.2 at η = 0.1 is 4, at η = 0.2 it is 1.
    assert drive(QSR(H_base=4, alpha=0.2), 20, lambda k: 0.2) == [4, 8, 12, 16, 20]


@pytest.mark.parametrize(("lr_power", "tau_after_drop"), [(1.0, math.ceil(10 * math.sqrt(10))), (2.0, 100)])
def test_adacomm_resizes_the_round_that_starts_with_a_dropped_lr(lr_power: float, tau_after_drop: int) -> None:
    """τ_l = ⌈√((F_l/F₀)·(η₀/η_l)^p)·τ₀⌉ (Wang & Joshi 2019): at constant loss a 10x LR drop due at the
    interval boundary (step 20) sets the very next round to ⌈√(10^p)·10⌉ (32 for p = 1, 100 for p = 2)."""
    lr_at = lambda k: 0.1 if k < 20 else 0.01  # noqa: E731
    schedule = AdaComm(tau0=10, interval_steps=10, lr_power=lr_power)
    # The sync at 10 records F₀ and η₀; the one at 20 is the first interval boundary.
    assert drive(schedule, 20 + 2 * tau_after_drop, lr_at) == [10, 20, 20 + tau_after_drop, 20 + 2 * tau_after_drop]
    assert schedule.local_steps(schedule.sync_round) == tau_after_drop


def test_adacomm_period_follows_the_loss_and_the_next_lr_together() -> None:
    """F halves and η drops 10x at the boundary: τ = ⌈√(0.5·10)·10⌉ = ⌈22.36⌉ = 23."""
    schedule = AdaComm(tau0=10, interval_steps=10)
    steps = drive(schedule, 80, lambda k: 0.1 if k < 20 else 0.01, lambda step: 2.0 if step < 20 else 1.0)
    assert steps == [10, 20, 43, 66] and math.ceil(math.sqrt(5) * 10) == 23


def test_adaptive_pd_grows_inversely_to_the_loss_gap_and_never_shrinks() -> None:
    s = AdaptivePD(N1=2, N_max=50, loss_floor=0.5)
    seq = []
    for loss in [2.5, 1.5, 1.0, 2.0, 0.6, 0.5]:
        s.observe(step=0, loss=loss)
        seq.append(s.current)
    assert seq == [2, 4, 8, 8, 40, 50]


def test_schedule_state_round_trips() -> None:
    for make in (lambda: AdaComm(5, 3), lambda: QSR(2, 0.2), lambda: AdaptivePD(1, 1, 9)):
        a = make()
        for step, loss in ((4, 2.0), (9, 1.0), (15, 0.5)):
            a.observe(step=step, loss=loss, lr=0.05)
            a.advance(step)
        b = make()
        b.load_state_dict(a.state_dict())
        ahead = [a.local_steps(a.sync_round + k) for k in range(3)]
        assert [b.local_steps(b.sync_round + k) for k in range(3)] == ahead
        assert b.state_dict() == a.state_dict()


def run_info(**overrides) -> RunInfo:
    return RunInfo(**{"total_local_steps": 1000, "world_size": 4, "batch_size": 8, **overrides})


@pytest.mark.parametrize(("cfg", "run", "kind", "expected"), [
    (FixedConfig(H=5), run_info(), Fixed, "fixed(H=5)"),
    (OneShotConfig(), run_info(), OneShot, "one_shot"),
    (StichConfig(c=0.29), run_info(total_local_steps=10_000, world_size=1, batch_size=1), Stich, "stich(H=29)"),
    (StichConfig(H_max=3), run_info(), Stich, "stich(H=3)"),
    (PatelDieuleveutConfig(N1=1.5, beta=0.5), run_info(), PatelDieuleveut, "patel_dieuleveut(N1=1.5, beta=0.5)"),
    (PatelDieuleveutConfig(N1=2.4, adaptive=True, N_max=9), run_info(), AdaptivePD,
     "patel_dieuleveut_adaptive(N1=2, N_max=9)"),
    (PostLocalConfig(H=4), run_info(first_lr_decay_step=300), PostLocal, "post_local(switch=300, H=4)"),
    (PostLocalConfig(H=4, switch_step=7), run_info(), PostLocal, "post_local(switch=7, H=4)"),
    (PostLocalConfig(H=4, switch_step=7), run_info(first_lr_decay_step=300), PostLocal, "post_local(switch=7, H=4)"),
    (PostLocalConfig(H=4), run_info(), PostLocal, "post_local(switch=500, H=4)"),  # no decay: half the run
    (PostLocalConfig(H=4, switch_fraction=0.25), run_info(), PostLocal, "post_local(switch=250, H=4)"),
    (PostLocalConfig(H=4, switch_fraction=0.25), run_info(first_lr_decay_step=300), PostLocal,
     "post_local(switch=300, H=4)"),  # the first decay wins over the fraction
    (AdaCommConfig(tau0=6), run_info(), AdaComm, "adacomm(tau0=6)"),
    (LupaConfig(tau=3, rounds=8), run_info(), Lupa, "lupa(tau=3, C=8)"),
    (HierarchicalConfig(H_group=2, H_global=6), run_info(local_world_size=8), Hierarchical,
     "hierarchical(H_group=2, H_global=6, group_size=8)"),
    (HierarchicalConfig(group_size=2), run_info(local_world_size=8), Hierarchical,
     "hierarchical(H_group=4, H_global=16, group_size=2)"),
    (QSRConfig(H_base=3, alpha=0.5), run_info(), QSR, "qsr(H_base=3, alpha=0.5)"),
])
def test_each_config_builds_its_schedule(cfg, run: RunInfo, kind: type, expected: str) -> None:
    schedule = build(cfg, run)
    assert type(schedule) is kind and schedule.describe() == expected
    assert cfg.build(run).describe() == expected  # the registry only forwards to the config


def test_the_run_budget_reaches_the_schedule() -> None:
    lupa = build(LupaConfig(tau=91, rounds=10), run_info(total_local_steps=5469))
    assert [lupa.local_steps(r) for r in range(3)] == [191, 290, 390]
    stich = build(StichConfig(), run_info(total_local_steps=10_000, world_size=4, batch_size=1))
    assert stich.rounds() == 200
    pd = build(PatelDieuleveutConfig(), run_info(total_local_steps=5050))
    assert pd.rounds() == 100


def test_ddp_builds_no_schedule() -> None:
    with pytest.raises(ConfigError, match="not a LocalSGD schedule"):
        build(DDPConfig(), run_info())
    assert callable(DDPConfig().build_communicator)


def test_post_local_refuses_a_fraction_outside_zero_to_one() -> None:
    assert [k for k, _, _ in PostLocalConfig(switch_fraction=1.5).problems()] == ["switch_fraction"]
    assert [k for k, _, _ in PostLocalConfig(switch_fraction=-0.1).problems()] == ["switch_fraction"]
    assert not list(PostLocalConfig(switch_fraction=1.0).problems())


@pytest.mark.slow
def test_post_local_trains_on_its_defaults_and_records_its_switch(tmp_path: Path) -> None:
    from .launch_helpers import TINY, output, records, single

    run = tmp_path / "run"
    proc = single(tmp_path, run, [*TINY, "schedule=post_local"])  # optimizer=sgd: no LR decay
    assert proc.returncode == 0, output(proc)
    final = records(run, "final")[0]
    assert final["schedule"] == "post_local(switch=20, H=16)"  # half of trainer=smoke's 40 steps
    assert final["comm_rounds"] == 20 + 2  # H = 1 for 20 rounds, then H = 16 (steps 36, 40 with the final)


def test_noise_adaptive_h_is_the_exact_floor_root_of_batch_over_noise_clipped() -> None:
    from localsgd.schedules.noise_adaptive import NoiseAdaptive, NoiseAdaptiveConfig, noise_adaptive_h

    assert [noise_adaptive_h(512, b, 1, 16) for b in (600, 512, 129, 128, 57, 32, 1)] == [1, 1, 1, 2, 2, 4, 16]
    assert noise_adaptive_h(900, 100.0, 1, 16) == 3 and noise_adaptive_h(899, 100.0, 1, 16) == 2  # 9 exactly
    assert noise_adaptive_h(64, 0.5, 2, 8) == 8 and noise_adaptive_h(64, 1000.0, 2, 8) == 2  # clipped
    assert all(noise_adaptive_h(64, b, 1, 16) is None for b in (float("nan"), float("inf"), 0.0, -3.0))
    s = NoiseAdaptive(H_min=1, H_max=16, H_start=2)
    assert s.should_sync(2) and not s.should_sync(1)  # H_start before any estimate
    s.observe_noise_scale(float("nan"), 0, 512)  # an unusable estimate changes nothing
    s.advance(2)
    assert s.next_sync_step == 4
    s.observe_noise_scale(32.0, 2, 512)  # sqrt(16) = 4 from the next round on
    assert s.fingerprint() == 4 and s.history == [(2, 32.0, 4)]
    s.advance(4)
    assert s.next_sync_step == 8
    t = NoiseAdaptive(H_start=2)
    t.load_state_dict(s.state_dict())
    assert (t.H, t.next_sync_step, t.history) == (4, 8, s.history)
    bad = {k for k, _, _ in NoiseAdaptiveConfig(H_min=2, H_start=1).problems()}
    assert bad == {"H_start"} and {k for k, _, _ in NoiseAdaptiveConfig(H_max=0).problems()} == {"H_max"}
    with pytest.raises(ValueError, match="1 <= H_min <= H_start <= H_max"):
        NoiseAdaptive(H_min=4, H_max=2)


def test_every_schedule_yaml_has_a_registered_config_and_back() -> None:
    """A schedule is its file, its YAML and its test: the registry and configs/schedule/ list the same names."""
    yaml_names = sorted(p.stem for p in (Path(__file__).parents[1] / "configs" / "schedule").glob("*.yaml"))
    assert SCHEDULES.names() == yaml_names
    for entry in SCHEDULES.entries():
        assert entry.config_cls().name == entry.name
        assert callable(entry.config_cls.build)


# ------------------------------------------------------------------ multi-rank
def _quadratic_all_schedules(rank: int, world: int) -> dict[str, float]:
    d, lr, steps = 4, 0.05, 60
    g = torch.Generator().manual_seed(3)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    A, b = m @ m.T / d + torch.eye(d, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    noise = torch.randn(steps, world, d, generator=g, dtype=torch.float64)
    makers = {"fixed": lambda: Fixed(5), "stich": lambda: Stich(steps, world, 1),
              "patel_dieuleveut": lambda: PatelDieuleveut(1.0, 1.0, steps), "post_local": lambda: PostLocal(10, 7),
              "adacomm": lambda: AdaComm(6, 10), "lupa": lambda: Lupa(3, 8, steps), "qsr": lambda: QSR(2, 0.3),
              "adaptive_pd": lambda: AdaptivePD(1, 1, 12), "one_shot": OneShot}
    worst, sync_steps_seen = {}, {}
    for name, make in makers.items():
        x = nn.Parameter(torch.zeros(d, dtype=torch.float64))
        holder = nn.Module()
        holder.x = x
        opt = torch.optim.SGD([x], lr=lr)
        sync = localsgd.LocalSGD(holder, opt, schedule=make())
        y = torch.zeros(d, dtype=torch.float64)
        err, seen = 0.0, []
        for t in range(steps):
            opt.zero_grad()
            x.grad = A @ x.detach() - b + noise[t, rank]
            loss = 0.5 * x.detach() @ A @ x.detach() - b @ x.detach()
            opt.step()
            y = y - lr * (A @ y - b + noise[t].mean(0))
            # A loss that falls fast, so the loss-driven schedules (AdaComm, adaptive PD) really adapt.
            if sync.step(loss=(loss + 10) / (t + 1)):
                err = max(err, float((x.detach() - y).abs().max()))
                seen.append(t + 1)
        if sync.finalize():  # one_shot's only average; a partial last round for the others
            err = max(err, float((x.detach() - y).abs().max()))
        assert sync.stats.rounds >= (1 if name == "one_shot" else 2), name
        worst[name], sync_steps_seen[name] = err, seen
    return {"worst": worst, "syncs": sync_steps_seen}


@pytest.mark.slow
def test_every_schedule_keeps_the_averaged_iterate_equal_to_minibatch_sgd_on_a_quadratic() -> None:
    for report in run_ok(_quadratic_all_schedules, 2, timeout_s=120):
        assert all(v < 1e-10 for v in report["worst"].values()), report["worst"]
        gaps = {name: {b - a for a, b in zip([0, *steps], steps)} for name, steps in report["syncs"].items()}
        assert len(gaps["adacomm"]) > 1 and len(gaps["adaptive_pd"]) > 1, gaps  # they did adapt
        assert report["syncs"]["one_shot"] == []


ADAPTIVE_MAKERS = {"adacomm": lambda: AdaComm(tau0=4, interval_steps=4), "qsr": lambda: QSR(H_base=2, alpha=0.3),
                   "adaptive_pd": lambda: AdaptivePD(N1=1, N_max=12, loss_floor=0.5)}


def _adaptive_agreement(rank: int, world: int, name: str) -> dict:
    """Ranks see different losses; decisions come from all-reduced values, so they agree. A resume from
    a mid-run state_dict continues with exactly the uninterrupted run's decisions."""

    def run(sync: localsgd.LocalSGD, opt: torch.optim.Optimizer, steps: range) -> list[int]:
        synced = []
        for step in steps:
            for group in opt.param_groups:
                group["lr"] = 0.1 / (1 + step / 10)  # a decaying LR (QSR reads it)
            if sync.step(loss=torch.tensor(5.0 / step * (1 + rank))):
                synced.append(step)
        return synced

    def build() -> tuple[localsgd.LocalSGD, torch.optim.Optimizer]:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return localsgd.LocalSGD(model, opt, schedule=ADAPTIVE_MAKERS[name]()), opt

    sync, opt = build()
    first = run(sync, opt, range(1, 31))
    saved = copy.deepcopy(sync.state_dict())
    rest = run(sync, opt, range(31, 81))
    resumed, opt2 = build()
    resumed.load_state_dict(saved)
    rest_resumed = run(resumed, opt2, range(31, 81))
    out: list = [None] * world
    tdist.all_gather_object(out, first + rest)
    return {"syncs": out, "loss": sync.last_round_loss, "resumed_equal": rest_resumed == rest}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(ADAPTIVE_MAKERS))
def test_adaptive_decisions_agree_across_ranks_and_survive_resume(name: str) -> None:
    reports = run_ok(_adaptive_agreement, 2, name)
    syncs = reports[0]["syncs"]
    assert syncs[0] == syncs[1]
    gaps = {b - a for a, b in zip([0, *syncs[0]], syncs[0])}
    assert len(gaps) > 1, gaps  # it actually adapted
    assert reports[0]["loss"] == reports[1]["loss"]  # the all-reduced loss, bit-identical on both ranks
    assert all(r["resumed_equal"] for r in reports)


def _hierarchical(rank: int, world: int, outer_lr: float | None = None, outer_momentum: float = 0.0) -> dict:
    """4 ranks as 2 'nodes' x 2: group averages every 2 steps, global every 6 (optionally DiLoCo's
    Nesterov outer step at the global syncs)."""
    from localsgd.outer import NesterovOuter

    d, lr = 4, 0.05
    g = torch.Generator().manual_seed(9)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    A, b = m @ m.T / d + torch.eye(d, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    noise = torch.randn(20, world, d, generator=g, dtype=torch.float64)
    x = nn.Parameter(torch.zeros(d, dtype=torch.float64))
    holder = nn.Module()
    holder.x = x
    opt = torch.optim.SGD([x], lr=lr)
    outer = None if outer_lr is None else NesterovOuter(lr=outer_lr, momentum=outer_momentum)
    sync = localsgd.LocalSGD(holder, opt, schedule=Hierarchical(H_group=2, H_global=6, group_size=2), outer=outer)
    # Reference: the mean over all ranks is mini-batch SGD from the last global point x_t (linearity:
    # group averages leave it unchanged); at a global sync the outer step moves x_t
    # (DiLoCo, Douillard et al., arXiv 2311.08105).
    y, x_t, v = (torch.zeros(d, dtype=torch.float64) for _ in range(3))

    def outer_reference() -> torch.Tensor:
        nonlocal v
        if outer is None:
            return y
        delta = x_t - y
        v = outer_momentum * v + delta
        return x_t - outer_lr * (delta + outer_momentum * v)

    events, worst = [], 0.0
    for t in range(20):
        opt.zero_grad()
        x.grad = A @ x.detach() - b + noise[t, rank]
        opt.step()
        y = y - lr * (A @ y - b + noise[t].mean(0))
        if sync.step():
            out: list = [None] * world
            tdist.all_gather_object(out, x.detach().clone())
            same_group = torch.equal(out[0], out[1]) and torch.equal(out[2], out[3])
            all_same = all(torch.equal(o, out[0]) for o in out)
            events.append((t + 1, same_group, all_same, sync.in_sync))
            if all_same:
                x_t = y = outer_reference()
                worst = max(worst, float((x.detach() - y).abs().max()))
    sync.finalize()
    worst = max(worst, float((x.detach() - outer_reference()).abs().max()))
    out = [None] * world
    tdist.all_gather_object(out, x.detach().clone())
    return {"events": events, "worst": worst, "final_same": all(torch.equal(o, out[0]) for o in out),
            "rounds": sync.stats.rounds, "bytes": sync.stats.bytes}


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize(("outer_lr", "outer_momentum"), [(None, 0.0), (0.7, 0.9)])
def test_hierarchical_averages_within_nodes_and_globally_on_four_ranks(outer_lr: float | None,
                                                                       outer_momentum: float) -> None:
    reports = run_ok(_hierarchical, 4, outer_lr, outer_momentum, timeout_s=120)
    events = reports[0]["events"]
    assert [e[0] for e in events] == list(range(2, 21, 2))
    for step, same_group, all_same, in_sync in events:
        assert same_group
        assert all_same == in_sync == (step % 6 == 0), step  # groups differ between global syncs
    assert reports[0]["worst"] < 1e-10  # global averages are mini-batch SGD exactly (linearity)
    assert all(r["final_same"] for r in reports)
    assert reports[0]["rounds"] == 11 and reports[0]["bytes"] == 11 * 4 * 8  # 10 syncs + finalize


def test_stich_weights_sum_at_least_t_cubed_over_three() -> None:
    for a in (1.0, 16.0, 250.0):
        for T in (1, 10, 1000):
            assert sum((a + t) ** 2 for t in range(T)) >= T**3 / 3


def test_stich_step_size_and_shift() -> None:
    from localsgd.schedules.stich import stich_lr

    s = Stich(total_steps=10_000, workers=4, batch_size=1)  # H = 50
    assert s.shift(mu=0.1, L=1.0) == 160.0  # 16 kappa > H
    assert s.shift(mu=1.0, L=2.0) == 50  # H > 16 kappa
    assert stich_lr(0, 0.1, 160.0) == pytest.approx(4 / (0.1 * 160))
    assert stich_lr(40, 0.1, 160.0) == pytest.approx(4 / (0.1 * 200))
    # Both paper constants are config values (unverified against the full text): overriding them works.
    assert s.shift(mu=0.1, L=1.0, shift_kappa=8) == 80.0 and stich_lr(0, 0.1, 80.0, numerator=2) == pytest.approx(0.25)


def _weighted_average(rank: int, world: int) -> float:
    from localsgd.schedules.stich import WeightedIterateAverage

    d, steps, a = 3, 23, 7.0
    g = torch.Generator().manual_seed(4)
    A, b = torch.eye(d, dtype=torch.float64) * 0.5, torch.randn(d, generator=g, dtype=torch.float64)
    noise = torch.randn(steps, world, d, generator=g, dtype=torch.float64)
    x = nn.Parameter(torch.zeros(d, dtype=torch.float64))
    holder = nn.Module()
    holder.x = x
    opt = torch.optim.SGD([x], lr=0.1)
    sync = localsgd.LocalSGD(holder, opt, schedule=Fixed(4))
    avg = WeightedIterateAverage(sync.param_buffers(), a)
    brute = torch.zeros(d, dtype=torch.float64)
    for t in range(steps):
        avg.accumulate(sync.param_buffers(), t)
        out: list = [None] * world
        tdist.all_gather_object(out, x.detach().clone())
        brute += (a + t) ** 2 * torch.stack(out).mean(0)  # w_t x̄_t from every worker's iterate
        opt.zero_grad()
        x.grad = A @ x.detach() - b + noise[t, rank]
        opt.step()
        sync.step()
    sync.finalize()
    avg.finalize_into(sync.param_buffers())
    expected = brute / sum((a + t) ** 2 for t in range(steps))
    return float((x.detach() - expected).abs().max())


@pytest.mark.slow
def test_stich_weighted_iterate_average_is_exact_across_workers() -> None:
    assert max(run_ok(_weighted_average, 2)) < 1e-12


def _simulate_stich_logreg(schedule_factory, A: torch.Tensor, y: torch.Tensor, lam: float, L: float, K: int,
                           T: int, draws: torch.Tensor, only_worker: int | None = None) -> torch.Tensor:
    """K workers x S seeds of local SGD on ℓ2-logistic regression with Stich's η_t and weighted x̂_T.

    ``draws`` (T, S, K) are the row indices, the same for every schedule. Returns f(x̂_T) per seed
    (of one worker's own x̂_T with ``only_worker``: the negative control that skips the final average).
    """
    from localsgd.schedules.stich import WeightedIterateAverage, stich_lr

    S, d = draws.shape[1], A.shape[1]
    schedule = schedule_factory()
    a = max(16 * L / lam, getattr(schedule, "H", 1))  # Corollary 2.3's shift, a = max(16κ, H)
    x = torch.zeros(S, K, d, dtype=torch.float64)
    x_hat = WeightedIterateAverage([x], a)
    for t in range(T):
        x_hat.accumulate([x], t)  # x_t before local step t, weighted (a + t)²
        rows, labels = A[draws[t]], y[draws[t]]  # (S, K, d), (S, K)
        margin = labels * (rows * x).sum(-1)
        grad = (-labels * torch.sigmoid(-margin)).unsqueeze(-1) * rows + lam * x
        x = x - stich_lr(t, lam, a) * grad
        if schedule.should_sync(t + 1):
            x = x.mean(1, keepdim=True).expand_as(x).clone()
            schedule.advance(t + 1)
    x_hat.finalize_into([x])  # per worker (world size 1 here); the workers' average is the mean over K
    w = x.mean(1) if only_worker is None else x[:, only_worker]  # (S, d)
    return torch.nn.functional.softplus(-y * (w @ A.T)).mean(1) + lam / 2 * (w * w).sum(1)


def test_stich_local_sgd_is_within_factor_two_of_minibatch_sgd_over_ten_seeds() -> None:
    """ℓ2-logistic regression, λ = 1/n, H = ⌊√(T/(Kb))⌋, Stich's (ICLR 2019, arXiv 1805.09767, Theorem 2.2)
    η_t = 4/(μ(a+t)) and (a+t)²-weighted x̂_T; over 10 seeds E f(x̂_T) − f* of local SGD is within
    a factor 2 of mini-batch SGD (H = 1) at the same T, K, b (the factor 2 is ours, not the paper's)."""
    g = torch.Generator().manual_seed(2019)
    n, d, K, T, seeds = 400, 10, 4, 6000, 10
    A = torch.randn(n, d, generator=g, dtype=torch.float64)
    A = A / A.norm(dim=1, keepdim=True)  # ‖a_i‖ = 1, so L ≤ λ + 1/4
    w_true = 3 * torch.randn(d, generator=g, dtype=torch.float64)
    y = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < torch.sigmoid(A @ w_true), 1.0, -1.0)
    lam, L = 1.0 / n, 1.0 / n + 0.25
    w = torch.zeros(d, dtype=torch.float64)  # f* by Newton's method (strongly convex, d = 10)
    for _ in range(50):
        s = torch.sigmoid(-y * (A @ w))
        grad = -(A * (y * s).unsqueeze(1)).mean(0) + lam * w
        hess = (A.T * (s * (1 - s))) @ A / n + lam * torch.eye(d, dtype=torch.float64)
        w = w - torch.linalg.solve(hess, grad)
    assert float(grad.norm()) < 1e-12
    f_star = float(torch.nn.functional.softplus(-y * (A @ w)).mean() + lam / 2 * w @ w)
    draws = torch.randint(0, n, (T, seeds, K), generator=g)
    stich = lambda: Stich(T, K, 1)  # noqa: E731
    assert stich().H == int(math.sqrt(T / K)) == 38
    local = _simulate_stich_logreg(stich, A, y, lam, L, K, T, draws) - f_star
    minibatch = _simulate_stich_logreg(lambda: Fixed(1), A, y, lam, L, K, T, draws) - f_star
    assert bool((local > 0).all()) and bool((minibatch > 0).all())
    ratio = float(local.mean() / minibatch.mean())
    means = f"local SGD (H=38) {float(local.mean()):.3e} vs H=1 {float(minibatch.mean()):.3e}"
    assert ratio <= 2.0, means
    assert ratio >= 0.5  # and not implausibly better: the same draws, 38x fewer averages
    # The comparison can fail: one-shot training without the final average (one worker's x̂_T)
    # loses the K-fold variance reduction and lands far outside the factor 2.
    no_average = _simulate_stich_logreg(lambda: Fixed(T), A, y, lam, L, K, T, draws, only_worker=0) - f_star
    assert float(no_average.mean() / minibatch.mean()) > 2.0
