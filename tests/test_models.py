"""Tests of ``localsgd.models``: output shapes, parameter counts, deterministic init, config checks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from localsgd import data, models


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_registry_names() -> None:
    assert models.MODELS.names() == ["cnn1d", "gpt", "logreg", "mlp", "resnet20"]
    for entry in models.MODELS.entries():
        cfg = entry.config_cls()
        assert cfg.name == entry.name and list(cfg.problems()) == []


@pytest.mark.parametrize(
    ("cfg", "input_shape", "num_classes"),
    [
        (models.LogRegConfig(), (30,), 2),
        (models.LogRegConfig(), (1, 40), 10),
        (models.LogRegConfig(bias=False, zero_init=True), (3, 8, 8), 10),
        (models.MLPConfig(), (64,), 10),
        (models.MLPConfig(hidden=[16], dropout=0.5), (1, 40), 10),
        (models.MLPConfig(hidden=[]), (30,), 2),
        (models.CNN1DConfig(), (1, 40), 10),
        (models.CNN1DConfig(channels=8, dropout=0.2), (2, 33), 5),
        (models.CNN1DConfig(), (64,), 10),  # a flat input is one channel
        (models.ResNet20Config(), (3, 32, 32), 10),
        (models.ResNet20Config(width=4, shortcut="B"), (3, 16, 16), 7),
        (models.ResNet20Config(width=8), (1, 28, 28), 10),
    ],
)
def test_forward_shape(cfg: object, input_shape: tuple[int, ...], num_classes: int) -> None:
    torch.manual_seed(0)
    model = models.build(cfg, input_shape, num_classes)
    x = torch.randn(5, *input_shape)
    out = model(x)
    assert out.shape == (5, num_classes) and out.dtype == torch.float32 and torch.isfinite(out).all()
    F.cross_entropy(out, torch.zeros(5, dtype=torch.long)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_logreg_is_one_linear_layer() -> None:
    m = models.build(models.LogRegConfig(), (3, 4), 2)
    assert _n_params(m) == 12 * 2 + 2
    z = models.build(models.LogRegConfig(zero_init=True), (3, 4), 2)
    assert all(float(p.detach().abs().sum()) == 0 for p in z.parameters())


def test_mlp_structure() -> None:
    m = models.build(models.MLPConfig(hidden=[32, 16], dropout=0.1), (64,), 10)
    linears = [x for x in m.modules() if isinstance(x, nn.Linear)]
    assert [(x.in_features, x.out_features) for x in linears] == [(64, 32), (32, 16), (16, 10)]
    assert sum(isinstance(x, nn.Dropout) for x in m.modules()) == 2
    assert not any(isinstance(x, nn.Dropout) for x in models.build(models.MLPConfig(), (64,), 10).modules())


def test_cnn1d_is_small_and_has_no_buffers() -> None:
    m = models.build(models.CNN1DConfig(), (1, 40), 10)
    assert _n_params(m) <= 50_000
    assert sum(isinstance(x, nn.Conv1d) and x.kernel_size == (5,) for x in m.modules()) == 3
    assert list(m.buffers()) == []


def test_resnet20_parameters_and_batchnorm() -> None:
    m = models.build(models.ResNet20Config(), (3, 32, 32), 10)
    assert abs(_n_params(m) - 270_000) <= 2_700  # He et al. 2016, Table 6: 0.27M
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert len(convs) == 19  # + the Linear layer = 20 weighted layers; option A adds no convolutions
    assert {x.out_channels for x in convs} == {16, 32, 64}
    bns = [x for x in m.modules() if isinstance(x, nn.BatchNorm2d)]
    assert len(bns) == 19
    names = {n for n, _ in m.named_buffers()}
    assert any(n.endswith("running_mean") for n in names) and any(n.endswith("running_var") for n in names)
    b = models.build(models.ResNet20Config(shortcut="B"), (3, 32, 32), 10)
    assert abs(_n_params(b) - 270_000) <= 2_700 and _n_params(b) > _n_params(m)
    wide = models.build(models.ResNet20Config(width=32), (3, 32, 32), 10)
    assert 3.9 < _n_params(wide) / _n_params(m) < 4.0  # conv parameters scale with width^2


def test_resnet20_batchnorm_train_and_eval() -> None:
    torch.manual_seed(0)
    m = models.build(models.ResNet20Config(width=4), (3, 8, 8), 10)
    bn = m.bn
    before = bn.running_mean.clone()
    m.train()
    m(torch.randn(4, 3, 8, 8) + 3)
    assert not torch.equal(bn.running_mean, before)
    m.eval()
    x = torch.randn(1, 3, 8, 8)
    assert torch.equal(m(x), m(x))


@pytest.mark.parametrize(
    ("cfg", "shape"),
    [
        (models.LogRegConfig(), (30,)),
        (models.MLPConfig(), (64,)),
        (models.CNN1DConfig(), (1, 40)),
        (models.ResNet20Config(width=4), (3, 8, 8)),
    ],
)
def test_initialisation_is_deterministic(cfg: object, shape: tuple[int, ...]) -> None:
    def state(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        return models.build(cfg, shape, 10).state_dict()

    a, b, c = state(1), state(1), state(2)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (models.MLPConfig(hidden=[8, 0]), "hidden[1]"),
        (models.MLPConfig(dropout=1.0), "dropout"),
        (models.CNN1DConfig(channels=0), "channels"),
        (models.CNN1DConfig(dropout=-0.1), "dropout"),
        (models.ResNet20Config(width=0), "width"),
        (models.ResNet20Config(shortcut="C"), "shortcut"),
    ],
)
def test_problems_flag_bad_values(cfg: object, field: str) -> None:
    problems = list(cfg.problems())  # type: ignore[attr-defined]
    assert [p[0] for p in problems] == [field]
    assert isinstance(problems[0][2], str) and problems[0][2]
    with pytest.raises(ValueError, match="invalid"):
        models.build(cfg, (3, 8, 8), 10)


def test_logreg_config_has_no_invalid_values() -> None:
    assert list(models.LogRegConfig(bias=False, zero_init=True).problems()) == []


@pytest.mark.parametrize(
    ("cfg", "shape", "num_classes"),
    [
        (models.CNN1DConfig(), (3, 8, 8), 10),
        (models.ResNet20Config(), (3, 32), 10),
        (models.ResNet20Config(), (3, 32, 32), 1),
        (models.LogRegConfig(), (), 10),
        (models.MLPConfig(), (0, 4), 10),
    ],
)
def test_bad_input_shapes_are_rejected(cfg: object, shape: tuple[int, ...], num_classes: int) -> None:
    with pytest.raises(ValueError):
        models.build(cfg, shape, num_classes)


def test_build_accepts_omegaconf_nodes() -> None:
    from omegaconf import OmegaConf

    node = OmegaConf.structured(models.MLPConfig(hidden=[8, 4]))
    m = models.build(node, (6,), 3)
    assert [x.out_features for x in m.modules() if isinstance(x, nn.Linear)] == [8, 4, 3]


def test_each_config_builds_its_own_model_through_the_registry() -> None:
    from omegaconf import OmegaConf

    shapes = {"logreg": (12,), "mlp": (12,), "cnn1d": (1, 12), "resnet20": (3, 8, 8), "gpt": (12,)}
    for entry in models.MODELS.entries():
        cfg = entry.config_cls()
        torch.manual_seed(0)
        direct = cfg.build(shapes[entry.name], 3)
        torch.manual_seed(0)
        via_registry = models.MODELS.build(cfg, shapes[entry.name], 3)
        torch.manual_seed(0)
        via_plain_node = models.build(OmegaConf.create(dataclasses.asdict(cfg)), shapes[entry.name], 3)
        for other in (via_registry, via_plain_node):
            assert type(other) is type(direct)
            assert all(torch.equal(p, q) for p, q in zip(direct.state_dict().values(), other.state_dict().values()))


def test_logreg_and_mlp_learn_breast_cancer_and_digits() -> None:
    """A smoke test that the models train: full-batch Adam on the two tiny scikit-learn sets."""
    for data_cfg, model_cfg in (
        (data.BreastCancerConfig(), models.LogRegConfig()),
        (data.DigitsConfig(), models.MLPConfig(hidden=[64])),
    ):
        ds = data.build(data_cfg)
        torch.manual_seed(0)
        m = models.build(model_cfg, ds.input_shape, ds.num_classes)
        opt = torch.optim.Adam(m.parameters(), lr=0.01)
        for _ in range(150):
            opt.zero_grad()
            F.cross_entropy(m(ds.x_train), ds.y_train).backward()
            opt.step()
        with torch.no_grad():
            acc = (m(ds.x_test).argmax(1) == ds.y_test).float().mean().item()
        assert acc > 0.9, (data_cfg.name, acc)
