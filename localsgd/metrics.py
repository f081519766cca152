"""Run outputs on rank 0: ``metrics.jsonl``, ``summary.json``, wandb, progress bar and summary table.

Only rank 0 writes (one output per run, not one per rank); other ranks get null objects with the same methods.
On resume, records past the checkpoint's step are dropped from ``metrics.jsonl`` so every step
appears exactly once in a run that was killed and restarted. Train records reach the log in batches
(:class:`TrainRecords`), all of them before each checkpoint commits.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from . import dist


class MetricsLog:
    """Append-only JSON-lines log of events (one object per line, each with an ``event`` field).

    The file stays open for the run and every record is flushed as it is written, so a crash loses no
    written record and a log line costs one ``write`` rather than an open and a close. Non-finite
    floats are written as ``null``: bare ``NaN``/``Infinity`` are not JSON and strict parsers reject them.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled
        self._file: Any = None

    def truncate_after(self, step: int) -> None:
        """Drop step-stamped records after ``step`` (left by a run that died after its checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        self.close()
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by the crash
            if rec.get("step", 0) <= step:
                kept.append(line)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.path, "a")  # noqa: SIM115 -- held for the run, closed by close()
        self._file.write(json.dumps(json_safe(record), sort_keys=True, allow_nan=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf) replaced by None, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class Tracker:
    """wandb from rank 0 (``logging.wandb=disabled|offline|online``); a no-op elsewhere."""

    def __init__(self, mode: str, run_dir: Path, config: dict[str, Any], project: str,
                 entity: str | None, group: str | None, name: str | None, run_id: str | None) -> None:
        self.run = None
        if mode == "disabled" or not dist.is_main():
            return
        import wandb

        self.run = wandb.init(mode=mode, project=project, entity=entity, group=group, name=name,
                              dir=str(run_dir), config=config, id=run_id, resume="allow" if run_id else None,
                              job_type="train")

    @property
    def run_id(self) -> str | None:
        return None if self.run is None else self.run.id

    def log(self, data: dict[str, Any], step: int) -> None:
        if self.run is not None:  # the record's "event" tag is not a metric
            self.run.log({k: v for k, v in data.items() if k != "event"}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


class RunLog:
    """Rank 0's text log: ``train.log`` in the run directory, and what the console shows.

    The banner, the resume point, stops and the summary go to both; progress and evaluation lines go
    to the file always and to the console only when the progress bar is off (under Slurm, say), so a
    crashed or batch-run job still says what it did. Each file line starts with a UTC time stamp; the
    file is appended to, so a resumed run continues its log.
    """

    def __init__(self, path: Path, enabled: bool, console_progress: bool) -> None:
        self.enabled = enabled
        self.console_progress = console_progress
        self._file: Any = open(path, "a") if enabled else None  # noqa: SIM115 -- held for the run

    def say(self, text: str, *, console: bool = True, stream: Any = None) -> None:
        if not self.enabled:
            return
        if console:
            print(text, file=stream or sys.stdout, flush=True)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._file.write("".join(f"{stamp} {line}\n" for line in text.strip("\n").splitlines()))
        self._file.flush()

    def progress(self, text: str) -> None:
        self.say(text, console=self.console_progress)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class StepFigures(Protocol):
    """What a logging window holds per step (``optim.StepOutput``): detached tensors."""

    loss: torch.Tensor
    logits: torch.Tensor | None
    targets: torch.Tensor | None


class TrainRecords:
    """Train records of the logging windows, reduced and written in batches, at least every ``max_seconds``.

    Why batches: a record reduces its window (a stack, a concatenation, an argmax, a host sync) and
    formats and flushes a JSON line. Once every ``log_every`` steps that code runs cold, and in a small
    model's loop it cost several per cent (``benchmarks/overhead.py``). K windows reduced together cost
    about one. Each record keeps its step and its values, which do not depend on how windows were
    batched (a resumed run writes the same numbers): the loss is the window's mean, summed in float64,
    and the accuracy an exact count. A record reaches ``write`` at most ``max_seconds`` (or
    ``max_windows`` windows) late. The trainer flushes before an evaluation record, a checkpoint (so
    every record up to it is on disk before it commits), a stop, the end and an error. Disabled (the
    ranks other than 0, which write nothing), it reduces nothing either.
    """

    def __init__(self, write: Callable[[dict[str, Any], int], None], enabled: bool = True, max_seconds: float = 1.0,
                 max_windows: int = 64) -> None:
        self.write, self.enabled, self.max_seconds, self.max_windows = write, enabled, max_seconds, max_windows
        self.pending: list[tuple[Sequence[StepFigures], dict[str, Any]]] = []
        self.flushed_at = time.perf_counter()

    def add(self, window: Sequence[StepFigures], record: dict[str, Any]) -> None:
        """Queue ``record`` (a train record lacking ``loss`` and ``accuracy``) for the steps of ``window``."""
        if not self.enabled:  # the other ranks: rank 0 writes every output
            return
        self.pending.append((window, record))
        if len(self.pending) >= self.max_windows or time.perf_counter() - self.flushed_at >= self.max_seconds:
            self.flush()

    def flush(self) -> None:
        """Reduce every queued window and hand each completed record, in order, to ``write``."""
        pending, self.pending = self.pending, []
        if pending:
            losses = torch.stack([o.loss for window, _ in pending for o in window]).tolist()
            accuracies = window_accuracies([window for window, _ in pending])
            start = 0
            for (window, record), accuracy in zip(pending, accuracies, strict=True):
                record["loss"] = math.fsum(losses[start : start + len(window)]) / len(window) if window else math.nan
                record["accuracy"] = accuracy
                start += len(window)
                self.write(record, len(window))
        self.flushed_at = time.perf_counter()

    def __enter__(self) -> TrainRecords:
        return self

    def __exit__(self, kind: type[BaseException] | None, *_: Any) -> None:
        if kind is None:
            self.flush()
            return
        try:  # a failing run still writes the records of its completed steps; its own error propagates
            self.flush()
        except Exception as err:  # noqa: BLE001 -- reported, not raised over the run's error
            print(f"localsgd: the last train records were not written: {err}", file=sys.stderr)


def window_accuracies(windows: Sequence[Sequence[StepFigures]]) -> list[float]:
    """Training accuracy of each window (NaN for one without logits): one argmax over all their batches
    and an exact count per window, so a window's figure does not depend on the others."""
    result = [float("nan")] * len(windows)
    scored = [i for i, w in enumerate(windows) if all(o.logits is not None and o.targets is not None for o in w)]
    if scored:
        outputs = [o for i in scored for o in windows[i]]
        correct = (torch.cat([o.logits for o in outputs]).argmax(dim=-1)  # type: ignore[misc]
                   == torch.cat([o.targets for o in outputs])).reshape(-1)  # type: ignore[misc]
        sizes = [sum(o.targets.numel() for o in windows[i]) for i in scored]  # type: ignore[union-attr]
        bounds = torch.tensor([0, *itertools.accumulate(sizes)], device=correct.device)
        totals = torch.nn.functional.pad(correct.cumsum(0), (1, 0))[bounds].tolist()
        for k, i in enumerate(scored):
            if sizes[k]:
                result[i] = (totals[k + 1] - totals[k]) / sizes[k]
    return result


class Progress:
    """A rank-0 tqdm bar showing loss, accuracy and communication so far."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        self.bar = None
        if enabled and dist.is_main() and os.environ.get("TQDM_DISABLE") != "1":
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="local SGD", unit="step", dynamic_ncols=True,
                            file=sys.stderr, mininterval=0.5)

    @property
    def shows_bar(self) -> bool:
        return self.bar is not None

    def update(self, n: int, record: dict[str, Any]) -> None:
        """Advance by ``n`` steps, showing a train record's loss, accuracy, rounds and bytes (formatted only
        when there is a bar)."""
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{record['loss']:.3f}", "acc": f"{record['accuracy']:.3f}",
                                  "rounds": str(record["comm_rounds"]), "comm": human_bytes(record["comm_bytes"])},
                                 refresh=False)
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def git_commit() -> str | None:
    """The commit of the localsgd checkout this code runs from (``+dirty`` if modified), else None."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None  # an installed package: no checkout to ask
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def summary_table(summary: dict[str, Any]) -> str:
    accuracy = summary["final_eval_accuracy"]
    rows = [
        *([("final eval accuracy", f"{accuracy:.4f}")] if accuracy is not None and accuracy == accuracy else []),
        ("final eval loss", f"{summary['final_eval_loss']:.4f}"),
        *([("final eval perplexity", f"{summary['final_eval_perplexity']:.3f}")]
          if "final_eval_perplexity" in summary else []),
        ("local steps / worker", f"{summary['steps']}"),
        ("samples (all workers)", f"{summary['samples']}"),
        *([("tokens (all workers)", f"{summary['tokens']:,}")] if "tokens" in summary else []),
        ("world size / backend", f"{summary['world_size']} / {summary['backend']}"),
        ("schedule", summary["schedule"]),
        ("communication rounds", f"{summary['comm_rounds']}"),
        ("communication payload", human_bytes(summary["comm_bytes"])),
        ("time in communication", f"{summary['comm_seconds']:.2f} s"),
        ("wall time", f"{summary['wall_seconds']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    values = max(20, *(len(str(v)) for _, v in rows))
    line = "+" + "-" * (width + 2) + "+" + "-" * (values + 2) + "+"
    body = [f"| {k:<{width}} | {v:>{values}} |" for k, v in rows]
    return "\n".join([line, *body, line])
