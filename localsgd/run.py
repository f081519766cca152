"""``localsgd-run``: start ``localsgd.train`` on N workers with one line per error instead of torchrun's wall of text.

``torchrun -m localsgd.train`` reports every failure twice over: a traceback per rank, then torchrun's own
``ChildFailedError`` block (and a Ctrl-C ends in its ``SignalException`` traceback). This launcher runs the
same elastic agent in-process (:func:`torch.distributed.run.run`), but

* composes the config with Hydra's compose API and runs :func:`localsgd.config.check_config` with the launch's
  world size *before* any worker starts, so a bad override costs one ``localsgd: ...`` line and exit 2;
* turns a worker failure into one ``localsgd-run: rank R exited with code C`` line and exits with that code
  (2 config error, 75 stopped after a checkpoint, 128+N killed by signal N);
* relays SIGINT/SIGTERM/SIGUSR1 to the workers and keeps watching them, so a Ctrl-C or a preemption ends
  with the workers' own exit code (75 once they committed a checkpoint), with no traceback;
* keeps torch's elastic logging (the OMP_NUM_THREADS banner, "Sending process ... closing signal") quiet
  unless ``--verbose``.

Worker stdout and stderr are the launcher's own (nothing is redirected), so the progress bar and the
summary appear as under torchrun. Raw ``torchrun ... -m localsgd.train`` keeps working; this module only
adds a front end.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

WORKER_MODULE = "localsgd.train"
CONFIG_ERROR_EXIT = 2
GENERIC_FAILURE_EXIT = 1
REQUEUE_EXIT = 75  # localsgd.trainer.REQUEUE_EXIT_CODE: stopped on request after a checkpoint (it says so itself)
# The signals the workers turn into "stop at the next sync with a checkpoint" (localsgd.trainer); the
# launcher relays them instead of letting torch's agent tear the workers down (which loses their exit code).
RELAYED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# Signals torch's agent still handles itself (raise SignalException, close the workers, re-raise).
AGENT_SIGNALS = "SIGHUP,SIGQUIT"
# After this many relayed signals a further one falls back to torch's shutdown (signal, wait, SIGKILL).
RELAYS_BEFORE_TEARDOWN = 2
MULTIRUN_FLAGS = ("-m", "--multirun")
# torchrun options the launcher decides itself: the worker is always ``python -m localsgd.train``, and
# signal handling is the relay above.
OWNED_TORCHRUN_OPTIONS = ("--module", "-m", "--no-python", "--no_python", "--run-path", "--run_path",
                          "--signals-to-handle", "--signals_to_handle", "-h", "--help")


class LaunchError(Exception):
    """A problem found before any worker starts; reported as one line, exit 2."""


def default_nproc_per_node() -> int:
    """One worker per visible GPU when CUDA is available, else 2 CPU workers (``make run``'s default)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 2


def torchrun_parser() -> argparse.ArgumentParser:
    from torch.distributed.run import get_args_parser

    return get_args_parser()


def launcher_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localsgd-run",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage="localsgd-run [--nproc-per-node N] [--nnodes N|MIN:MAX] [--verbose] [torchrun options] "
              "[hydra overrides ...]",
        description="Start `python -m localsgd.train` on N workers through torch's elastic launcher (torchrun), "
                    "after checking the config\nonce in this process: a bad override fails in one line "
                    "(exit 2) before any worker starts.",
        epilog="Every other torchrun option is passed through, e.g. --rdzv-endpoint HOST:PORT, --rdzv-id, "
               "--rdzv-backend,\n--max-restarts, --monitor-interval, --shutdown-timeout, --log-dir, --node-rank "
               "(see `torchrun --help`).\nWith one node and no rendezvous option the launch is --standalone "
               "(a free local port).\n"
               "Everything else is a Hydra override for localsgd.train (data=digits trainer.max_steps=500 ...).\n"
               "Multirun (-m) is not supported here: use `python -m localsgd.train -m "
               "hydra/launcher=submitit_local ...`.\n\n"
               "Exit codes: the failing worker's (2 config error, 75 stopped after a checkpoint: run again with "
               "the same\nhydra.run.dir to resume, 128+N killed by signal N). Ctrl-C asks the workers to stop at "
               "the next sync\nwith a checkpoint (exit 75); a second Ctrl-C stops them at once (exit 130).")
    parser.add_argument("--nproc-per-node", "--nproc_per_node", default=None, metavar="N",
                        help="workers on this node: an integer, or gpu/cpu/auto as torchrun takes it "
                             "(default: the number of visible GPUs when CUDA is available, else 2)")
    parser.add_argument("--nnodes", default="1", metavar="N|MIN:MAX",
                        help="nodes, N or MIN:MAX (default: 1, standalone)")
    parser.add_argument("--verbose", action="store_true", help="show torch's elastic agent logging (INFO)")
    return parser


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str], list[str]]:
    """Sort the command line into (launcher options, torchrun options, Hydra overrides).

    A Hydra override never starts with ``-`` (``key=value``, ``+key=value``, ``~key``), so every dash
    argument is an option of ours or of torchrun (with its value, when it takes one); ``--`` ends the options.
    """
    own_actions = launcher_parser()._option_string_actions  # argparse keeps no public option table
    torch_actions = torchrun_parser()._option_string_actions
    own: list[str] = []
    passed: list[str] = []
    overrides: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg == "--":
            overrides += args
            break
        if not arg.startswith("-"):
            overrides.append(arg)
            continue
        name, has_value, _ = arg.partition("=")
        if name in MULTIRUN_FLAGS:
            raise LaunchError("multirun (-m) is not supported under localsgd-run (torchrun + Hydra multirun makes one "
                              "sweep dir per rank); run sweeps with `python -m localsgd.train -m "
                              "hydra/launcher=submitit_local ...` (docs/launching.md)")
        if name in own_actions and name not in ("-h", "--help"):
            target, action = own, own_actions[name]
        elif name in ("-h", "--help"):
            own.append(arg)
            continue
        elif name in torch_actions and name not in OWNED_TORCHRUN_OPTIONS:
            target, action = passed, torch_actions[name]
        else:
            raise LaunchError(f"unknown option {name}: localsgd-run takes its own and torchrun's options, then Hydra "
                              "overrides (key=value); see localsgd-run --help")
        target.append(arg)
        if action.nargs != 0 and not has_value:
            if not args:
                raise LaunchError(f"option {name} needs a value")
            target.append(args.pop(0))
    return own, passed, overrides


def node_counts(nnodes: str) -> tuple[int, int]:
    """``N`` or ``MIN:MAX`` as (min, max) nodes."""
    try:
        parts = [int(p) for p in nnodes.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or not 0 < parts[0] <= parts[-1]:
        raise LaunchError(f"--nnodes={nnodes}: expected N or MIN:MAX with 0 < MIN <= MAX")
    return parts[0], parts[-1]


def local_workers(nproc_per_node: str | None) -> int:
    if nproc_per_node is None:
        return default_nproc_per_node()
    from torch.distributed.run import determine_local_world_size

    try:
        count = determine_local_world_size(nproc_per_node)
    except ValueError as exc:
        raise LaunchError(f"--nproc-per-node={nproc_per_node}: {exc}") from None
    if count < 1:
        raise LaunchError(f"--nproc-per-node={nproc_per_node}: must be >= 1")
    return count


def one_line(exc: BaseException) -> str:
    """Hydra's and OmegaConf's messages span lines (override, hint, full_key ...); join them."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or type(exc).__name__
    cause = exc.__cause__
    if cause is not None and str(cause).strip():  # "Error merging override ..." names no reason; its cause does
        text += ": " + str(cause).strip().splitlines()[0]
    return text


def validate(overrides: list[str], world_size: int, local_world_size: int) -> None:
    """Compose the config as the workers will and check it for this launch; raise ConfigError/LaunchError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from . import train
    from .config import check_config, register_configs
    from .errors import ConfigError

    register_configs()
    configs = train.config_dir()
    problem = train.unknown_option(overrides, Path(configs))
    if problem:
        raise ConfigError(problem)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=os.path.abspath(configs), version_base="1.3", job_name="localsgd"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        # A key Hydra refuses gets the workers' own one line, with its did-you-mean; anything else Hydra's reason.
        raise LaunchError(train.unknown_key(overrides, Path(configs)) or one_line(exc)) from None
    check_config(cfg, world_size=world_size, local_world_size=local_world_size)


def quiet_torch_logging(verbose: bool) -> None:
    """torch's elastic loggers each set their own level (WARNING, or $LOGLEVEL) and print via logging's
    last-resort handler; route them through one handler of ours instead: INFO with --verbose, else nothing."""
    import torch.distributed.launcher.api  # noqa: F401  (creates the agent's loggers)
    import torch.distributed.run  # noqa: F401

    top = logging.getLogger("torch.distributed")
    top.propagate = False
    top.handlers.clear()
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[torch elastic] %(levelname)s %(message)s"))
        top.addHandler(handler)
        level = logging.INFO
    else:
        top.addHandler(logging.NullHandler())
        level = logging.CRITICAL + 1
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if name.startswith("torch.distributed") and isinstance(logger, logging.Logger):
            logger.setLevel(level)
    top.setLevel(level)


def live_workers() -> list[object]:
    """The worker processes torch's agent is running now.

    The agent keeps them to itself (no public handle from ``elastic_launch``); each is a
    ``SubprocessHandler`` whose ``proc`` is the ``Popen``, so find the live ones among the objects.
    """
    from torch.distributed.elastic.multiprocessing.subprocess_handler import SubprocessHandler

    return [obj for obj in gc.get_objects()
            # type(), not isinstance(): some torch objects warn when their __class__ is read
            if issubclass(type(obj), SubprocessHandler) and obj.proc.poll() is None]


class SignalRelay:
    """Pass SIGINT/SIGTERM/SIGUSR1 on to the workers, which stop at the next sync, checkpoint and exit 75.

    torch's agent would raise ``SignalException``, tear the workers down and lose their exit codes; relayed,
    the agent keeps monitoring and reports the exits as usual. The workers run in their own sessions (torch
    starts them so), so a terminal's Ctrl-C reaches only this process. Past ``RELAYS_BEFORE_TEARDOWN`` relays
    (workers that do not stop), or before any worker runs, fall back to torch's shutdown.
    """

    def __init__(self) -> None:
        self.relayed: list[signal.Signals] = []

    def install(self) -> None:
        for sig in RELAYED_SIGNALS:
            signal.signal(sig, self.relay)

    def uninstall(self) -> None:
        """The agent is done: a late signal must not turn a finished launch's exit code into a traceback."""
        for sig in RELAYED_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def relay(self, signum: int, frame: object) -> None:
        from torch.distributed.elastic.multiprocessing.api import SignalException

        sig = signal.Signals(signum)
        workers = live_workers()
        if not workers or len(self.relayed) >= RELAYS_BEFORE_TEARDOWN:
            raise SignalException(f"localsgd-run got {sig.name}", sigval=sig)
        self.relayed.append(sig)
        for worker in workers:
            try:
                os.killpg(worker.proc.pid, sig)  # type: ignore[attr-defined]  # the group, as torch's close does
            except ProcessLookupError:
                pass


def exit_code(worker_code: int) -> int:
    """A worker's exit status as a shell reports it: 128 + N for a worker killed by signal N."""
    return 128 - worker_code if worker_code < 0 else worker_code


def failure_line(rank: int, worker_code: int) -> str | None:
    """The launcher's one line on a failed launch; None where the worker's own ``localsgd:`` line says it all."""
    if worker_code in (CONFIG_ERROR_EXIT, REQUEUE_EXIT):
        return None
    if worker_code < 0:
        try:
            name = signal.Signals(-worker_code).name
        except ValueError:
            name = f"signal {-worker_code}"
        return f"localsgd-run: rank {rank} was killed by {name} (exit {exit_code(worker_code)})"
    return f"localsgd-run: rank {rank} exited with code {worker_code}"


def launch(torch_argv: list[str], relay: SignalRelay) -> int:
    """Run torch's elastic agent here; return the exit code (0, or the first failed worker's).

    A launch stopped by a relayed signal whose workers did not stop with a checkpoint (a second Ctrl-C)
    exits 128 + the signal, as an interrupted command does, whichever rank fell first.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    relay.install()
    try:
        run(parse_args(torch_argv))
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        if relay.relayed and failure.exitcode != REQUEUE_EXIT:
            sig = relay.relayed[0]
            print(f"localsgd-run: stopped by {sig.name} (rank {rank} exited with code {exit_code(failure.exitcode)})",
                  file=sys.stderr, flush=True)
            return 128 + int(sig)
        line = failure_line(rank, failure.exitcode)
        if line:
            print(line, file=sys.stderr, flush=True)
        return exit_code(failure.exitcode)
    except SignalException as exc:  # torch's shutdown ran: the workers got the signal, then SIGKILL if needed
        print(f"localsgd-run: stopped by {exc.sigval.name}", file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    except Exception as exc:  # rendezvous timeouts, a bad torchrun option value ...
        print(f"localsgd-run: {type(exc).__name__}: {one_line(exc)}", file=sys.stderr, flush=True)
        return GENERIC_FAILURE_EXIT
    finally:
        relay.uninstall()
    return 0


def torchrun_argv(passed: list[str], nnodes: str, nproc: int, overrides: list[str]) -> list[str]:
    rendezvous = ("--standalone", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-backend", "--rdzv_backend",
                  "--rdzv-id", "--rdzv_id", "--master-addr", "--master_addr", "--master-port", "--master_port")
    chose_rendezvous = any(arg.partition("=")[0] in rendezvous for arg in passed)
    standalone = [] if chose_rendezvous or node_counts(nnodes)[1] > 1 else ["--standalone"]
    return [*passed, *standalone, f"--nnodes={nnodes}", f"--nproc-per-node={nproc}",
            f"--signals-to-handle={AGENT_SIGNALS}", "-m", WORKER_MODULE, *overrides]


def main(argv: Sequence[str] | None = None) -> int:
    from . import train
    from .errors import ConfigError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        own, passed, overrides = split_argv(argv)
        overrides = train.target_overrides(overrides)
        options = launcher_parser().parse_args(own)
        min_nodes, _ = node_counts(options.nnodes)
        nproc = local_workers(options.nproc_per_node)
        # MIN:MAX: the smallest launch; each worker checks again with the world size it got.
        validate(overrides, world_size=min_nodes * nproc, local_world_size=nproc)
    except (ConfigError, LaunchError) as exc:
        print(f"localsgd: {exc}", file=sys.stderr, flush=True)
        return CONFIG_ERROR_EXIT
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    quiet_torch_logging(options.verbose)
    # One start time for every worker and restart of this launch: the run directory's name (config.run_id).
    os.environ.setdefault("LOCALSGD_LAUNCH_TIME", str(int(time.time())))
    return launch(torchrun_argv(passed, options.nnodes, nproc, overrides), SignalRelay())


if __name__ == "__main__":
    sys.exit(main())
