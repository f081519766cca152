"""The package's PEP 517 build backend: setuptools' own, minus the litter of an in-tree build.

pip (21.3 and later) builds a wheel in the source tree, and setuptools leaves its work there: a
``build/`` folder and ``localsgd.egg-info``. A user's ``pip install .`` should leave the checkout as
it found it, so this backend (named in ``pyproject.toml`` with ``backend-path``, PEP 517 §"In-tree
build backends") calls setuptools and then removes whichever of the two did not exist before. Every
other hook is setuptools' unchanged; an editable install keeps its ``egg-info``, which it needs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (every hook not redefined here is setuptools')

LITTER = ("build", "localsgd.egg-info")  # relative to the source tree, the backend's working directory


@contextmanager
def _leaves_no_litter() -> Iterator[None]:
    new = [Path(p) for p in LITTER if not Path(p).exists()]
    try:
        yield
    finally:
        for path in new:
            shutil.rmtree(path, ignore_errors=True)


def _clean(hook: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        with _leaves_no_litter():
            return hook(*args, **kwargs)

    wrapped.__name__, wrapped.__doc__ = hook.__name__, hook.__doc__
    return wrapped


# the hooks of a wheel or sdist build (setuptools' get_requires_* already runs egg_info in the tree)
get_requires_for_build_wheel = _clean(_setuptools.get_requires_for_build_wheel)
get_requires_for_build_sdist = _clean(_setuptools.get_requires_for_build_sdist)
prepare_metadata_for_build_wheel = _clean(_setuptools.prepare_metadata_for_build_wheel)
build_wheel = _clean(_setuptools.build_wheel)
build_sdist = _clean(_setuptools.build_sdist)
