"""Tests of ``model=gpt`` (``localsgd.models.gpt``): shapes, causality, weight tying, deterministic init,
the parameter counts of its docstring, block sizes, config checks, and that a few SGD steps learn."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from localsgd import models
from localsgd.models import GPT, GPTConfig

TINY = GPTConfig(n_layer=2, n_head=2, n_embd=16)


def _build(cfg: GPTConfig = TINY, window: int = 8, vocab: int = 11, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = models.build(cfg, (window,), vocab)
    assert isinstance(model, GPT)
    return model


def test_registered_by_name() -> None:
    assert "gpt" in models.MODELS.names()
    assert GPTConfig().name == "gpt" and list(GPTConfig().problems()) == []
    assert isinstance(models.MODELS.build(GPTConfig(), (12,), 3), GPT)


def test_forward_shape_and_backward() -> None:
    model = _build()
    idx = torch.randint(0, 11, (3, 8))
    logits = model(idx)
    assert logits.shape == (3, 8, 11) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert model(idx[:, :5]).shape == (3, 5, 11)  # shorter windows fit the position table
    F.cross_entropy(logits.reshape(-1, 11), idx.reshape(-1)).backward()
    assert all(p.grad is not None for p in model.parameters())


def test_forward_refuses_float_inputs_and_long_windows() -> None:
    model = _build()
    with pytest.raises(ValueError, match="integer"):
        model(torch.zeros(2, 8))
    with pytest.raises(ValueError, match="T=9 .*block_size=8"):
        model(torch.zeros(2, 9, dtype=torch.long))


@pytest.mark.parametrize("t", [0, 3, 7])
def test_causal_a_token_changes_only_its_own_and_later_logits(t: int) -> None:
    model = _build().double().eval()
    idx = torch.randint(0, 11, (2, 8))
    changed = idx.clone()
    changed[:, t] = (idx[:, t] + 1) % 11
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert torch.equal(a[:, :t], b[:, :t])  # exactly: masked positions get weight 0 in the softmax
    assert (a[:, t:] != b[:, t:]).any(dim=-1).all()  # every later position sees the change


def test_tied_weights_are_one_parameter_counted_once() -> None:
    tied = _build()
    assert tied.head.weight is tied.tok_emb.weight
    assert sum(p is tied.tok_emb.weight for p in tied.parameters()) == 1
    untied = _build(GPTConfig(n_layer=2, n_head=2, n_embd=16, tie_weights=False))
    assert untied.head.weight is not untied.tok_emb.weight
    assert not torch.equal(untied.head.weight, untied.tok_emb.weight)
    assert untied.num_parameters() - tied.num_parameters() == 11 * 16  # the head's own (V, C) matrix
    assert untied.num_parameters(non_embedding=True) - tied.num_parameters(non_embedding=True) == 11 * 16


def test_initialisation() -> None:
    cfg = GPTConfig(n_layer=3, n_head=4, n_embd=64)
    a, b, c = (_build(cfg, 32, 50, seed).state_dict() for seed in (1, 1, 2))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same seed builds the same model
    assert any(not torch.equal(a[k], c[k]) for k in a)
    model = _build(cfg, 32, 50)
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name
    std = float(model.blocks[0].mlp.fc.weight.detach().std())
    residual = float(torch.cat([b.mlp.proj.weight.detach().flatten() for b in model.blocks]).std())
    assert abs(std - 0.02) < 0.001
    assert abs(residual - 0.02 / math.sqrt(2 * 3)) < 0.0005  # GPT-2's scaled residual init


@pytest.mark.parametrize(
    ("cfg", "vocab", "window", "total", "non_embedding"),
    [  # the table of localsgd/models/gpt.py's docstring
        (GPTConfig(n_layer=2, n_head=4, n_embd=128), 256, 128, 445_952, 396_800),
        (GPTConfig(), 256, 128, 842_496, 793_344),
        (GPTConfig(n_layer=6, n_head=6, n_embd=384), 256, 256, 10_844_160, 10_647_552),
        (GPTConfig(n_layer=12, n_head=12, n_embd=768), 50257, 1024, 124_439_808, 85_056_000),
    ],
)
def test_parameter_counts_match_the_docstring(
    cfg: GPTConfig, vocab: int, window: int, total: int, non_embedding: int
) -> None:
    with torch.device("meta"):  # shapes only: GPT-2 small costs no memory or init time
        model = models.build(cfg, (window,), vocab)
    assert model.num_parameters() == total == sum(p.numel() for p in model.parameters())
    assert model.num_parameters(non_embedding=True) == non_embedding
    c = cfg.n_embd
    assert total == cfg.n_layer * (12 * c * c + 13 * c) + (vocab + window + 2) * c  # the formula stated there


def test_block_size() -> None:
    assert _build(window=8).pos_emb.num_embeddings == 8  # 0: the data's window
    longer = _build(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=20), window=8)
    assert longer.pos_emb.num_embeddings == 20 and longer(torch.zeros(1, 20, dtype=torch.long)).shape == (1, 20, 11)
    with pytest.raises(ValueError, match=r"model.block_size=4 is shorter than the data's token window T=8"):
        _build(GPTConfig(block_size=4), window=8)


@pytest.mark.parametrize(
    ("cfg", "field"),
    [
        (GPTConfig(n_embd=130, n_head=4), "n_embd"),
        (GPTConfig(n_layer=0), "n_layer"),
        (GPTConfig(n_head=0), "n_head"),
        (GPTConfig(n_embd=0), "n_embd"),
        (GPTConfig(block_size=-1), "block_size"),
        (GPTConfig(dropout=1.0), "dropout"),
        (GPTConfig(dropout=-0.1), "dropout"),
    ],
)
def test_problems_flag_bad_values(cfg: GPTConfig, field: str) -> None:
    problems = list(cfg.problems())
    assert [p[0] for p in problems] == [field]
    assert isinstance(problems[0][2], str) and problems[0][2]
    with pytest.raises(ValueError, match="invalid gpt config"):
        models.build(cfg, (8,), 11)


def test_non_divisible_width_names_the_head_count() -> None:
    assert list(GPTConfig(n_embd=130, n_head=4).problems()) == [("n_embd", 130, "must be a multiple of n_head=4")]


@pytest.mark.parametrize(("shape", "vocab"), [((2, 8), 11), ((3, 8, 8), 11), ((0,), 11), ((8,), 1)])
def test_bad_input_shapes_are_rejected(shape: tuple[int, ...], vocab: int) -> None:
    with pytest.raises(ValueError, match="model 'gpt' needs"):
        models.build(GPTConfig(), shape, vocab)


def test_a_few_sgd_steps_learn_a_repeated_sequence() -> None:
    model = _build(GPTConfig(n_layer=1, n_head=2, n_embd=32), window=16, vocab=8)
    tokens = (torch.arange(17) % 8).repeat(4, 1)  # 0 1 2 ... 7 0 1 ...: each next token is determined
    x, y = tokens[:, :-1], tokens[:, 1:]
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)

    def loss() -> torch.Tensor:
        return F.cross_entropy(model(x).reshape(-1, 8), y.reshape(-1))

    first = float(loss().detach())
    assert abs(first - math.log(8)) < 0.25  # a near-uniform start
    for _ in range(20):
        opt.zero_grad()
        step_loss = loss()
        step_loss.backward()
        opt.step()
    assert float(loss().detach()) < 0.05  # from ~log(8) = 2.08; it reaches < 0.001 here


def test_dropout_acts_in_train_mode_only() -> None:
    model = _build(GPTConfig(n_layer=1, n_head=2, n_embd=16, dropout=0.5))
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 3  # on the embeddings, and 2 in the one block
    idx = torch.randint(0, 11, (2, 8))
    model.eval()
    with torch.no_grad():
        evaluated = model(idx)
        assert torch.equal(evaluated, model(idx))
        model.train()
        trained = model(idx)
    assert not torch.allclose(trained, evaluated)


def test_builds_from_an_omegaconf_node() -> None:
    from omegaconf import OmegaConf

    node = OmegaConf.structured(GPTConfig(n_layer=1, n_head=2, n_embd=16, tie_weights=False))
    torch.manual_seed(0)
    via_node = models.build(node, (8,), 11)
    torch.manual_seed(0)
    direct = GPTConfig(n_layer=1, n_head=2, n_embd=16, tie_weights=False).build((8,), 11)
    assert all(torch.equal(p, q) for p, q in zip(direct.state_dict().values(), via_node.state_dict().values()))
    assert via_node.head.weight is not via_node.tok_emb.weight
