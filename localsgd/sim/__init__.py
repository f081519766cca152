"""``localsgd.sim``: many local-SGD workers simulated in one process (:mod:`.simulator`).

    from localsgd.sim import Simulator, sim_config
    cfg = sim_config("data=synthetic_logreg", "model=logreg", "schedule.H=16", "trainer.max_steps=400", workers=256)
    result = Simulator(cfg, workers=256).run()

The config is the trainer's (the same YAML and overrides, checked as a launch of ``workers`` ranks
would be), and the run is driven by the trainer's own schedule, ramp, outer-optimizer, optimizer and
sampler objects; see :mod:`.simulator` for what is simulated exactly and what is refused.
"""

from __future__ import annotations

from ..config import TrainConfig
from .simulator import SimResult, Simulator, SyncRecord, unsupported

__all__ = ["SimResult", "Simulator", "SyncRecord", "sim_config", "unsupported"]


def sim_config(*overrides: str, workers: int) -> TrainConfig:
    """The typed config the trainer would run for these Hydra overrides at ``workers`` ranks (checked)."""
    from hydra import compose, initialize_config_dir

    from ..config import check_config, register_configs
    from ..train import config_dir

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    return check_config(cfg, world_size=workers, local_world_size=workers)
