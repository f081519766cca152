"""Floors and ceilings of products in the schedules are exact: each period is checked against an
independent reference, 100-digit ``decimal`` arithmetic on the numbers as written, over hundreds of
parameter sets drawn from a seeded RNG (binary floating point gave N_50 = 56 for ⌈1.1·50⌉ = 55)."""

from __future__ import annotations

import decimal
import random
from decimal import Decimal
from fractions import Fraction

import pytest

from localsgd.schedules import QSR, AdaComm, AdaptivePD, PatelDieuleveut, Stich
from localsgd.schedules.exact import as_exponent, as_measured, as_written, ceil_root, floor_root

PRECISION = 100
# A value this close to an integer is that integer: 100 digits put the reference's own rounding error
# near 1e-90, and every quantity here is either a rational with a small denominator or irrational.
SNAP = Decimal("1e-60")


def _snapped(value: Decimal) -> Decimal:
    nearest = value.to_integral_value()
    return nearest if abs(value - nearest) < SNAP else value


def ref_floor(value: Decimal) -> int:
    return int(_snapped(value).to_integral_value(rounding=decimal.ROUND_FLOOR))


def ref_ceil(value: Decimal) -> int:
    return int(_snapped(value).to_integral_value(rounding=decimal.ROUND_CEILING))


def written(x: float) -> Decimal:
    """The decimal a user writes in YAML for ``x``."""
    return Decimal(repr(x))


def a_decimal(rng: random.Random, most: int, places: int) -> float:
    """A number with at most ``places`` decimal places in (0, most]."""
    return rng.randint(1, most * 10**places) / 10**places


@pytest.fixture(autouse=True)
def _hundred_digits():
    with decimal.localcontext() as ctx:
        ctx.prec = PRECISION
        yield


def test_the_reported_cases() -> None:
    assert PatelDieuleveut(1.1, 1.0).local_steps(49) == 55  # N_50 = ⌈1.1·50⌉
    assert Stich(10_000, 1, 1, c=0.29).H == 29  # ⌊0.29·√10⁴⌋


def test_patel_dieuleveut_phases_match_an_exact_reference() -> None:
    rng = random.Random(1904)
    mismatches = []
    for _ in range(300):
        n1 = a_decimal(rng, 5, rng.choice([1, 2]))
        beta = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.5, 2.0, 3.0])
        schedule = PatelDieuleveut(n1, beta)
        for t in rng.sample(range(1, 400), 20):
            expected = max(1, ref_ceil(written(n1) * Decimal(t) ** written(beta)))
            if schedule.local_steps(t - 1) != expected:
                mismatches.append((n1, beta, t, schedule.local_steps(t - 1), expected))
    assert mismatches == []


def test_patel_dieuleveut_round_count_uses_the_exact_phases() -> None:
    # Σ_{t≤C} ⌈1.1·t⌉ with exact phases 2, 3, 4, 5, 6, 7, 8, 9, 10, 11: C = 10 rounds cover 65 steps.
    assert PatelDieuleveut(1.1, 1.0, 65).rounds() == 10
    assert [PatelDieuleveut(1.1, 1.0).local_steps(r) for r in range(10)] == [2, 3, 4, 5, 6, 7, 8, 9, 10, 11]


def test_stich_period_matches_an_exact_reference() -> None:
    rng = random.Random(1805)
    mismatches = []
    for _ in range(600):
        c = a_decimal(rng, 3, 2)
        total, workers, batch = rng.randint(1, 10**6), rng.randint(1, 64), rng.choice([1, 2, 4, 8, 32, 128, 512])
        h_max = rng.choice([None, None, rng.randint(1, 200)])
        h = max(1, ref_floor(written(c) * (Decimal(total) / Decimal(workers * batch)).sqrt()))
        expected = min(h, h_max) if h_max else h
        got = Stich(total, workers, batch, c=c, H_max=h_max).H
        if got != expected:
            mismatches.append((c, total, workers, batch, h_max, got, expected))
    assert mismatches == []


def test_stich_when_the_period_is_a_whole_number() -> None:
    """c = p/q and T = K·b·(j·q)², so c·√(T/(Kb)) = j·p exactly: the floor is j·p, never one below."""
    rng = random.Random(2019)
    mismatches = []
    for _ in range(600):
        c = a_decimal(rng, 3, 2)
        q = Fraction(repr(c)).denominator
        j, workers, batch = rng.randint(1, 40), rng.randint(1, 16), rng.choice([1, 2, 8])
        total = workers * batch * (j * q) ** 2
        expected = max(1, ref_floor(written(c) * (Decimal(total) / (workers * batch)).sqrt()))
        got = Stich(total, workers, batch, c=c).H
        if got != expected:
            mismatches.append((c, total, workers, batch, got, expected))
    assert mismatches == []


def test_qsr_period_matches_an_exact_reference() -> None:
    """H = max(H_base, ⌊(α/η)²⌋) for decimal α and η (Gu et al., ICLR 2024)."""
    rng = random.Random(2310)
    mismatches = []
    for _ in range(600):
        h_base, alpha = rng.randint(1, 8), a_decimal(rng, 2, rng.choice([1, 2, 3]))
        lr = rng.randint(1, 999) / 10 ** rng.randint(2, 5)
        schedule = QSR(H_base=h_base, alpha=alpha)
        schedule.observe(step=1, lr=lr)
        expected = max(h_base, ref_floor((written(alpha) / written(lr)) ** 2))
        if schedule.local_steps(1) != expected:
            mismatches.append((h_base, alpha, lr, schedule.local_steps(1), expected))
    assert mismatches == []


def test_qsr_when_alpha_is_a_whole_multiple_of_the_lr() -> None:
    """α = n·η gives H = n² exactly (for large n the float square misses by more than any tolerance)."""
    rng = random.Random(2024)
    mismatches = []
    for _ in range(600):
        lr, n = rng.randint(1, 999) / 10 ** rng.randint(2, 5), rng.randint(1, 20_000)
        alpha = float(written(lr) * n)
        schedule = QSR(H_base=1, alpha=alpha)
        schedule.observe(step=1, lr=lr)
        expected = ref_floor((written(alpha) / written(lr)) ** 2)
        assert expected == n * n
        if schedule.local_steps(1) != expected:
            mismatches.append((alpha, lr, schedule.local_steps(1), expected))
    assert mismatches == []


def test_qsr_reads_a_decayed_learning_rate_as_the_decimal_it_stands_for() -> None:
    """0.1·0.1 is 0.010000000000000002 in binary; read at 12 significant digits it is 0.01, so
    α = 0.1 gives ⌊(0.1/0.01)²⌋ = 100 (the last digits are rounding, not a different LR)."""
    lr = 0.1 * 0.1
    assert lr != 0.01
    schedule = QSR(H_base=4, alpha=0.1)
    schedule.observe(step=1, lr=lr)
    assert schedule.local_steps(1) == 100
    schedule = QSR(H_base=4, alpha=0.29)
    schedule.observe(step=1, lr=0.01)
    assert schedule.local_steps(1) == 841  # (0.29/0.01)² = 841 exactly; the float square is 840.99...


def test_adacomm_period_matches_an_exact_reference() -> None:
    """τ = clip(⌈√((F_l/F₀)·(η₀/η_l)^p)·τ₀⌉) (Wang & Joshi 2019), F and η decimals as measured."""
    rng = random.Random(1810)
    mismatches = []
    for _ in range(600):
        tau0, power = rng.randint(1, 64), rng.choice([1.0, 1.0, 2.0, 0.5, 1.5, 3.0])
        f0, f_l = a_decimal(rng, 4, rng.choice([1, 2, 3])), a_decimal(rng, 4, rng.choice([1, 2, 3]))
        lr0 = rng.randint(1, 99) / 10 ** rng.randint(1, 3)
        lr = float(written(lr0) / rng.choice([1, 1, 2, 4, 5, 10, 100]))  # a decimal, as LRs are written
        schedule = AdaComm(tau0=tau0, interval_steps=1, lr_power=power)
        schedule.observe(step=1, loss=f0, lr=lr0)
        schedule.observe(step=2, loss=f_l, lr=lr)
        ratio = (written(f_l) / written(f0)) * (written(lr0) / written(lr)) ** written(power)
        expected = max(1, ref_ceil(ratio.sqrt() * tau0))
        if schedule.local_steps(1) != expected:
            mismatches.append((tau0, power, f0, f_l, lr0, lr, schedule.local_steps(1), expected))
    assert mismatches == []


def test_adacomm_when_the_period_is_a_whole_number() -> None:
    """F_l/F₀ = (u/v)² with v | τ₀·u and a constant LR: τ = τ₀·u/v exactly, not one more."""
    rng = random.Random(1838)
    mismatches = []
    for _ in range(600):
        v, u = rng.randint(1, 30), rng.randint(1, 30)
        tau0 = v * rng.randint(1, 8)
        f0, f_l = float(Decimal(v * v) / 100), float(Decimal(u * u) / 100)
        schedule = AdaComm(tau0=tau0, interval_steps=1)
        schedule.observe(step=1, loss=f0, lr=0.1)
        schedule.observe(step=2, loss=f_l, lr=0.1)
        if schedule.local_steps(1) != max(1, tau0 * u // v):
            mismatches.append((tau0, f0, f_l, schedule.local_steps(1), tau0 * u // v))
    assert mismatches == []


def test_adaptive_pd_period_matches_an_exact_reference() -> None:
    """N = clip(⌈N₁·(F₁ − F_floor)/(F_r − F_floor)⌉, N_min, N_max), never shrinking."""
    rng = random.Random(1325)
    mismatches = []
    for _ in range(300):
        n1, floor = rng.randint(1, 8), rng.choice([0.0, 0.1, 0.5, 1.25])
        schedule = AdaptivePD(N1=n1, N_min=1, N_max=100_000, loss_floor=floor)
        first = float(written(floor) + written(a_decimal(rng, 3, 2)))
        schedule.observe(step=1, loss=first)
        current = n1
        for _ in range(5):
            loss = float(written(floor) + written(a_decimal(rng, 3, rng.choice([1, 2, 3]))))
            schedule.observe(step=2, loss=loss)
            gap = written(loss) - written(floor)
            current = max(current, min(100_000, ref_ceil(n1 * (written(first) - written(floor)) / gap)))
            if schedule.local_steps(1) != current:
                mismatches.append((n1, floor, first, loss, schedule.local_steps(1), current))
    assert mismatches == []


def test_adaptive_pd_ceiling_just_above_an_integer() -> None:
    """N₁·F₁/F_r = 1.0000000001 needs 2 phases of one step, not 1 (a 1e-9 tolerance would say 1)."""
    schedule = AdaptivePD(N1=1, N_min=1, N_max=10)
    schedule.observe(step=1, loss=1.0000000001)
    schedule.observe(step=2, loss=1.0)
    assert schedule.local_steps(1) == 2


def test_integer_roots_match_a_brute_force_search() -> None:
    """⌊x^(1/k)⌋ is the largest m with m^k <= x; ⌈·⌉ the smallest with m^k >= x (searched one by one)."""
    rng = random.Random(7)
    for _ in range(2000):
        x, k = Fraction(rng.randint(0, 10**6), rng.randint(1, 10**3)), rng.randint(1, 6)
        m = 0
        while Fraction(m + 1) ** k <= x:
            m += 1
        assert floor_root(x, k) == m, (x, k)
        assert ceil_root(x, k) == (m if Fraction(m) ** k == x else m + 1), (x, k)


def test_how_numbers_are_read() -> None:
    assert as_written(1.1) == Fraction(11, 10) != Fraction(1.1)
    assert as_measured(0.1 * 0.1) == Fraction(1, 100) and as_written(0.1 * 0.1) != Fraction(1, 100)
    assert as_exponent(0.75) == Fraction(3, 4) and as_exponent(1 / 3) == Fraction(1, 3)
