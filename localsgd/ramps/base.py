"""The batch-ramp interface: the per-worker batch size b_t and the LR multiplier as functions of the step.

A ramp answers ``batch_size(step)``, the per-worker mini-batch b_t at local step ``step`` (0-based,
the step about to be taken), and ``lr_factor(step)``, a multiplier on the optimizer's learning rate
(1.0 unless the ramp trades batch growth against LR decay, as ``smith`` does once b_max is reached).
The global batch is K·b_t. Every rank must compute the same b_t, so a ramp depends only on the step,
its config, the run's constants (base batch, total steps, world size) and all-reduced values
(``observe_noise_scale``), like the sync schedules.

``lr_scale(step, batch_size, base_batch, coupling)`` is the whole multiplier the trainer puts on the
optimizer's LR: ``lr_factor(step)`` times, when ``coupling`` is on and the ramp ``couples_lr``, the
ramp's batch coupling, by default Goyal et al.'s linear scaling b_t / b_0 (arXiv 1706.02677, §2.1).
Capabilities the trainer reads instead of ramp names: ``couples_lr`` (False for ``smith``, which grows
the batch *instead of* changing the LR), ``constant`` (True for ``none``: b_t = b_0 throughout) and
``observes_noise_scale`` (True for ``noise_scale``: the trainer must measure B_simple for it).

Milestones are fractions of the run's total local steps, converted with ``int(fraction * total_steps)``
exactly as the optimizers' step decay (``optim.base.lr_at``) converts them, so a ramp and an LR
schedule given the same fractions switch at the same step.

The trainer must draw b_t samples per step from a sampler that counts *samples* (``ShardSampler``
does), so a batch change in the middle of an epoch neither skips nor repeats data.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Sequence
from typing import Any, ClassVar

from ..registry import Registry

MAX_BATCH = 2**40  # a batch this large is a configuration error, not a plan


class BatchRamp(abc.ABC):
    """Per-worker batch size and LR multiplier as functions of the local step. Checkpointable."""

    name: ClassVar[str] = "base"
    couples_lr: ClassVar[bool] = True  # does the LR follow the batch (when the trainer couples them)?
    constant: ClassVar[bool] = False  # is b_t = b_0 at every step (nothing to recompute per step)?
    observes_noise_scale: ClassVar[bool] = False  # does it need the trainer's B_simple measurements?

    def __init__(self, base_batch: int, total_steps: int) -> None:
        if int(base_batch) != base_batch or base_batch < 1:
            raise ValueError(f"ramp {self.name!r} needs a base batch size >= 1, got {base_batch!r}")
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"ramp {self.name!r} needs total_steps >= 1, got {total_steps!r}")
        self.base_batch = int(base_batch)
        self.total_steps = int(total_steps)

    @abc.abstractmethod
    def batch_size(self, step: int) -> int:
        """b_t >= 1: samples per worker at local step ``step`` (0-based)."""

    def lr_factor(self, step: int) -> float:
        """Multiplier on the optimizer's learning rate at local step ``step``."""
        check_step(step)
        return 1.0

    def lr_scale(self, step: int, batch_size: int, base_batch: int, coupling: bool) -> float:
        """The full multiplier on the optimizer's LR at ``step`` for a per-worker batch ``batch_size``.

        ``lr_factor(step)``, times ``batch_lr_multiplier(batch_size, base_batch)`` when ``coupling``
        (the trainer's ``lr_batch_coupling``) is on and this ramp ``couples_lr``.
        """
        factor = self.lr_factor(step)
        if coupling and self.couples_lr:
            return factor * self.batch_lr_multiplier(batch_size, base_batch)
        return factor

    def batch_lr_multiplier(self, batch_size: int, base_batch: int) -> float:
        """LR multiplier for growing the batch from ``base_batch`` to ``batch_size``: Goyal et al.'s b/b_0."""
        return batch_size / base_batch

    def global_batch(self, step: int, world_size: int) -> int:
        """K·b_t: samples per step summed over the ``world_size`` workers."""
        return int(world_size) * self.batch_size(step)

    def observe_noise_scale(self, b_simple: float, step: int) -> None:
        """Receive an all-reduced noise-scale estimate (only the ``noise_scale`` ramp uses it)."""
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"name": self.name}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("name") != self.name:
            raise ValueError(f"checkpoint holds batch ramp {state.get('name')!r}, this run uses {self.name!r}")

    def describe(self) -> str:
        return self.name


RAMPS: Registry[BatchRamp] = Registry("ramp")


def check_step(step: int) -> int:
    if int(step) != step or step < 0:
        raise ValueError(f"a ramp's step must be an integer >= 0, got {step!r}")
    return int(step)


def milestone_steps(fractions: Sequence[float], total_steps: int) -> list[int]:
    """The steps at which fractional milestones take effect (as ``optim.base.lr_at`` computes them)."""
    return sorted(int(m * total_steps) for m in fractions)


def stages_passed(step: int, milestones: Sequence[int]) -> int:
    """How many milestone steps ``step`` has reached."""
    return sum(1 for m in milestones if step >= m)


def round_batch(x: float) -> int:
    """Round half up (monotone, unlike Python's round-half-to-even) to an integer >= 1."""
    if not math.isfinite(x) or x > MAX_BATCH:
        raise ValueError(f"batch size {x!r} is out of range (> {MAX_BATCH}); set b_max")
    return max(1, int(math.floor(x + 0.5)))


def grown_batch(base: int, factor: float, times: int, b_max: int | None) -> int:
    """min(b_max, round(base · factor**times)) for factor >= 1, without overflowing for large ``times``."""
    if times <= 0 or factor == 1:
        b = base
    else:
        if b_max is not None and math.log(base) + times * math.log(factor) > math.log(b_max) + 1e-9:
            return b_max
        if math.log(base) + times * math.log(factor) > math.log(MAX_BATCH):
            raise ValueError(f"batch {base}·{factor}^{times} is out of range (> {MAX_BATCH}); set b_max")
        b = round_batch(base * factor**times)
    return b if b_max is None else min(b, b_max)


def fraction_problems(key: str, values: Sequence[float]) -> Iterator[tuple[str, Any, str]]:
    if any(not 0 < m <= 1 for m in values):
        yield key, list(values), "must be fractions of the total steps in (0, 1]"


def b_max_problems(b_max: int | None, required: bool = False) -> Iterator[tuple[str, Any, str]]:
    if b_max is None:
        if required:
            yield "b_max", b_max, "must be set (an integer >= 1): this ramp grows without bound otherwise"
    elif b_max < 1:
        yield "b_max", b_max, "must be >= 1"


def check_b_max(name: str, b_max: int | None, base_batch: int) -> None:
    """Builder-time check that needs the run's base batch."""
    if b_max is not None and b_max < base_batch:
        raise ValueError(f"ramp {name!r}: b_max={b_max} is below the starting batch size {base_batch}")
