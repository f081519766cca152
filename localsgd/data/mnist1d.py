"""MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024; arXiv 2011.14439).

The data is *generated* locally with ``mnist1d.data.make_dataset`` (never ``get_dataset``, which
downloads) and cached as an ``.npz`` file, because generating 10,000 samples takes several seconds.
The cache is written atomically (temp file in the same directory, then ``os.replace``), so concurrent
workers never read a half-written file, and a corrupt or mismatching cache file is regenerated.
"""

from __future__ import annotations

import os
import random
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .base import DATASETS, Dataset, Problems, check_fraction

CACHE_FORMAT_VERSION = 1
SEQ_LEN = 40  # mnist1d's default final_seq_length
NUM_CLASSES = 10


@DATASETS.add
@dataclass
class MNIST1DConfig:
    """``data=mnist1d``: the MNIST-1D generator with its default transforms, shape (1, 40), 10 classes."""

    name: str = "mnist1d"
    num_samples: int = 10000  # total, train + test; a multiple of 10 (the generator makes N/10 per class)
    seed: int = 42  # the generator's seed (42 is the one of the published MNIST-1D set)
    train_split: float = 0.8  # the first 80% of the shuffled samples are the train set, as in mnist1d
    cache_dir: str | None = None  # None/"": $LOCALSGD_CACHE_DIR, else ~/.cache/localsgd

    def problems(self) -> Problems:
        if self.num_samples < 100 or self.num_samples % NUM_CLASSES:
            yield "num_samples", self.num_samples, "must be a multiple of 10 and >= 100"
        if self.seed < 0 or self.seed >= 2**32:
            yield "seed", self.seed, "must be in [0, 2**32)"
        yield from check_fraction("train_split", self.train_split)

    def build(self) -> Dataset:
        x, y = load_arrays(self.num_samples, self.seed, self.cache_dir)
        split = int(len(y) * self.train_split)  # the same split rule as mnist1d.data.make_dataset
        xt = torch.from_numpy(x).unsqueeze(1)  # (N, 1, 40): one input channel for Conv1d
        yt = torch.from_numpy(y)
        return Dataset(
            name="mnist1d",
            x_train=xt[:split].clone(),
            y_train=yt[:split].clone(),
            x_test=xt[split:].clone(),
            y_test=yt[split:].clone(),
            num_classes=NUM_CLASSES,
        )


def cache_root(cache_dir: str | None = None) -> Path:
    """``cache_dir`` if given, else ``$LOCALSGD_CACHE_DIR``, else ``~/.cache/localsgd``."""
    root = cache_dir or os.environ.get("LOCALSGD_CACHE_DIR") or "~/.cache/localsgd"
    return Path(root).expanduser()


def cache_path(num_samples: int, seed: int, cache_dir: str | None = None) -> Path:
    return cache_root(cache_dir) / f"mnist1d_v{CACHE_FORMAT_VERSION}_n{num_samples}_seed{seed}.npz"


def generate(num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All ``num_samples`` samples in the generator's shuffled order: float32 (N, 40), int64 (N,).

    ``make_dataset`` reseeds Python's and NumPy's global RNGs; their states are restored afterwards
    so that generating the data does not change any other random stream of the run.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    args.seed = int(seed)
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)
    y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
    return x, y


def _read_cache(path: Path, num_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as f:
        meta = f["meta"]
        x, y = f["x"], f["y"]
    n = NUM_CLASSES * (num_samples // NUM_CLASSES)
    want_meta = np.array([CACHE_FORMAT_VERSION, num_samples, seed], dtype=np.int64)
    if meta.shape != want_meta.shape or not np.array_equal(meta, want_meta):
        raise ValueError(f"cache metadata {meta.tolist()} does not match {want_meta.tolist()}")
    if x.dtype != np.float32 or x.shape != (n, SEQ_LEN) or not np.isfinite(x).all():
        raise ValueError(f"cached x has dtype {x.dtype} and shape {x.shape}, expected float32 {(n, SEQ_LEN)}")
    if y.dtype != np.int64 or y.shape != (n,) or y.min() < 0 or y.max() >= NUM_CLASSES:
        raise ValueError(f"cached y has dtype {y.dtype}, shape {y.shape} or labels outside [0, 10)")
    return x, y


def _write_cache(path: Path, x: np.ndarray, y: np.ndarray, num_samples: int, seed: int) -> None:
    """Write atomically: a temp file in the same directory, fsynced, then renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp makes 0600; a cache may be shared
            meta = np.array([CACHE_FORMAT_VERSION, num_samples, seed], dtype=np.int64)
            np.savez(f, x=x, y=y, meta=meta)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_arrays(num_samples: int, seed: int, cache_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The generated samples, from the cache when it holds a valid copy, else generated and cached."""
    path = cache_path(num_samples, seed, cache_dir)
    if path.exists():
        try:
            return _read_cache(path, num_samples, seed)
        except Exception as e:  # any unreadable/invalid file: regenerate rather than fail the run
            warnings.warn(
                f"MNIST-1D cache file {path} is unreadable or invalid ({type(e).__name__}: {e}); "
                "regenerating it",
                RuntimeWarning,
                stacklevel=2,
            )
    x, y = generate(num_samples, seed)
    try:
        _write_cache(path, x, y, num_samples, seed)
    except OSError as e:
        warnings.warn(f"could not write MNIST-1D cache file {path} ({e}); continuing uncached", stacklevel=2)
    return x, y
