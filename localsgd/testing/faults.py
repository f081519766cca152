"""Environment-driven fault injection for the reliability tests (CPU, Gloo).

``LOCALSGD_FAULT`` holds ``;``-separated faults such as ``kill:rank=1,step=7``,
``nan:rank=0,step=5``, ``sleep:rank=1,step=3,secs=999``, ``kill_during_save:rank=0,step=8`` (after
the shard files, before the commit) or ``kill_during_purge:rank=0,step=8`` (while retention deletes
an old checkpoint).
A fault fires only on torchrun's first attempt (``TORCHELASTIC_RESTART_COUNT == 0``), like torchft's
event injector, so a restarted group runs clean. Without the variable every hook is a no-op.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
from torch import nn

from .. import dist

KINDS = ("kill", "nan", "sleep", "kill_during_save", "kill_during_purge")


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    step: int
    secs: float = 0.0


def parse(spec: str) -> list[Fault]:
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        kind, _, args = part.partition(":")
        if kind not in KINDS:
            raise ValueError(f"LOCALSGD_FAULT: unknown fault {kind!r} in {part!r}; known: {KINDS}")
        kv = dict(item.split("=", 1) for item in args.split(",") if item)
        try:
            faults.append(Fault(kind, int(kv["rank"]), int(kv["step"]), float(kv.get("secs", 0))))
        except (KeyError, ValueError) as exc:
            raise ValueError(f"LOCALSGD_FAULT: {part!r} needs rank=<int>,step=<int> ({exc})") from None
    return faults


class FaultInjector:
    """Fires the configured faults at the matching rank and local step."""

    def __init__(self, spec: str | None = None) -> None:
        spec = os.environ.get("LOCALSGD_FAULT", "") if spec is None else spec
        active = dist.restart_count() == 0
        self.faults = [f for f in parse(spec) if f.rank == dist.rank()] if active else []

    def _match(self, kind: str, step: int) -> Fault | None:
        return next((f for f in self.faults if f.kind == kind and f.step == step), None)

    def after_step(self, step: int, model: nn.Module) -> None:
        """Called after local step ``step`` (1-based) and before the sync decision."""
        if not self.faults:
            return
        if self._match("nan", step):
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))
        if (f := self._match("sleep", step)) is not None:
            time.sleep(f.secs)
        if self._match("kill", step):
            os._exit(17)

    def during_save(self, step: int, stage: str) -> None:
        if not self.faults:
            return
        if (stage == "shards" and self._match("kill_during_save", step)) or (
                stage == "purge" and self._match("kill_during_purge", step)):
            os._exit(17)
