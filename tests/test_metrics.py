"""metrics.jsonl: strict JSON (non-finite floats as null), every record on disk as soon as written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from localsgd.metrics import MetricsLog, TrainRecords, json_safe
from localsgd.optim import StepOutput


def strict_records(path: Path) -> list[dict]:
    def refuse(name: str) -> None:
        raise ValueError(f"bare {name} in JSON")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_non_finite_values_are_written_as_null_and_parse_strictly(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=True)
    log.write({"event": "train", "step": 1, "loss": math.nan, "b_simple": math.inf,
               "nested": {"a": -math.inf, "b": [1.5, math.nan]}, "accuracy": 0.5})
    log.close()
    (rec,) = strict_records(tmp_path / "metrics.jsonl")
    assert rec == {"event": "train", "step": 1, "loss": None, "b_simple": None,
                   "nested": {"a": None, "b": [1.5, None]}, "accuracy": 0.5}


def test_each_record_is_on_disk_before_the_next_and_truncation_keeps_appending(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path, enabled=True)
    for step in (1, 2, 3):
        log.write({"event": "train", "step": step})
        assert [r["step"] for r in strict_records(path)] == list(range(1, step + 1))  # no close needed
    log.truncate_after(2)
    log.write({"event": "train", "step": 3, "again": True})
    log.close()
    assert strict_records(path) == [{"event": "train", "step": 1}, {"event": "train", "step": 2},
                                    {"event": "train", "step": 3, "again": True}]


def test_a_disabled_log_writes_nothing(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", enabled=False)
    log.write({"event": "train", "step": 1})
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("value", [0.0, -2.5, 1e308, 7, "text", None, True])
def test_finite_values_pass_unchanged(value: object) -> None:
    assert json_safe({"v": value}) == {"v": value}


# ---- TrainRecords: windows reduced in batches, each record's values independent of the batching

def random_windows(seed: int, count: int, scorable: bool = True) -> list[list[StepOutput]]:
    gen = torch.Generator().manual_seed(seed)
    windows = []
    for _ in range(count):
        window = []
        for _ in range(int(torch.randint(1, 6, (1,), generator=gen))):
            batch = int(torch.randint(1, 9, (1,), generator=gen))
            logits = torch.randn(batch, 4, generator=gen) if scorable else None
            targets = torch.randint(0, 4, (batch,), generator=gen) if scorable else None
            window.append(StepOutput(loss=torch.rand((), generator=gen) * 3, count=batch, logits=logits,
                                     targets=targets))
        windows.append(window)
    return windows


def reference_values(window: list[StepOutput]) -> tuple[float, float]:
    """One window alone, the slow way: float64 mean of its losses and a count of correct argmaxes."""
    loss = math.fsum(float(o.loss) for o in window) / len(window)
    if any(o.logits is None for o in window):
        return loss, math.nan
    correct = sum(int(torch.argmax(o.logits[i])) == int(o.targets[i]) for o in window for i in range(o.count))
    return loss, correct / sum(o.count for o in window)


def written_records(windows: list[list[StepOutput]], **options: object) -> list[tuple[int, int, float, float]]:
    written: list[tuple[int, int, float, float]] = []
    with TrainRecords(lambda rec, steps: written.append((rec["step"], steps, rec["loss"], rec["accuracy"])),
                      **options) as records:
        for step, window in enumerate(windows):
            records.add(window, {"event": "train", "step": step})
    return written


@pytest.mark.parametrize("seed", range(6))
def test_records_equal_one_window_alone_however_windows_are_batched(seed: int) -> None:
    windows = random_windows(seed, 23)
    if seed % 2:  # some windows without logits (a language model's, or STN's hyper steps) between scored ones
        for k in (0, 5, 6, 22):
            windows[k][0].logits = None
    expected = [(step, len(w), *reference_values(w)) for step, w in enumerate(windows)]
    for options in ({"max_windows": 1}, {"max_windows": 5}, {"max_windows": 64, "max_seconds": math.inf},
                    {"max_seconds": 0.0}):
        got = written_records(windows, **options)
        assert [g[:3] for g in got] == [e[:3] for e in expected], options  # the loss exactly, in order
        for g, e in zip(got, expected, strict=True):
            assert (math.isnan(g[3]) and math.isnan(e[3])) or g[3] == e[3], (options, g, e)
    assert sum(math.isnan(e[3]) for e in expected) == (4 if seed % 2 else 0)


def test_windows_wait_for_max_windows_or_max_seconds_and_flush_writes_them_at_once() -> None:
    written: list[int] = []
    records = TrainRecords(lambda rec, steps: written.append(rec["step"]), max_seconds=math.inf, max_windows=3)
    windows = random_windows(0, 7)
    for step, window in enumerate(windows[:5]):
        records.add(window, {"step": step})
        assert written == ([0, 1, 2] if step >= 2 else [])
    records.flush()
    assert written == [0, 1, 2, 3, 4]
    records.flush()  # nothing pending: nothing written twice
    assert written == [0, 1, 2, 3, 4]
    eager = TrainRecords(lambda rec, steps: written.append(rec["step"]), max_seconds=0.0)
    eager.add(windows[5], {"step": 5})
    assert written[-1] == 5  # a second already passed: written at once


def test_disabled_records_reduce_and_write_nothing() -> None:
    def refuse(rec: dict, steps: int) -> None:
        raise AssertionError("a disabled TrainRecords wrote")

    broken = [StepOutput(loss=torch.tensor(1.0), count=2, logits=torch.zeros(3, 4), targets=torch.zeros(2))]
    with TrainRecords(refuse, enabled=False, max_seconds=0.0, max_windows=1) as records:
        records.add(broken, {"step": 1})  # would fail to reduce (3 logits, 2 targets) if it tried
        records.flush()
    assert records.pending == []


def test_a_failing_run_still_writes_its_records_and_its_error_propagates(capsys: pytest.CaptureFixture) -> None:
    written: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        with TrainRecords(lambda rec, steps: written.append(rec["step"]), max_seconds=math.inf) as records:
            for step, window in enumerate(random_windows(1, 3)):
                records.add(window, {"step": step})
            raise KeyboardInterrupt
    assert written == [0, 1, 2]

    def full_disk(rec: dict, steps: int) -> None:
        raise OSError(28, "No space left on device")

    with pytest.raises(RuntimeError, match="the run's own error"):
        with TrainRecords(full_disk, max_seconds=math.inf) as records:
            records.add(random_windows(2, 1)[0], {"step": 1})
            raise RuntimeError("the run's own error")
    err = capsys.readouterr().err
    assert err.strip() == "localsgd: the last train records were not written: [Errno 28] No space left on device"
    with pytest.raises(OSError, match="No space left"):  # without a run error, the write's own error is raised
        with TrainRecords(full_disk, max_seconds=math.inf) as records:
            records.add(random_windows(3, 1)[0], {"step": 1})
