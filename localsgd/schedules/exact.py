"""Exact floors and ceilings for the period formulas of the schedules.

A period such as ⌈N₁·t^β⌉ (Patel & Dieuleveut) or ⌊c·√(T/(K·b))⌋ (Stich) changes by a whole step when
the product lands on an integer, and binary floating point misses exactly those cases: 1.1·50 is
55.000000000000007, so ⌈·⌉ gave 56. Here every such value is a rational number, or a k-th root of
one, and its floor or ceiling is decided in integer arithmetic.

How numbers are read (ours; no paper fixes it):
* a config number is the decimal its user wrote: ``Fraction(str(x))``, so 1.1 is 11/10;
* a run-time float (learning rate, all-reduced loss) is read at 12 significant digits: 0.1·0.1 is
  0.010000000000000002 in binary and stands for 0.01; digits past the twelfth are rounding from
  the arithmetic that made the value, not a different learning rate (every rank reads the same
  all-reduced bits, so every rank reads the same number);
* an exponent is the nearest fraction with denominator ≤ 10⁴ (every decimal of up to four places
  as written, and 1/3 for 0.3333333333333333), so that x^(a/b) costs a b-th root.
"""

from __future__ import annotations

import math
from fractions import Fraction

MEASURED_DIGITS = 12
EXPONENT_DENOMINATOR = 10**4


def as_written(x: float | int | Fraction) -> Fraction:
    """A config number as its decimal literal: 1.1 -> 11/10 (not the binary 1.100000000000000088...)."""
    return x if isinstance(x, Fraction) else Fraction(str(x))


def as_measured(x: float | int | Fraction) -> Fraction:
    """A run-time float at 12 significant digits: 0.010000000000000002 -> 1/100."""
    return x if isinstance(x, Fraction) else Fraction(f"{x:.{MEASURED_DIGITS}g}")


def as_exponent(x: float | int | Fraction) -> Fraction:
    """An exponent as a fraction a/b with b <= 10⁴."""
    return as_written(x).limit_denominator(EXPONENT_DENOMINATOR)


def floor_root(x: Fraction, k: int) -> int:
    """⌊x^(1/k)⌋ for a rational x >= 0, exactly: the largest m with m^k <= x, by integer comparison."""
    if x < 0 or k < 1:
        raise ValueError(f"floor_root needs x >= 0 and k >= 1, got x={x}, k={k}")
    if k == 1:
        return math.floor(x)
    num, den = x.numerator, x.denominator
    if k == 2:  # √(n/d) = √(n·d)/d, and ⌊s/d⌋ = ⌊⌊s⌋/d⌋ for a whole d
        return math.isqrt(num * den) // den
    if x < 1:
        return 0

    def at_most(m: int) -> bool:  # m^k <= num/den
        return m**k * den <= num

    # A float estimate brackets the root; the bisection below makes the answer exact.
    guess = math.exp((math.log(num) - math.log(den)) / k)
    lo, hi = max(0, int(guess * (1 - 1e-9)) - 2), int(guess * (1 + 1e-9)) + 2
    while not at_most(lo):
        lo //= 2
    while at_most(hi):
        hi *= 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if at_most(mid) else (lo, mid)
    return lo


def ceil_root(x: Fraction, k: int) -> int:
    """⌈x^(1/k)⌉ for a rational x >= 0, exactly."""
    m = floor_root(x, k)
    return m if m**k * x.denominator == x.numerator else m + 1


def ceil_scaled_power(coefficient: Fraction, base: Fraction, exponent: Fraction) -> int:
    """⌈coefficient · base^exponent⌉ for coefficient, base > 0 and a rational exponent a/b.

    c·x^(a/b) = (c^b · x^a)^(1/b), a b-th root of a rational number.
    """
    if coefficient <= 0 or base <= 0:
        raise ValueError(f"ceil_scaled_power needs a positive coefficient and base, got {coefficient}, {base}")
    a, b = exponent.numerator, exponent.denominator
    return ceil_root(coefficient**b * base**a, b)
