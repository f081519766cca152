"""Linear LR scaling with gradual warm-up (Goyal et al., "Accurate, Large Minibatch SGD", arXiv 1706.02677).

η = η_base · B / B_ref for a global batch B (the paper: η = 0.1·kn/256 for ResNet-50), reached by a
linear warm-up from η_base over the first ``warmup_steps`` steps (the paper: 5 epochs). Neither the
paper's reference batch 256 nor its 5-epoch warm-up is a default here: both are arguments (the
constants are unverified against the paper's full text).

Note the warm-up starts *at* η_base (lr(0) = η_base), unlike ``optim.base.lr_at``'s warm-up from
η/warmup_steps: use one or the other, not both.
"""

from __future__ import annotations

import math


def coupled_lr(base_lr: float, global_batch: int, reference_batch: int, step: int, warmup_steps: int) -> float:
    """The LR at local step ``step`` (0-based) for the *current* global batch.

    Linear scaling ``base_lr · global_batch / reference_batch``; during the first ``warmup_steps`` steps
    it is interpolated linearly from ``base_lr`` (at step 0) to that value (reached at ``warmup_steps``).
    With a batch ramp, pass the global batch of the step being taken (K · ramp.batch_size(step)).
    """
    if not (math.isfinite(base_lr) and base_lr > 0):
        raise ValueError(f"coupled_lr: base_lr must be > 0, got {base_lr!r}")
    if global_batch < 1 or reference_batch < 1:
        raise ValueError(f"coupled_lr: batch sizes must be >= 1, got global_batch={global_batch!r}, "
                         f"reference_batch={reference_batch!r}")
    if step < 0 or warmup_steps < 0:
        raise ValueError(f"coupled_lr: step and warmup_steps must be >= 0, got {step!r}, {warmup_steps!r}")
    target = base_lr * global_batch / reference_batch
    if step >= warmup_steps:
        return target
    return base_lr + (target - base_lr) * (step / warmup_steps)
