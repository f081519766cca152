"""A tiny name -> component registry (the torchtitan pattern): configs select components by name.

Each registry maps the name used in ``configs/<group>/<name>.yaml`` to a builder and the typed config
dataclass that the builder accepts, so Hydra's ConfigStore and the builders cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    config_cls: type
    build: Callable[..., T]


class Registry(Generic[T]):
    """Components of one kind (schedules, optimizers, datasets, models), keyed by config name."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(self, name: str, config_cls: type) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(build: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = Entry(name, config_cls, build)
            return build

        return deco

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {sorted(self._entries)}") from None

    def build(self, cfg: Any, *args: Any, **kwargs: Any) -> T:
        return self.get(cfg.name).build(cfg, *args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]
