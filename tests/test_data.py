"""Tests of ``localsgd.data``: shapes, dtypes, splits, the MNIST-1D cache, CIFAR-10 file loading."""

from __future__ import annotations

import dataclasses
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from localsgd import data
from localsgd.data import mnist1d as mnist1d_mod
from localsgd.data.base import split_indices


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOCALSGD_CACHE_DIR", str(cache))
    return cache


def _check(
    ds: data.Dataset, input_shape: tuple[int, ...], num_classes: int, n_train: int, n_test: int
) -> None:
    assert ds.input_shape == input_shape
    assert ds.num_classes == num_classes
    assert ds.x_train.shape == (n_train, *input_shape) and ds.x_test.shape == (n_test, *input_shape)
    assert ds.y_train.shape == (n_train,) and ds.y_test.shape == (n_test,)
    for x in (ds.x_train, ds.x_test):
        assert x.dtype == torch.float32 and torch.isfinite(x).all()
    for y in (ds.y_train, ds.y_test):
        assert y.dtype == torch.int64 and int(y.min()) >= 0 and int(y.max()) < num_classes
    assert set(ds.y_train.tolist()) == set(range(num_classes))


def _equal(a: data.Dataset, b: data.Dataset) -> bool:
    return all(torch.equal(getattr(a, k), getattr(b, k)) for k in ("x_train", "y_train", "x_test", "y_test"))


def test_registry_names() -> None:
    assert data.DATASETS.names() == ["breast_cancer", "cifar10", "digits", "mnist1d", "synthetic_logreg", "tokens"]
    for entry in data.DATASETS.entries():
        cfg = entry.config_cls()
        assert cfg.name == entry.name
        assert list(cfg.problems()) == [] or entry.name == "cifar10"  # cifar10 needs a root


# ---------------------------------------------------------------- MNIST-1D


def test_mnist1d_matches_generator_and_split(_cache_dir: Path) -> None:
    from mnist1d.data import get_dataset_args, make_dataset

    ds = data.build(data.MNIST1DConfig(num_samples=500, seed=3))
    _check(ds, (1, 40), 10, 400, 100)
    args = get_dataset_args()
    args.num_samples, args.seed = 500, 3
    ref = make_dataset(args)
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(ref["x"].astype(np.float32)))
    assert torch.equal(ds.x_test[:, 0], torch.from_numpy(ref["x_test"].astype(np.float32)))
    assert torch.equal(ds.y_train, torch.from_numpy(ref["y"].astype(np.int64)))
    assert torch.equal(ds.y_test, torch.from_numpy(ref["y_test"].astype(np.int64)))


def test_mnist1d_cache_written_then_read(_cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = data.MNIST1DConfig(num_samples=200, seed=1)
    first = data.build(cfg)
    path = mnist1d_mod.cache_path(200, 1)
    assert path.parent == _cache_dir and path.is_file()
    assert "200" in path.name and "seed1" in path.name and f"v{mnist1d_mod.CACHE_FORMAT_VERSION}" in path.name
    assert sorted(p.name for p in _cache_dir.iterdir()) == [path.name]  # no temp file left behind

    def no_generation(*args: object) -> None:
        raise AssertionError("generated although a valid cache file exists")

    monkeypatch.setattr(mnist1d_mod, "generate", no_generation)
    second = data.build(cfg)
    assert _equal(first, second)


def test_mnist1d_corrupt_cache_is_regenerated(_cache_dir: Path) -> None:
    cfg = data.MNIST1DConfig(num_samples=200, seed=1)
    good = data.build(cfg)
    path = mnist1d_mod.cache_path(200, 1)
    for bad in (b"not an npz file", path.read_bytes()[: path.stat().st_size // 2]):
        path.write_bytes(bad)
        with pytest.warns(RuntimeWarning, match="regenerating"):
            again = data.build(cfg)
        assert _equal(good, again)
        with np.load(path) as f:  # the file was rewritten and is valid again
            assert f["x"].shape == (200, 40)


def test_mnist1d_cache_for_other_settings_is_not_reused(_cache_dir: Path) -> None:
    data.build(data.MNIST1DConfig(num_samples=200, seed=1))
    wrong = mnist1d_mod.cache_path(200, 1)
    # a file with a valid format but the wrong metadata under the expected name is rejected
    os.replace(wrong, mnist1d_mod.cache_path(200, 2))
    with pytest.warns(RuntimeWarning, match="does not match"):
        ds = data.build(data.MNIST1DConfig(num_samples=200, seed=2))
    x, _ = mnist1d_mod.generate(200, 2)
    assert torch.equal(torch.cat([ds.x_train, ds.x_test])[:, 0], torch.from_numpy(x))


def test_mnist1d_cache_dir_and_unwritable_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "own"
    data.build(data.MNIST1DConfig(num_samples=100, seed=0, cache_dir=str(own)))
    assert [p.name for p in own.iterdir()] == [mnist1d_mod.cache_path(100, 0).name]

    def failing_savez(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    other = tmp_path / "other"
    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.warns(UserWarning, match="continuing uncached"):
        ds = data.build(data.MNIST1DConfig(num_samples=100, seed=0, cache_dir=str(other)))
    assert ds.x_train.shape == (80, 1, 40)
    assert list(other.iterdir()) == []  # the temp file was removed


def test_mnist1d_determinism_and_global_rng_untouched() -> None:
    np.random.seed(123)
    random.seed(123)
    np_before, py_before = np.random.get_state()[1].copy(), random.getstate()
    a = data.build(data.MNIST1DConfig(num_samples=100, seed=5))
    assert np.array_equal(np.random.get_state()[1], np_before) and random.getstate() == py_before
    b = data.build(data.MNIST1DConfig(num_samples=100, seed=5, cache_dir=None))
    c = data.build(data.MNIST1DConfig(num_samples=100, seed=6))
    assert _equal(a, b)
    assert not torch.equal(a.x_train, c.x_train)


# ---------------------------------------------------------------- scikit-learn sets


def test_digits() -> None:
    ds = data.build(data.DigitsConfig())
    _check(ds, (64,), 10, 1797 - 449, 449)
    assert float(ds.x_train.min()) == 0.0 and float(ds.x_train.max()) == 1.0
    assert torch.equal(ds.x_train * 16, (ds.x_train * 16).round())  # original 0..16 intensities
    same = data.build(data.DigitsConfig())
    other = data.build(data.DigitsConfig(seed=1))
    assert _equal(ds, same)
    assert not torch.equal(ds.y_train, other.y_train)
    small = data.build(data.DigitsConfig(test_fraction=0.1))
    assert small.x_test.shape[0] == 180


def test_split_indices_is_a_partition() -> None:
    train, test = split_indices(101, 0.3, seed=7)
    assert len(test) == 30 and len(train) == 71
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(101))
    t2, s2 = split_indices(101, 0.3, seed=7)
    assert np.array_equal(train, t2) and np.array_equal(test, s2)


def test_breast_cancer_standardised_with_train_statistics() -> None:
    from sklearn.datasets import load_breast_cancer

    ds = data.build(data.BreastCancerConfig(seed=2))
    _check(ds, (30,), 2, 569 - 142, 142)
    assert ds.x_train.mean(0).abs().max() < 1e-5
    assert (ds.x_train.std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert ds.x_test.mean(0).abs().max() > 1e-3  # test set is *not* standardised on its own statistics
    raw = load_breast_cancer()
    train, test = split_indices(569, 0.25, seed=2)
    mean, std = raw.data[train].mean(0), raw.data[train].std(0)
    expected = torch.from_numpy(((raw.data[test] - mean) / std).astype(np.float32))
    assert torch.allclose(ds.x_test, expected, atol=1e-5)
    assert torch.equal(ds.y_test, torch.from_numpy(raw.target[test].astype(np.int64)))


# ---------------------------------------------------------------- synthetic logistic regression


def test_synthetic_logreg_binary() -> None:
    cfg = data.SyntheticLogRegConfig(n_samples=2000, n_features=100, sparsity=0.2, seed=4, scale=4.0)
    ds = data.build(cfg)
    _check(ds, (100,), 2, 1600, 400)
    assert set(ds.x_train.unique().tolist()) == {0.0, 1.0}
    assert abs(float(ds.x_train.mean()) - 0.2) < 0.01
    x, y, w = data.synthetic.generate(cfg)
    bayes = ((x @ w > 0).astype(np.int64) == y).mean()
    assert bayes > 0.75  # labels follow the planted model
    assert _equal(ds, data.build(cfg))
    assert not torch.equal(ds.x_train, data.build(data.SyntheticLogRegConfig(n_samples=2000, seed=5)).x_train)


def test_synthetic_logreg_gaussian_dense_and_label_noise() -> None:
    cfg = data.SyntheticLogRegConfig(n_samples=1000, n_features=50, sparsity=1.0, features="gaussian")
    ds = data.build(cfg)
    _check(ds, (50,), 2, 800, 200)
    assert (ds.x_train != 0).all()
    assert abs(float(ds.x_train.std()) - 1.0) < 0.05
    clean = data.synthetic.generate(data.SyntheticLogRegConfig(n_samples=4000, seed=1))[1]
    noisy = data.synthetic.generate(data.SyntheticLogRegConfig(n_samples=4000, seed=1, label_noise=0.2))[1]
    assert 0.15 < (clean != noisy).mean() < 0.25
    with pytest.raises(ValueError, match="sparsity"):
        data.build(data.SyntheticLogRegConfig(sparsity=0.0))


# ---------------------------------------------------------------- CIFAR-10


def _write_fake_cifar(
    directory: Path, per_batch: int = 20, seed: int = 0
) -> dict[str, tuple[np.ndarray, list[int]]]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    batches = {}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        x = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        x[:, :1024] //= 2  # give the channels different statistics
        labels = [(k + 3 * i) % 10 for i in range(per_batch)]
        with open(directory / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": x, b"labels": labels, b"filenames": []}, f)
        batches[name] = (x, labels)
    return batches


def test_cifar10_from_fake_batches(tmp_path: Path) -> None:
    batches = _write_fake_cifar(tmp_path / "cifar")
    ds = data.build(data.CIFAR10Config(root=str(tmp_path / "cifar")))
    _check(ds, (3, 32, 32), 10, 100, 20)
    train_x = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert ds.y_train.tolist() == train_y
    assert ds.y_test.tolist() == batches["test_batch"][1]
    imgs = train_x.reshape(100, 3, 32, 32).astype(np.float64)
    mean, std = imgs.mean(axis=(0, 2, 3)), imgs.std(axis=(0, 2, 3))
    expected = (imgs - mean[None, :, None, None]) / std[None, :, None, None]
    assert torch.allclose(ds.x_train, torch.from_numpy(expected).float(), atol=1e-5)
    test_imgs = batches["test_batch"][0].reshape(20, 3, 32, 32).astype(np.float64)
    expected_test = (test_imgs - mean[None, :, None, None]) / std[None, :, None, None]
    assert torch.allclose(ds.x_test, torch.from_numpy(expected_test).float(), atol=1e-5)
    assert ds.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-5
    assert (ds.x_train.std(dim=(0, 2, 3), unbiased=False) - 1).abs().max() < 1e-4


def test_cifar10_subdir_and_limits(tmp_path: Path) -> None:
    batches = _write_fake_cifar(tmp_path / "cifar-10-batches-py", seed=1)
    ds = data.build(data.CIFAR10Config(root=str(tmp_path), limit_train=30, limit_test=5))
    _check(ds, (3, 32, 32), 10, 30, 5)
    labels = batches["data_batch_1"][1] + batches["data_batch_2"][1]
    assert ds.y_train.tolist() == labels[:30]
    assert ds.y_test.tolist() == batches["test_batch"][1][:5]
    assert ds.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-5  # statistics of the 30 images used


def test_cifar10_missing_file_error(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3") as err:
        data.build(data.CIFAR10Config(root=str(tmp_path)))
    assert "cannot be downloaded" in str(err.value)
    with pytest.raises(FileNotFoundError, match="test_batch"):
        data.build(data.CIFAR10Config(root=str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="cannot be downloaded"):
        data.build(data.CIFAR10Config())


def test_cifar10_rejects_a_non_cifar_file(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 10), dtype=np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="not a CIFAR-10 python batch"):
        data.build(data.CIFAR10Config(root=str(tmp_path)))


# ---------------------------------------------------------------- config validation


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (data.MNIST1DConfig(num_samples=50), "num_samples"),
        (data.MNIST1DConfig(num_samples=1005), "num_samples"),
        (data.MNIST1DConfig(seed=-1), "seed"),
        (data.MNIST1DConfig(train_split=1.0), "train_split"),
        (data.DigitsConfig(test_fraction=0.0), "test_fraction"),
        (data.BreastCancerConfig(test_fraction=1.5), "test_fraction"),
        (data.SyntheticLogRegConfig(n_samples=5), "n_samples"),
        (data.SyntheticLogRegConfig(n_features=0), "n_features"),
        (data.SyntheticLogRegConfig(sparsity=1.2), "sparsity"),
        (data.SyntheticLogRegConfig(sparsity=1.0), "sparsity"),  # binary + dense is degenerate
        (data.SyntheticLogRegConfig(features="ternary"), "features"),
        (data.SyntheticLogRegConfig(scale=0.0), "scale"),
        (data.SyntheticLogRegConfig(label_noise=0.5), "label_noise"),
        (data.SyntheticLogRegConfig(test_fraction=0.0), "test_fraction"),
        (data.CIFAR10Config(), "root"),
        (data.CIFAR10Config(root="/x", limit_train=-1), "limit_train"),
        (data.CIFAR10Config(root="/x", limit_test=-2), "limit_test"),
    ],
)
def test_problems_flag_bad_values(cfg: object, field: str) -> None:
    problems = list(cfg.problems())  # type: ignore[attr-defined]
    assert [p[0] for p in problems] == [field]
    name, value, requirement = problems[0]
    assert value == getattr(cfg, field) and isinstance(requirement, str) and requirement


def test_valid_configs_have_no_problems() -> None:
    for cfg in (
        data.MNIST1DConfig(),
        data.DigitsConfig(),
        data.BreastCancerConfig(),
        data.SyntheticLogRegConfig(),
        data.SyntheticLogRegConfig(sparsity=1.0, features="gaussian"),
        data.CIFAR10Config(root="/data/cifar"),
    ):
        assert list(cfg.problems()) == []


def test_build_accepts_omegaconf_nodes() -> None:
    from omegaconf import OmegaConf

    node = OmegaConf.structured(data.DigitsConfig(seed=3))
    assert _equal(data.build(node), data.build(data.DigitsConfig(seed=3)))


def test_each_config_builds_its_own_dataset_through_the_registry() -> None:
    from omegaconf import OmegaConf

    cfg = data.SyntheticLogRegConfig(n_samples=200, n_features=10, seed=4)
    direct = cfg.build()
    assert _equal(direct, data.DATASETS.build(cfg))
    assert _equal(direct, data.build(OmegaConf.create(dataclasses.asdict(cfg))))  # an untyped node too
