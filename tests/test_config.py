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
    extra = ["data.root=/nonexistent"] if "cifar10" in option and group in ("data", "experiment") else []
    # The main job's other choices, where they do not go with this option (the checks across components).
    extra += {("data", "cifar10"): ["model=resnet20"],  # cnn1d takes 1-D signals, not images
              ("model", "resnet20"): ["data=cifar10", "data.root=/nonexistent"],
              ("optimizer", "metz_unsupervised"): ["model=mlp"],
              ("schedule", "post_local"): ["optimizer.lr_decay=step"],
              ("data", "tokens"): ["model=gpt"],  # token ids go to a language model only
              ("model", "gpt"): ["data=tokens"],
              ("data", "custom"): ["data._target_=collections.OrderedDict"],  # importable is all the check asks
              ("model", "custom"): ["model._target_=torch.nn.Identity"]}.get((group, option), [])
    selector = f"+{group}={option}" if group == "experiment" else f"{group}={option}"
    # Two workers: ramp=noise_scale needs them (the big batch is the all-reduced gradient).
    cfg = check_config(_compose(selector, *extra), world_size=2)
    if group in ("data", "model", "optimizer", "schedule"):
        assert getattr(cfg, group).name == (extra[0].split("=")[1] if option == "custom" else option)


def test_a_progress_merge_takes_no_mix() -> None:
    with pytest.raises(ConfigError, match=r"sync.mix=0.5: must be 0 with sync.merge=progress"):
        check_config(_compose("sync.merge=progress", "sync.mix=0.5"))
    # with no delay there is no progress to keep: refused, not run as a silent synonym of merge=mix
    with pytest.raises(ConfigError, match=r"sync.merge='progress': needs sync.delay >= 1"):
        check_config(_compose("sync.fragments=2", "sync.merge=progress"))
    check_config(_compose("sync.fragments=2", "sync.delay=1", "sync.merge=progress"))


@pytest.mark.parametrize(("override", "named"), [
    ("trainer.max_steps=0", "trainer.max_steps=0: must be >= 1"),
    ("trainer.batch_size=-4", "trainer.batch_size=-4"),
    ("optimizer.lr=-1", "optimizer.lr=-1.0: must be > 0"),
    ("optimizer.momentum=1.5", "optimizer.momentum=1.5"),
    ("schedule.H=0", "schedule.H=0: must be >= 1"),
    ("sync.buffers=mean", "sync.buffers='mean'"),
    ("sync.optimizer_state=zero", "sync.optimizer_state='zero'"),
    ("sync.compress=int2", "sync.compress='int2': must be one of ('none', 'bf16', 'fp16', 'int8', 'int4')"),
    ("sync.mix=1.0", "sync.mix=1.0: must be in [0, 1)"),
    ("sync.merge=blend", "sync.merge='blend': must be one of ('mix', 'progress')"),
    ("sync.fragments=0", "sync.fragments=0: must be >= 1"),
    ("sync.delay=-1", "sync.delay=-1: must be >= 0"),
    ("sync.error_feedback=true", "sync.error_feedback=True: needs a lossy sync.compress"),
    ("loader.start_method=forkserver", "loader.start_method='forkserver': must be spawn or fork"),
    ("checkpoint.keep_latest_k=0", "checkpoint.keep_latest_k=0"),
    ("checkpoint.every_rounds=0", "checkpoint.every_rounds=0"),
    ("logging.wandb=cloud", "logging.wandb='cloud'"),
    ("comm.train_timeout_s=0", "comm.train_timeout_s=0.0"),
    ("data.num_samples=5", "data.num_samples=5"),
    ("+optimizer.lrr=0.1", "optimizer.lrr=0.1 (did you mean optimizer.lr?)"),
    ("+trainer.max_step=10", "unknown config key(s): trainer.max_step=10 (did you mean trainer.max_steps?); check"),
    ("+schedule.period=3", "schedule.period=3; check"),  # nothing like it: no suggestion
    ("+schedule.h=3", "schedule.h=3 (did you mean schedule.H?)"),  # the selected option's keys, case-blind
    # Bounded: inf and 1e308 overflow the process group's timedelta; seeds beyond 32 bits fail numpy's
    # seeding; a run of 10**20 steps never ends.
    ("comm.train_timeout_s=inf", "comm.train_timeout_s=inf: must be > 0 and <= 604800 seconds (7 days)"),
    ("comm.init_timeout_s=1e308", "comm.init_timeout_s=1e+308: must be > 0 and <= 604800 seconds"),
    ("comm.init_timeout_s=nan", "comm.init_timeout_s=nan"),
    ("trainer.seed=100000000000000000000", "trainer.seed=100000000000000000000: must be in [0, 4294967295]"),
    ("trainer.seed=-1", "trainer.seed=-1: must be in [0, 4294967295]"),
    ("trainer.max_steps=100000000000000000000", "trainer.max_steps=100000000000000000000: must be <= "
                                                "1,000,000,000,000"),
])
def test_bad_values_and_forced_unknown_keys_are_named(override: str, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_config(_compose(override))
    assert named in str(err.value)
    assert str(err.value).count(named.split("=")[0]) == 1  # each key named once


def test_the_bounds_admit_their_limits() -> None:
    from localsgd.config import MAX_SEED, MAX_STEPS, MAX_TIMEOUT_S
    from localsgd.sampler import ShardSampler
    from localsgd.trainer import seed_everything

    cfg = check_config(_compose(f"trainer.seed={MAX_SEED}", f"trainer.max_steps={MAX_STEPS}",
                                f"comm.init_timeout_s={MAX_TIMEOUT_S}", f"comm.train_timeout_s={MAX_TIMEOUT_S}"))
    seed_everything(cfg.trainer.seed + 7919 * 64)  # the per-rank seed of rank 63
    ShardSampler(10, 0, 1, cfg.trainer.seed).next_indices(25)  # the data order's seed * 1_000_003 + epoch


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
                                                  ("optimizer.lr=abc", "override optimizer.lr=abc: Value 'abc'")])
def test_entry_point_exits_non_zero_naming_the_key(tmp_path: Path, override: str, named: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "localsgd.train", override, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert named in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1 and not proc.stdout.strip(), proc.stderr  # one line of ours
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
    if expected is not None:  # <date>_<time> of the launch (here: the parent, as a torchrun agent), then the id
        assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d_\d\d-\d\d-\d\d_{re.escape(expected)}", run_id()), run_id()
    else:  # no launcher: the time, to the microsecond
        assert re.fullmatch(r"\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_\d{6}", run_id())


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
    ("+experiment=resnet20", "+experiment=resnet20: configs/experiment/ has no option 'resnet20' (did you mean "
                             "resnet20_cifar10?); choose one of gpt_text, logreg_breast_cancer, resnet20_cifar10"),
])
def test_selecting_a_schema_or_a_missing_option_fails_in_one_line(tmp_path: Path, selector: str, named: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "localsgd.train", selector, f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"localsgd: {named}"), proc.stderr
    assert not (tmp_path / "run").exists()  # nothing composed, nothing started


@pytest.mark.parametrize(("args", "named"), [
    (["schedule=fixd"], "schedule=fixd: configs/schedule/ has no option 'fixd' (did you mean fixed?); choose one of "
                        "adacomm, ddp, fixed,"),
    (["outer=slomo"], "outer=slomo: configs/outer/ has no option 'slomo' (did you mean slowmo?)"),
    (["model=resnet"], "model=resnet: configs/model/ has no option 'resnet' (did you mean resnet20?)"),
    (["ramp=zzz"], "ramp=zzz: configs/ramp/ has no option 'zzz'; choose one of"),  # nothing like it
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


@pytest.mark.parametrize(("args", "named"), [
    (["trainer.max_step=10", "trainer=smoke"], "unknown config key(s): trainer.max_step=10 (did you mean "
                                               "trainer.max_steps?); check the spelling or the selected group option"),
    (["schedule=fixed", "schedule.h=3"], "schedule.h=3 (did you mean schedule.H?)"),
    (["traner.max_steps=3"], "traner.max_steps=3 (did you mean trainer.max_steps?)"),
    (["model=mlp", "model.hiden=[3]"], "model.hiden=[3] (did you mean model.hidden?)"),  # the chosen option's keys
    (["+experiment=logreg_breast_cancer", "model.hidden=[3]"], "model.hidden=[3]; check"),  # the experiment's logreg
    (["trainer.max_steps=5", "model=mlp", "model.hidden=[3]", "hydra.run.dir=x", "hydra/job_logging=disabled"], None),
    (["+trainer.max_step=10"], None),  # forced in: check_config names it, with the suggestion
    (["++trainer.max_steps=5", "~ramp"], None),
    (["-m", "trainer.max_step=1,2"], None),  # sweeps: Hydra composes each job itself
    (["schedule=fixed,ddp", "schedule.h=3"], None),
    (["--config-name=other", "trainer.max_step=1"], None),  # another primary config: Hydra decides
    (["optimizer.lr=abc"], "Error merging override optimizer.lr=abc: Value 'abc' of type 'str' could not be "
                           "converted to Float"),  # a wrong type: Hydra's five lines joined into one
])
def test_unknown_key_names_the_override_and_its_likely_spelling(args: list[str], named: str | None) -> None:
    from hydra.core.global_hydra import GlobalHydra

    from localsgd.train import unknown_key

    register_configs()
    problem = unknown_key(args, CONFIGS)
    assert problem is None if named is None else problem is not None and named in problem, problem
    assert not GlobalHydra.instance().is_initialized()  # hydra.main initialises it again


@pytest.mark.slow
def test_a_typo_hydra_refuses_ends_in_one_line_of_ours(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "localsgd.train", "trainer.max_step=10", "trainer=smoke",
                           f"hydra.run.dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "localsgd: unknown config key(s): trainer.max_step=10 (did you mean trainer.max_steps?); check the spelling "
        "or the selected group option"], proc.stderr
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------- experiments and the command line
EXPERIMENT_TRAINERS = {"resnet20_cifar10": (20000, 128, 2000), "logreg_breast_cancer": (600, 16, 200)}


@pytest.mark.parametrize("experiment", sorted(EXPERIMENT_TRAINERS))
def test_a_trainer_chosen_on_the_command_line_wins_over_the_experiment(experiment: str) -> None:
    root = ["data.root=/nonexistent"] if "cifar10" in experiment else []

    def trainer(*overrides: str) -> tuple[int, int, int]:
        t = _compose(f"+experiment={experiment}", *root, *overrides).trainer
        return t.max_steps, t.batch_size, t.eval_every

    assert trainer() == EXPERIMENT_TRAINERS[experiment]  # the experiment wins over the group defaults ...
    assert trainer("trainer=smoke") == (40, 16, 20)  # ... a trainer chosen on the command line over it ...
    assert trainer("trainer.max_steps=7")[0] == 7  # ... and a value given there over both
    assert trainer("trainer=smoke", "trainer.max_steps=7") == (7, 16, 20)


def test_the_experiment_keeps_its_other_choices_and_values_with_a_command_line_trainer() -> None:
    cfg = _compose("+experiment=resnet20_cifar10", "data.root=/nonexistent", "trainer=smoke")
    assert (cfg.data.name, cfg.model.name, cfg.optimizer.lr, cfg.optimizer.lr_decay, cfg.schedule.H) == (
        "cifar10", "resnet20", 0.1, "step", 16)


@pytest.mark.parametrize(("args", "named"), [
    (["+experiment=resnet20_cifar10", "optimizer=adamw"],
     "warning: +experiment=resnet20_cifar10 sets optimizer.lr, optimizer.weight_decay, optimizer.warmup_steps, "
     "optimizer.lr_decay, which win over the values of optimizer=adamw; give them on the command line"),
    (["+experiment=resnet20_cifar10", "trainer=smoke", "model=mlp"], None),  # chosen with override: no clash
    (["+experiment=resnet20_cifar10", "optimizer.lr=0.2"], None),
    (["optimizer=adamw"], None),
])
def test_a_choice_the_experiment_values_override_is_warned_of(args: list[str], named: str | None) -> None:
    from localsgd.train import experiment_overrides_choice

    warning = experiment_overrides_choice(args, CONFIGS)
    assert warning is None if named is None else warning is not None and warning.startswith(named), warning
