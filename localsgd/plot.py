"""``localsgd-plot RUN_DIR [RUN_DIR ...]``: figures of one or more runs from their ``metrics.jsonl``.

One file per quantity, every run overlaid (legend: the run directory's name, or ``--labels``), against
the local step:

* ``loss`` and ``accuracy``: training (solid, the mean over each logging window) and eval (dashed,
  markers; the ``eval`` records plus the final evaluation of the ``final`` record);
* ``lr``, ``batch_size``;
* ``local_steps``: H, the local steps per communication round. The ``H`` field of the train records
  when a run logs one; otherwise derived from how ``comm_rounds`` grows against ``step``
  (:func:`derive_local_steps`);
* ``comm_bytes``: cumulative averaging payload of one rank, in B/KB/MB/GB (a log axis when the runs
  differ by more than 50x);
* ``stn`` (only when a run has them): the ``hp/<name>``, ``hp_sigma/<name>`` and ``stn_val_loss``
  fields that ``optimizer=stn`` adds (:meth:`localsgd.optim.stn.StnPlugin.log_values`).

Reading is separate from drawing (:func:`load_run`), tolerant of what real runs leave: a line cut by
a crash is skipped with a warning, ``null`` (a non-finite value) becomes a gap in the line, a run
without eval records just has no eval line. matplotlib is an optional dependency and is imported only
when drawing, with the non-interactive Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
H_FIELD = "H"  # an explicit local-steps field in train records, preferred to deriving H when present
STN_PREFIXES = ("hp/", "hp_sigma/")
STN_KEYS = ("stn_val_loss",)
FORMATS = ("png", "pdf", "svg")
# The files every invocation writes (stn only when a run has STN fields), in the order they are written.
CORE_PLOTS = ("loss", "accuracy", "lr", "batch_size", "local_steps", "comm_bytes")
STN_PLOT = "stn"
MISSING_MATPLOTLIB = "localsgd-plot needs matplotlib: pip install 'localsgd[plot]'"
LOG_BYTES_RATIO = 50.0  # final payloads differing by more than this get a log axis
MARKER_POINTS = 100  # series up to this length get point markers

Series = dict[str, list[Any]]  # "step" and one list per field, aligned; None where a record has no finite value


class PlotError(Exception):
    """A problem with the command's input, reported as one line and exit status 2."""


@dataclass
class RunData:
    """The series of one run directory, ready to draw."""

    path: Path
    label: str
    train: Series = field(default_factory=dict)
    eval: Series = field(default_factory=dict)
    h_steps: list[int] = field(default_factory=list)
    h_values: list[float] = field(default_factory=list)
    h_logged: bool = False  # True: from the H field of the records; False: derived from comm_rounds
    skipped_lines: int = 0  # unreadable lines (a crash cuts the last one)

    @property
    def stn_keys(self) -> list[str]:
        return stn_keys(self.train)


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def number_or_none(value: Any) -> int | float | None:
    return value if is_number(value) else None


def read_records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The JSON objects of a ``metrics.jsonl`` and how many lines were unreadable (skipped)."""
    records, skipped = [], 0
    # errors="replace": a crash can cut a multi-byte character too; that line is then skipped as bad JSON.
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def to_series(records: list[dict[str, Any]]) -> Series:
    """Columns of the numeric fields of ``records`` by step, sorted by step, one record per step.

    A field missing from some records (STN fields, an H field added later) is None there. A step seen
    twice keeps its last record: the trainer already deduplicates a resumed run, this only keeps a
    hand-concatenated log drawable.
    """
    by_step: dict[int, dict[str, Any]] = {}
    for record in records:
        step = record.get("step")
        if is_number(step):
            by_step[int(step)] = record
    steps = sorted(by_step)
    keys = sorted({k for r in by_step.values() for k, v in r.items()
                   if k not in ("event", "step") and (v is None or is_number(v))})
    # A field that is null in every record but never a number carries nothing to draw.
    keys = [k for k in keys if any(is_number(by_step[s].get(k)) for s in steps)]
    series: Series = {"step": steps}
    for key in keys:
        series[key] = [number_or_none(by_step[s].get(key)) for s in steps]
    return series


def derive_local_steps(steps: Sequence[int], rounds: Sequence[Any]) -> tuple[list[int], list[float]]:
    """H at each train record from the cumulative ``comm_rounds``: steps per round over the longest stretch of
    consecutive logging windows that one constant H explains.

    Each window (previous record, this record] of W steps holding c rounds bounds a constant H to
    [W/(c+1), W/(c-1)] (a periodic sync lands floor(W/H) or ceil(W/H) times in it). Windows are merged
    while their bounds intersect and every record of the stretch gets its steps/rounds, so a run at H=8
    logged every 25 steps reads 8 throughout, not the 8.33 and 6.25 of single windows; a new stretch starts
    where H changed. Windows whose length is a multiple of H give exactly Δsteps/Δrounds. A stretch
    without any round (an H longer than the run so far) gives no points; a null count is skipped.
    """
    stretches: list[list[tuple[int, int, int]]] = []  # runs of windows (start step, end step, rounds in it)
    low, high = 0.0, math.inf
    last_step, last_rounds = 0, 0
    for step, count in zip(steps, rounds):
        if count is None:
            continue
        if count < last_rounds or step <= last_step:  # a counter that went back (not this trainer's): start afresh
            last_step, last_rounds, low, high = step, count, math.inf, 0.0
            continue
        width, grown = step - last_step, count - last_rounds
        window_low, window_high = width / (grown + 1), width / (grown - 1) if grown > 1 else math.inf
        if stretches and max(low, window_low) <= min(high, window_high):
            stretches[-1].append((last_step, step, grown))
            low, high = max(low, window_low), min(high, window_high)
        else:
            stretches.append([(last_step, step, grown)])
            low, high = window_low, window_high
        last_step, last_rounds = step, count
    out_steps: list[int] = []
    out_h: list[float] = []
    for stretch in stretches:
        total_rounds = sum(grown for _, _, grown in stretch)
        if total_rounds:
            per_round = (stretch[-1][1] - stretch[0][0]) / total_rounds
            out_steps.extend(end for _, end, _ in stretch)
            out_h.extend([per_round] * len(stretch))
    return out_steps, out_h


def eval_series(eval_records: list[dict[str, Any]], final_records: list[dict[str, Any]]) -> Series:
    """Eval loss/accuracy by step: the ``eval`` records, then the final evaluation at the last step.

    The trainer does not write an ``eval`` record at the last step; the final record's
    ``final_eval_loss``/``final_eval_accuracy`` are that evaluation (of the averaged model).
    """
    as_eval = [{"step": r.get("step"), "eval_loss": r.get("final_eval_loss"),
                "eval_accuracy": r.get("final_eval_accuracy")} for r in final_records]
    series = to_series([*eval_records, *as_eval])
    return {"step": series["step"], **{k: series.get(k, [None] * len(series["step"]))
                                      for k in ("eval_loss", "eval_accuracy")}}


def stn_keys(train: Series) -> list[str]:
    """The STN fields of a train series, each hyperparameter's value then its scale, the val loss last."""
    names = sorted({k.split("/", 1)[1] for k in train if k.startswith(STN_PREFIXES)})
    ordered = [f"{prefix}{name}" for name in names for prefix in STN_PREFIXES]
    return [k for k in [*ordered, *STN_KEYS] if k in train]


def load_run(run_dir: Path | str, label: str | None = None) -> RunData:
    """Read ``run_dir/metrics.jsonl`` into the series that are drawn; PlotError when there is no such file."""
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise PlotError(f"no run directory {run_dir}")
    if not path.is_file():
        raise PlotError(f"no {METRICS_FILE} in {run_dir} (not a run directory, or the run never logged)")
    records, skipped = read_records(path)
    by_event: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_event.setdefault(str(record.get("event")), []).append(record)
    run = RunData(path=run_dir, label=label or run_dir.resolve().name, skipped_lines=skipped)
    run.train = to_series(by_event.get("train", []))
    run.eval = eval_series(by_event.get("eval", []), by_event.get("final", []))
    logged = run.train.get(H_FIELD)
    if logged is not None:
        run.h_logged = True
        points = [(s, float(h)) for s, h in zip(run.train["step"], logged) if h is not None]
        run.h_steps, run.h_values = [s for s, _ in points], [h for _, h in points]
    else:
        run.h_steps, run.h_values = derive_local_steps(run.train["step"], run.train.get("comm_rounds", []))
    return run


def run_labels(run_dirs: Sequence[Path], labels: str | None) -> list[str]:
    """Legend names: ``--labels`` (comma-separated), else each directory's name, with its parent when names clash."""
    if labels is not None:
        names = [name.strip() for name in labels.split(",")]
        if len(names) != len(run_dirs):
            raise PlotError(f"--labels names {len(names)} runs but {len(run_dirs)} run directories were given")
        return names
    names = [d.resolve().name for d in run_dirs]
    if len(set(names)) < len(names):  # e.g. outputs/a/run and outputs/b/run
        names = [f"{d.resolve().parent.name}/{d.resolve().name}" for d in run_dirs]
    return names


def format_bytes(value: float, _position: Any = None) -> str:
    """A tick label in decimal units (as the summary table's): 0 B, 500 KB, 1.5 MB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 999.5 or unit == "TB":
            return f"{value:.3g} {unit}"
        value /= 1000
    return f"{value:.3g} TB"


def _floats(values: Sequence[Any]) -> list[float]:
    # matplotlib breaks a line at NaN, so a null (a non-finite value in the run) shows as a gap.
    return [math.nan if v is None else float(v) for v in values]


def _dots(steps: Sequence[Any]) -> dict[str, Any]:
    # Markers on short series: a point between two nulls has no segment to draw and would vanish otherwise.
    return {"marker": ".", "markersize": 4} if len(steps) <= MARKER_POINTS else {}


def _has_points(values: Sequence[Any]) -> bool:
    return any(v is not None and math.isfinite(v) for v in values)


def draw(runs: Sequence[RunData], out_dir: Path, fmt: str = "png") -> list[Path]:
    """Write the figures of ``runs`` to ``out_dir`` as ``<name>.<fmt>``; returns the files written."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    out_dir.mkdir(parents=True, exist_ok=True)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    many = len(runs) > 1
    written: list[Path] = []

    def new_axes(title: str, ylabel: str) -> tuple[Any, Any]:
        fig = Figure(figsize=(7, 4.2), layout="constrained")
        FigureCanvasAgg(fig)  # Agg, not pyplot: nothing interactive, no global figure state
        ax = fig.add_subplot()
        ax.set_title(title)
        ax.set_xlabel("step (local steps per worker)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        return fig, ax

    def save(fig: Any, ax_list: Sequence[Any], name: str) -> None:
        for ax in ax_list:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize="small")
            else:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
        path = out_dir / f"{name}.{fmt}"
        fig.savefig(path, format=fmt, dpi=120)
        written.append(path)

    def train_and_eval(name: str, key: str, title: str, ylabel: str) -> None:
        fig, ax = new_axes(title, ylabel)
        for run, color in zip(runs, colors):
            train_values = run.train.get(key, [])
            if _has_points(train_values):
                ax.plot(run.train["step"], _floats(train_values), color=color,
                        label=f"{run.label} train" if many else "train", **_dots(run.train["step"]))
            eval_values = run.eval.get(f"eval_{key}", [])
            if _has_points(eval_values):
                ax.plot(run.eval["step"], _floats(eval_values), color=color, linestyle="--", marker="o",
                        markersize=4, label=f"{run.label} eval" if many else "eval")
        save(fig, [ax], name)

    def per_run(name: str, key: str, title: str, ylabel: str, **style: Any) -> Any:
        fig, ax = new_axes(title, ylabel)
        for run, color in zip(runs, colors):
            values = run.train.get(key, [])
            if _has_points(values):
                ax.plot(run.train["step"], _floats(values), color=color, label=run.label,
                        **{**_dots(run.train["step"]), **style})
        return fig, ax

    suffix = f" ({len(runs)} runs)" if many else f": {runs[0].label}"
    train_and_eval("loss", "loss", f"Loss{suffix}", "loss (train: window mean; eval: averaged model)")
    train_and_eval("accuracy", "accuracy", f"Accuracy{suffix}", "accuracy")
    fig, ax = per_run("lr", "lr", f"Learning rate{suffix}", "learning rate")
    save(fig, [ax], "lr")
    fig, ax = per_run("batch_size", "batch_size", f"Batch size per worker{suffix}", "batch size (samples)",
                      drawstyle="steps-post")
    save(fig, [ax], "batch_size")

    fig, ax = new_axes(f"Local steps per round H{suffix}", "H (local steps per round)")
    for run, color in zip(runs, colors):
        if run.h_values:
            how = "logged" if run.h_logged else "from comm_rounds"
            ax.plot(run.h_steps, run.h_values, color=color, marker="o", markersize=3,
                    label=f"{run.label} ({how})" if many else how)
    ax.set_ylim(bottom=0)  # H >= 1: from zero, a constant H reads as constant rather than as a zoomed-in wobble
    save(fig, [ax], "local_steps")

    fig, ax = per_run("comm_bytes", "comm_bytes", f"Cumulative communication{suffix}",
                      "averaging payload of one rank (bytes)")
    finals = [max(v for v in run.train["comm_bytes"] if v is not None) for run in runs
              if _has_points(run.train.get("comm_bytes", []))]
    if finals and min(finals) > 0 and max(finals) / min(finals) > LOG_BYTES_RATIO:
        ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(format_bytes))
    save(fig, [ax], "comm_bytes")

    keys = list(dict.fromkeys(k for run in runs for k in run.stn_keys))
    if keys:
        columns = 2 if len(keys) > 1 else 1
        rows = math.ceil(len(keys) / columns)
        fig = Figure(figsize=(6 * columns, 3.2 * rows), layout="constrained")
        FigureCanvasAgg(fig)
        fig.suptitle(f"STN hyperparameters{suffix}")
        axes = [fig.add_subplot(rows, columns, i + 1) for i in range(len(keys))]
        for ax, key in zip(axes, keys):
            ax.set_title(key, fontsize="medium")
            ax.set_xlabel("step (local steps per worker)")
            ax.set_ylabel("validation loss" if key in STN_KEYS else "value")
            ax.grid(alpha=0.3)
            for run, color in zip(runs, colors):
                values = run.train.get(key, [])
                if _has_points(values):
                    ax.plot(run.train["step"], _floats(values), color=color, label=run.label,
                            **_dots(run.train["step"]))
        save(fig, axes, STN_PLOT)
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="localsgd-plot", description="Plot loss, accuracy, LR, batch size, H and communication of runs.")
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (default: the run directory for one run, ./plots for several)")
    parser.add_argument("--format", choices=FORMATS, default="png", help="file format (default: png)")
    parser.add_argument("--labels", default=None, help="comma-separated legend names, one per run directory")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        labels = run_labels(args.run_dirs, args.labels)
        runs = [load_run(d, label) for d, label in zip(args.run_dirs, labels)]
    except PlotError as err:
        print(f"localsgd-plot: {err}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401 -- an optional extra: ask for it before anything is drawn
    except ImportError:
        print(MISSING_MATPLOTLIB, file=sys.stderr)
        return 2
    for run in runs:
        if run.skipped_lines:
            print(f"localsgd-plot: skipped {run.skipped_lines} unreadable line(s) of {run.path / METRICS_FILE} "
                  "(a run cut short?)", file=sys.stderr)
        if not run.train["step"] and not run.eval["step"]:
            print(f"localsgd-plot: no train or eval records in {run.path / METRICS_FILE}", file=sys.stderr)
    if not any(run.train["step"] or run.eval["step"] for run in runs):
        print("localsgd-plot: nothing to plot", file=sys.stderr)
        return 2
    out_dir = args.out if args.out is not None else (args.run_dirs[0] if len(runs) == 1 else Path("plots"))
    for path in draw(runs, out_dir, args.format):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
