"""metrics.jsonl: strict JSON (non-finite floats as null), every record on disk as soon as written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from localsgd.metrics import MetricsLog, json_safe


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
