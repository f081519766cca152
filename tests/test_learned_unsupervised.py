"""The Metz et al. unsupervised update rule: meta-training, held-out few-shot gains, locality, labels, worker loop."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from localsgd import optim
from localsgd.errors import ConfigError
from localsgd.learned.meta_train_unsupervised import MetaTrainConfig, evaluate_rule, meta_train
from localsgd.learned.unsupervised import (
    BUNDLED_CHECKPOINT,
    BaseNet,
    MetzRule,
    RuleSpec,
    base_forward,
    init_base_net,
    load_rule,
    ridge_meta_loss,
    save_rule,
    stack_nets,
    step_many,
)
from localsgd.models import MLP
from localsgd.optim import StepContext
from localsgd.optim.metz import MetzUnsupervisedConfig, MetzUnsupervisedPlugin, build_metz_unsupervised

from .distributed import run_ok

pytestmark = pytest.mark.timeout(60)  # tests that need longer say so

TEST_SIZES = [64, 32, 32, 32]  # small base network: 3 layers of 32 units


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    # Small ops: a second intra-op thread only spins, and on a loaded 2-core machine that is many times slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundled() -> tuple[MetzRule, dict[str, Any]]:
    return load_rule()


# ---------------------------------------------------------------------------------------------- meta-training
@pytest.mark.timeout(120)
def test_meta_loss_decreases_in_a_short_meta_training_run() -> None:
    # A narrower θ and larger meta- and inner steps than the bundled run's, so 25 meta-steps show progress
    # within the test budget (the bundled run: meta-loss 0.80 -> 0.27 over 400 meta-steps).
    cfg = MetaTrainConfig(seed=0, iters=25, tasks=8, batch=16, sizes=TEST_SIZES, min_horizon=10, max_horizon=40,
                          rule_lr=1e-2, meta_lr=1e-2, spec=RuleSpec(hidden=8, delta_dim=4, top_hidden=16))
    _, history = meta_train(cfg)
    losses = np.array([r["meta_loss"] for r in history])
    assert np.isfinite(losses).all()
    n = len(losses) // 5
    first, last = losses[:n].mean(), losses[-n:].mean()
    assert last <= 0.9 * first, f"meta-loss first 20% {first:.4f}, last 20% {last:.4f}"


# ---------------------------------------------------------------------------------------------- the bundled rule
@pytest.mark.timeout(120)
def test_bundled_rule_beats_random_init_and_a_random_rule_on_held_out_classes(
        bundled: tuple[MetzRule, dict[str, Any]]) -> None:
    rule, meta = bundled
    torch.manual_seed(1234)
    random_rule = MetzRule(rule.spec).requires_grad_(False)
    acc = evaluate_rule({"init": None, "bundled": rule, "random_theta": random_rule}, seeds=range(20), steps=30,
                        sizes=TEST_SIZES, lr=meta["config"]["rule_lr"])
    init, learned, random_theta = (np.array(acc[k]) for k in ("init", "bundled", "random_theta"))
    assert len(learned) == 20
    # Paired over 20 seeds: same network, pixel permutation, batches and support set per seed.
    assert (learned - init).mean() >= 0.03, f"init {init.mean():.3f} vs bundled {learned.mean():.3f}"
    assert (learned - random_theta).mean() >= 0.03, f"random θ {random_theta.mean():.3f} vs {learned.mean():.3f}"


def test_bundled_checkpoint_names_its_provenance(bundled: tuple[MetzRule, dict[str, Any]]) -> None:
    rule, meta = bundled
    assert BUNDLED_CHECKPOINT.is_file() and BUNDLED_CHECKPOINT.stat().st_size < 64_000
    assert meta["command"].startswith("localsgd-meta-train-unsupervised")
    assert meta["config"]["seed"] == 0 and meta["meta_train_classes"] == [0, 1, 2, 3, 4]
    assert meta["meta_loss_last_20pct"] < meta["meta_loss_first_20pct"]
    assert not any(p.requires_grad for p in rule.parameters())


def test_checkpoint_round_trip_and_version_check(tmp_path: Path) -> None:
    torch.manual_seed(3)
    rule = MetzRule()
    save_rule(rule, tmp_path / "rule.pt", {"seed": 3})
    loaded, meta = load_rule(tmp_path / "rule.pt")
    assert meta == {"seed": 3}
    for (k, a), (_, b) in zip(rule.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    blob = torch.load(tmp_path / "rule.pt", weights_only=True)
    blob["version"] = 0
    torch.save(blob, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="not a version-1 Metz rule checkpoint"):
        load_rule(tmp_path / "old.pt")
    with pytest.raises(FileNotFoundError, match="localsgd-meta-train-unsupervised"):
        load_rule(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------- locality
def _permute_units(net: BaseNet, layer: int, perm: torch.Tensor) -> BaseNet:
    """Relabel the units of hidden layer ``layer`` (0-based weight layer whose outputs they are)."""
    ws, bs, vs = list(net.weights), list(net.biases), list(net.backward)
    ws[layer], bs[layer], vs[layer] = ws[layer][perm], bs[layer][perm], vs[layer][perm]
    ws[layer + 1], vs[layer + 1] = ws[layer + 1][:, perm], vs[layer + 1][:, perm]
    return BaseNet(ws, bs, vs)


def test_permuting_hidden_units_permutes_the_update_exactly(bundled: tuple[MetzRule, dict[str, Any]]) -> None:
    rule = MetzRule(bundled[0].spec).double()
    rule.load_state_dict(bundled[0].state_dict())
    gen = torch.Generator().manual_seed(5)
    net = init_base_net([20, 12, 10, 6], gen, dtype=torch.float64)
    x = torch.rand(16, 20, generator=gen, dtype=torch.float64)
    perm = torch.randperm(10, generator=gen)
    with torch.no_grad():
        ref = rule.step(net, x, 1e-2)
        got = rule.step(_permute_units(net, 1, perm), x, 1e-2)
        input_perm = torch.randperm(20, generator=gen)  # relabel the input units (pixels) too
        net_in = BaseNet([net.weights[0][:, input_perm], *net.weights[1:]], net.biases,
                         [net.backward[0][:, input_perm], *net.backward[1:]])
        got_in = rule.step(net_in, x[:, input_perm], 1e-2)
    expected = _permute_units(ref, 1, perm)
    for a, b in zip(got.tensors(), expected.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    expected_in = BaseNet([ref.weights[0][:, input_perm], *ref.weights[1:]], ref.biases,
                          [ref.backward[0][:, input_perm], *ref.backward[1:]])
    for a, b in zip(got_in.tensors(), expected_in.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    # The update is not trivially equivariant (e.g. zero): it moved every layer.
    assert all((a - b).abs().max() > 1e-4 for a, b in zip(ref.weights, net.weights))


def test_vectorised_steps_equal_one_network_at_a_time(bundled: tuple[MetzRule, dict[str, Any]]) -> None:
    rule = bundled[0]
    gen = torch.Generator().manual_seed(7)
    nets = [init_base_net([16, 8, 4], gen) for _ in range(3)]
    x = torch.rand(3, 10, 16, generator=gen)
    with torch.no_grad():
        many = step_many(rule, stack_nets(nets), x, 1e-3)
        for k, net in enumerate(nets):
            one = rule.step(net, x[k], 1e-3)
            for a, b in zip(many.tensors(), one.tensors()):
                torch.testing.assert_close(a[k], b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- labels
def test_the_update_never_sees_labels(bundled: tuple[MetzRule, dict[str, Any]]) -> None:
    assert list(inspect.signature(MetzRule.step).parameters) == ["self", "net", "x", "lr"]
    params = []
    for shuffle in (False, True):
        torch.manual_seed(0)
        model = MLP(64, [32, 16], 10)
        plugin = build_metz_unsupervised(MetzUnsupervisedConfig(pretrain_steps=5), model, total_steps=10)
        gen = torch.Generator().manual_seed(1)
        ctx = StepContext(loss_fn=torch.nn.functional.cross_entropy)
        for step in range(5):
            x, y = torch.rand(24, 64, generator=gen), torch.randint(0, 10, (24,), generator=gen)
            if shuffle:
                y = y[torch.randperm(24, generator=torch.Generator().manual_seed(step))]
            plugin.train_step(model, (x, y), step, ctx)
        params.append({k: v.clone() for k, v in model.state_dict().items()})
    changed = [k for k in params[0] if not torch.equal(params[0][k], params[1][k])]
    assert changed == []
    torch.manual_seed(0)
    fresh = MLP(64, [32, 16], 10)
    build_metz_unsupervised(MetzUnsupervisedConfig(), fresh, total_steps=10)
    assert not torch.equal(fresh.state_dict()["net.1.weight"], params[0]["net.1.weight"])  # the rule did act


# ---------------------------------------------------------------------------------------------- meta-objective
def test_ridge_meta_loss_matches_a_float64_reference() -> None:
    gen = torch.Generator().manual_seed(11)
    support, query = torch.randn(30, 6, generator=gen, dtype=torch.float64), torch.randn(9, 6, generator=gen,
                                                                                      dtype=torch.float64)
    ys, yq = torch.arange(30) % 3, torch.arange(9) % 3
    loss, acc = ridge_meta_loss(support, ys, query, yq, 3)
    a = np.hstack([support.numpy(), np.ones((30, 1))])
    onehot = np.eye(3)[ys.numpy()]
    target = (onehot - onehot.mean()) / np.sqrt(((onehot - onehot.mean()) ** 2).sum(1).mean())
    w = np.linalg.solve(a.T @ a + np.diag([0.1] * 6 + [0.0]), a.T @ target)
    pred = np.hstack([query.numpy(), np.ones((9, 1))]) @ w
    unit = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    onehot_q = np.eye(3)[yq.numpy()]
    target_q = (onehot_q - onehot_q.mean()) / np.sqrt(((onehot_q - onehot_q.mean()) ** 2).sum(1).mean())
    expected = ((unit - target_q) ** 2).sum() / 9 + 0.1 * (w[:-1] ** 2).sum() / 30
    assert float(loss) == pytest.approx(expected, rel=1e-9)
    assert float(acc) == pytest.approx(float((pred.argmax(1) == yq.numpy()).mean()))


# ---------------------------------------------------------------------------------------------- the plugin
def _run_plugin(finetune: str) -> tuple[list[str], dict[str, torch.Tensor], list[dict[str, torch.Tensor]], Any]:
    torch.manual_seed(0)
    model = MLP(64, [32, 16], 10)
    plugin = optim.build(MetzUnsupervisedConfig(pretrain_steps=3, lr=0.1, finetune=finetune), model, total_steps=6)
    assert isinstance(plugin, MetzUnsupervisedPlugin)  # the config builds its plugin, through the registry
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(2)
    ctx = StepContext(loss_fn=torch.nn.functional.cross_entropy)
    snapshots = []
    for step in range(6):
        plugin.train_step(model, (torch.rand(16, 64, generator=gen), torch.randint(0, 10, (16,), generator=gen)),
                          step, ctx)
        snapshots.append({k: v.clone() for k, v in model.state_dict().items()})
    return [k for k, _ in model.named_parameters()], before, snapshots, (model, plugin)


def test_plugin_runs_the_rule_first_then_sgd_on_the_readout_or_on_all_layers() -> None:
    names, before, snaps, (model, plugin) = _run_plugin("readout")
    assert names == ["net.1.weight", "net.1.bias", "net.1.backward_weight", "net.3.weight", "net.3.bias",
                     "net.3.backward_weight", "net.5.weight", "net.5.bias"]
    x = torch.rand(4, 8, 8)  # any input shape: flattened like the MLP does
    xs, _ = base_forward(plugin.base_net(), x.flatten(1))
    torch.testing.assert_close(model.net[:5](x), xs[-1])  # the model's forward is the Metz base network's
    hidden = [k for k in names if not k.startswith("net.5")]
    assert all(not torch.equal(snaps[2][k], before[k]) for k in hidden)  # the rule moved W, b and V
    assert all(torch.equal(snaps[2][k], before[k]) for k in ("net.5.weight", "net.5.bias"))  # not the readout
    assert all(torch.equal(snaps[5][k], snaps[2][k]) for k in hidden)  # frozen features after the switch
    assert not torch.equal(snaps[5]["net.5.weight"], snaps[2]["net.5.weight"])
    assert plugin.lr(0) == 1e-3 and plugin.lr(3) == 0.1
    names, _, snaps, _ = _run_plugin("all")
    moved = {k for k in names if not torch.equal(snaps[5][k], snaps[2][k])}
    assert moved == {k for k in names if "backward" not in k}  # SGD trains W, b and the readout; V has no gradient


def test_config_problems_and_model_check_name_the_key(tmp_path: Path) -> None:
    bad = MetzUnsupervisedConfig(pretrain_steps=-1, finetune="head", rule_lr=2.0, checkpoint=str(tmp_path / "x"))
    assert sorted(k for k, _, _ in bad.problems()) == ["checkpoint", "finetune", "pretrain_steps", "rule_lr"]
    assert list(MetzUnsupervisedConfig().problems()) == []
    with pytest.raises(ConfigError, match="needs model=mlp with at least one hidden layer"):
        build_metz_unsupervised(MetzUnsupervisedConfig(), MLP(64, [], 10), total_steps=10)


# ---------------------------------------------------------------------------------------------- two ranks
def _worker_loop_two_ranks(rank: int, world: int, run_dir: str) -> dict[str, Any]:
    """The real worker loop (``run_training``) with optimizer=metz_unsupervised on a 2-rank Gloo group."""
    import torch.distributed as tdist
    from hydra import compose, initialize_config_dir

    import localsgd.optim as optim_lib
    from localsgd.config import check_config, config_hash, flat_items, register_configs
    from localsgd.train import config_dir
    from localsgd.trainer import run_training

    register_configs()
    overrides = ["data=digits", "model=mlp", "model.hidden=[32,32]", "optimizer=metz_unsupervised",
                 "optimizer.pretrain_steps=16", "trainer=smoke", "trainer.max_steps=32", "trainer.eval_every=0",
                 "schedule.H=4", "checkpoint=off"]
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = check_config(compose("config", overrides=overrides))
    captured: dict[str, Any] = {}
    real_build = optim_lib.build

    def capture(opt_cfg: Any, model: torch.nn.Module, total_steps: int) -> Any:
        captured["plugin"] = plugin = real_build(opt_cfg, model, total_steps)
        captured["model"], captured["init"] = model, {k: v.clone() for k, v in model.state_dict().items()}
        return plugin

    optim_lib.build = capture  # the trainer looks the builder up on the module at call time
    items = flat_items(cfg)
    Path(run_dir).mkdir(parents=True, exist_ok=True)  # Hydra's job, when launched through localsgd.train
    summary = run_training(cfg, Path(run_dir), items, config_hash(items))
    model, plugin = captured["model"], captured["plugin"]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    gathered: list[Any] = [None] * world
    tdist.all_gather_object(gathered, state)
    keys = [f"net.{i}.{p}" for i in (1, 3) for p in ("weight", "bias", "backward_weight")]
    # One more local rule step on this rank's own data: the replicas would differ without averaging.
    x = torch.rand(16, 64, generator=torch.Generator().manual_seed(rank))
    plugin.cfg.pretrain_steps = 10**9
    plugin.train_step(model, (x, torch.zeros(16, dtype=torch.long)), 0, optim_lib.StepContext(
        loss_fn=torch.nn.functional.cross_entropy))
    local: list[Any] = [None] * world
    tdist.all_gather_object(local, model.state_dict()["net.1.weight"].clone())
    # Plain Python results: tensors sent through the result queue would travel as shared memory.
    return {"summary": summary, "keys": keys,
            "identical": {k: all(torch.equal(s[k], gathered[0][k]) for s in gathered) for k in keys},
            "moved": {k: not torch.equal(state[k], captured["init"][k]) for k in keys},
            "local_steps_differ": not torch.equal(local[0], local[1])}


@pytest.mark.slow
@pytest.mark.timeout(150)
def test_two_ranks_pretrain_in_the_worker_loop_and_agree_on_w_b_v(tmp_path: Path) -> None:
    results = run_ok(_worker_loop_two_ranks, 2, str(tmp_path / "run"), timeout_s=140)
    summary = results[0]["summary"]
    assert summary["world_size"] == 2 and summary["optimizer"] == "metz_unsupervised"
    assert summary["comm_rounds"] == 32 // 4  # H = 4: the last step is a sync, so finalize adds no round
    assert summary["final_eval_accuracy"] > 0.5  # 10 classes: chance is 0.1
    for r in results:
        assert len(r["keys"]) == 6
        assert all(r["identical"].values()), r["identical"]  # W, b and V identical after the sync
        assert all(r["moved"].values()), r["moved"]  # and moved by the rule
        assert r["local_steps_differ"]  # while a local step on each rank's own data would split them
