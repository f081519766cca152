"""The gradient noise scale B_simple and a batch ramp driven by it.

Estimator (McCandlish, Kaplan, Amodei et al., "An Empirical Model of Large-Batch Training",
arXiv 1812.06162, Appendix A.1; formulas cross-checked against public
implementations, e.g. MosaicML Composer's noise-scale monitor). With squared norms of mean gradients
over batches of B_small < B_big samples taken *at the same parameters*,

    |𝒢|² = (B_big·|G_big|² − B_small·|G_small|²) / (B_big − B_small)     unbiased for |G|²
    𝒮    = (|G_small|² − |G_big|²) / (1/B_small − 1/B_big)                 unbiased for tr(Σ)

and B_simple = tr(Σ)/|G|² ≈ EMA(𝒮) / EMA(|𝒢|²): numerator and denominator are smoothed separately
(a ratio of noisy estimates is biased). The EMAs are bias-corrected like Adam's moments
(ê_n = e_n / (1 − β^n), e_0 = 0), so ``trace_sigma()`` and ``grad_sq()`` are meaningful from the first
update; both carry the same correction, so it cancels in ``b_simple()``. The EMA coefficient 0.95 is
ours (the paper prescribes none). ``discard_first`` draws (ours; the ramp passes its
``warmup_measurements``) are recorded as ``last_*`` but kept out of the EMAs: the first draws, taken
at initialisation where |G|² is atypically large, otherwise dominate a bias-corrected EMA for tens of
measurements (reproduction 3 measured a first B_simple of 2167 against about 35 afterwards).

In local SGD: B_small = b (one worker's batch), B_big = K·b (the all-reduced mean), with the mean over
workers of |g_k|² as |G_small|² (lower variance). Both gradients are at the same parameters only at the
first local step after a sync (or with H = 1); pseudo-gradients after H > 1 steps are not valid inputs.

Ramp (ours, a heuristic built on McCandlish; the paper prescribes no controller):
b_t = clip(round(B_simple / K), b_min, b_max), updated only when ``observe_noise_scale`` is called and
only ever increased. Defaults (ours): b_min = the trainer's batch size, b_max = 4096, EMA 0.95, one
measurement every 4 rounds.

LR coupling (McCandlish et al., §2, eq. 2.6-2.7), applied when the trainer's ``lr_batch_coupling`` is
on, chosen by ``lr_coupling``:

* ``mccandlish`` (default): the best SGD step for a batch B is ε_opt(B) = ε_max / (1 + B_noise/B)
  (eq. 2.6; eq. 2.7 is the matching loss decrease). Taking the configured LR as ε_opt at the base
  batch b_0, the LR multiplier is

      ε_opt(B) / ε_opt(b_0) = (1 + B_noise/b_0) / (1 + B_noise/B)  <=  1 + B_noise/b_0 = ε_max / ε_opt(b_0)

  with B_noise the latest usable B_simple (equal to B_noise when the Hessian is a multiple of the
  identity, the paper's simplification), and B = K·b_t, b_0 = K·(the trainer's batch size) global
  batches: B_simple is measured on the all-reduced gradient and the ramp aims K·b_t at it. It is close
  to B/b_0 while b_0 <= B << B_noise and saturates at the bound beyond, so the LR stops following a
  batch that has outgrown the noise scale. Before the first usable estimate it is 1.
* ``linear``: B/b_0 (Goyal et al., arXiv 1706.02677), uncapped: the batch ramped 128x then sets a
  128x LR (0.05 became 6.4, with momentum 0.9), which is why it is not the default.
* ``capped_linear``: min(B/b_0, max_lr_scale); the cap 8 is ours.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .base import RAMPS, BatchRamp, check_b_max, check_step, round_batch

LR_COUPLINGS = ("mccandlish", "linear", "capped_linear")


def two_batch_estimates(sq_norm_small: float, sq_norm_big: float, b_small: float, b_big: float) -> tuple[float, float]:
    """One draw of the unbiased estimates ``(|𝒢|², 𝒮)`` of ``(|G|², tr Σ)`` (McCandlish et al., App. A.1)."""
    if not 0 < b_small < b_big:
        raise ValueError(f"noise scale needs 0 < b_small < b_big, got b_small={b_small!r}, b_big={b_big!r}")
    grad_sq = (b_big * sq_norm_big - b_small * sq_norm_small) / (b_big - b_small)
    trace_sigma = (sq_norm_small - sq_norm_big) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace_sigma


def mccandlish_lr_multiplier(b_noise: float, batch: float, base_batch: float) -> float:
    """ε_opt(batch) / ε_opt(base_batch) = (1 + B_noise/base_batch) / (1 + B_noise/batch) (McCandlish eq. 2.6).

    At most 1 + B_noise/base_batch (= ε_max/ε_opt(base_batch), approached as ``batch`` grows).
    """
    if not (math.isfinite(b_noise) and b_noise > 0):
        raise ValueError(f"the LR multiplier needs a noise scale B_noise > 0 (finite), got {b_noise!r}")
    if not (batch > 0 and base_batch > 0):
        raise ValueError(f"the LR multiplier needs batch sizes > 0, got batch={batch!r}, base_batch={base_batch!r}")
    return (1 + b_noise / base_batch) / (1 + b_noise / batch)


class NoiseScaleEstimator:
    """EMA-smoothed two-batch estimate of B_simple = tr(Σ)/|G|². Scalars in, scalars out; checkpointable."""

    def __init__(self, b_small: int, b_big: int, ema: float = 0.95, discard_first: int = 0) -> None:
        if not 0 <= ema < 1:
            raise ValueError(f"NoiseScaleEstimator: ema must be in [0, 1), got {ema!r}")
        if discard_first < 0:
            raise ValueError(f"NoiseScaleEstimator: discard_first must be >= 0, got {discard_first!r}")
        self.discard_first = int(discard_first)
        self.seen = 0  # every draw, the discarded ones included
        two_batch_estimates(0.0, 0.0, b_small, b_big)  # validates the sizes
        self.b_small = int(b_small)
        self.b_big = int(b_big)
        self.ema = float(ema)
        self.count = 0
        self._ema_grad_sq = 0.0  # uncorrected EMAs, e_0 = 0
        self._ema_trace = 0.0
        self.last_grad_sq = math.nan  # the latest raw estimates
        self.last_trace_sigma = math.nan

    def update(self, sq_norm_small_mean: float, sq_norm_big: float, b_small: int | None = None,
               b_big: int | None = None) -> None:
        """Fold in one measurement: the mean of |G_small|² (over workers) and |G_big|², at the same parameters.

        ``b_small``/``b_big`` override the sizes for this and later updates (a batch ramp changes b; the
        estimated quantities |G|² and tr Σ do not depend on it, so the EMAs carry over).
        """
        if not (math.isfinite(sq_norm_small_mean) and math.isfinite(sq_norm_big)):
            raise ValueError(f"NoiseScaleEstimator.update: non-finite squared norms {sq_norm_small_mean!r}, "
                             f"{sq_norm_big!r}")
        bs = self.b_small if b_small is None else int(b_small)
        bb = self.b_big if b_big is None else int(b_big)
        grad_sq, trace = two_batch_estimates(float(sq_norm_small_mean), float(sq_norm_big), bs, bb)
        self.b_small, self.b_big = bs, bb
        self.last_grad_sq, self.last_trace_sigma = grad_sq, trace
        self.seen += 1
        if self.seen <= self.discard_first:
            return
        self._ema_grad_sq = self.ema * self._ema_grad_sq + (1 - self.ema) * grad_sq
        self._ema_trace = self.ema * self._ema_trace + (1 - self.ema) * trace
        self.count += 1

    def _correction(self) -> float:
        return 1.0 - self.ema**self.count

    def grad_sq(self) -> float:
        """Bias-corrected EMA of |𝒢|² (NaN before the first update)."""
        return self._ema_grad_sq / self._correction() if self.count else math.nan

    def trace_sigma(self) -> float:
        """Bias-corrected EMA of 𝒮 (NaN before the first update)."""
        return self._ema_trace / self._correction() if self.count else math.nan

    def b_simple(self) -> float:
        """EMA(𝒮) / EMA(|𝒢|²); NaN until both EMAs are positive."""
        if self.count == 0 or not (self._ema_trace > 0 and self._ema_grad_sq > 0):
            return math.nan
        return self._ema_trace / self._ema_grad_sq

    def state_dict(self) -> dict[str, Any]:
        return {"b_small": self.b_small, "b_big": self.b_big, "ema": self.ema, "count": self.count, "seen": self.seen,
                "ema_grad_sq": self._ema_grad_sq, "ema_trace": self._ema_trace,
                "last_grad_sq": self.last_grad_sq, "last_trace_sigma": self.last_trace_sigma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if float(state["ema"]) != self.ema:
            raise ValueError(f"checkpoint's noise-scale EMA is {state['ema']!r}, this run uses {self.ema!r}")
        self.b_small, self.b_big = int(state["b_small"]), int(state["b_big"])
        self.count = int(state["count"])
        self.seen = int(state.get("seen", self.count))
        self._ema_grad_sq, self._ema_trace = float(state["ema_grad_sq"]), float(state["ema_trace"])
        self.last_grad_sq, self.last_trace_sigma = float(state["last_grad_sq"]), float(state["last_trace_sigma"])


class NoiseScaleFeed:
    """Measurements in, B_simple out to the component that acts on it (a ramp, or a schedule such as
    ``noise_adaptive``): the EMA estimator, its cadence (every ``measure_every_rounds`` rounds) and the
    hand-over, shared by the trainer's probe (:class:`localsgd.hooks.NoiseScaleProbe`) and the simulator.

    ``cfg`` carries ``ema``, ``measure_every_rounds`` and ``warmup_measurements``; ``observer`` has
    ``observe_noise_scale(b_simple, step, global_batch)``.
    """

    def __init__(self, cfg: Any, observer: Any, world_size: int) -> None:
        self.observer, self.world, self.every = observer, int(world_size), int(cfg.measure_every_rounds)
        self.estimator = NoiseScaleEstimator(1, world_size, ema=cfg.ema, discard_first=cfg.warmup_measurements)
        self.last_b_simple = math.nan

    def due(self, rounds: int) -> bool:
        """Whether the first local step after ``rounds`` completed averages measures."""
        return rounds % self.every == 0

    def feed(self, sq_norm_small_mean: float, sq_norm_big: float, batch_size: int, step: int) -> None:
        """One measurement at ``step``: the workers' mean |g_k|² (batch b) and |mean g_k|² (batch K·b)."""
        global_batch = self.world * batch_size
        self.estimator.update(sq_norm_small_mean, sq_norm_big, b_small=batch_size, b_big=global_batch)
        self.last_b_simple = self.estimator.b_simple()
        self.observer.observe_noise_scale(self.last_b_simple, step, global_batch)


class NoiseScaleRamp(BatchRamp):
    """b_t = clip(round(B_simple / K), b_min, b_max), raised only when an estimate calls for more.

    The LR follows the batch by ``lr_coupling`` (module doc): McCandlish's ε_opt(B) by default.
    """

    name = "noise_scale"
    observes_noise_scale = True

    def __init__(self, base_batch: int, total_steps: int, world_size: int, b_min: int | None, b_max: int,
                 max_growth: float = 2.0, warmup_measurements: int = 2, lr_coupling: str = "mccandlish",
                 max_lr_scale: float = 8.0) -> None:
        super().__init__(base_batch, total_steps)
        if lr_coupling not in LR_COUPLINGS:
            raise ValueError(f"ramp 'noise_scale': lr_coupling must be one of {list(LR_COUPLINGS)}, "
                             f"got {lr_coupling!r}")
        if not (math.isfinite(max_lr_scale) and max_lr_scale >= 1):
            raise ValueError(f"ramp 'noise_scale' needs max_lr_scale >= 1 (finite), got {max_lr_scale!r}")
        self.lr_coupling = lr_coupling
        self.max_lr_scale = float(max_lr_scale)
        self.warmup_measurements = int(warmup_measurements)
        self.measurements = 0
        if not max_growth > 1:
            raise ValueError(f"ramp 'noise_scale' needs max_growth > 1, got {max_growth!r}")
        self.max_growth = float(max_growth)
        if world_size < 1:
            raise ValueError(f"ramp 'noise_scale' needs world_size >= 1, got {world_size!r}")
        self.world_size = int(world_size)
        self.b_min = self.base_batch if b_min is None else int(b_min)
        self.b_max = int(b_max)
        if not 1 <= self.b_min <= self.b_max:
            raise ValueError(f"ramp 'noise_scale': needs 1 <= b_min <= b_max, got b_min={self.b_min}, "
                             f"b_max={self.b_max}")
        self.current = min(max(self.base_batch, self.b_min), self.b_max)
        self.last_b_simple = math.nan
        self.noise_scale = math.nan  # the latest usable (finite, > 0) B_simple: McCandlish's B_noise
        self.last_step: int | None = None

    def batch_size(self, step: int) -> int:
        """The batch set by the latest observation (not a function of ``step``: past steps are not replayed)."""
        check_step(step)
        return self.current

    def batch_lr_multiplier(self, batch_size: int, base_batch: int) -> float:
        """The LR multiplier for per-worker batch ``batch_size`` against ``base_batch``, by ``lr_coupling``."""
        linear = batch_size / base_batch
        if self.lr_coupling == "linear":
            return linear
        if self.lr_coupling == "capped_linear":
            return min(linear, self.max_lr_scale)
        if math.isnan(self.noise_scale):
            return 1.0  # no estimate of B_noise yet: keep the LR tuned for the base batch
        k = self.world_size
        return mccandlish_lr_multiplier(self.noise_scale, k * batch_size, k * base_batch)

    def target(self, b_simple: float) -> int | None:
        """clip(round(B_simple/K), b_min, b_max), or None for an unusable estimate (NaN, inf, <= 0)."""
        if not (math.isfinite(b_simple) and b_simple > 0):
            return None
        per_worker = b_simple / self.world_size
        return self.b_max if per_worker >= self.b_max else min(max(round_batch(per_worker), self.b_min), self.b_max)

    def observe_noise_scale(self, b_simple: float, step: int, global_batch: int | None = None) -> None:
        """Raise the batch to the target of an all-reduced B_simple estimate (never lowers it).
        ``global_batch`` (the measured round's K·b) is the probe's for every observer; the ramp needs none."""
        check_step(step)
        self.last_b_simple = float(b_simple)
        if math.isfinite(self.last_b_simple) and self.last_b_simple > 0:
            self.noise_scale = self.last_b_simple
        self.last_step = int(step)
        self.measurements += 1
        if self.measurements <= self.warmup_measurements:
            return  # the first estimates rest on one or two draws: let the EMAs settle first (ours)
        t = self.target(float(b_simple))
        if t is not None and t > self.current:
            # At most x max_growth per measurement (ours): one noisy early estimate must not jump the
            # batch (and, with the LR coupled to it, the learning rate) straight to b_max.
            self.current = min(t, max(self.current + 1, math.floor(self.current * self.max_growth)))

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name, "current": self.current, "last_b_simple": self.last_b_simple,
                "noise_scale": self.noise_scale, "last_step": self.last_step, "measurements": self.measurements}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.current = int(state["current"])
        self.measurements = int(state.get("measurements", 0))
        self.last_b_simple = float(state["last_b_simple"])
        usable = math.isfinite(self.last_b_simple) and self.last_b_simple > 0
        # Checkpoints from before the LR coupling lack "noise_scale"; their last estimate is the best guess.
        self.noise_scale = float(state.get("noise_scale", self.last_b_simple if usable else math.nan))
        self.last_step = None if state["last_step"] is None else int(state["last_step"])

    def describe(self) -> str:
        return (f"noise_scale(K={self.world_size}, b in [{self.b_min}, {self.b_max}], now {self.current}, "
                f"lr_coupling={self.lr_coupling})")


@RAMPS.add
@dataclass
class NoiseScaleRampConfig:
    """``ramp=noise_scale``: per-worker batch from the measured noise scale (ours; module doc).

    ``ema`` and ``measure_every_rounds`` are read by the trainer, which owns the
    :class:`NoiseScaleEstimator` and measures at the first local step after every such sync.
    ``lr_coupling`` (``mccandlish``, ``linear`` or ``capped_linear``, capped at ``max_lr_scale``) says how
    the LR follows the batch when the trainer's ``lr_batch_coupling`` is on (module doc).
    """

    name: str = "noise_scale"
    b_min: int | None = None  # None: the trainer's batch size
    b_max: int = 4096
    ema: float = 0.95
    measure_every_rounds: int = 4
    max_growth: float = 2.0  # ours: the batch grows at most this factor per measurement
    warmup_measurements: int = 2  # ours: first estimates ignored by the ramp and kept out of the EMAs
    lr_coupling: str = "mccandlish"  # McCandlish et al. eq. 2.6 (module doc); "linear" is Goyal's, uncapped
    max_lr_scale: float = 8.0  # ours: the cap of lr_coupling=capped_linear

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.b_min is not None and self.b_min < 1:
            yield "b_min", self.b_min, "must be >= 1 (or null for the trainer's batch size)"
        if self.b_max < 1:
            yield "b_max", self.b_max, "must be >= 1"
        elif self.b_min is not None and self.b_max < self.b_min:
            yield "b_max", self.b_max, f"must be >= b_min={self.b_min}"
        if not 0 <= self.ema < 1:
            yield "ema", self.ema, "must be in [0, 1)"
        if self.measure_every_rounds < 1:
            yield "measure_every_rounds", self.measure_every_rounds, "must be >= 1"
        if not self.max_growth > 1:
            yield "max_growth", self.max_growth, "must be > 1"
        if self.warmup_measurements < 0:
            yield "warmup_measurements", self.warmup_measurements, "must be >= 0"
        if self.lr_coupling not in LR_COUPLINGS:
            yield "lr_coupling", self.lr_coupling, f"must be one of {list(LR_COUPLINGS)}"
        if not (math.isfinite(self.max_lr_scale) and self.max_lr_scale >= 1):
            yield "max_lr_scale", self.max_lr_scale, "must be >= 1 (finite)"

    def build(self, base_batch: int, total_steps: int, world_size: int = 1) -> BatchRamp:
        check_b_max(self.name, self.b_max, base_batch)
        return NoiseScaleRamp(base_batch, total_steps, world_size, self.b_min, self.b_max, self.max_growth,
                              self.warmup_measurements, self.lr_coupling, self.max_lr_scale)
