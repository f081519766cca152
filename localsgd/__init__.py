"""localsgd: local SGD on torch.distributed.

Every worker takes several optimizer steps on its own shard, then all workers average their
parameters with one all-reduce (Stich, ICLR 2019, arXiv 1805.09767; Lin et al., ICLR 2020,
arXiv 1808.07217). ``LocalSGD`` is the engine usable from any training loop; ``localsgd.train`` is
the torchrun/Hydra worker loop built on it.
"""

from . import schedules
from .engine import LocalSGD, SyncStats
from .errors import CheckpointError, ConfigError, NonFiniteError, ScheduleDisagreementError

__version__ = "0.1.0"

__all__ = [
    "LocalSGD",
    "SyncStats",
    "schedules",
    "NonFiniteError",
    "ScheduleDisagreementError",
    "CheckpointError",
    "ConfigError",
    "__version__",
]
