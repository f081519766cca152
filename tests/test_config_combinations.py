"""Choices valid alone but not together fail in ``check_config``, before any process group, naming the key.

Every check across components lives in ``localsgd.config.combination_problems``; each case here is one
of them, with the launch's world size given as the launcher would give it, and a neighbouring config
that passes, so that a rule which refuses too much fails as well.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from hydra import compose, initialize_config_dir

from localsgd.config import (
    DATA_INPUT_DIMS,
    MODEL_INPUT_DIMS,
    check_batch_fits_shard,
    check_config,
    has_activation_modules,
    register_configs,
)
from localsgd.errors import ConfigError
from localsgd.train import config_dir

CIFAR = ["data=cifar10", "data.root=/nonexistent"]


def _compose(*overrides: str) -> Any:
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _problem(overrides: list[str], world: int = 2, local: int = 1) -> str:
    with pytest.raises(ConfigError) as err:
        check_config(_compose(*overrides), world_size=world, local_world_size=local)
    assert not tdist.is_initialized()  # refused before any process group
    return str(err.value)


REFUSED = [  # (overrides, world size, local world size, what the message must say)
    (["schedule=ddp", "outer=slowmo"], 2, 1, "outer.name='slowmo': an outer optimizer steps on the workers' model "
                                            "average, and schedule=ddp averages gradients instead"),
    (["schedule=ddp", "outer=nesterov"], 2, 1, "outer.name='nesterov'"),
    (["loader.mode=dataloader", "ramp=noise_scale"], 2, 1, "loader.mode='dataloader': a DataLoader loads the "
                                                           "batches of the coming steps ahead"),
    (["loader.mode=dataloader", "data=tokens", "model=gpt"], 2, 1, "loader.mode='dataloader': data=tokens draws "
                                                                   "its windows from memory-mapped files itself"),
    (["data=tokens"], 2, 1, "model.name='cnn1d': data=tokens gives token ids, which only a language model takes; "
                            "choose model=gpt"),
    (["model=gpt"], 2, 1, "model.name='gpt': is a language model of token ids, and data=mnist1d gives features; "
                          "choose data=tokens"),
    (["schedule=ddp", "optimizer=stn"], 2, 1, "optimizer.name='stn': its local step takes several backward passes"),
    (["schedule=ddp", "ramp=noise_scale"], 2, 1, "ramp.name='noise_scale': it measures the gradient noise at the "
                                                 "first local step after a model average, and schedule=ddp has none"),
    (["ramp=noise_scale"], 1, 1, "ramp.name='noise_scale': needs >= 2 workers (the big batch is the all-reduced "
                                 "gradient), this launch has world size 1"),
    (["schedule=noise_adaptive"], 1, 1, "schedule.name='noise_adaptive': needs >= 2 workers"),
    (["schedule=noise_adaptive", "ramp=noise_scale"], 2, 1, "schedule.name='noise_adaptive': ramp=noise_scale also "
                                                            "acts on the measured noise scale"),
    (["schedule=noise_adaptive", "trainer.grad_accum_steps=2"], 2, 1, "trainer.grad_accum_steps=2: "
                                                                      "schedule=noise_adaptive measures the gradient"),
    (["ramp=geometric", "ramp.b_max=16"], 2, 1, "ramp.b_max=16: is below the starting batch trainer.batch_size=32"),
    (["ramp=step", "ramp.b_max=8", "trainer.batch_size=9"], 2, 1, "ramp.b_max=8: is below the starting batch "
                                                                  "trainer.batch_size=9"),
    (["ramp=smith", "ramp.b_max=8"], 2, 1, "ramp.b_max=8"),
    (["ramp=noise_scale", "ramp.b_max=8"], 2, 1, "ramp.b_max=8"),
    (["ramp=linear", "ramp.b_end=16"], 2, 1, "ramp.b_end=16: is below the starting batch trainer.batch_size=32 "
                                             "(ramp.b_start=null starts there)"),
    (["schedule=hierarchical", "schedule.group_size=2"], 3, 1, "schedule.group_size=2: world size 3 is not a "
                                                               "multiple of the group size 2"),
    (["schedule=hierarchical", "schedule.group_size=2"], 1, 1, "schedule.group_size=2: world size 1"),
    (["schedule=hierarchical"], 4, 3, "schedule.group_size=0: world size 4 is not a multiple of the group size 3 "
                                      "(0: the workers of one node)"),
    (["optimizer=metz_unsupervised"], 2, 1, "model.name='cnn1d': optimizer=metz_unsupervised needs model=mlp with "
                                            "at least one hidden layer"),
    (["optimizer=metz_unsupervised", "model=logreg"], 2, 1, "model.name='logreg'"),
    (["optimizer=metz_unsupervised", "model=mlp", "model.hidden=[]"], 2, 1, "model.hidden=[]: optimizer="
                                                                            "metz_unsupervised needs model=mlp"),
    ([*CIFAR, "model=cnn1d"], 2, 1, "model.name='cnn1d': takes inputs shaped (features,) or (C, L), and "
                                    "data=cifar10 gives (C, H, W); choose model=logreg, mlp or resnet20"),
    (["model=resnet20"], 2, 1, "model.name='resnet20': takes inputs shaped (C, H, W), and data=mnist1d gives "
                               "(C, L); choose model=cnn1d, logreg or mlp"),
    (["data=digits", "model=resnet20"], 2, 1, "data=digits gives (features,)"),
    (["optimizer=stn", "model.dropout=0.25"], 2, 1, "model.dropout=0.25: optimizer=stn tunes the dropout rate"),
    (["optimizer=stn", "model=mlp", "model.dropout=0.5"], 2, 1, "model.dropout=0.5"),
    (["optimizer=stn", "data=digits", "model=logreg"], 2, 1, "model.name='logreg': optimizer=stn puts tuned "
                                                             "dropout after the model's activation modules"),
    (["optimizer=stn", *CIFAR, "model=resnet20"], 2, 1, "model.name='resnet20': optimizer=stn puts tuned dropout"),
    (["optimizer=stn", "model=mlp", "model.hidden=[]"], 2, 1, "model.hidden=[]: optimizer=stn puts tuned dropout"),
    (["ramp=smith", "optimizer.lr_decay=cosine"], 2, 1, "optimizer.lr_decay='cosine': ramp=smith replaces the LR "
                                                        "decay"),
    (["sync.fragments=3"], 2, 1, "sync.fragments=3: must divide schedule.H=8"),
    (["sync.fragments=2", "sync.delay=4"], 2, 1, "sync.delay=4: must be < schedule.H/sync.fragments = 4"),
    (["sync.delay=1", "schedule=stich"], 2, 1, "sync.delay=1: fragments sync at fixed offsets in a round of H steps, "
                                               "which needs schedule=fixed (got schedule=stich)"),
    (["sync.compress=int8", "schedule=ddp"], 2, 1, "sync.compress='int8': schedule=ddp averages gradients"),
    (["sync.compress=bf16", "sync.on_nonfinite=skip_round"], 2, 1, "sync.on_nonfinite='skip_round': needs the "
                                                                   "blocking sync, and sync.compress='bf16'"),
    (["sync.fragments=2", "sync.buffers=broadcast"], 2, 1, "sync.buffers='broadcast': needs the blocking sync"),
    (["sync.compress=int8", "outer=nesterov", "sync.outer_state_on_host=true"], 2, 1,
     "sync.outer_state_on_host=True: the streaming engine keeps each fragment's x_ref beside the model"),
    (["sync.mix=0.5", "sync.optimizer_state=average"], 2, 1, "sync.optimizer_state='average': acts on the whole "
                                                             "model after a blocking average, and sync.mix=0.5"),
    (["sync.compress=int4", "schedule=hierarchical", "schedule.group_size=1"], 2, 1, "schedule=hierarchical needs "
                                                                                     "the blocking sync"),
]


@pytest.mark.parametrize(("overrides", "world", "local", "named"), REFUSED,
                         ids=[" ".join(c[0]) + f" K={c[1]}" for c in REFUSED])
def test_a_combination_is_refused_naming_its_key(overrides: list[str], world: int, local: int, named: str) -> None:
    message = _problem(overrides, world, local)
    assert named in message
    assert message.count(";") >= 1  # ... and says what to do


ACCEPTED = [  # the neighbours of the refused ones
    (["sync.fragments=4", "sync.delay=1", "sync.mix=0.5", "sync.compress=int4"], 2, 1),
    (["sync.fragments=4", "sync.delay=1", "sync.merge=progress", "sync.compress=int4"], 2, 1),
    (["sync.compress=int8", "schedule=stich"], 2, 1),  # compression alone serves any schedule
    (["sync.fragments=2", "sync.delay=3", "sync.buffers=local"], 2, 1),
    (["schedule=ddp"], 2, 1),
    (["schedule=ddp", "ramp=geometric"], 2, 1),
    (["schedule=fixed", "outer=slowmo", "ramp=noise_scale"], 2, 1),
    (["ramp=geometric", "ramp.b_max=32"], 1, 1),  # b_max may equal the starting batch
    (["ramp=linear", "ramp.b_end=16", "ramp.b_start=8"], 1, 1),
    (["ramp=smith"], 1, 1),
    (["schedule=post_local", "optimizer.lr_decay=step"], 1, 1),
    (["schedule=post_local"], 2, 1),  # no LR decay: switches at schedule.switch_fraction of the run
    (["schedule=post_local", "optimizer.lr_decay=cosine"], 2, 1),
    (["schedule=post_local", "optimizer.lr_decay=step", "optimizer.decay_milestones=[]"], 2, 1),
    (["schedule=post_local", "schedule.switch_step=100"], 1, 1),
    (["schedule=hierarchical", "schedule.group_size=2"], 4, 1),
    (["schedule=hierarchical"], 6, 3),
    (["schedule=hierarchical"], 1, 1),
    (["optimizer=metz_unsupervised", "model=mlp"], 1, 1),
    ([*CIFAR, "model=resnet20"], 1, 1),
    ([*CIFAR, "model=mlp"], 1, 1),
    (["data=digits", "model=cnn1d"], 1, 1),
    (["optimizer=stn"], 1, 1),
    (["optimizer=stn", "model=mlp"], 1, 1),
    (["optimizer=stn", "data=digits", "model=logreg", "optimizer.tune=[input_noise]"], 1, 1),
    (["optimizer=stn", "model.dropout=0.25", "optimizer.tune=[input_noise]"], 1, 1),
    (["comm.backend=gloo"], 1, 1),
]


@pytest.mark.parametrize(("overrides", "world", "local"), ACCEPTED,
                         ids=[" ".join(c[0]) + f" K={c[1]}" for c in ACCEPTED])
def test_the_neighbours_pass(overrides: list[str], world: int, local: int) -> None:
    check_config(_compose(*overrides), world_size=world, local_world_size=local)


def test_every_problem_is_named_at_once() -> None:
    message = _problem(["schedule=ddp", "outer=slowmo", "ramp=noise_scale", "trainer.max_steps=0"], world=1)
    for named in ("trainer.max_steps=0", "outer.name='slowmo'", "ramp.name='noise_scale': it measures",
                  "ramp.name='noise_scale': needs >= 2 workers"):
        assert named in message


def test_nccl_needs_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "comm.backend='nccl': needs CUDA, which is not available on this machine" in _problem(["comm.backend=nccl"])
    check_config(_compose("comm.backend=auto"), world_size=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert check_config(_compose("comm.backend=nccl"), world_size=1).comm.backend == "nccl"  # nothing initialised


@pytest.mark.parametrize(("env", "refused"), [({"RANK": "0", "WORLD_SIZE": "1"}, True),
                                              ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}, False),
                                              ({}, True)])
def test_the_world_size_comes_from_the_launcher_environment(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                                            refused: bool) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "SUBMITIT_EXECUTOR"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    cfg = _compose("ramp=noise_scale")
    if refused:
        with pytest.raises(ConfigError, match="ramp.name='noise_scale': needs >= 2 workers"):
            check_config(cfg)
    else:
        assert check_config(cfg).ramp.name == "noise_scale"
    assert not tdist.is_initialized()


def test_the_local_world_size_comes_from_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in {"RANK": "0", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "3"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match="world size 4 is not a multiple of the group size 3"):
        check_config(_compose("schedule=hierarchical"))


def test_the_entry_point_checks_before_the_process_group(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import localsgd.train as train

    def no_group(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("dist.init was called for a config that check_config refuses")

    monkeypatch.setattr(train.dist, "init", no_group)
    for key in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(SystemExit) as exit_:
        train.task(_compose("schedule=ddp", "ramp=noise_scale"))
    assert exit_.value.code == 2


@pytest.mark.parametrize(("overrides", "switch"), [
    (["schedule=post_local"], 1000),  # no LR decay: half of trainer.max_steps=2000
    (["schedule=post_local", "optimizer.lr_decay=cosine"], 1000),
    (["schedule=post_local", "optimizer.lr_decay=cosine", "schedule.switch_fraction=0.25"], 500),
    (["schedule=post_local", "optimizer.lr_decay=step", "optimizer.decay_milestones=[0.3,0.6]"], 600),  # Lin et al.
    (["schedule=post_local", "optimizer.lr_decay=step", "schedule.switch_step=7"], 7),  # explicit wins
    (["schedule=post_local", "schedule.switch_step=0"], 0),
])
def test_post_local_switches_at_the_first_decay_else_at_a_fraction_of_the_run(overrides: list[str],
                                                                              switch: int) -> None:
    from localsgd.optim import first_decay_step
    from localsgd.schedules import RunInfo, build

    cfg = check_config(_compose(*overrides), world_size=2)
    first_decay = first_decay_step(cfg.optimizer.lr_decay, cfg.trainer.max_steps, cfg.optimizer.decay_milestones)
    run = RunInfo(cfg.trainer.max_steps, 2, cfg.trainer.batch_size, first_decay, 1)  # as the trainer builds it
    assert build(cfg.schedule, run).describe() == f"post_local(switch={switch}, H=16)"


def test_post_local_refuses_a_fraction_outside_the_run() -> None:
    assert "schedule.switch_fraction=1.5: must be in [0, 1]" in _problem(["schedule=post_local",
                                                                          "schedule.switch_fraction=1.5"])


# ---------------------------------------------------------------------- a batch larger than a worker's shard
def _batch_problem(overrides: list[str], train_samples: int, world: int) -> str | None:
    from localsgd import ramps

    cfg = check_config(_compose(*overrides), world_size=world)
    ramp = ramps.build(cfg.ramp, cfg.trainer.batch_size, cfg.trainer.max_steps, world_size=world)
    try:
        check_batch_fits_shard(cfg, ramp, train_samples, world)
    except ConfigError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize(("overrides", "train_samples", "world", "named"), [
    (["trainer.batch_size=100000"], 8000, 2, "invalid config: trainer.batch_size=100000: is larger than a worker's "
                                             "shard of 4000 training samples (8000 of data=mnist1d over 2 worker(s)); "
                                             "lower trainer.batch_size to at most 4000"),
    (["trainer.batch_size=4000"], 8001, 2, None),  # a batch of the whole shard is fine
    (["trainer.batch_size=4000"], 7999, 2, "shard of 3999"),
    (["ramp=geometric", "ramp.every_steps=1", "ramp.b_max=5000"], 8000, 2,
     "ramp.b_max=5000 (the ramp's largest batch, 5000): is larger than a worker's shard of 4000"),
    (["ramp=geometric", "ramp.every_steps=1", "ramp.b_max=5000"], 8000, 1, None),
    # It would pass the shard only after the run's last step: the batch it reaches counts, not its cap.
    (["ramp=geometric", "ramp.every_steps=1000", "ramp.b_max=5000", "trainer.max_steps=1000"], 8000, 2, None),
    (["ramp=linear", "ramp.b_end=4001"], 8000, 2, "ramp=linear (the ramp's largest batch, 4001)"),
    (["ramp=noise_scale"], 1348, 2, None),  # b_max=4096 caps a measured batch that small sets never reach
])
def test_a_batch_larger_than_the_shard_is_refused(overrides: list[str], train_samples: int, world: int,
                                                  named: str | None) -> None:
    problem = _batch_problem(overrides, train_samples, world)
    assert problem is None if named is None else problem is not None and named in problem, problem


@pytest.mark.slow
def test_the_entry_point_refuses_a_batch_larger_than_the_shard_in_one_line(tmp_path: Path) -> None:
    from .launch_helpers import TINY, single

    proc = single(tmp_path, tmp_path / "run", [*TINY, "trainer.batch_size=100000"])
    assert proc.returncode == 2
    ours = [line for line in proc.stderr.splitlines() if line.startswith("localsgd:")]
    assert len(ours) == 1 and "trainer.batch_size=100000: is larger than a worker's shard of 1348" in ours[0], ours
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before the first step


@pytest.mark.slow
def test_under_torchrun_a_config_error_is_one_line_from_rank_0(tmp_path: Path) -> None:
    from .launch_helpers import torchrun

    # Four combination errors at once (check_config names them all in one line), the last where no CUDA is.
    overrides = ["schedule=hierarchical", "schedule.group_size=3", "optimizer=metz_unsupervised", *CIFAR]
    named = ["schedule.group_size=3: world size 2 is not a multiple", "model.name='cnn1d': optimizer=metz_unsupervised",
             "model.name='cnn1d': takes inputs shaped"]
    if not torch.cuda.is_available():
        overrides.append("comm.backend=nccl")
        named.append("comm.backend='nccl': needs CUDA")
    proc = torchrun(tmp_path, tmp_path / "run", overrides, nproc=2, timeout=120)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("localsgd:")]
    assert len(ours) == 1 and ours[0].startswith("localsgd: invalid config: "), proc.stderr
    assert all(n in ours[0] for n in named), ours[0]
    assert not re.search(r'File ".*[/\\]localsgd[/\\]', proc.stderr), proc.stderr  # no traceback of ours


# ---------------------------------------------------------------------- the facts the rules rest on
def _fake_cifar(root: Path) -> None:
    root.mkdir()
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        batch = {b"data": np.zeros((2, 3072), dtype=np.uint8), b"labels": [0, 1]}
        (root / name).write_bytes(pickle.dumps(batch))


def test_the_input_dimensions_are_the_datasets(tmp_path: Path) -> None:
    from localsgd.data import DATASETS

    _fake_cifar(tmp_path / "cifar")
    small = {"mnist1d": {"num_samples": 100, "cache_dir": str(tmp_path / "cache")},
             "synthetic_logreg": {"n_samples": 50, "n_features": 7}, "cifar10": {"root": str(tmp_path / "cifar")},
             "tokens": {"train_bin": str(tmp_path / "train.bin"), "val_bin": str(tmp_path / "val.bin"),
                        "vocab_size": 256, "block_size": 8}}
    for split in ("train", "val"):
        np.arange(100, dtype=np.uint16).tofile(tmp_path / f"{split}.bin")
    assert sorted(DATA_INPUT_DIMS) == DATASETS.names()  # a new dataset states its input here
    for entry in DATASETS.entries():
        dataset = DATASETS.build(entry.config_cls(**small.get(entry.name, {})))
        assert len(dataset.input_shape) == DATA_INPUT_DIMS[entry.name], entry.name


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_the_input_dimensions_are_the_models(dims: int) -> None:
    from localsgd.models import MODELS

    shape = {1: (12,), 2: (2, 12), 3: (3, 8, 8)}[dims]
    for entry in MODELS.entries():
        try:
            MODELS.build(entry.config_cls(), shape, 3)
            built = True
        except ValueError:
            built = False
        assert built == (dims in MODEL_INPUT_DIMS.get(entry.name, (dims,))), (entry.name, shape)


def test_the_models_with_activation_modules_are_the_ones_stn_can_tune_dropout_in() -> None:
    from localsgd.models import MODELS, MLPConfig
    from localsgd.stn.convert import ACTIVATIONS

    configs = [entry.config_cls() for entry in MODELS.entries()] + [MLPConfig(hidden=[])]
    for cfg in configs:
        shape = (3, 8, 8) if cfg.name == "resnet20" else (12,)
        model = MODELS.build(cfg, shape, 3)
        assert has_activation_modules(cfg) == any(isinstance(m, ACTIVATIONS) for m in model.modules()), cfg

