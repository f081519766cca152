"""A tiny name -> component registry (the torchtitan pattern): configs select components by name.

Each registry maps the name used in ``configs/<group>/<name>.yaml`` to the typed config dataclass of
that component. A component builds itself from its config (torchtitan's ``Configurable``: the config
dataclass has a ``build(...)`` method), so adding one touches its own file, its YAML and its test,
and Hydra's ConfigStore and the builders cannot drift apart: :meth:`Registry.add` registers a config
class under the default of its ``name`` field.
"""

from __future__ import annotations

import dataclasses
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

    def add(self, config_cls: type) -> type:
        """Register a config dataclass that builds its component (``cfg.build(...)``); usable as a
        class decorator. The registered name is the default of its ``name`` field."""
        name = next(f.default for f in dataclasses.fields(config_cls) if f.name == "name")
        if not callable(getattr(config_cls, "build", None)):
            raise TypeError(f"{self.kind} config {config_cls.__name__} has no build() method")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = Entry(name, config_cls, _build_from_config)
        return config_cls

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {sorted(self._entries)}") from None

    def build(self, cfg: Any, *args: Any, **kwargs: Any) -> T:
        """Build the component ``cfg.name`` names; ``cfg`` may be its dataclass or a Hydra node of it."""
        entry = self.get(cfg.name)
        if not dataclasses.is_dataclass(cfg):  # a Hydra/OmegaConf node: its registered dataclass builds
            from omegaconf import OmegaConf

            cfg = entry.config_cls(**OmegaConf.to_container(cfg, resolve=True))
        return entry.build(cfg, *args, **kwargs)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def entries(self) -> list[Entry[T]]:
        return [self._entries[n] for n in self.names()]


def _build_from_config(cfg: Any, *args: Any, **kwargs: Any) -> Any:
    return cfg.build(*args, **kwargs)
