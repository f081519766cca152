"""The local-SGD worker loop: H local steps, then one average; evaluate, log, checkpoint, repeat.

Each worker (one process per rank under torchrun) draws its own disjoint shard, runs the optimizer
plugin's local step, and hands the step to :class:`~localsgd.engine.LocalSGD`, which averages when
the schedule says so (Stich, ICLR 2019, arXiv 1805.09767, Algorithm 1). ``schedule=ddp`` runs the
same loop with PyTorch's DistributedDataParallel (gradient all-reduce every step) as the baseline.

Reproducibility contract: identical initial weights on every rank
(seeded identically, then broadcast from rank 0), a per-rank RNG stream for dropout and
augmentation, shards that reshuffle each epoch, and checkpoints that restore every RNG and the data
cursor, so a killed-and-resumed run ends bit-for-bit equal to an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import random
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import data as data_lib
from . import dist
from . import models as model_lib
from . import optim as optim_lib
from . import outer as outer_lib
from . import ramps as ramp_lib
from . import schedules as schedule_lib
from .checkpoint import Checkpointer
from .communicator import Communicator
from .config import TrainConfig, check_batch_fits_shard, total_steps_dependents
from .engine import LocalSGD, SyncStats
from .errors import CheckpointError, ConfigError, RunDirBusyError
from .hooks import FaultHook, NoiseScaleProbe, RoundLengthHistory, StepHook, StichIterateAverage, overriding
from .metrics import MetricsLog, Progress, RunLog, Tracker, TrainRecords, git_commit, human_bytes, summary_table
from .rundir import RunDirLock, completed_run, rotate_previous_run
from .sampler import ValidationShard

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
    data = data_lib.build(cfg.data)
    model = model_lib.build(cfg.model, data.input_shape, data.num_classes).to(device)
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast_(tensor.data, src=0, what="initial weights broadcast")
    plugin = optim_lib.build(cfg.optimizer, model, tc.max_steps)
    validation = None  # a held-out shard per worker for plugins that tune on validation data (STN)
    if plugin.validation_fraction > 0:
        if not isinstance(data, data_lib.Dataset):
            raise ConfigError(f"invalid config: optimizer={cfg.optimizer.name} holds out validation batches from "
                              f"an in-memory training set, and data={cfg.data.name} is not one; choose optimizer=sgd")
        validation = ValidationShard(data.x_train.to(device), data.y_train.to(device), plugin.validation_fraction,
                                     tc.batch_size, rank, world, tc.seed)
        data = data.without_train_rows(validation.train_index)
    options = {f.name: getattr(cfg.loader, f.name) for f in dataclasses.fields(data_lib.LoaderOptions)}
    data = data_lib.loaded(data, cfg.loader.mode, data_lib.LoaderOptions(**options))
    ramp = ramp_lib.build(cfg.ramp, tc.batch_size, tc.max_steps, world_size=world)
    if ramp.observes_noise_scale and isinstance(data, data_lib.MapStyleData):
        raise ConfigError("invalid config: ramp=noise_scale: decides each batch at run time, and a DataLoader "
                          "loads the batches of the coming steps ahead; choose another ramp")
    if data.num_train is not None:  # ConfigError before the first batch, not OOM
        check_batch_fits_shard(cfg, ramp, data.num_train, world)
    comm, step_model = build_communicator(cfg, model, plugin, ramp, world, config_digest)
    if tc.compile:  # the compiled module shares the parameters, which stay views of the engine's flat buffer
        step_model = torch.compile(step_model)
    stream = data.train_stream(rank, world, tc.seed, device)
    options = optim_lib.StepOptions.build(tc.precision, tc.grad_accum_steps, tc.grad_clip, device)
    # Different dropout/augmentation noise per rank, deterministic for the seed.
    seed_everything(tc.seed + 7919 * (rank + 1))
    ctx = optim_lib.StepContext(loss_fn=data.loss_fn, options=options,
                                next_val_batch=validation.next_batch if validation is not None else None)
    start_step = 0
    faults = FaultHook()
    hooks = [*build_hooks(cfg, ramp, comm, world, lambda: start_step >= tc.max_steps), faults]
    dist.set_timeout(cfg.comm.train_timeout_s)

    # ---- outputs and resume
    lock = claim_run_dir(run_dir)
    metrics = MetricsLog(run_dir / "metrics.jsonl", enabled=dist.is_main())
    ckpt = Checkpointer(cfg.checkpoint.dir or run_dir / "checkpoints", cfg.checkpoint.keep_latest_k,
                        cfg.checkpoint.fallback)
    wall_before, wandb_id, resumed_from = 0.0, None, None
    # Per-rank state beyond the communicator's, checkpointed and restored by name.
    extra_state: dict[str, Any] = {"ramp": ramp, **({"validation": validation} if validation is not None else {}),
                                   **({"grad_scaler": options.scaler} if options and options.scaler else {}),
                                   **{h.name: h for h in hooks if hasattr(h, "state_dict")}}
    if cfg.checkpoint.resume:
        found = ckpt.find_latest()
        if found is not None:
            check_resumable(found.manifest, world, config_items, cfg)
            leave_if_complete(run_dir, tc.max_steps, found.step)
            model_state, rank_state = ckpt.load(found)
            restore(model, plugin, comm, stream, model_state, rank_state)
            for key, component in extra_state.items():
                component.load_state_dict(rank_state[key])
            start_step, wall_before = found.step, float(found.manifest.get("wall_seconds", 0.0))
            resumed_from = found.path
            wandb_id = found.manifest.get("wandb_id")
            metrics.truncate_after(start_step)
    if start_step == 0:
        set_aside_earlier_run(run_dir, ckpt.dir if cfg.checkpoint.enable else None)
    tracker = Tracker(cfg.logging.wandb, run_dir, config_items, cfg.logging.project, cfg.logging.entity,
                      cfg.logging.group, cfg.logging.name, wandb_id)
    metrics.write({"event": "start", "step": start_step, "world_size": world, "backend": dist.backend(),
                   "restart_count": dist.restart_count(), "resumed": start_step > 0,
                   "resumed_from": None if resumed_from is None else str(resumed_from)})
    runlog = RunLog(run_dir / "train.log", dist.is_main(), console_progress=True)
    runlog.say(banner(cfg, run_dir, comm, ramp, world, device, start_step, resumed_from))
    install_preemption_handler(comm)

    progress = Progress(tc.max_steps, start_step, tc.progress)
    runlog.console_progress = not progress.shows_bar  # with the bar on, progress lines go to train.log only
    progress_every = max(1, tc.max_steps // 20)

    def write_train(record: dict[str, Any], steps: int) -> None:  # a record completed by TrainRecords
        done = record["step"]
        metrics.write(record)
        tracker.log(record, step=done)
        progress.update(steps, record)
        if done // progress_every != (done - steps) // progress_every or done == tc.max_steps:
            runlog.progress(progress_line(record, tc.max_steps))

    train_records = TrainRecords(write_train, enabled=dist.is_main())  # written in batches: off the hot path

    def save(step: int) -> None:
        if not cfg.checkpoint.enable:
            return
        train_records.flush()  # every record up to this step is on disk before the checkpoint commits
        meta = {"config": config_items, "config_sha256": config_digest, "wandb_id": tracker.run_id,
                "restart_count": dist.restart_count(), "torch": torch.__version__,
                "wall_seconds": wall_before + time.perf_counter() - t_start, "schedule": comm.describe()}
        rank_state = rank_checkpoint(step, model, plugin, comm, stream, cfg.sync.buffers == "local")
        rank_state.update({key: component.state_dict() for key, component in extra_state.items()})
        ckpt.save(step, model.state_dict() if dist.is_main() else {}, rank_state, meta,
                  fault_hook=lambda stage: faults.during_save(step, stage))

    # ---- the loop: draw a batch, one local step, the communicator, then log / evaluate / checkpoint
    stream.start(lambda s: ramp.batch_size(s) * tc.grad_accum_steps if plugin.uses_train_batch(s) else 0,
                 start_step, tc.max_steps)  # a DataLoader loads ahead: the batches of the steps to come
    before_step, after_step, records = (overriding(hooks, m) for m in ("before_step", "after_step", "record"))
    window: list[optim_lib.StepOutput] = []  # reduced only when logged: no per-step host sync
    batch_size = tc.batch_size
    # Every completed record is written and the loaders' workers stop, whatever ends the loop (a stop, an
    # error: a library caller that catches it keeps no worker processes alive).
    with train_records, closed_on_error(stream, data):
        for step in range(start_step, tc.max_steps):
            if not ramp.constant:
                batch_size = ramp.batch_size(step)
                ctx.lr_scale = ramp.lr_scale(step, batch_size, tc.batch_size, tc.lr_batch_coupling)
            for hook in before_step:
                hook(step, batch_size, ctx)
            # A step without training data (STN's hyper steps) must not advance the data stream.
            batch = stream.next_batch(batch_size * tc.grad_accum_steps) if plugin.uses_train_batch(step) else None
            out = plugin.train_step(step_model, batch, step, ctx)
            done = step + 1
            for hook in after_step:
                hook(done, model)
            synced = comm.step(loss=out.loss)
            if not data.train_accuracy:
                out.logits = None  # free a language model's (B, T, V) logits now, not at the next record
            window.append(out)
            if done % tc.log_every == 0 or done == tc.max_steps:
                record = {"event": "train", "step": done, "lr": ctx.lr_override or plugin.lr(step) * ctx.lr_scale,
                          "batch_size": batch_size, "samples": stream.samples_seen * world, **comm_record(comm.stats),
                          **counted(data, stream, world)}
                for hook_record in records:
                    record.update(hook_record())
                record.update(plugin.log_values())
                train_records.add(window, record)  # its loss and accuracy are reduced with the next windows'
                window = []
            if tc.eval_every and done % tc.eval_every == 0 and done < tc.max_steps:
                ev = evaluate_averaged(model, comm, data, tc.eval_batch_size, device)
                train_records.flush()
                metrics.write({"event": "eval", "step": done, **ev})
                tracker.log(ev, step=done)
                runlog.progress(f"eval at step {done}: {eval_line(ev)}")
            # Checkpoints at the end of a round (a global one, not a hierarchical group's), after this step's
            # records, so a crash after the commit loses no record and a crash before it leaves records
            # that the resume truncates and writes again.
            if synced and comm.round_completed and comm.stats.rounds % cfg.checkpoint.every_rounds == 0:
                save(done)
            if comm.stop_agreed:
                save(done)
                train_records.flush()
                metrics.write({"event": "preempted", "step": done})
                where = f"checkpoint step-{done} in {ckpt.dir}" if cfg.checkpoint.enable else "no checkpoint (off)"
                # every launch gets a fresh run directory: the resume names this one
                runlog.say(f"localsgd: stopped at step {done}, {where}; to resume, run the same command with "
                           f"hydra.run.dir={run_dir}", stream=sys.stderr)
                raise SystemExit(REQUEUE_EXIT_CODE)

    # ---- the end: a guaranteed final average, evaluation of the averaged model, summary
    stream.close()
    with closed_on_error(data):  # the evaluation loaders' workers stop too if the final average fails
        comm.finalize()
        for hook in hooks:
            hook.finish(comm)
        final_step = max(start_step, tc.max_steps)
        ev = evaluate_averaged(model, comm, data, tc.eval_batch_size, device)
    data.close()
    if cfg.checkpoint.enable and start_step < tc.max_steps:
        save(final_step)
    progress.close()
    s = comm.stats
    summary = {
        **{f"final_{k}": v for k, v in ev.items()},
        "steps": final_step, "samples": stream.samples_seen * world, **counted(data, stream, world),
        "comm_rounds": s.rounds, "comm_bytes": s.bytes, "comm_seconds": s.seconds,
        "comm_check_bytes": s.check_bytes, "comm_skipped_rounds": s.skipped_rounds,
        "wall_seconds": wall_before + time.perf_counter() - t_start,
        "world_size": world, "backend": dist.backend(), "schedule": comm.describe(),
        "optimizer": cfg.optimizer.name, "data": cfg.data.name, "model": cfg.model.name,
        "outer": cfg.outer.name, "ramp": ramp.describe(), "final_batch_size": ramp.batch_size(final_step - 1),
        "restart_count": dist.restart_count(), "run_dir": str(run_dir), "seed": tc.seed,
        "torch": torch.__version__, "git_commit": git_commit() if dist.is_main() else None,  # rank 0 writes it
    }
    for hook in hooks:
        summary.update(hook.summary())
    metrics.write({"event": "final", "step": final_step, **summary})
    metrics.close()
    tracker.log({f"final/{k}": v for k, v in summary.items() if isinstance(v, int | float)}, step=final_step)
    tracker.finish()
    if dist.is_main():
        write_json_atomic(run_dir / "summary.json", summary)
    runlog.say(f"\nrun directory: {run_dir}\n{summary_table(summary)}")
    runlog.close()
    if lock is not None:
        lock.release()
    return summary


@contextlib.contextmanager
def closed_on_error(*parts: Any) -> Iterator[None]:
    """Close ``parts`` (data streams, training data: their loaders' worker processes) if the block raises,
    ``SystemExit`` of a stop included, so the workers stop before the launcher signals what is left;
    on success the caller closes each at its own point."""
    try:
        yield
    except BaseException:
        for part in parts:
            with contextlib.suppress(Exception):  # the error in flight is the one to report
                part.close()
        raise


# ---------------------------------------------------------------------- building the communicator and hooks
def build_communicator(cfg: TrainConfig, model: nn.Module, plugin: optim_lib.OptimizerPlugin, ramp: Any,
                       world: int, config_digest: str) -> tuple[Communicator, nn.Module]:
    """Local SGD on the configured schedule, or the DDP baseline (``schedule=ddp``); returns the
    communicator and the module the optimizer plugin trains through."""
    build_own = getattr(cfg.schedule, "build_communicator", None)
    if build_own is not None:  # the DDP baseline averages gradients, not parameters
        comm = build_own(model)
        return comm, comm.step_model
    schedule = build_schedule(cfg, world, dist.local_world_size())

    def next_lr(step: int) -> float:  # the rate local step ``step`` will run at (adaptive schedules decide on it)
        return step_lr(cfg, plugin, ramp, step)

    s = cfg.sync
    sync = LocalSGD(model, plugin.optimizers, schedule, buffers=s.buffers, optimizer_state=s.optimizer_state,
                    on_nonfinite=s.on_nonfinite, max_skipped_rounds=s.max_skipped_rounds,
                    bucket_cap_mb=s.bucket_cap_mb, extra_tensors=plugin.averaged_tensors(),
                    config_hash=int(config_digest[:8], 16), outer=outer_lib.build(cfg.outer),
                    agreement_check=s.agreement_check, pre_average=plugin.pre_average, next_lr=next_lr,
                    outer_state_on_host=s.outer_state_on_host, fused_max_mb=s.fused_max_mb, fragments=s.fragments,
                    delay=s.delay, mix=s.mix, merge=s.merge, compress=s.compress, error_feedback=s.error_feedback,
                    compress_block=s.compress_block)
    return sync, model


def build_schedule(cfg: TrainConfig, world: int, local_world: int) -> Any:
    """The configured sync schedule for ``world`` workers, ``local_world`` per node (also :mod:`localsgd.sim`'s)."""
    tc = cfg.trainer
    return schedule_lib.build(cfg.schedule, schedule_lib.RunInfo(
        tc.max_steps, world, tc.batch_size,
        optim_lib.first_decay_step(getattr(cfg.optimizer, "lr_decay", "none"), tc.max_steps,
                                   getattr(cfg.optimizer, "decay_milestones", [])),
        local_world))


def step_lr(cfg: TrainConfig, plugin: optim_lib.OptimizerPlugin, ramp: Any, step: int) -> float:
    """The learning rate local step ``step`` (0-based) runs at: the optimizer's schedule times the ramp's."""
    tc = cfg.trainer
    return plugin.lr(step) * ramp.lr_scale(step, ramp.batch_size(step), tc.batch_size, tc.lr_batch_coupling)


def build_hooks(cfg: TrainConfig, ramp: Any, comm: Communicator, world: int, finished: Any) -> list[StepHook]:
    """The step hooks the chosen components ask for, by capability (combinations they cannot serve,
    such as ramp=noise_scale at one worker, were refused by ``config.check_config`` before start)."""
    hooks: list[StepHook] = [RoundLengthHistory(comm)]
    schedule = getattr(comm, "schedule", None)
    if ramp.observes_noise_scale:
        hooks.append(NoiseScaleProbe(cfg.ramp, ramp, world, comm))
    elif getattr(schedule, "observes_noise_scale", False):  # H from B_simple (schedule=noise_adaptive)
        hooks.append(NoiseScaleProbe(cfg.schedule, schedule, world, comm))
    sc = cfg.schedule
    if getattr(sc, "paper_lr", False):  # Stich's step size and weighted iterate average
        a = comm.schedule.shift(sc.mu, sc.L, sc.shift_kappa)  # type: ignore[attr-defined]
        hooks.append(StichIterateAverage(comm, a, sc.mu, sc.lr_numerator, finished))
    return hooks


# ---------------------------------------------------------------------- the run directory
def claim_run_dir(run_dir: Path) -> RunDirLock | None:
    """Rank 0 locks the run directory for the run: a second job there exits at once, in one line (two
    jobs in one directory would write duplicate steps and purge each other's checkpoints)."""
    lock, busy = None, None
    if dist.is_main():
        try:
            lock = RunDirLock.acquire(run_dir)
        except RunDirBusyError as exc:
            busy = str(exc)
    busy = dist.broadcast_object(busy)
    if busy:
        dist.print0(f"localsgd: {busy}", file=sys.stderr)
        raise SystemExit(2)
    return lock


def leave_if_complete(run_dir: Path, max_steps: int, checkpoint_step: int) -> None:
    """A finished run, run again, says so and exits 0 without touching its outputs."""
    done = completed_run(run_dir, max_steps, checkpoint_step) if dist.is_main() else None
    message = dist.broadcast_object(None if done is None else done.describe(run_dir))
    if message:
        dist.print0(f"localsgd: {message}", file=sys.stderr)
        raise SystemExit(0)


def set_aside_earlier_run(run_dir: Path, checkpoint_dir: Path | None) -> None:
    """Starting at step 0 where an earlier run left records (no usable checkpoint, or
    ``checkpoint.resume=false``): its ``metrics.jsonl``, ``summary.json`` and checkpoints become
    ``*.1`` (older ones ``*.2`` ...), so no step is recorded twice and no purge mixes two runs."""
    paths: list[str | Path] = ["metrics.jsonl", "summary.json", *([checkpoint_dir] if checkpoint_dir else [])]
    moves = rotate_previous_run(run_dir, paths) if dist.is_main() else []
    moved = dist.broadcast_object([f"{old.name} -> {new.name}" for old, new in moves])
    if moved:
        dist.print0(f"localsgd: starting at step 0 in {run_dir}; the earlier run's outputs were moved aside "
                    f"({', '.join(moved)})", file=sys.stderr)


# ---------------------------------------------------------------------- helpers of the loop
def banner(cfg: TrainConfig, run_dir: Path, comm: Communicator, ramp: Any, world: int, device: torch.device,
           start_step: int, resumed_from: Path | None) -> str:
    """What rank 0 says before the first step: where the run lives, what it runs, where it starts."""
    opt = cfg.optimizer
    lr = f" (lr {opt.lr})" if hasattr(opt, "lr") else ""
    start = (f"resuming from {resumed_from.name} of {run_dir} (step {start_step} of {cfg.trainer.max_steps})"
             if resumed_from is not None else f"new run, {cfg.trainer.max_steps} steps")
    return (f"localsgd: run directory {run_dir}\n"
            f"  {world} worker(s), {dist.backend()} on {device}; seed {cfg.trainer.seed}; data {cfg.data.name}, "
            f"model {cfg.model.name}, batch {cfg.trainer.batch_size} per worker\n"
            f"  schedule {comm.describe()}, optimizer {opt.name}{lr}, ramp {ramp.describe()}, outer {cfg.outer.name}\n"
            f"  {start}")


def progress_line(record: dict[str, Any], max_steps: int) -> str:
    quality = (f"accuracy {record['accuracy']:.4f}" if record["accuracy"] == record["accuracy"]
               else f"tokens {record['tokens']:,}" if "tokens" in record else "")
    return (f"step {record['step']}/{max_steps}: loss {record['loss']:.4f}, {quality + ', ' if quality else ''}"
            f"lr {record['lr']:.4g}, batch {record['batch_size']}, H {record.get('H', '-')}, "
            f"rounds {record['comm_rounds']}, comm {human_bytes(record['comm_bytes'])}")


def eval_line(ev: dict[str, float]) -> str:
    parts = [f"loss {ev['eval_loss']:.4f}"]
    if "eval_perplexity" in ev:
        parts.append(f"perplexity {ev['eval_perplexity']:.3f}")
    if ev["eval_accuracy"] == ev["eval_accuracy"]:  # not NaN
        parts.append(f"accuracy {ev['eval_accuracy']:.4f}")
    return ", ".join(parts)


def counted(data: data_lib.TrainingData, stream: data_lib.TrainStream, world: int) -> dict[str, int]:
    """Tokens trained on by all workers, for a token set (``tokens`` in records and the summary)."""
    per = data.tokens_per_sample
    return {} if per is None else {"tokens": stream.samples_seen * world * per}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def comm_record(s: SyncStats) -> dict[str, Any]:
    return {"comm_rounds": s.rounds, "comm_bytes": s.bytes, "comm_seconds": round(s.seconds, 6)}


@torch.no_grad()
def evaluate(model: nn.Module, data: data_lib.TrainingData, batch_size: int, device: torch.device) -> dict[str, float]:
    """Loss (and accuracy, perplexity where the data reports them) on the evaluation set, summed over ranks.

    Each rank evaluates its disjoint part (``data.eval_batches``); the loss, a mean over the targets'
    elements, is summed as mean x count in float64, so the result is the mean over the whole set.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for x, target in data.eval_batches(dist.rank(), dist.world_size(), batch_size, device):
        logits = model(x)
        totals[0] += data.loss_fn(logits, target).double() * target.numel()
        if data.reports_accuracy:
            totals[1] += (logits.argmax(dim=-1) == target).sum().double()
        totals[2] += target.numel()
    model.train(was_training)
    dist.all_reduce_sum_(totals, what="evaluation totals")
    loss_sum, correct, count = totals.tolist()
    ev = {"eval_loss": loss_sum / count, "eval_accuracy": correct / count if data.reports_accuracy else float("nan")}
    if data.reports_perplexity:
        ev["eval_perplexity"] = math.exp(min(ev["eval_loss"], 700.0))  # exp(709) is float64's largest
    return ev


def evaluate_averaged(model: nn.Module, comm: Communicator, data: data_lib.TrainingData, batch_size: int,
                      device: torch.device) -> dict[str, float]:
    with comm.averaged():
        return evaluate(model, data, batch_size, device)


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


def rank_checkpoint(step: int, model: nn.Module, plugin: optim_lib.OptimizerPlugin, comm: Communicator,
                    stream: data_lib.TrainStream, local_buffers: bool) -> dict[str, Any]:
    state: dict[str, Any] = {"step": step, "optimizer": plugin.state_dict(), "sampler": stream.state_dict(),
                             "rng": rng_state(), "engine": comm.state_dict()}
    if local_buffers:
        state["buffers"] = {k: v for k, v in model.state_dict().items() if k in dict(model.named_buffers())}
    return state


def restore(model: nn.Module, plugin: optim_lib.OptimizerPlugin, comm: Communicator, stream: data_lib.TrainStream,
            model_state: dict[str, Any], rank_state: dict[str, Any]) -> None:
    model.load_state_dict(model_state)  # copies into the engine's flat views in place
    if "buffers" in rank_state:
        model.load_state_dict({**model.state_dict(), **rank_state["buffers"]})
    plugin.load_state_dict(rank_state["optimizer"])
    comm.load_state_dict(rank_state["engine"])
    stream.load_state_dict(rank_state["sampler"])
    set_rng_state(rank_state["rng"])


# Keys a resume may change: they steer outputs, cadence and patience, not the trajectory.
RESUME_MAY_CHANGE = ("checkpoint.resume", "checkpoint.fallback", "checkpoint.keep_latest_k", "checkpoint.every_rounds",
                     "trainer.progress", "trainer.log_every", "trainer.eval_every", "comm.train_timeout_s",
                     "comm.init_timeout_s", "logging.", "loader.")  # loader: the same samples in the same order


def check_resumable(manifest: dict[str, Any], world: int, config_items: dict[str, Any],
                    cfg: TrainConfig | None = None) -> None:
    """Refuse a silent mis-resume: world size and config must match the checkpoint's.

    Outputs and cadence may change (``RESUME_MAY_CHANGE``), and ``trainer.max_steps`` may grow to extend a
    run when nothing in it depends on the total (``config.total_steps_dependents``): with a cosine decay or
    Stich's H, the steps already taken would belong to another run's schedule, so that is refused by name.
    """
    step = manifest["step"]
    if int(manifest["world_size"]) != world:
        raise CheckpointError(
            f"checkpoint step-{step} was written by {manifest['world_size']} ranks, this run has "
            f"{world}; resuming would re-shard the data differently. Use the same world size or a new run dir."
        )
    saved = manifest.get("config", {})
    keys = sorted(k for k in set(saved) | set(config_items)
                  if (saved[k] if k in saved else added_key_default(k)) != config_items.get(k)
                  and not k.startswith(RESUME_MAY_CHANGE))
    if keys == ["trainer.max_steps"] and cfg is not None:
        old, new = int(saved[keys[0]]), int(config_items[keys[0]])
        dependents = total_steps_dependents(cfg)
        if new >= step and not dependents:
            if dist.is_main():
                print(f"localsgd: extending the run from {old} to {new} steps (resuming at step {step})",
                      file=sys.stderr, flush=True)
            return
        why = (f"the run is already at step {step}" if new < step else
               f"{', '.join(dependents)} depend(s) on trainer.max_steps, so the steps taken so far followed "
               "another schedule")
        raise CheckpointError(f"checkpoint step-{step}: trainer.max_steps {old} -> {new} cannot extend this run: "
                              f"{why}; use a new run directory, or checkpoint.resume=false to start over in this one")
    if keys:
        diff = ", ".join(f"{k}: {saved.get(k)!r} -> {config_items.get(k)!r}" for k in keys)
        raise CheckpointError(
            f"checkpoint step-{step} was made with a different config ({diff}); use a new run "
            "directory, or checkpoint.resume=false to start over in this one"
        )


def added_key_default(key: str) -> Any:
    """The default of ``key`` (``section.field`` of a fixed section, such as ``trainer.precision``), for a
    checkpoint written before the key existed: a run resumed with the key at its default behaves as before.
    None for keys of the component groups, whose fields depend on the option chosen."""
    import dataclasses
    import typing

    section, _, leaf = key.partition(".")
    cls = typing.get_type_hints(TrainConfig).get(section)
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        return None
    for f in dataclasses.fields(cls):
        if f.name == leaf:
            return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]
    return None


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    import json

    from .metrics import json_safe

    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, path)


def install_preemption_handler(stopper: Communicator) -> None:
    """SIGTERM/SIGUSR1 and a first Ctrl-C (SIGINT) ask to stop; all ranks agree at the next sync (DDP:
    the next stop check), checkpoint and exit 75. A second Ctrl-C stops at once."""

    first_ctrl_c: list[float] = []

    def handler(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            # Under torchrun a Ctrl-C reaches each worker twice (from the terminal, then forwarded by the
            # launcher): only a second press, a moment later, stops at once.
            if first_ctrl_c and time.monotonic() - first_ctrl_c[0] > 2.0:
                raise KeyboardInterrupt
            if first_ctrl_c:
                return
            first_ctrl_c.append(time.monotonic())
            if dist.is_main():
                print("\nlocalsgd: Ctrl-C: stopping at the next sync with a checkpoint (Ctrl-C again to stop now)",
                      file=sys.stderr, flush=True)
        stopper.stop_requested = True

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            pass
    return None
