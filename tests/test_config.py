"""Config composition and validation: every bad value or unknown key is named before any process group."""

from __future__ import annotations

import re
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
    # The main job's other choices, where they do not go with this option (the checks across components).
    extra += {("data", "cifar10"): ["model=resnet20"],  # cnn1d takes 1-D signals, not images
              ("model", "resnet20"): ["data=cifar10", "data.root=/nonexistent"],
              ("optimizer", "metz_unsupervised"): ["model=mlp"],
              ("schedule", "post_local"): ["optimizer.lr_decay=step"]}.get((group, option), [])
    selector = f"+{group}={option}" if group == "experiment" else f"{group}={option}"
    # Two workers: ramp=noise_scale needs them (the big batch is the all-reduced gradient).
    cfg = check_config(_compose(selector, *extra), world_size=2)
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
    model = ["model=mlp"] if optimizer == "metz_unsupervised" else []  # the rule needs an MLP's hidden layers
    cfg = check_config(_compose(f"optimizer={optimizer}", *model, "optimizer.lr_decay=poly",
                                "optimizer.decay_power=0.6"))
    assert cfg.optimizer.lr_decay == "poly" and cfg.optimizer.decay_power == 0.6
    with pytest.raises(ConfigError, match=r"optimizer.decay_power=1.5: must be in \(0.5, 1\)"):
        check_config(_compose(f"optimizer={optimizer}", *model, "optimizer.lr_decay=poly",
                              "optimizer.decay_power=1.5"))


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


@pytest.mark.parametrize(("env", "expected"), [
    ({"TORCHELASTIC_RUN_ID": "abc123"}, "abc123"),
    ({"TORCHELASTIC_RUN_ID": "0123456789abcdef0"}, "01234567"),  # longer than 16: its first 8 characters
    ({"TORCHELASTIC_RUN_ID": "none", "SLURM_JOB_ID": "4242"}, "slurm-4242"),  # torchrun's placeholder
    ({"SLURM_JOB_ID": "4242"}, "slurm-4242"),
    ({"TORCHELASTIC_RUN_ID": "", "SLURM_JOB_ID": ""}, None),
])
def test_the_launch_id_comes_from_dist_and_names_the_run(monkeypatch: pytest.MonkeyPatch,
                                                         env: dict[str, str], expected: str | None) -> None:
    from localsgd import dist
    from localsgd.config import run_id

    for key in ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert dist.launch_id() == expected
    if expected is not None:
        assert run_id() == expected
    else:  # no launcher: the time, to the microsecond
        assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d-\d{6}", run_id())


def test_config_reads_no_environment_variable_itself() -> None:
    source = (Path(__file__).parent.parent / "localsgd" / "config.py").read_text()
    assert "os.environ" not in source and "getenv" not in source  # localsgd.dist is the only door


@pytest.mark.slow
def test_help_lists_no_schema(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "localsgd.train", "--help"], cwd=tmp_path, env=env_for(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    groups = proc.stdout.split("== Config ==")[0]
    assert "schedule: adacomm, ddp, fixed," in groups  # the options are listed ...
    assert "_schema" not in proc.stdout + proc.stderr and "schema/" not in groups  # ... and no schema


@pytest.mark.parametrize("selector", ["schedule=fixed_schema", "model=cnn1d_schema", "optimizer=optimizer_sgd_schema"])
def test_a_schema_is_no_group_option(selector: str) -> None:
    with pytest.raises(ConfigCompositionException, match="Could not find"):
        _compose(selector)


@pytest.mark.slow
@pytest.mark.parametrize(("selector", "named"), [
    ("schedule=fixed_schema", "schedule=fixed_schema: configs/schedule/ has no option 'fixed_schema'; choose one of "
                              "adacomm, ddp, fixed,"),
    ("+experiment=resnet20", "+experiment=resnet20: configs/experiment/ has no option 'resnet20'; choose one of "
                             "logreg_breast_cancer, resnet20_cifar10"),
])
def test_selecting_a_schema_or_a_missing_option_fails_in_one_line(tmp_path: Path, selector: str, named: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "localsgd.train", selector, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"localsgd: {named}"), proc.stderr
    assert not (tmp_path / "run").exists()  # nothing composed, nothing started


@pytest.mark.parametrize(("args", "named"), [
    (["schedule=fixd"], "schedule=fixd: configs/schedule/ has no option 'fixd'"),
    (["trainer.max_steps=3", "data=mnist1d", "ramp=none_schema"], "ramp=none_schema: configs/ramp/ has no option"),
    (["schedule=fixed", "+experiment=logreg_breast_cancer", "trainer=smoke"], None),
    (["schedule=fixed,ddp", "schedule@other=nope", "~ramp", "hydra/job_logging=disabled", "--cfg", "job"], None),
    (["--config-dir=/elsewhere", "schedule=mine"], None),  # another config directory: Hydra decides
    (["hydra.searchpath=[file://elsewhere]", "schedule=mine"], None),
])
def test_unknown_option_names_the_override(args: list[str], named: str | None) -> None:
    from localsgd.train import unknown_option

    problem = unknown_option(args, CONFIGS)
    assert problem is None if named is None else problem is not None and problem.startswith(named)
