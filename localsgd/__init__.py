"""localsgd: local SGD on torch.distributed.

Every worker takes several optimizer steps on its own shard, then all workers average their
parameters with one all-reduce (Stich, ICLR 2019, arXiv 1805.09767; Lin et al., ICLR 2020,
arXiv 1808.07217). ``LocalSGD`` is the engine usable from any training loop; ``localsgd.train`` is
the torchrun/Hydra worker loop built on it.

After ``import localsgd`` the engine's companions are attributes: ``localsgd.schedules``,
``localsgd.outer``, ``localsgd.ramps``, ``localsgd.engine``, ``localsgd.dist`` and ``localsgd.errors``
(all light once torch is loaded). The worker loop's components (``data``, ``models``, ``optim``,
``stn``, ``learned``, ...) are imported on first attribute access, so ``import localsgd`` does not pay
for scikit-learn and the datasets.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import dist, engine, errors, outer, ramps, schedules
from .engine import LocalSGD, SyncStats
from .errors import CheckpointError, ConfigError, NonFiniteError, ScheduleDisagreementError

__version__ = "0.1.0"

# Submodules imported on first use (PEP 562): each costs a noticeable import (scikit-learn, the
# datasets' generators) or belongs to the worker loop rather than the engine.
_LAZY_SUBMODULES = ("checkpoint", "communicator", "config", "data", "ddp", "hooks", "learned", "metrics", "models",
                    "optim", "registry", "sampler", "stn", "testing", "train", "trainer")

__all__ = [
    "LocalSGD",
    "SyncStats",
    "dist",
    "engine",
    "errors",
    "outer",
    "ramps",
    "schedules",
    "NonFiniteError",
    "ScheduleDisagreementError",
    "CheckpointError",
    "ConfigError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY_SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))
