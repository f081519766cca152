"""Config composition and validation: every bad value or unknown key is named before any process group."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import OmegaConfBaseException

from localsgd.config import TrainConfig, check_config, register_configs
from localsgd.errors import ConfigError
from localsgd.train import config_dir

from .launch_helpers import env_for

CONFIGS = Path(config_dir())


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_defaults_compose_to_the_main_job() -> None:
    cfg = check_config(_compose())
    assert isinstance(cfg, TrainConfig)
    names = (cfg.data.name, cfg.model.name, cfg.optimizer.name, cfg.schedule.name)
    assert names == ("mnist1d", "cnn1d", "sgd", "fixed")
    assert cfg.trainer.batch_size == 32 and cfg.schedule.H == 8 and cfg.sync.optimizer_state == "keep"
    assert cfg.logging.wandb == "disabled"


GROUP_OPTIONS = sorted((p.parent.name, p.stem) for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "hydra")


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS)
def test_every_shipped_group_option_composes_and_validates(group: str, option: str) -> None:
    extra = ["data.root=/nonexistent"] if "cifar10" in option else []
    selector = f"+{group}={option}" if group == "experiment" else f"{group}={option}"
    cfg = check_config(_compose(selector, *extra))
    if group in ("data", "model", "optimizer", "schedule"):
        assert getattr(cfg, group).name == option


@pytest.mark.parametrize(("override", "named"), [
    ("trainer.max_steps=0", "trainer.max_steps=0: must be >= 1"),
    ("trainer.batch_size=-4", "trainer.batch_size=-4"),
    ("optimizer.lr=-1", "optimizer.lr=-1.0: must be > 0"),
    ("optimizer.momentum=1.5", "optimizer.momentum=1.5"),
    ("schedule.H=0", "schedule.H=0: must be >= 1"),
    ("sync.buffers=mean", "sync.buffers='mean'"),
    ("sync.optimizer_state=zero", "sync.optimizer_state='zero'"),
    ("checkpoint.keep_latest_k=0", "checkpoint.keep_latest_k=0"),
    ("checkpoint.every_rounds=0", "checkpoint.every_rounds=0"),
    ("logging.wandb=cloud", "logging.wandb='cloud'"),
    ("comm.train_timeout_s=0", "comm.train_timeout_s=0.0"),
    ("data.num_samples=5", "data.num_samples=5"),
    ("+optimizer.lrr=0.1", "optimizer.lrr=0.1"),
    ("+trainer.max_step=10", "trainer.max_step=10"),
    ("+schedule.period=3", "schedule.period=3"),
])
def test_bad_values_and_forced_unknown_keys_are_named(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_config(_compose(override))
    assert named in str(err.value)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "learned", "metz_unsupervised", "stn"])
def test_every_optimizer_takes_the_poly_decay_and_checks_its_power(optimizer: str) -> None:
    cfg = check_config(_compose(f"optimizer={optimizer}", "optimizer.lr_decay=poly", "optimizer.decay_power=0.6"))
    assert cfg.optimizer.lr_decay == "poly" and cfg.optimizer.decay_power == 0.6
    with pytest.raises(ConfigError, match=r"optimizer.decay_power=1.5: must be in \(0.5, 1\)"):
        check_config(_compose(f"optimizer={optimizer}", "optimizer.lr_decay=poly", "optimizer.decay_power=1.5"))


def test_smith_ramp_with_an_lr_decay_is_refused_naming_both() -> None:
    with pytest.raises(ConfigError, match=r"optimizer.lr_decay='step': ramp=smith replaces the LR decay"):
        check_config(_compose("ramp=smith", "optimizer.lr_decay=step"))
    assert check_config(_compose("ramp=smith")).ramp.name == "smith"  # alone it is fine


@pytest.mark.parametrize(("override", "named"), [("optimizer.lr=abc", "optimizer.lr"),
                                                  ("optimizer.lrr=0.1", "lrr"),
                                                  ("trainer.max_stepz=3", "max_stepz")])
def test_hydra_rejects_wrong_types_and_unknown_keys(override: str, named: str) -> None:
    with pytest.raises((ConfigCompositionException, OmegaConfBaseException)) as err:
        _compose(override)
    assert named in str(err.value) + str(err.value.__cause__)


@pytest.mark.slow
@pytest.mark.parametrize(("override", "named"), [("trainer.max_steps=0", "trainer.max_steps=0"),
                                                  ("+optimizer.lrr=0.1", "optimizer.lrr=0.1"),
                                                  ("optimizer.lr=abc", "full_key: optimizer.lr")])
def test_entry_point_exits_non_zero_naming_the_key(tmp_path: Path, override: str, named: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "localsgd.train", override, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert named in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # nothing started
