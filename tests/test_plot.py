"""``localsgd-plot``: the series read from ``metrics.jsonl`` files (synthetic ones with the faults of real
runs: a line cut by a crash, nulls, no eval records), H derived from ``comm_rounds``, the files written,
the message without matplotlib, and the plots of a real 2-rank ``torchrun`` run.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from localsgd import plot

from .launch_helpers import ROOT, TINY, env_for, output, torchrun

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CORE_FILES = [f"{name}.png" for name in plot.CORE_PLOTS]


def train_record(step: int, rounds: int, **extra: object) -> dict[str, object]:
    return {"event": "train", "step": step, "loss": 2.0 / step, "accuracy": step / 100, "lr": 0.1,
            "batch_size": 16, "samples": 32 * step, "comm_rounds": rounds, "comm_bytes": 1000 * rounds,
            "comm_seconds": 0.001 * rounds, **extra}


def write_log(run_dir: Path, records: list[dict[str, object]], cut_tail: str = "") -> Path:
    """A metrics.jsonl as the trainer writes it (``null`` for non-finite values), plus a cut last line."""
    run_dir.mkdir(parents=True)
    lines = [json.dumps(r, sort_keys=True) + "\n" for r in records]
    (run_dir / "metrics.jsonl").write_text("".join(lines) + cut_tail)
    return run_dir


@pytest.fixture
def stn_run(tmp_path: Path) -> Path:
    """A finished STN run at H=5 logged every 10 steps: eval records, a final record, a NaN loss and hp fields."""
    stn = {"hp/dropout": 0.05, "hp_sigma/dropout": 1.0, "stn_val_loss": None}
    records = [
        {"event": "start", "step": 0, "world_size": 2, "backend": "gloo", "resumed": False, "restart_count": 0},
        train_record(10, 2, **stn),
        train_record(20, 4, **{**stn, "hp/dropout": 0.07, "stn_val_loss": 1.5}),
        {"event": "eval", "step": 20, "eval_loss": 1.25, "eval_accuracy": 0.5},
        {**train_record(30, 6, **{**stn, "hp/dropout": 0.09, "stn_val_loss": 1.25}), "loss": None},
        train_record(40, 8, **{**stn, "hp/dropout": 0.11, "stn_val_loss": 1.0}),
        {"event": "final", "step": 40, "final_eval_loss": 0.75, "final_eval_accuracy": 0.75, "comm_rounds": 8,
         "schedule": "fixed(H=5)"},
    ]
    return write_log(tmp_path / "stn-h5", records)


@pytest.fixture
def crashed_run(tmp_path: Path) -> Path:
    """A run that died: H=10 logged every 5 steps, no eval records, a null accuracy and a half-written last line."""
    records = [
        {"event": "start", "step": 0, "world_size": 2, "backend": "gloo", "resumed": False, "restart_count": 0},
        train_record(5, 0),
        {**train_record(10, 1), "accuracy": None},
        train_record(15, 1),
        train_record(20, 2),
    ]
    return write_log(tmp_path / "sgd-h10", records, cut_tail='{"event": "train", "step": 25, "lo')


def test_load_run_reads_every_series(stn_run: Path) -> None:
    run = plot.load_run(stn_run)
    assert run.label == "stn-h5" and run.skipped_lines == 0
    assert run.train["step"] == [10, 20, 30, 40]
    assert run.train["loss"] == [0.2, 0.1, None, 0.05]
    assert run.train["accuracy"] == [0.1, 0.2, 0.3, 0.4]
    assert run.train["lr"] == [0.1] * 4 and run.train["batch_size"] == [16] * 4
    assert run.train["comm_rounds"] == [2, 4, 6, 8]
    assert run.train["comm_bytes"] == [2000, 4000, 6000, 8000]
    # The eval record, then the final evaluation (the trainer writes no eval record at the last step).
    assert run.eval == {"step": [20, 40], "eval_loss": [1.25, 0.75], "eval_accuracy": [0.5, 0.75]}
    assert (run.h_steps, run.h_values, run.h_logged) == ([10, 20, 30, 40], [5.0] * 4, False)
    assert run.stn_keys == ["hp/dropout", "hp_sigma/dropout", "stn_val_loss"]
    assert run.train["hp/dropout"] == [0.05, 0.07, 0.09, 0.11]
    assert run.train["stn_val_loss"] == [None, 1.5, 1.25, 1.0]


def test_load_run_of_a_crashed_run_without_eval(crashed_run: Path) -> None:
    run = plot.load_run(crashed_run)
    assert run.skipped_lines == 1  # the cut line, and nothing else
    assert run.train["step"] == [5, 10, 15, 20]
    assert run.train["accuracy"] == [0.05, None, 0.15, 0.2]
    assert run.eval == {"step": [], "eval_loss": [], "eval_accuracy": []}
    assert run.stn_keys == [] and "hp/dropout" not in run.train
    # 5-step windows hold 0 or 1 rounds of H=10; merged, they read 10 steps a round.
    assert run.h_steps == [5, 10, 15, 20] and run.h_values == [10.0] * 4


def test_logged_h_field_is_preferred(tmp_path: Path) -> None:
    # An H field (the schedule's own value) wins over the derivation, which would say 5.
    records = [train_record(10, 2, H=4), train_record(20, 4, H=None), train_record(30, 6, H=6)]
    run = plot.load_run(write_log(tmp_path / "logged", records))
    assert (run.h_steps, run.h_values, run.h_logged) == ([10, 30], [4.0, 6.0], True)


def test_resumed_run_reads_as_one(tmp_path: Path) -> None:
    # A restart from the step-20 checkpoint: a second start record, then the counters carry on.
    records = [{"event": "start", "step": 0, "resumed": False}, train_record(10, 2), train_record(20, 4),
               {"event": "start", "step": 20, "resumed": True, "restart_count": 1}, train_record(30, 6),
               train_record(40, 8)]
    run = plot.load_run(write_log(tmp_path / "resumed", records))
    assert run.train["step"] == [10, 20, 30, 40] and run.h_values == [5.0] * 4


def test_duplicate_steps_keep_the_last_record(tmp_path: Path) -> None:
    records = [train_record(10, 1), train_record(20, 2), {**train_record(20, 2), "loss": 9.0}, train_record(30, 3)]
    run = plot.load_run(write_log(tmp_path / "concatenated", records))
    assert run.train["step"] == [10, 20, 30] and run.train["loss"][1] == 9.0


@pytest.mark.parametrize(("steps", "rounds", "expected_steps", "expected_h"), [
    # log_every a multiple of H: exactly the steps per round of each window
    ([10, 20, 30], [10, 20, 30], [10, 20, 30], [1.0, 1.0, 1.0]),
    # post-local style: H=2 for 40 steps, then H=10
    ([10, 20, 30, 40, 50, 60, 70, 80], [5, 10, 15, 20, 21, 22, 23, 24], [10, 20, 30, 40, 50, 60, 70, 80],
     [2.0] * 4 + [10.0] * 4),
    # windows without a round and a null count are folded into the stretch
    ([10, 20, 30, 40, 50, 60], [0, 0, 1, 1, None, 2], [10, 20, 30, 40, 60], [30.0] * 5),
    # no round yet: nothing to say about H
    ([10, 20], [0, 0], [], []),
    ([], [], [], []),
])
def test_derive_local_steps(steps: list[int], rounds: list[int | None], expected_steps: list[int],
                            expected_h: list[float]) -> None:
    assert plot.derive_local_steps(steps, rounds) == (expected_steps, expected_h)


def test_derive_local_steps_when_windows_straddle_rounds() -> None:
    # H=8 logged every 25 steps: single windows hold 3 or 4 rounds (8.33 or 6.25 steps each); merged, 8.
    steps = list(range(25, 2001, 25))
    assert plot.derive_local_steps(steps, [s // 8 for s in steps]) == (steps, [8.0] * len(steps))


def assert_plots(directory: Path, names: list[str], magic: bytes = PNG_MAGIC) -> None:
    for name in names:
        data = (directory / name).read_bytes()
        assert len(data) > len(magic) and data.startswith(magic), name


def test_two_runs_overlaid(stn_run: Path, crashed_run: Path, tmp_path: Path,
                           capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "plots"
    assert plot.main([str(stn_run), str(crashed_run), "--out", str(out), "--labels", "STN,crashed SGD"]) == 0
    captured = capsys.readouterr()
    assert_plots(out, [*CORE_FILES, "stn.png"])
    assert sorted(p.name for p in out.iterdir()) == sorted([*CORE_FILES, "stn.png"])
    assert captured.out.split() == [str(out / name) for name in [*CORE_FILES, "stn.png"]]
    assert "skipped 1 unreadable line" in captured.err and "sgd-h10" in captured.err


def test_one_run_defaults_to_its_directory(crashed_run: Path) -> None:
    pytest.importorskip("matplotlib")
    assert plot.main([str(crashed_run)]) == 0
    assert_plots(crashed_run, CORE_FILES)
    assert not (crashed_run / "stn.png").exists()  # no STN fields, no STN figure


def test_several_runs_default_to_plots(stn_run: Path, crashed_run: Path, monkeypatch: pytest.MonkeyPatch,
                                       tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    monkeypatch.chdir(tmp_path)
    assert plot.main([str(stn_run), str(crashed_run), "--format", "svg"]) == 0
    for name in plot.CORE_PLOTS:
        assert b"<svg" in (tmp_path / "plots" / f"{name}.svg").read_bytes()[:2000]


def test_pdf_format(stn_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert plot.main([str(stn_run), "--out", str(tmp_path / "pdf"), "--format", "pdf"]) == 0
    assert_plots(tmp_path / "pdf", [f"{name}.pdf" for name in [*plot.CORE_PLOTS, "stn"]], magic=b"%PDF")


def test_missing_run_dir(stn_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-run"
    assert plot.main([str(stn_run), str(missing)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"localsgd-plot: no run directory {missing}"]


def test_directory_without_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert plot.main([str(tmp_path / "empty")]) == 2
    assert len(capsys.readouterr().err.splitlines()) == 1


def test_labels_must_match_the_runs(stn_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert plot.main([str(stn_run), "--labels", "a,b"]) == 2
    assert "--labels names 2 runs but 1" in capsys.readouterr().err


def test_without_matplotlib(stn_run: Path, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    # None in sys.modules makes every `import matplotlib...` raise ImportError, as if it were not installed.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plot.main([str(stn_run), "--out", str(stn_run / "plots")]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [plot.MISSING_MATPLOTLIB] and captured.out == ""
    assert not (stn_run / "plots").exists()


def test_importing_does_not_import_matplotlib(tmp_path: Path) -> None:
    code = "import sys, localsgd, localsgd.plot; print('matplotlib' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_for(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", output(proc)


@pytest.mark.long
@pytest.mark.slow
def test_plots_of_a_real_two_rank_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # trainer=smoke logs every 10 steps; H=5 makes every window hold exactly 2 rounds.
    trained = torchrun(tmp_path, run_dir, [*TINY, "schedule.H=5"])
    assert trained.returncode == 0, output(trained)
    run = plot.load_run(run_dir)
    assert run.skipped_lines == 0 and run.train["step"] == [10, 20, 30, 40]
    assert run.h_values == [5.0] * 4 and run.h_logged is (plot.H_FIELD in run.train)
    assert run.eval["step"][-1] == 40 and all(math.isfinite(v) for v in run.eval["eval_loss"])
    pytest.importorskip("matplotlib")
    proc = subprocess.run([sys.executable, "-m", "localsgd.plot", str(run_dir)], cwd=tmp_path,
                          env=env_for(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, output(proc)
    assert_plots(run_dir, CORE_FILES)
    assert proc.stdout.split() == [str(run_dir / name) for name in CORE_FILES]
