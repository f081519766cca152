"""Typed configs: dataclasses in Hydra's ConfigStore are the source of truth; YAML only selects.

The root :class:`TrainConfig` has one field per config group (``data``, ``model``, ``optimizer``,
``schedule``, ``outer``, ``ramp``, ``trainer``, ``logging``, ``checkpoint``) plus the ``sync`` and
``comm`` sections. Polymorphic groups (data, model, optimizer, schedule, outer, ramp) take the
dataclass of the chosen registry entry, stored as ``<group>/<name>_schema`` and extended by
``configs/<group>/<name>.yaml``.

Validation happens before any process group exists (``conventions.md`` §5.2, ``reliability.md`` T8):
Hydra rejects wrong types and unknown keys; :func:`check_config` additionally rejects keys that
``+key=value`` forced in (Hydra accepts them) and values out of range, naming the full key and the
value of each problem.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf

from .errors import ConfigError


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

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        if self.max_steps < 1:
            yield "max_steps", self.max_steps, "must be >= 1"
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


@dataclass
class SyncConfig:
    """What an average does besides the parameters (``reliability.md`` §4)."""

    buffers: str = "average"  # average | broadcast | local
    optimizer_state: str = "keep"  # keep | average | reset
    on_nonfinite: str = "raise"  # raise | skip_round
    # before: the agreement/NaN check completes before the average starts (two latencies);
    # overlapped: both travel together, a non-finite replica sends zeros, nothing is used unless the check passes
    agreement_check: str = "fused"  # fused | before | overlapped (see localsgd.engine)
    max_skipped_rounds: int = 3
    bucket_cap_mb: float = 64.0
    check_config_agreement: bool = True  # compare config hashes across ranks at start-up

    def problems(self) -> Iterator[tuple[str, Any, str]]:
        from .engine import AGREEMENT_CHECKS, BUFFER_POLICIES, NONFINITE_POLICIES, OPTIMIZER_STATE_POLICIES

        for key, allowed in (("buffers", BUFFER_POLICIES), ("optimizer_state", OPTIMIZER_STATE_POLICIES),
                             ("on_nonfinite", NONFINITE_POLICIES), ("agreement_check", AGREEMENT_CHECKS)):
            if getattr(self, key) not in allowed:
                yield key, getattr(self, key), f"must be one of {allowed}"
        if self.max_skipped_rounds < 0:
            yield "max_skipped_rounds", self.max_skipped_rounds, "must be >= 0"
        if not self.bucket_cap_mb > 0:
            yield "bucket_cap_mb", self.bucket_cap_mb, "must be > 0"


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
            if not getattr(self, key) > 0:
                yield key, getattr(self, key), "must be > 0 seconds"


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
    """Checkpoints at sync boundaries (``reliability.md`` §5)."""

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


def run_id() -> str:
    """A run name every rank of one launch computes alike (Hydra's ``${now:}`` is per process).

    torchrun gives all ranks (and restarts) the same ``TORCHELASTIC_RUN_ID``; Slurm the job id.
    """
    rid = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if rid and rid != "none":
        return rid if len(rid) <= 16 else rid[:8]
    job = os.environ.get("SLURM_JOB_ID")
    if job:
        return f"slurm-{job}"
    return time.strftime("%Y-%m-%d_%H-%M-%S") + f"-{int(time.time() * 1e6) % 1_000_000:06d}"


def register_configs() -> None:
    """Put the root schema and every registered component's schema into Hydra's ConfigStore."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="localsgd_schema", node=TrainConfig)
    for group, registry in _registries().items():
        for entry in registry.entries():
            cs.store(group=group, name=f"{entry.name}_schema", node=entry.config_cls)
    if not OmegaConf.has_resolver("localsgd_run_id"):
        OmegaConf.register_new_resolver("localsgd_run_id", run_id, use_cache=True)


def _unknown_keys(node: Any, schema: type, prefix: str) -> Iterator[str]:
    names = {f.name: f for f in dataclasses.fields(schema)}
    for key in node.keys() if isinstance(node, DictConfig) else []:
        full = f"{prefix}{key}"
        if key not in names:
            yield full
            continue
        child = node._get_node(key)
        child_type = OmegaConf.get_type(node, key) if isinstance(child, DictConfig) else None
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(child_type):
            yield from _unknown_keys(child, child_type, full + ".")


def check_config(cfg: DictConfig) -> TrainConfig:
    """Reject unknown keys and out-of-range values; return the typed config object."""
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
        name = node.get("name")
        try:
            entry = registries[group].get(name)
        except KeyError as exc:
            raise ConfigError(f"{group}.name={name!r}: {exc.args[0]}") from None
        unknown += list(_unknown_keys(node, entry.config_cls, f"{group}."))
    if unknown:
        values = ", ".join(f"{k}={OmegaConf.select(cfg, k)!r}" for k in unknown)
        raise ConfigError(f"unknown config key(s): {values}; check the spelling or the selected group option")
    obj: TrainConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    problems = []
    for section in dataclasses.fields(obj):
        value = getattr(obj, section.name)
        if hasattr(value, "problems"):
            problems += [f"{section.name}.{k}={v!r}: {why}" for k, v, why in value.problems()]
    problems += list(_combination_problems(obj))
    if problems:
        raise ConfigError("invalid config: " + "; ".join(problems))
    return obj


def _combination_problems(obj: TrainConfig) -> Iterator[str]:
    """Choices that are valid alone but not together."""
    decay = getattr(obj.optimizer, "lr_decay", "none")
    if obj.ramp.name == "smith" and decay != "none":
        # Smith et al. grow the batch *instead of* decaying the LR; both would shrink the noise twice.
        yield (f"optimizer.lr_decay={decay!r}: ramp=smith replaces the LR decay by batch growth; "
               "set optimizer.lr_decay=none (the ramp decays the LR itself once the batch reaches b_max)")


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
