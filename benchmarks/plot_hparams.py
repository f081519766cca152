"""Plot the hyperparameter schedules a Self-Tuning Network learned (``optimizer=stn``) from a run's metrics.

The trainer adds the STN plugin's ``log_values()`` to every ``train`` record of ``metrics.jsonl``:
``hp/<name>`` (the constrained value, MacKay et al., ICLR 2019, arXiv 1903.03088), ``hp_sigma/<name>``
(the perturbation scale σ = softplus(s), in unconstrained units) and ``stn_val_loss`` (the last hyper
step's validation loss). This script draws one panel per hyperparameter over the training steps, plus
the scales and the validation loss, for one or more run directories (overlaid, e.g. several seeds).

Usage: python benchmarks/plot_hparams.py outputs/runs/<run> [<run> ...] [--out stn_hparams.png]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.figures import pyplot, save_figure  # noqa: E402


def read_train_records(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if r.get("event") == "train"]


def series(records: list[dict[str, Any]], prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    """``{name: (steps, values)}`` for every key ``<prefix><name>`` (finite values only)."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith(prefix) and isinstance(value, int | float) and math.isfinite(value):
                steps, values = out.setdefault(key[len(prefix):], ([], []))
                steps.append(int(r["step"]))
                values.append(float(value))
    return out


def plot(run_dirs: list[Path], out: Path) -> list[str]:
    plt = pyplot()

    runs = [(d, read_train_records(d)) for d in run_dirs]
    names = sorted({n for _, recs in runs for n in series(recs, "hp/")})
    if not names:
        raise SystemExit(f"no hp/<name> values in {[str(d) for d in run_dirs]}: were they trained with optimizer=stn?")
    panels = [*names, "σ (all)", "validation loss"]
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.6 * rows), squeeze=False)
    for i, (run_dir, recs) in enumerate(runs):
        label = run_dir.name
        hp, sigma = series(recs, "hp/"), series(recs, "hp_sigma/")
        for ax, name in zip(axes.flat, names):
            if name in hp:
                ax.plot(*hp[name], color=f"C{i}", lw=1.2, label=label)
        for j, (_, (steps, values)) in enumerate(sorted(sigma.items())):
            axes.flat[len(names)].plot(steps, values, color=f"C{i}", lw=0.8, alpha=0.4 + 0.6 / (j + 1))
        val = [(int(r["step"]), float(r["stn_val_loss"])) for r in recs
               if isinstance(r.get("stn_val_loss"), int | float) and math.isfinite(r["stn_val_loss"])]
        if val:
            axes.flat[len(names) + 1].plot(*zip(*val), color=f"C{i}", lw=1.0, label=label)
    for ax, title in zip(axes.flat, panels):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, out)
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="run directories (or metrics.jsonl files)")
    p.add_argument("--out", type=Path, default=Path("stn_hparams.png"))
    args = p.parse_args(argv)
    names = plot(args.runs, args.out)
    print(f"{args.out}: {', '.join(names)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
