"""The worker loop names no component: what a component needs at a moment of the step is a hook,
what it can do is a capability (``ramp.constant``, ``ramp.observes_noise_scale``), and who
communicates is a :class:`~localsgd.communicator.Communicator`."""

from __future__ import annotations

import inspect
import re

from localsgd import trainer
from localsgd.communicator import Communicator
from localsgd.config import _registries
from localsgd.ddp import DDPBaseline
from localsgd.engine import LocalSGD
from localsgd.hooks import StepHook, overriding


def _loop_source() -> str:
    source = inspect.getsource(trainer.run_training)
    start, end = source.index("# ---- the loop"), source.index("# ---- the end")
    return source[start:end]


def test_the_loop_names_no_component_and_fits_on_one_screen() -> None:
    loop = _loop_source()
    names = {n for registry in _registries().values() for n in registry.names()}
    mentioned = {n for n in names if re.search(rf"(==|!=|in \(|\[)\s*['\"]{re.escape(n)}['\"]", loop)}
    assert not mentioned, f"the loop switches on component names {sorted(mentioned)}"
    assert ".name" not in loop and " is None" not in loop and " is not None" not in loop
    assert loop.count("\n") <= 60


def test_local_sgd_and_ddp_are_communicators() -> None:
    for cls in (LocalSGD, DDPBaseline):
        missing = [m for m in ("step", "finalize", "averaged", "describe", "state_dict", "load_state_dict",
                               "in_sync") if not hasattr(cls, m)]
        assert not missing, (cls.__name__, missing)
    from torch import nn

    from localsgd.schedules import Fixed

    assert isinstance(LocalSGD(nn.Linear(2, 2), None, schedule=Fixed(2)), Communicator)


def test_only_overridden_hook_methods_are_called() -> None:
    calls = []

    class Probe(StepHook):
        def after_step(self, done, model):  # type: ignore[no-untyped-def]
            calls.append(done)

    hooks = [StepHook(), Probe()]
    assert overriding(hooks, "before_step") == []
    (after,) = overriding(hooks, "after_step")
    after(3, None)
    assert calls == [3]
