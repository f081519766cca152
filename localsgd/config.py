"""Typed configs: dataclasses in Hydra's ConfigStore are the source of truth; YAML only selects and overrides.

The root :class:`TrainConfig` has one field per config group (``data``, ``model``, ``optimizer``,
``schedule``, ``outer``, ``ramp``, ``trainer``, ``logging``, ``checkpoint``) plus the ``sync`` and
``comm`` sections. Polymorphic groups (data, model, optimizer, schedule, outer, ramp) take the
dataclass of the chosen registry entry, stored at the ConfigStore's root as ``<group>_<name>_schema``
(:func:`schema_name`) and extended by ``configs/<group>/<name>.yaml``, which states only what differs
from the dataclass's defaults.

Validation happens before any process group exists, so a bad config fails before any rank waits on another:
Hydra rejects wrong types and unknown keys; :func:`check_config` additionally rejects keys that
``+key=value`` forced in (Hydra accepts them), values out of range (each dataclass's ``problems()``)
and choices that are valid alone but not together (:func:`combination_problems`, the one place for
checks across components, including those that need the launch's world size), naming the full key
and the value of each problem.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import math
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from . import dist
from .errors import ConfigError
from .registry import TargetConfig, as_target, locate

MAX_STEPS = 10**12  # local steps: a bound far beyond any run that ends, and an error for one that would not
MAX_SEED = 2**32 - 1  # the widest seed that random, numpy's legacy seeding and torch.manual_seed all take
PRECISIONS = ("fp32", "bf16", "fp16")
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a collective timeout beyond a week is a typo (and inf/1e308 overflow timedelta)


@dataclass
class TrainerConfig:
    """The worker loop: steps, batch, seed, evaluation and threads."""

    max_steps: int = 2000  # local optimizer steps per worker
    batch_size: int = 32  # samples per local step on each worker
    seed: int = 0
    eval_every: int = 500  # steps between evaluations of the averaged model (0: only at the end)
    eval_batch_size: int = 1000
    log_every: int = 25  # steps between metrics.jsonl train records and progress-bar updates
    threads: int = 0  # torch intra-op threads per worker; 0 = cores / local workers
    lr_batch_coupling: bool = True  # LR x current batch / initial batch (Goyal et al. linear scaling)
    progress: bool = True  # rank-0 progress bar (also off when TQDM_DISABLE=1)
    # The local step (localsgd.optim.step): autocast precision (the fp32 weights are what is averaged),
    # micro-batches of batch_size each per step, global gradient-norm clipping (0: off), torch.compile.
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16: CUDA, with a GradScaler)
    grad_accum_steps: int = 1
    grad_clip: float = 0.0
    compile: bool = False

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.max_steps < 1:
            yield "max_steps", self.max_steps, "must be >= 1"
        elif self.max_steps > MAX_STEPS:
            yield "max_steps", self.max_steps, f"must be <= {MAX_STEPS:,} (a run that would never end)"
        if not 0 <= self.seed <= MAX_SEED:
            # torch.manual_seed takes 64 bits and the data order seeds with seed * 1_000_003 + epoch;
            # numpy's legacy seeding takes 32 bits: [0, 2**32 - 1] fits all of them.
            yield "seed", self.seed, f"must be in [0, {MAX_SEED}] (2**32 - 1)"
        if self.batch_size < 1:
            yield "batch_size", self.batch_size, "must be >= 1"
        if self.eval_every < 0:
            yield "eval_every", self.eval_every, "must be >= 0 (0 evaluates only at the end)"
        if self.eval_batch_size < 1:
            yield "eval_batch_size", self.eval_batch_size, "must be >= 1"
        if self.log_every < 1:
            yield "log_every", self.log_every, "must be >= 1"
        if self.threads < 0:
            yield "threads", self.threads, "must be >= 0"
        if self.precision not in PRECISIONS:
            yield "precision", self.precision, f"must be one of {PRECISIONS}"
        if not 1 <= self.grad_accum_steps <= 4096:
            yield "grad_accum_steps", self.grad_accum_steps, "must be in [1, 4096]"
        if not (self.grad_clip >= 0 and math.isfinite(self.grad_clip)):
            yield "grad_clip", self.grad_clip, "must be >= 0 and finite (0: no clipping)"


@dataclass
class SyncConfig:
    """What an average does besides the parameters: buffers, optimizer state, non-finite values, checks."""

    buffers: str = "average"  # average | broadcast | local
    optimizer_state: str = "keep"  # keep | average | reset
    on_nonfinite: str = "raise"  # raise | skip_round
    # before: the agreement/NaN check completes before the average starts (two latencies);
    # overlapped: both travel together, a non-finite replica sends zeros, nothing is used unless the check passes
    agreement_check: str = "fused"  # fused | before | overlapped (see localsgd.engine)
    max_skipped_rounds: int = 3
    bucket_cap_mb: float = 64.0
    fused_max_mb: float = 4.0  # fused check up to this payload; larger ones are checked first (localsgd.engine)
    check_config_agreement: bool = True  # compare config hashes across ranks at start-up
    outer_state_on_host: bool = False  # keep an outer optimizer's round start x_t in host memory (GPU memory)
    # Streaming and compression (localsgd.engine.streaming, .compress); the defaults are the blocking sync.
    fragments: int = 1  # F: fragments of the parameters, each syncing at its own offset in the round (fixed H)
    delay: int = 0  # tau: local steps a fragment's average travels before it is applied (overlap); < H/F
    mix: float = 0.0  # alpha: weight of the local copy when a fragment's average lands (0: the average replaces it)
    merge: str = "mix"  # mix (Streaming DiLoCo's alpha) | progress: average + the steps taken in flight (delay >= 1)
    compress: str = "none"  # none | bf16 | fp16 | int8 | int4: the format the pseudo-gradient travels in
    error_feedback: bool | None = None  # keep what the code dropped and send it next time (null: on for int8/int4)
    compress_block: int = 256  # values per float32 scale of the int8/int4 codes

    @property
    def streaming_options(self) -> list[str]:
        """The streaming/compression options away from the blocking sync's values (empty: blocking)."""
        from .engine.streaming import BLOCKING_DEFAULTS, streaming_options

        return streaming_options(**{k: getattr(self, k) for k in BLOCKING_DEFAULTS})

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        from .engine import AGREEMENT_CHECKS, BUFFER_POLICIES, NONFINITE_POLICIES, OPTIMIZER_STATE_POLICIES
        from .engine.compress import COMPRESSIONS
        from .engine.streaming import MERGES

        for key, allowed in (("buffers", BUFFER_POLICIES), ("optimizer_state", OPTIMIZER_STATE_POLICIES),
                             ("on_nonfinite", NONFINITE_POLICIES), ("agreement_check", AGREEMENT_CHECKS)):
            if getattr(self, key) not in allowed:
                yield key, getattr(self, key), f"must be one of {allowed}"
        if self.max_skipped_rounds < 0:
            yield "max_skipped_rounds", self.max_skipped_rounds, "must be >= 0"
        if not self.bucket_cap_mb > 0:
            yield "bucket_cap_mb", self.bucket_cap_mb, "must be > 0"
        if not self.fused_max_mb >= 0:
            yield "fused_max_mb", self.fused_max_mb, "must be >= 0 (0: always check before averaging)"
        if self.fragments < 1:
            yield "fragments", self.fragments, "must be >= 1 (1: the whole model syncs at once)"
        if self.delay < 0:
            yield "delay", self.delay, "must be >= 0 (0: a fragment's average is applied at once)"
        if not 0.0 <= self.mix < 1.0:
            yield "mix", self.mix, "must be in [0, 1) (the local copy's weight when an average lands)"
        if self.merge not in MERGES:
            yield "merge", self.merge, f"must be one of {MERGES}"
        elif self.merge == "progress" and self.mix != 0.0:
            yield "mix", self.mix, "must be 0 with sync.merge=progress (it keeps all the local progress)"
        elif self.merge == "progress" and self.delay == 0:
            yield "merge", self.merge, ("needs sync.delay >= 1: with delay 0 an average lands before any local "
                                        "progress, so there is none to keep (sync.merge=mix is the same run)")
        if self.compress not in COMPRESSIONS:
            yield "compress", self.compress, f"must be one of {COMPRESSIONS}"
        elif self.error_feedback and self.compress == "none":
            yield "error_feedback", self.error_feedback, "needs a lossy sync.compress (bf16, fp16, int8 or int4)"
        if self.compress_block < 1:
            yield "compress_block", self.compress_block, "must be >= 1"


@dataclass
class CommConfig:
    """Process-group backend and timeouts (every collective is bounded)."""

    backend: str = "auto"  # auto (nccl with CUDA, else gloo) | gloo | nccl
    init_timeout_s: float = 300.0
    train_timeout_s: float = 120.0  # applied after the first successful sync

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.backend not in ("auto", "gloo", "nccl"):
            yield "backend", self.backend, "must be auto, gloo or nccl"
        for key in ("init_timeout_s", "train_timeout_s"):
            # Finite and bounded: the value becomes a datetime.timedelta of the process group, and an
            # infinite timeout would turn a dead peer into a hang instead of an error.
            seconds = getattr(self, key)
            if not (seconds > 0 and math.isfinite(seconds) and seconds <= MAX_TIMEOUT_S):
                yield key, seconds, f"must be > 0 and <= {MAX_TIMEOUT_S:.0f} seconds (7 days)"


@dataclass
class LoggingConfig:
    """metrics.jsonl is always written by rank 0; wandb is optional and rank-0 only."""

    wandb: str = "disabled"  # disabled | offline | online
    project: str = "localsgd"
    entity: str | None = None
    group: str | None = None
    name: str | None = None

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.wandb not in ("disabled", "offline", "online"):
            yield "wandb", self.wandb, "must be disabled, offline or online"


@dataclass
class CheckpointConfig:
    """Checkpoints at sync boundaries, where every replica holds the same parameters."""

    enable: bool = True
    every_rounds: int = 25  # commit a checkpoint every this many averaging rounds
    keep_latest_k: int = 2
    fallback: bool = True  # resume from the previous checkpoint when the newest is corrupt
    resume: bool = True  # resume from the newest committed checkpoint in the run directory
    dir: str | None = None  # default: <run dir>/checkpoints

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.every_rounds < 1:
            yield "every_rounds", self.every_rounds, "must be >= 1"
        if self.enable and self.keep_latest_k < 2:
            yield "keep_latest_k", self.keep_latest_k, "must be >= 2 (the newest may be mid-write)"


@dataclass
class LoaderConfig:
    """How training batches are read (``localsgd.data.loader``): in memory, or through a ``DataLoader``."""

    # auto: in-memory sets index on the device (the fast path), map-style sets use a DataLoader;
    # dataloader: in-memory sets too (the same samples in the same order)
    mode: str = "auto"
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = True
    prefetch_factor: int = 2
    # spawn: workers start clean (a fork of a rank whose threads hold a lock can hang; localsgd.data.loader)
    start_method: str = "spawn"

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.mode not in ("auto", "dataloader"):
            yield "mode", self.mode, "must be auto or dataloader"
        if not 0 <= self.num_workers <= 256:
            yield "num_workers", self.num_workers, "must be in [0, 256]"
        if self.prefetch_factor < 1:
            yield "prefetch_factor", self.prefetch_factor, "must be >= 1"
        if self.start_method not in ("spawn", "fork"):
            yield "start_method", self.start_method, ("must be spawn or fork (a fork server's workers outlive a "
                                                      "killed rank)")


@dataclass
class TrainConfig:
    data: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    schedule: Any = MISSING
    outer: Any = MISSING
    ramp: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)


POLYMORPHIC_GROUPS = ("data", "model", "optimizer", "schedule", "outer", "ramp")


def _registries() -> dict[str, Any]:
    from .data import DATASETS
    from .models import MODELS
    from .optim import OPTIMIZERS
    from .outer import OUTER
    from .ramps import RAMPS
    from .schedules import SCHEDULES

    return {"data": DATASETS, "model": MODELS, "optimizer": OPTIMIZERS, "schedule": SCHEDULES, "outer": OUTER,
            "ramp": RAMPS}


def run_id(name: str | None = None) -> str:
    """A readable, sortable run name that every rank of one launch, and every restart of it, computes alike.

    ``<date>_<time>`` of the launch's start, then the launcher's id (torchrun's run id or ``slurm-<job>``,
    :func:`localsgd.dist.launch_id`) or, without a launcher, the microseconds, then ``logging.name``
    when given: ``2026-12-02_01-58-03_slurm-4242_baseline``. (Hydra's ``${now:}`` differs per process.)
    """
    started, ident = dist.launch_start_time(), dist.launch_id()
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started))
    parts = [stamp if started is not None else "", ident or f"{int(time.time() * 1e6) % 1_000_000:06d}",
             re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)) if name else ""]
    return "_".join(p for p in parts if p)


# Components whose behaviour does not depend on trainer.max_steps (a run with them can be extended).
_SCHEDULES_WITHOUT_TOTAL = ("fixed", "one_shot", "hierarchical", "adacomm", "qsr", "noise_adaptive", "ddp")
_RAMPS_WITHOUT_TOTAL = ("none", "noise_scale")


def total_steps_dependents(cfg: TrainConfig) -> list[str]:
    """The chosen components whose behaviour depends on ``trainer.max_steps``, as ``key=value`` strings.

    Empty when a resume may raise ``max_steps`` and continue exactly as a run planned that long from the
    start would have: a constant learning rate (warm-up counts absolute steps), a schedule whose H needs
    no total (not Stich's H(T), Patel-Dieuleveut's or LUPA's rounds over T, post-local's switch at a
    fraction), a ramp without milestones. Optimizers that are not plain SGD/AdamW count as dependent.
    """
    found = []
    opt = cfg.optimizer
    if getattr(opt, "lr_decay", None) is None:
        found.append(f"optimizer={opt.name}")
    elif opt.lr_decay != "none":
        found.append(f"optimizer.lr_decay={opt.lr_decay}")
    schedule = cfg.schedule
    if schedule.name == "post_local" and getattr(schedule, "switch_step", -1) >= 0:
        pass  # an explicit switch step does not move with the total
    elif schedule.name not in _SCHEDULES_WITHOUT_TOTAL:
        found.append(f"schedule={schedule.name}")
    if cfg.ramp.name not in _RAMPS_WITHOUT_TOTAL:
        found.append(f"ramp={cfg.ramp.name}")
    return found


def schema_name(group: str, name: str) -> str:
    """The ConfigStore name of a component's dataclass, which ``configs/<group>/<name>.yaml`` extends.

    Schemas sit at the store's root, outside every group: Hydra lists each group with its options in
    ``--help`` (a ``schema/<group>`` group as well) and in its "Available options" errors, and a
    schema stored in its group could be selected bare (``<group>=<name>_schema``). A root-level
    config is neither listed nor a group option; the YAML file names it by its absolute path.
    """
    return f"{group}_{name}_schema"


def register_configs() -> None:
    """Put the root schema and every registered component's schema into Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="localsgd_schema", node=TrainConfig)
    for group, registry in _registries().items():
        for entry in registry.entries():
            cs.store(name=schema_name(group, entry.name), node=entry.config_cls)
    if not OmegaConf.has_resolver("localsgd_run_id"):
        OmegaConf.register_new_resolver("localsgd_run_id", run_id, use_cache=True)


def close_keys(key: str, valid: list[str]) -> list[str]:
    """The valid keys that ``key`` is a likely misspelling of (case-blind: ``schedule.h`` finds ``H``)."""
    by_lower = {v.lower(): v for v in valid}
    return [by_lower[m] for m in difflib.get_close_matches(key.lower(), list(by_lower), n=3, cutoff=0.6)]


def did_you_mean(suggestions: list[str]) -> str:
    return f" (did you mean {' or '.join(suggestions)}?)" if suggestions else ""


def unknown_keys_message(assignments: list[tuple[str, list[str]]]) -> str:
    """The one line for keys no schema has: ``key=value`` with its likely spellings, for each key."""
    named = ", ".join(f"{assignment}{did_you_mean(close)}" for assignment, close in assignments)
    return f"unknown config key(s): {named}; check the spelling or the selected group option"


def suggest_keys(full_key: str, schema: Any) -> list[str]:
    """Full keys like ``full_key`` among the fields of ``schema``, the dataclass of its parent node."""
    if not (isinstance(schema, type) and dataclasses.is_dataclass(schema)):
        return []
    prefix, _, leaf = full_key.rpartition(".")
    return [f"{prefix}.{k}" if prefix else k for k in close_keys(leaf, [f.name for f in dataclasses.fields(schema)])]


def _unknown_keys(node: Any, schema: type, prefix: str) -> Iterator[tuple[str, list[str]]]:
    """``(full key, likely spellings)`` for each key of ``node`` that ``schema`` (a dataclass) lacks."""
    names = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys() if isinstance(node, DictConfig) else []:
        full = f"{prefix}{key}"
        if key not in names:
            yield full, suggest_keys(full, schema)
            continue
        child = node._get_node(key)
        child_type = OmegaConf.get_type(node, key) if isinstance(child, DictConfig) else None
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(child_type):
            yield from _unknown_keys(child, child_type, full + ".")


def check_config(cfg: DictConfig, world_size: int | None = None, local_world_size: int | None = None) -> TrainConfig:
    """Reject unknown keys, out-of-range values and choices that do not go together; return the typed config.

    Runs before any process group exists: the launch's size comes from the launcher's environment
    (:func:`localsgd.dist.read_env`, :func:`localsgd.dist.local_world_size`) unless given.
    """
    cfg = cfg.copy()
    with_hydra = "hydra" in cfg
    if with_hydra:
        with _open(cfg):
            del cfg["hydra"]
    unknown = list(_unknown_keys(cfg, TrainConfig, ""))
    registries = _registries()
    for group in POLYMORPHIC_GROUPS:
        node = cfg.get(group)
        if node is None or not isinstance(node, DictConfig):
            raise ConfigError(f"config group {group!r} is not selected; choose one, e.g. {group}=<name>")
        if group in TARGET_GROUPS and "_target_" in node.keys():
            if OmegaConf.is_missing(node, "_target_"):
                raise ConfigError(f"{group}._target_ is missing: {group}=custom builds your own {group} from "
                                  f"{group}._target_=<module>.<{'Class' if group == 'model' else 'function'}>")
            continue  # the user's own component: its arguments are its own, checked when it is built
        name = node.get("name")
        try:
            entry = registries[group].get(name)
        except KeyError as exc:
            raise ConfigError(f"{group}.name={name!r}: {exc.args[0]}") from None
        unknown += list(_unknown_keys(node, entry.config_cls, f"{group}."))
    unknown = list(dict(unknown).items())  # a group's node is walked from the root and as its group: once each
    if unknown:
        raise ConfigError(unknown_keys_message([(f"{k}={OmegaConf.select(cfg, k)!r}", close) for k, close in unknown]))
    obj: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    problems = []
    for group in TARGET_GROUPS:
        target = as_target(getattr(obj, group))
        if target is not None:
            setattr(obj, group, target)
            problems += list(_target_problems(group, target))
    for section in dataclasses.fields(obj):
        value = getattr(obj, section.name)
        if hasattr(value, "problems"):
            problems += [f"{section.name}.{k}={v!r}: {why}" for k, v, why in value.problems()]
    launch = Launch(dist.read_env().world_size if world_size is None else world_size,
                    dist.local_world_size() if local_world_size is None else local_world_size)
    problems += list(combination_problems(obj, launch))
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return obj


TARGET_GROUPS = ("data", "model")  # the groups a user may fill with their own component (``_target_``)


def _target_problems(group: str, target: TargetConfig) -> Iterator[str]:
    """The ``_target_`` must import here, before any worker starts (the workers import it the same way)."""
    try:
        obj = locate(target.target)
    except ImportError as exc:
        yield f"{group}._target_={target.target!r}: cannot import it ({exc})"
        return
    if not callable(obj):
        yield f"{group}._target_={target.target!r}: is not a class or function"


# ---------------------------------------------------------------------- checks across components
@dataclass(frozen=True)
class Launch:
    """What the launcher says of the job before any process group starts."""

    world_size: int  # workers in all
    local_world_size: int = 1  # workers on this node


def combination_problems(cfg: TrainConfig, launch: Launch) -> Iterator[str]:
    """Choices that are valid alone but not together, each naming its key and value and what to do.

    The one place for checks that look at more than one component (or at the launch); each
    dataclass's ``problems()`` checks its own values. The builders and the worker loop keep their
    own guards for callers outside ``localsgd.train``; here the same conditions fail before any
    process group, data or model exists.
    """
    for rule in COMBINATION_RULES:
        yield from rule(cfg, launch)


def _smith_ramp_and_lr_decay(cfg: TrainConfig, launch: Launch) -> Iterator[str]:
    decay = getattr(cfg.optimizer, "lr_decay", "none")
    if cfg.ramp.name == "smith" and decay != "none":
        # Smith et al. grow the batch *instead of* decaying the LR; both would shrink the noise twice.
        yield (f"optimizer.lr_decay={decay!r}: ramp=smith replaces the LR decay by batch growth; "
               "set optimizer.lr_decay=none (the ramp decays the LR itself once the batch reaches b_max)")


def _ddp_baseline(cfg: TrainConfig, launch: Launch) -> Iterator[str]:
    """schedule=ddp all-reduces gradients at every backward pass: there is no model average to act on."""
    if cfg.schedule.name != "ddp":
        return
    if cfg.outer.name != "average":
        yield (f"outer.name={cfg.outer.name!r}: an outer optimizer steps on the workers' model average, "
               "and schedule=ddp averages gradients instead; choose outer=average with schedule=ddp, or a "
               "local-SGD schedule (e.g. schedule=fixed)")
    if cfg.optimizer.name == "stn":
        yield ("optimizer.name='stn': its local step takes several backward passes, which schedule=ddp's "
               "gradient all-reduce cannot follow; choose a local-SGD schedule (e.g. schedule=fixed)")
    if cfg.ramp.name == "noise_scale":
        yield ("ramp.name='noise_scale': it measures the gradient noise at the first local step after a "
               "model average, and schedule=ddp has none, so the batch would never grow; choose a "
               "local-SGD schedule (e.g. schedule=fixed) or a ramp that needs no measurement "
               "(e.g. ramp=geometric)")


def noise_measurer(cfg: TrainConfig) -> tuple[str, str] | None:
    """(group, option) of the component that has the trainer measure the gradient noise scale, if any."""
    if cfg.ramp.name == "noise_scale":
        return "ramp", "noise_scale"
    if cfg.schedule.name == "noise_adaptive":
        return "schedule", "noise_adaptive"
    return None


def _noise_scale_workers(cfg: TrainConfig, launch: Launch) -> Iterator[str]:
    if cfg.ramp.name == "noise_scale" and cfg.schedule.name == "noise_adaptive":
        yield ("schedule.name='noise_adaptive': ramp=noise_scale also acts on the measured noise scale (it "
               "grows the batch); one controller at a time: choose another ramp, or schedule=fixed")
    who = noise_measurer(cfg)
    if who is not None and launch.world_size < 2:
        group, option = who
        yield (f"{group}.name='{option}': needs >= 2 workers (the big batch is the all-reduced gradient), "
               f"this launch has world size {launch.world_size}; launch with torchrun --nproc_per_node=2 "
               f"or more, or choose another {group}")


def _ramp_and_batch_size(cfg: TrainConfig, launch: Launch) -> Iterator[str]:
    """A ramp starts at trainer.batch_size and never shrinks the batch."""
    b0 = cfg.trainer.batch_size
    b_max = getattr(cfg.ramp, "b_max", None)
    if b_max is not None and b_max < b0:
        yield (f"ramp.b_max={b_max}: is below the starting batch trainer.batch_size={b0}; "
               "raise ramp.b_max or lower trainer.batch_size")
    if cfg.ramp.name == "linear" and cfg.ramp.b_start is None and cfg.ramp.b_end < b0:
        yield (f"ramp.b_end={cfg.ramp.b_end}: is below the starting batch trainer.batch_size={b0} "
               "(ramp.b_start=null starts there) and the batch never shrinks; raise ramp.b_end or set ramp.b_start")


def _hierarchical_groups(cfg: TrainConfig, launch: Launch) -> Iterator[str]:
    if cfg.schedule.name != "hierarchical":
        return
    given = cfg.schedule.group_size
    size = given or launch.local_world_size
    if launch.world_size % size:
        what = f"group size {size}" if given else f"group size {size} (0: the workers of one node)"
        yield (f"schedule.group_size={given}: world size {launch.world_size} is not a multiple of the {what}; "
               "set schedule.group_size to a divisor of the world size")


def _metz_model(cfg: TrainConfig, launch: Launch) -> Iterator[str]:
    if cfg.optimizer.name != "metz_unsupervised":
        return
    need = ("optimizer=metz_unsupervised needs model=mlp with at least one hidden layer "
            "(e.g. model=mlp model.hidden=[64,64,32]); the rule updates the hidden layers")
    if cfg.model.name != "mlp":
        yield f"model.name={cfg.model.name!r}: {need}"
    elif not list(cfg.model.hidden):
        yield f"model.hidden=[]: {need}"


# The dimensions of one input (without the batch) that each dataset gives and each model takes (models
# not listed flatten any input), and whether a model has activation modules (nn.ReLU, ...) after which
# optimizer=stn can put tuned dropout. Stated here for the rules below, before any data is loaded or
# model built; tests/test_config_combinations.py checks them against the builders.
DATA_INPUT_DIMS = {"mnist1d": 2, "digits": 1, "breast_cancer": 1, "synthetic_logreg": 1, "cifar10": 3, "tokens": 1}
MODEL_INPUT_DIMS = {"cnn1d": (1, 2), "resnet20": (3,), "gpt": (1,)}
# Inputs of token ids (integers), not features: only a language model takes them, and it takes nothing else.
TOKEN_DATA = ("tokens",)
TOKEN_MODELS = ("gpt",)
_SHAPES = {1: "(features,)", 2: "(C, L)", 3: "(C, H, W)"}


def has_activation_modules(model: Any) -> bool:
    """Whether the model ``model`` (a model config) builds has activation modules for STN's dropout."""
    if model.name == "mlp":
        return bool(list(model.hidden))
    return model.name == "cnn1d"


def _model_and_data(cfg: TrainConfig, launch: Launch) -> Iterator[str]:
    if isinstance(cfg.data, TargetConfig) or isinstance(cfg.model, TargetConfig):
        return  # the user's own component: its shapes are known only once it is built
    tokens_in, tokens_taken = cfg.data.name in TOKEN_DATA, cfg.model.name in TOKEN_MODELS
    if tokens_in != tokens_taken:
        why = (f"data={cfg.data.name} gives token ids, which only a language model takes; "
               f"choose model={_either(list(TOKEN_MODELS))}" if tokens_in else
               f"is a language model of token ids, and data={cfg.data.name} gives features; "
               f"choose data={_either(list(TOKEN_DATA))}")
        yield f"model.name={cfg.model.name!r}: {why}"
        return
    dims = DATA_INPUT_DIMS.get(cfg.data.name)
    takes = MODEL_INPUT_DIMS.get(cfg.model.name)
    if dims is None or takes is None or dims in takes:
        return
    fits = [m for m in _registries()["model"].names()
            if dims in MODEL_INPUT_DIMS.get(m, (dims,)) and m not in TOKEN_MODELS]
    yield (f"model.name={cfg.model.name!r}: takes inputs shaped {_either([_SHAPES[d] for d in takes])}, and "
           f"data={cfg.data.name} gives {_SHAPES[dims]}; choose model={_either(fits)}")


def _either(words: list[str]) -> str:
    return " or ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " or " + words[-1]


def _stn_model(cfg: TrainConfig, launch: Launch) -> Iterator[str]:
    if cfg.optimizer.name != "stn" or "dropout" not in list(cfg.optimizer.tune):
        return
    dropout = getattr(cfg.model, "dropout", 0.0)
    if dropout > 0:
        yield (f"model.dropout={dropout!r}: optimizer=stn tunes the dropout rate (optimizer.tune has dropout), "
               "so the model's fixed dropout must be 0; set model.dropout=0.0 or remove dropout from optimizer.tune")
    if not has_activation_modules(cfg.model):
        key, value = ("model.hidden", []) if cfg.model.name == "mlp" else ("model.name", cfg.model.name)
        yield (f"{key}={value!r}: optimizer=stn puts tuned dropout after the model's activation modules, and "
               "this model has none; choose model=cnn1d or an mlp with hidden layers, or remove dropout "
               "from optimizer.tune")


def _step_options(cfg: TrainConfig, launch: Launch) -> Iterator[str]:
    """Precision, accumulation and clipping live in the plain supervised step (optimizer=sgd or adamw)."""
    tc = cfg.trainer
    chosen = [f"trainer.{k}={v!r}" for k, v, off in (("precision", tc.precision, "fp32"),
                                                      ("grad_accum_steps", tc.grad_accum_steps, 1),
                                                      ("grad_clip", tc.grad_clip, 0.0)) if v != off]
    if chosen and not getattr(cfg.optimizer, "plain_step", False):
        yield (f"{chosen[0]}: optimizer={cfg.optimizer.name} runs its own local step, which has no "
               "precision, accumulation or clipping options; choose optimizer=sgd or optimizer=adamw")
    if tc.precision == "fp16" and not torch.cuda.is_available():
        yield ("trainer.precision='fp16': float16 autocast with a GradScaler needs CUDA, which this machine lacks; "
               "use trainer.precision=bf16 (works on CPU) or fp32")
    who = noise_measurer(cfg)
    if tc.grad_accum_steps > 1 and who is not None:
        yield (f"trainer.grad_accum_steps={tc.grad_accum_steps}: {who[0]}={who[1]} measures the gradient of one "
               f"batch of trainer.batch_size; use grad_accum_steps=1 with it, or another {who[0]}")


def _loader(cfg: TrainConfig, launch: Launch) -> Iterator[str]:
    if cfg.loader.mode != "dataloader":
        return
    if cfg.data.name in TOKEN_DATA:
        yield (f"loader.mode='dataloader': data={cfg.data.name} draws its windows from memory-mapped files itself; "
               "use loader.mode=auto")
    if cfg.ramp.name == "noise_scale":
        yield ("loader.mode='dataloader': a DataLoader loads the batches of the coming steps ahead, and "
               "ramp=noise_scale decides each batch at run time; use loader.mode=auto or another ramp")


def _streaming(cfg: TrainConfig, launch: Launch) -> Iterator[str]:
    """Streaming fragments and compressed payloads: what the streaming engine can serve."""
    s = cfg.sync
    options = s.streaming_options
    if not options or s.fragments < 1 or s.delay < 0:  # bad single values are named by SyncConfig.problems
        return
    chosen = f"sync.{options[0]}={getattr(s, options[0])!r}"
    if cfg.schedule.name == "ddp":
        yield (f"{chosen}: schedule=ddp averages gradients at every step, and streaming and compression act on the "
               "model average; choose a local-SGD schedule (e.g. schedule=fixed)")
        return
    if s.fragments != 1 or s.delay != 0:
        if cfg.schedule.name != "fixed":
            yield (f"{chosen}: fragments sync at fixed offsets in a round of H steps, which needs schedule=fixed "
                   f"(got schedule={cfg.schedule.name}); or keep sync.fragments=1 and sync.delay=0")
        elif cfg.schedule.H % s.fragments:
            yield (f"sync.fragments={s.fragments}: must divide schedule.H={cfg.schedule.H} (each fragment syncs once "
                   "per round, H/fragments steps apart); choose a divisor of H")
        elif s.delay >= cfg.schedule.H // s.fragments:
            yield (f"sync.delay={s.delay}: must be < schedule.H/sync.fragments = {cfg.schedule.H // s.fragments}, so "
                   "a fragment's average lands before the next fragment leaves; lower it or use fewer fragments")
    for key, value, need in (("on_nonfinite", "skip_round", "raise"), ("buffers", "broadcast", "average or local")):
        if getattr(s, key) == value:
            yield (f"sync.{key}={value!r}: needs the blocking sync, and {chosen} streams or compresses; use "
                   f"sync.{key}={need}")
    if s.optimizer_state != "keep":
        yield (f"sync.optimizer_state={s.optimizer_state!r}: acts on the whole model after a blocking average, and "
               f"{chosen} streams or compresses; use sync.optimizer_state=keep")
    if cfg.schedule.name == "hierarchical":
        yield f"{chosen}: schedule=hierarchical needs the blocking sync; choose schedule=fixed"
    if s.outer_state_on_host:
        yield (f"sync.outer_state_on_host=True: the streaming engine keeps each fragment's x_ref beside the model, and "
               f"{chosen} streams or compresses; use sync.outer_state_on_host=false")


def _backend(cfg: TrainConfig, launch: Launch) -> Iterator[str]:
    if cfg.comm.backend == "nccl" and not torch.cuda.is_available():
        yield ("comm.backend='nccl': needs CUDA, which is not available on this machine; use comm.backend=auto "
               "(nccl with CUDA, else gloo) or comm.backend=gloo")


COMBINATION_RULES: tuple[Callable[[TrainConfig, Launch], Iterator[str]], ...] = (
    _smith_ramp_and_lr_decay, _ddp_baseline, _noise_scale_workers, _ramp_and_batch_size,
    _hierarchical_groups, _metz_model, _model_and_data, _stn_model, _step_options, _loader, _streaming, _backend,
)


def check_batch_fits_shard(cfg: TrainConfig, ramp: Any, train_samples: int, world_size: int) -> None:
    """Refuse a batch larger than one worker's shard of the training set, once the data is built.

    The size of a dataset is known only after loading it, so the trainer calls this right after building
    the data and the ramp, before the first batch (a batch of 100,000 from a 4,000-sample shard repeats the
    shard 25 times per step and runs out of memory). Every rank computes the same shard size, so every
    rank raises alike. A ramp that follows the step counts with the batch of its last step (batches never
    shrink); the noise-scale ramp, which grows only on measurement, with its starting batch, since its
    ``b_max`` is a cap that small data sets never reach. With ``trainer.grad_accum_steps=k`` a step draws k
    batches, so each must fit a k-th of the shard.
    """
    tc = cfg.trainer
    shard = train_samples // world_size // tc.grad_accum_steps
    if tc.batch_size > shard:
        key, batch = f"trainer.batch_size={tc.batch_size}", tc.batch_size
        fix = f"lower trainer.batch_size to at most {shard}"
    else:
        last = tc.max_steps - 1
        batch = tc.batch_size if ramp.observes_noise_scale else max(ramp.batch_size(0), ramp.batch_size(last))
        if batch <= shard:
            return
        if getattr(cfg.ramp, "b_max", None) == batch:
            key, fix = f"ramp.b_max={batch}", f"set ramp.b_max to at most {shard}"
        else:
            key, fix = f"ramp={cfg.ramp.name}", f"cap its batch at {shard} (ramp.b_max or ramp.b_end)"
        key += f" (the ramp's largest batch, {batch})"
    share = (f"{shard} training samples, a worker's shard over trainer.grad_accum_steps={tc.grad_accum_steps} "
             "micro-batches" if tc.grad_accum_steps > 1 else f"a worker's shard of {shard} training samples")
    raise ConfigError(f"invalid config: {key}: is larger than {share} ({train_samples} of data={cfg.data.name} "
                      f"over {world_size} worker(s)); {fix}, or use more data or fewer workers")


class _open:
    def __init__(self, cfg: DictConfig) -> None:
        self.cfg = cfg

    def __enter__(self) -> None:
        OmegaConf.set_struct(self.cfg, False)

    def __exit__(self, *exc: Any) -> None:
        OmegaConf.set_struct(self.cfg, True)


def flat_items(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"trainer.max_steps": 2000, ...}``: for hashing and for naming keys that differ."""
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig | ListConfig) else cfg
    if dataclasses.is_dataclass(container):
        container = dataclasses.asdict(container)
    out: dict[str, Any] = {}
    for key, value in container.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_items(value, full + "."))
        else:
            out[full] = value
    return out


def config_hash(items: dict[str, Any]) -> str:
    return hashlib.sha256(repr(sorted(items.items())).encode()).hexdigest()
