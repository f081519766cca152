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


# ---------------------------------------------------------------------- a user's own component: ``_target_``
@dataclass
class TargetConfig:
    """A component the user brings: ``model._target_=my_pkg.MyNet`` (Hydra's instantiation convention).

    ``target`` is the dotted path of a class or function; ``kwargs`` are the other keys of its config node,
    passed as keyword arguments. Its ``name`` (in summaries and banners) is the path.
    """

    target: str
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.target


def as_target(cfg: Any) -> TargetConfig | None:
    """``cfg`` as a :class:`TargetConfig` when it names a ``_target_`` (a node, a dict or one already), else None."""
    if isinstance(cfg, TargetConfig):
        return cfg
    if dataclasses.is_dataclass(cfg):
        return None
    from omegaconf import DictConfig, OmegaConf

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, dict) and "_target_" in cfg:
        kwargs = {k: v for k, v in cfg.items() if k != "_target_"}
        return TargetConfig(str(cfg["_target_"]), kwargs)
    return None


def locate(path: str) -> Any:
    """The object a dotted path names (``pkg.module.Class`` or ``pkg.module.function``); ImportError if none."""
    import importlib

    parts = path.split(".")
    if not path or any(not p.isidentifier() for p in parts):
        raise ImportError(f"{path!r} is not a dotted path like my_pkg.MyNet")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and not module_name.startswith(exc.name):
                raise  # the module exists but imports something missing: that is the user's error to see
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                raise ImportError(f"{module_name!r} has no attribute {attr!r}")
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module named {parts[0]!r} (is its directory on PYTHONPATH, or the package installed?)")


def instantiate_target(cfg: Any, **offered: Any) -> Any:
    """Call the ``_target_`` of ``cfg`` with its keyword arguments (nested ``_target_`` nodes built by Hydra).

    ``offered`` arguments (a model is offered ``input_shape`` and ``num_classes``) are passed only to a
    callable that names them as parameters and only where the config does not set them.
    """
    import inspect

    from hydra.utils import instantiate

    target = as_target(cfg)
    if target is None:
        raise TypeError(f"{cfg!r} has no _target_")
    fn = locate(target.target)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    extra = {k: v for k, v in offered.items() if k in params and k not in target.kwargs}
    kwargs = {k: instantiate(v) if isinstance(v, dict) and "_target_" in v else v for k, v in target.kwargs.items()}
    return fn(**kwargs, **extra)
