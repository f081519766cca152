"""YAML only selects and overrides: no file under configs/ restates a default, and the composed configs
are the dataclasses' defaults plus exactly the differences the files state."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from localsgd.config import (
    POLYMORPHIC_GROUPS,
    TrainConfig,
    _registries,
    check_config,
    flat_items,
    register_configs,
    schema_name,
)
from localsgd.train import config_dir

CONFIGS = Path(config_dir())
# ``<group>/custom.yaml`` is the user's own component (a bare ``_target_``, no schema): tested below on its own.
CUSTOM_FILES = sorted(CONFIGS.glob("*/custom.yaml"))
GROUP_FILES = sorted(p for p in CONFIGS.glob("*/*.yaml") if p.parent.name != "experiment" and p not in CUSTOM_FILES)


@pytest.mark.parametrize("path", CUSTOM_FILES, ids=lambda p: p.parent.name)
def test_a_custom_option_is_a_bare_target_the_user_must_fill(path: Path) -> None:
    from localsgd.config import TARGET_GROUPS
    from localsgd.errors import ConfigError

    assert path.parent.name in TARGET_GROUPS
    assert OmegaConf.to_container(OmegaConf.load(path)) == {"_target_": "???"}
    with pytest.raises(ConfigError, match=rf"^{path.parent.name}\._target_ is missing: {path.parent.name}=custom"):
        check_config(_compose(f"{path.parent.name}=custom"))
EXPERIMENTS = sorted((CONFIGS / "experiment").glob("*.yaml"))
MAIN_JOB = {"data": "mnist1d", "model": "cnn1d", "optimizer": "sgd", "schedule": "fixed", "outer": "average",
            "ramp": "none"}


def _compose(*overrides: str) -> Any:
    register_configs()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _schema(group: str, option: str) -> type:
    if group in POLYMORPHIC_GROUPS:
        return _registries()[group].get(option).config_cls
    return typing.get_type_hints(TrainConfig)[group]


def _default(cls: type, key: str) -> Any:
    f = next(f for f in dataclasses.fields(cls) if f.name == key)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default  # type: ignore[misc]


def _flat(node: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_no_group_file_restates_a_default(path: Path) -> None:
    group, option = path.parent.name, path.stem
    text = OmegaConf.to_container(OmegaConf.load(path)) or {}
    assert isinstance(text, dict)
    defaults = text.pop("defaults", [])
    if group in POLYMORPHIC_GROUPS:  # extends its own component's dataclass, by an absolute root-level name
        assert defaults == [f"/{schema_name(group, option)}", "_self_"]
    cls = _schema(group, option)
    restated = {k: v for k, v in text.items() if v == _default(cls, k)}
    assert not restated, f"configs/{group}/{path.name} restates {cls.__name__}'s defaults {restated}; delete them"
    composed = flat_items(_compose(f"{group}={option}"))
    ignored = {k: v for k, v in text.items() if composed[f"{group}.{k}"] != v}  # e.g. ``???`` onto a default
    assert not ignored, f"configs/{group}/{path.name} states {ignored}, which composition ignores"


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.stem)
def test_no_experiment_restates_the_config_it_overrides(path: Path) -> None:
    text = OmegaConf.to_container(OmegaConf.load(path))
    assert isinstance(text, dict)
    selections = [f"{g.removeprefix('override /')}={o}" for entry in text.pop("defaults", []) for g, o in entry.items()]
    extra = ["data.root=/nonexistent"] if any("cifar10" in s for s in selections) else []
    base = flat_items(_compose(*selections, *extra))
    restated = {k: v for k, v in _flat(text).items() if base.get(k) == v}
    assert not restated, f"configs/experiment/{path.name} restates {restated}, which its selections already give"


# What each file still states: the differences from its dataclass's defaults, nothing else.
FILE_DELTAS: dict[str, dict[str, Any]] = {
    "trainer=smoke": {"trainer.max_steps": 40, "trainer.batch_size": 16, "trainer.eval_every": 20,
                      "trainer.log_every": 10, "trainer.progress": False},
    # The experiments' trainers: group options, so that a trainer chosen on the command line replaces them.
    "trainer=resnet20_cifar10": {"trainer.max_steps": 20000, "trainer.batch_size": 128, "trainer.eval_every": 2000},
    "trainer=gpt_text": {"trainer.batch_size": 16, "trainer.eval_every": 250, "trainer.eval_batch_size": 16,
                         "trainer.log_every": 10},
    "trainer=logreg_breast_cancer": {"trainer.max_steps": 600, "trainer.batch_size": 16, "trainer.eval_every": 200},
    "checkpoint=off": {"checkpoint.enable": False, "checkpoint.resume": False},
    "logging=offline": {"logging.wandb": "offline"},
}


def _expected(group: str, option: str) -> dict[str, Any]:
    """The composed config that ``group=option`` must give, from the dataclasses alone."""
    choices = {g: _registries()[g].get(MAIN_JOB[g]).config_cls() for g in POLYMORPHIC_GROUPS}
    if group in POLYMORPHIC_GROUPS:
        choices[group] = _schema(group, option)()
    return {**flat_items(TrainConfig(**choices)), **FILE_DELTAS.get(f"{group}={option}", {})}


@pytest.mark.parametrize(("group", "option"), [("", "")] + [(p.parent.name, p.stem) for p in GROUP_FILES])
def test_composed_config_is_the_dataclass_defaults_plus_the_file(group: str, option: str) -> None:
    composed = flat_items(_compose(f"{group}={option}") if group else _compose())
    assert composed == _expected(group, option)


# The values the group files stated before they stopped restating defaults, that is the behaviour
# of these options before and after (sgd's lr was 0.05 in its file and 0.1 in SGDConfig; the file won).
VALUES_THE_FILES_STATED: dict[str, dict[str, Any]] = {
    "checkpoint=default": {"checkpoint.enable": True, "checkpoint.every_rounds": 25, "checkpoint.keep_latest_k": 2,
                           "checkpoint.fallback": True, "checkpoint.resume": True},
    "data=mnist1d": {"data.num_samples": 10000, "data.seed": 42},
    "logging=default": {"logging.wandb": "disabled", "logging.project": "localsgd"},
    "logging=offline": {"logging.wandb": "offline", "logging.project": "localsgd"},
    "model=cnn1d": {"model.channels": 32, "model.dropout": 0.0},
    "model=mlp": {"model.hidden": [256, 256], "model.dropout": 0.0},
    "model=resnet20": {"model.width": 16, "model.shortcut": "A"},
    "optimizer=adamw": {"optimizer.lr": 0.001, "optimizer.weight_decay": 0.01},
    "optimizer=learned": {"optimizer.lr": 1.0, "optimizer.lr_decay": "cosine", "optimizer.checkpoint": ""},
    "optimizer=metz_unsupervised": {"optimizer.checkpoint": "", "optimizer.pretrain_steps": 100,
                                    "optimizer.rule_lr": 0.001, "optimizer.finetune": "all", "optimizer.lr": 0.05,
                                    "optimizer.momentum": 0.9},
    "optimizer=sgd": {"optimizer.lr": 0.05, "optimizer.momentum": 0.9, "optimizer.nesterov": False,
                      "optimizer.weight_decay": 0.0},
    "optimizer=stn": {"optimizer.lr": 0.05, "optimizer.momentum": 0.9, "optimizer.variant": "delta",
                      "optimizer.linearize": False, "optimizer.tune": ["dropout"], "optimizer.init_scale": 1.0,
                      "optimizer.entropy_weight": 0.001, "optimizer.hyper_optimizer": "rmsprop",
                      "optimizer.hyper_lr": 0.01, "optimizer.scale_lr": 0.01, "optimizer.hyper_warmup_steps": 100,
                      "optimizer.train_steps": 5, "optimizer.val_steps": 1, "optimizer.val_fraction": 0.15,
                      "optimizer.averaging": "plain"},
    "outer=nesterov": {"outer.lr": 0.7, "outer.momentum": 0.9},
    "schedule=ddp": {"schedule.bucket_cap_mb": 25.0},
    "schedule=fixed": {"schedule.H": 8},
    "trainer=default": {"trainer.max_steps": 2000, "trainer.batch_size": 32, "trainer.seed": 0,
                        "trainer.eval_every": 500, "trainer.log_every": 25},
}


@pytest.mark.parametrize("selector", sorted(VALUES_THE_FILES_STATED))
def test_options_keep_the_values_their_files_stated(selector: str) -> None:
    composed = flat_items(_compose(selector))
    stated = VALUES_THE_FILES_STATED[selector]
    assert {k: composed[k] for k in stated} == stated


def test_the_main_job_is_unchanged() -> None:
    composed = flat_items(_compose())
    for selector in ("data=mnist1d", "model=cnn1d", "optimizer=sgd", "schedule=fixed", "trainer=default",
                     "logging=default", "checkpoint=default"):
        stated = VALUES_THE_FILES_STATED[selector]
        assert {k: composed[k] for k in stated} == stated
