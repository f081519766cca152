"""The real thing the simulator is checked against: :class:`~localsgd.engine.LocalSGD` on a real process group.

Each rank builds its components from the config exactly as the trainer does (seeded init, the
optimizer plugin and its own step, ramp, schedule, outer optimizer, the rank's
:class:`~localsgd.sampler.ShardSampler`), in ``dtype``, and runs the trainer's loop body without its
logging and checkpoints: the step hooks' ``before_step`` (the noise-scale probe of a schedule that
observes it), batch, ``plugin.train_step``, ``LocalSGD.step``; then ``finalize``. Run it with
:func:`localsgd.testing.ranks.run_ok` (``tests/test_sim.py``, ``benchmarks/sim.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import data as data_lib
from .. import dist
from .. import models as model_lib
from .. import optim as optim_lib
from .. import outer as outer_lib
from .. import ramps as ramp_lib
from ..config import TrainConfig
from ..engine import LocalSGD
from ..sampler import ShardSampler


def gloo_reference(rank: int, world: int, cfgs: list[TrainConfig], dtype: torch.dtype = torch.float64
                   ) -> list[dict[str, Any]]:
    """Train each config on this rank of a live process group; per config, the final flat parameters
    the steps after which an average happened (equal on every rank) and the loop's seconds."""
    import time

    from ..hooks import overriding
    from ..trainer import build_hooks, build_schedule, seed_everything, step_lr

    out = []
    for cfg in cfgs:
        tc = cfg.trainer
        seed_everything(tc.seed)
        data = data_lib.build(cfg.data)
        model = model_lib.build(cfg.model, data.input_shape, data.num_classes).to(dtype)
        for tensor in model.parameters():
            dist.broadcast_(tensor.data, src=0, what="initial weights broadcast")
        plugin = optim_lib.build(cfg.optimizer, model, tc.max_steps)
        ramp = ramp_lib.build(cfg.ramp, tc.batch_size, tc.max_steps, world_size=world)
        schedule = build_schedule(cfg, world, world)

        def next_lr(step: int, cfg: TrainConfig = cfg, plugin: Any = plugin, ramp: Any = ramp) -> float:
            return step_lr(cfg, plugin, ramp, step)

        comm = LocalSGD(model, plugin.optimizers, schedule, outer=outer_lib.build(cfg.outer), next_lr=next_lr)
        sampler = ShardSampler(data.num_train, rank, world, tc.seed)
        x, y = data.x_train.to(dtype), data.y_train
        ctx = optim_lib.StepContext(loss_fn=data.loss_fn)
        before_step = overriding(build_hooks(cfg, ramp, comm, world, lambda: False), "before_step")
        synced_at = []
        start = time.perf_counter()
        for step in range(tc.max_steps):
            b = ramp.batch_size(step)
            ctx.lr_scale = ramp.lr_scale(step, b, tc.batch_size, tc.lr_batch_coupling)
            for hook in before_step:
                hook(step, b, ctx)
            idx = sampler.next_indices(b)
            loss = plugin.train_step(model, (x[idx], y[idx]), step, ctx).loss
            if comm.step(loss=loss):
                synced_at.append(step + 1)
        comm.finalize()
        seconds = time.perf_counter() - start
        # numpy, not a tensor: a tensor would cross to the parent through shared memory the rank frees on exit
        out.append({"params": torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy(),
                    "synced_at": synced_at, "rounds": comm.stats.rounds, "seconds": seconds})
    return out
