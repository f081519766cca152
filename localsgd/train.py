"""Entry point: ``torchrun --nproc_per_node=K -m localsgd.train [hydra overrides]``.

Thin on purpose (torchtitan's ``train.py`` layout): compose and validate the config *before* any
process group exists, start the group, check that every rank composed the same config, run the
worker loop of :mod:`localsgd.trainer`, and always tear the group down. Non-zero ranks tell Hydra
not to write its own ``.hydra/`` and logs, so a run has exactly one output directory, named the same
on every rank.
"""

from __future__ import annotations

import logging
import os
import sys
from importlib import resources
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from torch.distributed.elastic.multiprocessing.errors import record

from . import dist
from .config import check_config, config_hash, flat_items, register_configs
from .errors import ConfigError


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

    if any(a.split("=")[0] in ("--config-dir", "-cd", "--config-path", "-cp") or a.startswith("hydra.searchpath")
           for a in args):
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
            options = ", ".join(sorted(f.stem for f in folder.glob("*.yaml")))
            return f"{arg}: configs/{group}/ has no option {option!r}; choose one of {options}"
    return None


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
        print(f"localsgd: {exc}", file=sys.stderr, flush=True)
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
    finally:
        dist.destroy()
    return float(summary["final_eval_accuracy"])


@record
def main() -> None:
    register_configs()
    problem = unknown_option(sys.argv[1:], Path(config_dir()))
    if problem:
        print(f"localsgd: {problem}", file=sys.stderr, flush=True)
        os._exit(2)
    if dist.read_env().rank > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
    code: int | str | None = 0
    try:
        hydra.main(version_base="1.3", config_path=config_dir(), config_name="config")(task)()
    except SystemExit as exc:
        code = exc.code
    # Everything is written and the process group is destroyed. Leave without interpreter
    # finalisation: a Gloo/TCPStore background thread torn down by a static destructor there
    # occasionally aborts the process ("terminate called without an active exception", about 1
    # run in 12 on a loaded 2-core machine), which would turn a finished run (or a preemption's
    # exit 75) into a SIGABRT.
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
