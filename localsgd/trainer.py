"""The local-SGD worker loop: H local steps, then one average; evaluate, log, checkpoint, repeat.

Each worker (one process per rank under torchrun) draws its own disjoint shard, runs the optimizer
plugin's local step, and hands the step to :class:`~localsgd.engine.LocalSGD`, which averages when
the schedule says so (Stich, ICLR 2019, arXiv 1805.09767, Algorithm 1). ``schedule=ddp`` runs the
same loop with PyTorch's DistributedDataParallel (gradient all-reduce every step) as the baseline.

Reproducibility contract (``reliability.md`` F8, T10, T11): identical initial weights on every rank
(seeded identically, then broadcast from rank 0), a per-rank RNG stream for dropout and
augmentation, shards that reshuffle each epoch, and checkpoints that restore every RNG and the data
cursor, so a killed-and-resumed run ends bit-for-bit equal to an uninterrupted one.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_lib
from . import dist
from . import models as model_lib
from . import optim as optim_lib
from . import outer as outer_lib
from . import ramps as ramp_lib
from . import schedules as schedule_lib
from .checkpoint import Checkpointer
from .config import TrainConfig
from .engine import LocalSGD, SyncStats
from .errors import CheckpointError, ConfigError
from .metrics import MetricsLog, Progress, Tracker, human_bytes, summary_table
from .sampler import ShardSampler, ValidationShard
from .schedules.stich import WeightedIterateAverage, stich_lr
from .testing.faults import FaultInjector

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: preempted after committing a checkpoint; rerun to resume


def run_training(cfg: TrainConfig, run_dir: Path, config_items: dict[str, Any], config_digest: str) -> dict[str, Any]:
    """Train on this rank; every rank calls this after ``dist.init()``. Returns the summary."""
    t_start = time.perf_counter()
    rank, world = dist.rank(), dist.world_size()
    device = dist.device()
    tc = cfg.trainer
    torch.set_num_threads(tc.threads or max(1, (os.cpu_count() or 1) // dist.local_world_size()))

    # ---- data, model, optimizer: same seed everywhere so every rank builds the same replica
    seed_everything(tc.seed)
    dataset = data_lib.build(cfg.data)
    x_train, y_train = dataset.x_train.to(device), dataset.y_train.to(device)
    x_test, y_test = dataset.x_test.to(device), dataset.y_test.to(device)
    model = model_lib.build(cfg.model, dataset.input_shape, dataset.num_classes).to(device)
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast_(tensor.data, src=0, what="initial weights broadcast")
    first_decay = optim_lib.first_decay_step(getattr(cfg.optimizer, "lr_decay", "none"), tc.max_steps,
                                             getattr(cfg.optimizer, "decay_milestones", []))
    schedule = schedule_lib.build(cfg.schedule, schedule_lib.RunInfo(tc.max_steps, world, tc.batch_size, first_decay,
                                                                      dist.local_world_size()))
    plugin = optim_lib.build(cfg.optimizer, model, tc.max_steps)
    validation = None  # a held-out shard per worker for plugins that tune on validation data (STN)
    if plugin.validation_fraction > 0:
        validation = ValidationShard(x_train, y_train, plugin.validation_fraction, tc.batch_size, rank, world, tc.seed)
        keep = validation.train_index.to(device)
        x_train, y_train = x_train[keep], y_train[keep]
    ramp = ramp_lib.build(cfg.ramp, tc.batch_size, tc.max_steps, world_size=world)
    step_model: nn.Module = model
    ddp_comm = None
    if schedule is None:  # the DDP baseline
        if cfg.outer.name != "average":
            raise ConfigError(f"outer={cfg.outer.name} needs local SGD; schedule=ddp averages gradients instead")
        step_model, ddp_comm = wrap_ddp(model, cfg.schedule.bucket_cap_mb, cfg.schedule.stop_check_every)
        sync = None
    else:
        sync = LocalSGD(model, plugin.optimizers, schedule, buffers=cfg.sync.buffers,
                        optimizer_state=cfg.sync.optimizer_state, on_nonfinite=cfg.sync.on_nonfinite,
                        max_skipped_rounds=cfg.sync.max_skipped_rounds, bucket_cap_mb=cfg.sync.bucket_cap_mb,
                        extra_tensors=plugin.averaged_tensors(), config_hash=int(config_digest[:8], 16),
                        outer=outer_lib.build(cfg.outer), agreement_check=cfg.sync.agreement_check,
                        pre_average=plugin.pre_average)
    sampler = ShardSampler(len(y_train), rank, world, tc.seed)
    # Different dropout/augmentation noise per rank, deterministic for the seed.
    seed_everything(tc.seed + 7919 * (rank + 1))
    ctx = optim_lib.StepContext(loss_fn=F.cross_entropy,
                                next_val_batch=validation.next_batch if validation is not None else None)
    noise = NoiseScaleProbe(cfg.ramp, ramp, world) if cfg.ramp.name == "noise_scale" else None
    stich = None  # Stich's step size and weighted iterate average (schedule=stich, paper_lr=true)
    if cfg.schedule.name == "stich" and cfg.schedule.paper_lr:
        a = schedule.shift(cfg.schedule.mu, cfg.schedule.L, cfg.schedule.shift_kappa)  # type: ignore[union-attr]
        stich = WeightedIterateAverage(sync.param_buffers(), a)  # type: ignore[union-attr]
    dist.set_timeout(cfg.comm.train_timeout_s)

    # ---- outputs and resume
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main())
    ckpt = Checkpointer(cfg.checkpoint.dir or run_dir / "checkpoints", cfg.checkpoint.keep_latest_k,
                        cfg.checkpoint.fallback)
    start_step, wall_before, wandb_id = 0, 0.0, None
    # Per-rank state beyond the engine's, checkpointed and restored by name.
    extra_state: dict[str, Any] = {k: v for k, v in (("ramp", ramp), ("noise_scale", noise), ("stich", stich),
                                                     ("validation", validation))
                                   if v is not None}
    if cfg.checkpoint.resume:
        found = ckpt.find_latest()
        if found is not None:
            check_resumable(found.manifest, world, config_items)
            model_state, rank_state = ckpt.load(found)
            restore(model, plugin, sync, sampler, model_state, rank_state, ddp_comm)
            for key, component in extra_state.items():
                component.load_state_dict(rank_state[key])
            start_step, wall_before = found.step, float(found.manifest.get("wall_seconds", 0.0))
            wandb_id = found.manifest.get("wandb_id")
            metrics.truncate_after(start_step)
    tracker = Tracker(cfg.logging.wandb, run_dir, config_items, cfg.logging.project, cfg.logging.entity,
                      cfg.logging.group, cfg.logging.name, wandb_id)
    metrics.write({"event": "start", "step": start_step, "world_size": world, "backend": dist.backend(),
                   "restart_count": dist.restart_count(), "resumed": start_step > 0})
    faults = FaultInjector()
    install_preemption_handler(sync if sync is not None else ddp_comm)

    def stats() -> SyncStats:
        return sync.stats if sync is not None else ddp_comm.stats  # type: ignore[union-attr]

    def save(step: int) -> None:
        if not cfg.checkpoint.enable:
            return
        meta = {"config": config_items, "config_sha256": config_digest, "wandb_id": tracker.run_id,
                "restart_count": dist.restart_count(), "torch": torch.__version__,
                "wall_seconds": wall_before + time.perf_counter() - t_start, "schedule": describe(sync)}
        rank_state = rank_checkpoint(step, model, plugin, sync, sampler, ddp_comm, cfg.sync.buffers == "local")
        rank_state.update({key: component.state_dict() for key, component in extra_state.items()})
        ckpt.save(step, model.state_dict() if dist.is_main() else {}, rank_state, meta,
                  fault_hook=lambda stage: faults.during_save(step, stage))

    # ---- the loop: local steps, with the engine averaging when the schedule says so
    progress = Progress(tc.max_steps, start_step, tc.progress)
    window: list[optim_lib.StepOutput] = []  # reduced only when logged: no per-step host sync
    # Linear LR scaling with the current batch (Goyal et al.), except for Smith's ramp, whose point is
    # to grow the batch *instead of* changing the LR (it sets its own LR factor once b_max is hit).
    couple_lr = tc.lr_batch_coupling and cfg.ramp.name != "smith"
    batch_size, constant_batch = tc.batch_size, cfg.ramp.name == "none"
    for step in range(start_step, tc.max_steps):
        if not constant_batch:
            batch_size = ramp.batch_size(step)
            ctx.lr_scale = ramp.lr_factor(step) * (batch_size / tc.batch_size if couple_lr else 1.0)
        if noise is not None:  # the first local step after a sync: every replica is at the same point
            ctx.after_backward = noise.hook(step, batch_size) if noise.due(sync) else None
        if stich is not None:
            stich.accumulate(sync.param_buffers(), step)  # type: ignore[union-attr]
            ctx.lr_override = stich_lr(step, cfg.schedule.mu, stich.a, cfg.schedule.lr_numerator)
        batch = None  # a step without training data (STN's hyper steps) must not advance the data stream
        if plugin.uses_train_batch(step):
            idx = sampler.next_indices(batch_size)
            batch = (x_train[idx], y_train[idx])
        out = plugin.train_step(step_model, batch, step, ctx)
        faults.after_step(step + 1, model)
        if sync is not None:
            synced = sync.step(loss=out.loss)
        else:
            synced = ddp_comm.step()  # type: ignore[union-attr]
        window.append(out)
        done = step + 1
        if done % tc.log_every == 0 or done == tc.max_steps:
            record = {"event": "train", "step": done, "loss": float(torch.stack([o.loss for o in window]).mean()),
                      "accuracy": window_accuracy(window),
                      "lr": ctx.lr_override or plugin.lr(step) * ctx.lr_scale, "batch_size": batch_size,
                      "samples": sampler.samples_seen * world, **comm_record(stats())}
            if noise is not None:
                record["b_simple"] = noise.last_b_simple
            record.update(plugin.log_values())
            metrics.write(record)
            tracker.log({k: v for k, v in record.items() if k != "event"}, step=done)
            progress.update(len(window), loss=f"{record['loss']:.3f}", acc=f"{record['accuracy']:.3f}",
                            rounds=str(record["comm_rounds"]), comm=human_bytes(record["comm_bytes"]))
            window.clear()
        if tc.eval_every and done % tc.eval_every == 0 and done < tc.max_steps:
            ev = evaluate_averaged(model, sync, x_test, y_test, tc.eval_batch_size)
            metrics.write({"event": "eval", "step": done, **ev})
            tracker.log(ev, step=done)
        # Checkpoints need identical replicas: after a global average (not a hierarchical group one).
        # They come after this step's records, so a crash after the commit loses no record and a crash
        # before it leaves records that the resume truncates and writes again.
        if synced and (sync is None or sync.in_sync) and stats().rounds % cfg.checkpoint.every_rounds == 0:
            save(done)
        if (sync if sync is not None else ddp_comm).stop_agreed:  # type: ignore[union-attr]
            save(done)
            metrics.write({"event": "preempted", "step": done})
            raise SystemExit(REQUEUE_EXIT_CODE)

    # ---- the end: a guaranteed final average, evaluation of the averaged model, summary
    if sync is not None:
        sync.finalize()
    if stich is not None and start_step < tc.max_steps:  # the output is x̂_T, not the last iterate
        sync.stats.bytes += stich.finalize_into(sync.param_buffers())  # type: ignore[union-attr]
    final_step = max(start_step, tc.max_steps)
    ev = evaluate_averaged(model, sync, x_test, y_test, tc.eval_batch_size)
    if cfg.checkpoint.enable and start_step < tc.max_steps:
        save(final_step)
    progress.close()
    s = stats()
    summary = {
        "final_eval_loss": ev["eval_loss"], "final_eval_accuracy": ev["eval_accuracy"],
        "steps": final_step, "samples": sampler.samples_seen * world,
        "comm_rounds": s.rounds, "comm_bytes": s.bytes, "comm_seconds": s.seconds,
        "comm_check_bytes": s.check_bytes, "comm_skipped_rounds": s.skipped_rounds,
        "wall_seconds": wall_before + time.perf_counter() - t_start,
        "world_size": world, "backend": dist.backend(), "schedule": describe(sync),
        "optimizer": cfg.optimizer.name, "data": cfg.data.name, "model": cfg.model.name,
        "outer": cfg.outer.name, "ramp": ramp.describe(), "final_batch_size": ramp.batch_size(final_step - 1),
        "noise_scale_bytes": 0 if noise is None else noise.bytes,
        "restart_count": dist.restart_count(), "run_dir": str(run_dir),
    }
    metrics.write({"event": "final", "step": final_step, **summary})
    tracker.log({f"final/{k}": v for k, v in summary.items() if isinstance(v, int | float)}, step=final_step)
    tracker.finish()
    if dist.is_main():
        write_json_atomic(run_dir / "summary.json", summary)
        print(f"\nrun directory: {run_dir}\n{summary_table(summary)}", flush=True)
    return summary


# ---------------------------------------------------------------------- helpers of the loop
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def window_accuracy(window: list[optim_lib.StepOutput]) -> float:
    """Training accuracy over the logging window: one argmax over all its batches, off the hot path."""
    if any(o.logits is None or o.targets is None for o in window):
        return float("nan")
    logits = torch.cat([o.logits for o in window])  # type: ignore[misc]
    targets = torch.cat([o.targets for o in window])  # type: ignore[misc]
    return float((logits.argmax(dim=1) == targets).double().mean())


def describe(sync: LocalSGD | None) -> str:
    return "ddp" if sync is None else sync.schedule.describe()


def comm_record(s: SyncStats) -> dict[str, Any]:
    return {"comm_rounds": s.rounds, "comm_bytes": s.bytes, "comm_seconds": round(s.seconds, 6)}


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Loss and accuracy on this rank's slice of the test set, summed over ranks."""
    rank, world = dist.rank(), dist.world_size()
    xs, ys = x[rank::world], y[rank::world]
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=x.device)
    for i in range(0, len(ys), batch_size):
        logits = model(xs[i : i + batch_size])
        target = ys[i : i + batch_size]
        totals[0] += F.cross_entropy(logits, target, reduction="sum").double()
        totals[1] += (logits.argmax(dim=1) == target).sum().double()
        totals[2] += len(target)
    model.train(was_training)
    dist.all_reduce_sum_(totals, what="evaluation totals")
    loss_sum, correct, count = totals.tolist()
    return {"eval_loss": loss_sum / count, "eval_accuracy": correct / count}


def evaluate_averaged(model: nn.Module, sync: LocalSGD | None, x: torch.Tensor, y: torch.Tensor,
                      batch_size: int) -> dict[str, float]:
    if sync is None:
        return evaluate(model, x, y, batch_size)
    with sync.averaged():
        return evaluate(model, x, y, batch_size)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_tupled(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tupled(value: Any) -> Any:
    return tuple(_tupled(v) for v in value) if isinstance(value, list | tuple) else value


def rank_checkpoint(step: int, model: nn.Module, plugin: optim_lib.OptimizerPlugin, sync: LocalSGD | None,
                    sampler: ShardSampler, ddp_comm: Any, local_buffers: bool) -> dict[str, Any]:
    state: dict[str, Any] = {"step": step, "optimizer": plugin.state_dict(), "sampler": sampler.state_dict(),
                             "rng": rng_state()}
    state["engine"] = sync.state_dict() if sync is not None else ddp_comm.state_dict()
    if local_buffers:
        state["buffers"] = {k: v for k, v in model.state_dict().items() if k in dict(model.named_buffers())}
    return state


def restore(model: nn.Module, plugin: optim_lib.OptimizerPlugin, sync: LocalSGD | None, sampler: ShardSampler,
            model_state: dict[str, Any], rank_state: dict[str, Any], ddp_comm: Any) -> None:
    model.load_state_dict(model_state)  # copies into the engine's flat views in place
    if "buffers" in rank_state:
        model.load_state_dict({**model.state_dict(), **rank_state["buffers"]})
    plugin.load_state_dict(rank_state["optimizer"])
    (sync if sync is not None else ddp_comm).load_state_dict(rank_state["engine"])
    sampler.load_state_dict(rank_state["sampler"])
    set_rng_state(rank_state["rng"])


def check_resumable(manifest: dict[str, Any], world: int, config_items: dict[str, Any]) -> None:
    """Refuse a silent mis-resume: world size and config must match the checkpoint's."""
    if int(manifest["world_size"]) != world:
        raise CheckpointError(
            f"checkpoint step-{manifest['step']} was written by {manifest['world_size']} ranks, this run has "
            f"{world}; resuming would re-shard the data differently. Use the same world size or a new run dir."
        )
    saved = manifest.get("config", {})
    ignore = ("checkpoint.resume", "checkpoint.fallback", "trainer.progress", "logging.")
    keys = sorted(k for k in set(saved) | set(config_items)
                  if saved.get(k) != config_items.get(k) and not k.startswith(ignore))
    if keys:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {config_items.get(k)!r}" for k in keys)
        raise CheckpointError(
            f"checkpoint step-{manifest['step']} was made with a different config ({diff}); use a new run "
            "directory, or checkpoint.resume=false to start over in this one"
        )


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    import json

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def install_preemption_handler(stopper: LocalSGD | DDPComm) -> None:
    """SIGTERM/SIGUSR1 ask to stop; all ranks agree at the next sync (DDP: the next stop check),
    checkpoint and exit 75."""

    def handler(signum: int, frame: Any) -> None:
        stopper.stop_requested = True

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            pass
    return None


# ---------------------------------------------------------------------- noise-scale measurement
class NoiseScaleProbe:
    """McCandlish et al. (arXiv 1812.06162, App. A.1) two-batch estimate at a common point.

    Right after a sync all replicas hold the same parameters, so at the first local step of every
    ``measure_every_rounds``-th round each worker's gradient (batch b) and the all-reduced mean
    gradient (batch K·b) are the two batches of the estimator. One extra all-reduce of one gradient
    (plus its squared norm) per measurement, counted in ``bytes``.
    """

    def __init__(self, cfg: Any, ramp: ramp_lib.BatchRamp, world: int) -> None:
        if world < 2:
            raise ConfigError("ramp=noise_scale needs >= 2 workers (the big batch is the all-reduced gradient)")
        self.ramp, self.world, self.every = ramp, world, cfg.measure_every_rounds
        self.estimator = ramp_lib.NoiseScaleEstimator(1, world, ema=cfg.ema, discard_first=cfg.warmup_measurements)
        self.bytes = 0
        self.last_b_simple = float("nan")

    def due(self, sync: LocalSGD | None) -> bool:
        return sync is not None and sync.in_sync and sync.stats.rounds % self.every == 0

    def hook(self, step: int, batch_size: int) -> Any:
        def measure(model: nn.Module) -> None:
            grads = [p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]
            flat = torch.cat(grads).double()
            buf = torch.cat([flat, flat.pow(2).sum().reshape(1)])
            dist.all_reduce_sum_(buf, what="noise-scale gradient all-reduce")
            self.bytes += buf.numel() * buf.element_size()
            small = float(buf[-1]) / self.world  # mean over workers of |g_k|^2 (lower variance)
            big = float((buf[:-1] / self.world).pow(2).sum())
            self.estimator.update(small, big, b_small=batch_size, b_big=self.world * batch_size)
            self.last_b_simple = self.estimator.b_simple()
            self.ramp.observe_noise_scale(self.last_b_simple, step)

        return measure

    def state_dict(self) -> dict[str, Any]:
        return {"estimator": self.estimator.state_dict(), "bytes": self.bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.estimator.load_state_dict(state["estimator"])
        self.bytes = int(state["bytes"])


# ---------------------------------------------------------------------- the DDP baseline
@dataclass
class DDPComm:
    """Communication accounting for DistributedDataParallel, via a counting comm hook."""

    stats: SyncStats
    stop_check_every: int = 10
    local_step: int = 0
    stop_requested: bool = False  # set by the preemption handler on this rank
    stop_agreed: bool = False  # some rank asked to stop, known to all at the same step

    def step(self) -> bool:
        self.local_step += 1
        self.stats.rounds += 1
        if self.local_step % self.stop_check_every == 0:
            flag = torch.tensor([float(self.stop_requested)], device=dist.device())
            dist.all_reduce_max_(flag, what="DDP preemption check")
            self.stats.check_bytes += flag.element_size()
            self.stop_agreed = bool(flag.item() > 0)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"local_step": self.local_step, "stats": self.stats.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.local_step = int(state["local_step"])
        self.stats.load_state_dict(state["stats"])


def wrap_ddp(model: nn.Module, bucket_cap_mb: float, stop_check_every: int = 10) -> tuple[nn.Module, DDPComm]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    comm = DDPComm(SyncStats(), stop_check_every)
    device = dist.device()
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = DDP(model, device_ids=device_ids, bucket_cap_mb=bucket_cap_mb)
    world = dist.world_size()

    # DDP inspects the hook's annotations; leave them off (they would be strings here).
    def counting_allreduce(state, bucket):  # type: ignore[no-untyped-def]
        tensor = bucket.buffer()
        state.stats.bytes += tensor.numel() * tensor.element_size()
        begin = time.perf_counter()
        work = torch.distributed.all_reduce(tensor, async_op=True)

        def finish(fut):  # type: ignore[no-untyped-def]
            state.stats.seconds += time.perf_counter() - begin
            return fut.value()[0].div_(world)

        return work.get_future().then(finish)

    ddp.register_comm_hook(comm, counting_allreduce)
    return ddp, comm
