"""Entry point: ``torchrun --nproc_per_node=K -m localsgd.train [hydra overrides]``.

Thin on purpose (torchtitan's ``train.py`` layout): compose and validate the config *before* any
process group exists, start the group, check that every rank composed the same config, run the
worker loop of :mod:`localsgd.trainer`, and always tear the group down. Non-zero ranks tell Hydra
not to write its own ``.hydra/`` and logs, so a run has exactly one output directory, named the same
on every rank.
"""

from __future__ import annotations

import os
import sys
import time
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from . import dist
from .config import (
    TARGET_GROUPS,
    check_config,
    close_keys,
    config_hash,
    did_you_mean,
    flat_items,
    register_configs,
    suggest_keys,
    unknown_keys_message,
)
from .errors import ConfigError, LocalSGDError

# Flags after which the overrides name options of another config directory, or keys of another primary config.
_OTHER_CONFIG_DIR_FLAGS = ("--config-dir", "-cd", "--config-path", "-cp")
_OTHER_CONFIG_FLAGS = (*_OTHER_CONFIG_DIR_FLAGS, "--config-name", "-cn")


def config_dir() -> str:
    """The Hydra config directory: ``$LOCALSGD_CONFIG_DIR``, else the checkout's ``configs/``, else the packaged copy.

    A checkout (run from the source tree, or an editable install) reads the top-level ``configs/``,
    the one copy of the YAML, so edits there take effect without reinstalling. A wheel carries that
    directory as ``localsgd/configs`` (see ``pyproject.toml``); the checkout is recognised by its
    ``pyproject.toml`` next to ``configs/``, so an unrelated ``configs/`` beside an installed package
    in site-packages is never taken for ours.
    """
    chosen = os.environ.get("LOCALSGD_CONFIG_DIR")
    if chosen:
        return chosen
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs" / "config.yaml").is_file():
        return str(checkout / "configs")
    packaged = resources.files("localsgd").joinpath("configs")
    if not packaged.joinpath("config.yaml").is_file():
        raise ConfigError(f"no config.yaml in {packaged}: this localsgd install lacks its configs; reinstall it, "
                          "or point LOCALSGD_CONFIG_DIR at a configs/ directory")
    return str(packaged)


def unknown_option(args: list[str], configs: Path) -> str | None:
    """A one-line error for a ``group=option`` override naming no ``configs/<group>/<option>.yaml``.

    Hydra refuses it as well, over a dozen lines with its search path; this names the group's options
    (so ``schedule=fixed_schema``, a schema rather than an option, is answered in one line). Overrides
    that Hydra resolves elsewhere (sweeps, packages, deletions, ``hydra/`` groups, another config
    directory or search path) are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(a.split("=")[0] in _OTHER_CONFIG_DIR_FLAGS or a.startswith("hydra.searchpath") for a in args):
        return None
    parser = OverridesParser.create()
    for arg in (a for a in args if "=" in a and not a.startswith("-")):
        try:
            override = parser.parse_override(arg)
        except HydraException:
            continue  # Hydra reports the syntax error itself
        group, option = override.key_or_group, override.value()
        folder = configs / group
        if (override.is_delete() or override.package is not None or group.startswith("hydra")
                or not isinstance(option, str) or "$" in option or not folder.is_dir()):
            continue
        if not (folder / f"{option}.yaml").is_file():
            names = sorted(f.stem for f in folder.glob("*.yaml"))
            return (f"{arg}: configs/{group}/ has no option {option!r}{did_you_mean(close_keys(option, names))}; "
                    f"choose one of {', '.join(names)}")
    return None


def _plain_overrides(args: list[str]) -> list[str] | None:
    """The overrides of ``args`` that compose the job's config, or None where a pre-check cannot stand in for Hydra.

    ``hydra.*`` and ``hydra/`` overrides configure Hydra, not the job, and are left out; sweeps (``a=1,2``,
    ranges, globs) and another config directory or primary config are left to Hydra altogether.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    if any(a.split("=")[0] in _OTHER_CONFIG_FLAGS or a.startswith("hydra.searchpath") for a in args):
        return None
    parser = OverridesParser.create()
    kept = []
    for arg in (a for a in args if "=" in a and not a.startswith("-")):
        try:
            override = parser.parse_override(arg)
        except HydraException:
            return None  # Hydra reports the syntax error itself
        if override.is_sweep_override():
            return None
        if not override.key_or_group.startswith("hydra"):
            kept.append(arg)
    return kept


def unknown_key(args: list[str], configs: Path) -> str | None:
    """A one-line error for a plain ``a.b=v`` override whose key the composed config does not have.

    Hydra refuses it in eight lines that advise ``+a.b=v``, which :func:`check_config` then refuses as an
    unknown key. Composing here first (a third of a second) names the key with its likely spellings among the
    keys of that section, the selected group option's included (``schedule.h`` finds ``schedule.H``).
    A value of the wrong type (``optimizer.lr=abc``), which Hydra reports in five lines, becomes one line
    too, the launcher's (:func:`localsgd.run.one_line`). Every other composition error is left to Hydra.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError

    overrides = _plain_overrides(args)
    if not overrides or not any("." in a.split("=")[0] and not a.startswith(("+", "~")) for a in overrides):
        return None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(configs.resolve()), version_base="1.3"):
            compose("config", overrides=overrides)
    except ConfigCompositionException as exc:
        cause = exc.__cause__
        refused = str(exc).split("'")[1] if str(exc).startswith("Could not override '") else None
        if not (refused and isinstance(cause, ConfigKeyError | ConfigAttributeError) and cause.full_key):
            if str(exc).startswith("Error merging override"):
                from .run import one_line

                return one_line(exc)
            return None
        missing = str(cause.full_key)  # the first missing part: ``traner`` of ``traner.max_steps``
        below = refused[len(missing):] if refused.startswith(missing) else ""
        arg = next((a for a in overrides if a.split("=")[0] == refused), refused)
        return unknown_keys_message([(arg, [k + below for k in suggest_keys(missing, cause.object_type)])])
    except Exception:  # noqa: BLE001 (anything else is Hydra's to report, in its own words)
        return None
    finally:
        GlobalHydra.instance().clear()
    return None


def experiment_overrides_choice(args: list[str], configs: Path) -> str | None:
    """A one-line warning where ``+experiment=X`` sets values of a group that the command line also chooses.

    A group the experiment selects with ``override /group: option`` yields to the command line's choice
    (``+experiment=resnet20_cifar10 trainer=smoke`` runs smoke's steps: the experiments keep their trainer
    settings in ``configs/trainer/<experiment>.yaml`` for that). Values the experiment states itself are
    merged after every group, so they still win over ``optimizer=adamw``'s; Hydra has no order that would
    let a command-line choice win over them, so say which keys keep the experiment's values.
    """
    from omegaconf import OmegaConf

    overrides = _plain_overrides(args) or []
    experiments = [a.split("=", 1)[1] for a in overrides if a.startswith("+experiment=")]
    chosen = {a.split("=", 1)[0]: a for a in overrides if "." not in a.split("=")[0] and a[0] not in "+~"}
    for name in experiments:
        path = configs / "experiment" / f"{name}.yaml"
        stated = OmegaConf.to_container(OmegaConf.load(path)) if path.is_file() else {}
        if not isinstance(stated, dict):
            continue
        clash = sorted(g for g in chosen if isinstance(stated.get(g), dict))
        if clash:
            keys = ", ".join(f"{g}.{k}" for g in clash for k in stated[g])
            return (f"warning: +experiment={name} sets {keys}, which win over the values of "
                    f"{', '.join(chosen[g] for g in clash)}; give them on the command line to change them")
    return None


REPORT_GRACE_S = 3.0  # how long ranks other than 0 wait for rank 0's one line before they exit


def target_overrides(args: list[str]) -> list[str]:
    """``model._target_=my_pkg.MyNet model.width=64`` as Hydra needs it: ``model=custom`` and ``++model.width=64``.

    A node of the user's own component has no schema, so its arguments are new keys, which Hydra takes only
    with ``+``/``++``; the group option ``custom`` (``configs/<group>/custom.yaml``, a bare ``_target_``) is
    selected when a ``_target_`` is given without a group option. Idempotent: the workers rewrite what the
    launcher already rewrote to the same.
    """
    out = list(args)
    for group in TARGET_GROUPS:
        chosen = [a.split("=", 1)[1] for a in out if a.split("=", 1)[0] == group]
        targeted = any(a.startswith(f"{group}._target_=") for a in out)
        if targeted and not chosen:
            out.insert(next(i for i, a in enumerate(out) if a.startswith(f"{group}._target_=")), f"{group}=custom")
            chosen = ["custom"]
        if chosen and chosen[-1] == "custom":
            out = [f"++{a}" if a.startswith(f"{group}.") and "=" in a and not a.startswith(f"{group}._target_=")
                   else a for a in out]
    return out


def report(problem: str, leaving: bool = True) -> None:
    """One line on stderr, from rank 0 only: every rank finds the same problem in the same config.

    When the rank is ``leaving`` (an error), the other ranks wait a moment before they exit: torchrun stops
    every worker as soon as the first one exits, and a rank that left first could have rank 0 stopped
    before it says the line.
    """
    if dist.read_env().rank == 0:
        print(f"localsgd: {problem}", file=sys.stderr, flush=True)
    elif leaving:
        time.sleep(REPORT_GRACE_S)


def check_ranks_agree(items: dict[str, object], digest: str) -> None:
    """All ranks must train the same config; name the keys that differ if they do not."""
    digests = dist.all_gather_object(digest)
    if len(set(digests)) == 1:
        return
    everyone = dist.all_gather_object(items)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    keys = sorted(k for r in odd for k in set(everyone[0]) | set(everyone[r])
                  if everyone[0].get(k) != everyone[r].get(k))
    detail = "; ".join(f"{k}: rank 0 has {everyone[0].get(k)!r}, rank {r} has {everyone[r].get(k)!r}"
                       for r in odd for k in dict.fromkeys(keys))
    raise ConfigError(f"ranks composed different configs ({detail}); launch every rank with the same overrides")


def task(cfg: DictConfig) -> float:
    from .trainer import run_training

    try:
        typed = check_config(cfg)  # before dist.init: every check, the launch's world size included
    except ConfigError as exc:
        report(str(exc))
        raise SystemExit(2) from None
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    items = flat_items(typed)
    digest = config_hash(items)
    dist.init(typed.comm.backend, typed.comm.init_timeout_s)
    try:
        if typed.sync.check_config_agreement:
            check_ranks_agree(items, digest)
        summary = run_training(typed, run_dir, items, digest)
        # Leave together: a rank tearing Gloo down while a peer still uses it can abort the peer.
        dist.barrier("shutdown")
    except ConfigError as exc:  # found once the data is built (a batch larger than a shard), alike on every rank
        report(str(exc))
        raise SystemExit(2) from None
    except LocalSGDError as exc:
        # Raised alike on every rank (a non-finite replica, ranks that disagree, a corrupt checkpoint):
        # one line from rank 0 instead of a Hydra traceback per rank.
        report(f"{type(exc).__name__}: {exc}")
        raise SystemExit(1) from None
    except dist.CollectiveTimeout as exc:
        # Only the ranks left waiting see it, each naming what it waited for: each says its line.
        print(f"localsgd: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
    finally:
        dist.destroy()
    return float(summary["final_eval_accuracy"])


@record
def multirun_under_launcher(args: list[str]) -> str | None:
    """Hydra's multirun inside torchrun makes one sweep per rank (``${now:}`` differs) whose jobs then wait
    for each other's files: refuse it in one line and point to the launcher that runs sweeps."""
    if not any(a in ("-m", "--multirun") for a in args) or dist.read_env().world_size <= 1:
        return None
    return ("multirun (-m) does not work under torchrun (every rank would start its own sweep); run sweeps "
            "without torchrun: python -m localsgd.train -m hydra/launcher=submitit_local ... (docs/launching.md)")


def main() -> None:
    register_configs()
    configs = Path(config_dir())
    sys.argv[1:] = target_overrides(sys.argv[1:])
    problem = (multirun_under_launcher(sys.argv[1:]) or unknown_option(sys.argv[1:], configs)
               or unknown_key(sys.argv[1:], configs))
    if problem:
        report(problem)
        os._exit(2)
    warning = experiment_overrides_choice(sys.argv[1:], configs)
    if warning:
        report(warning, leaving=False)
    if dist.read_env().rank > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    code: int | str | None = 0
    try:
        hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")(task)()
    except SystemExit as exc:
        code = exc.code
    # Everything is written and the process group is destroyed: leave without interpreter finalisation,
    # whose Gloo/TCPStore teardown occasionally turns a finished run (or a preemption's exit 75) into a
    # SIGABRT (dist.leave).
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    dist.leave(code or 0)


if __name__ == "__main__":
    main()
