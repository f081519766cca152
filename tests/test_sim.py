"""``localsgd.sim``: K simulated workers equal K real Gloo ranks, and agree with hand-computed references."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from localsgd.errors import ConfigError
from localsgd.sampler import ShardGroup, ShardSampler
from localsgd.sim import Simulator, sim_config
from localsgd.testing.gloo_reference import gloo_reference

from .distributed import run_ok

LOGREG = ["data=synthetic_logreg", "data.n_samples=1200", "data.n_features=12", "model=logreg", "optimizer=sgd",
          "optimizer.lr=0.3", "trainer.batch_size=4"]
# The four (fixed, stich, patel_dieuleveut, an outer optimizer), each at two seeds, then a ramp,
# a hierarchical schedule and adaptive schedules at one; stich at T=200, b=2 has H = ⌊√(200/(K·2))⌋ > 1.
REQUIRED = [["schedule=fixed", "schedule.H=4", "trainer.max_steps=48"],
            ["schedule=stich", "trainer.max_steps=200", "trainer.batch_size=2", "optimizer.lr=0.05"],
            ["schedule=patel_dieuleveut", "trainer.max_steps=48", "optimizer.lr_decay=poly"],
            ["schedule=fixed", "schedule.H=5", "outer=nesterov", "trainer.max_steps=48"]]
EXTRA = [["schedule=fixed", "schedule.H=3", "ramp=linear", "ramp.b_end=16", "trainer.max_steps=48"],
         ["schedule=hierarchical", "schedule.H_group=2", "schedule.H_global=6", "schedule.group_size=2",
          "outer=nesterov", "trainer.max_steps=48"],
         ["schedule=adacomm", "trainer.max_steps=48", "optimizer.lr_decay=step"],
         ["schedule=patel_dieuleveut", "schedule.adaptive=true", "trainer.max_steps=48", "outer=slowmo"],
         # H from the measured noise scale: the probe's all-reduced estimate and the simulator's agree
         ["schedule=noise_adaptive", "schedule.measure_every_rounds=1", "schedule.warmup_measurements=1",
          "trainer.batch_size=128", "trainer.max_steps=60"]]


def _cases(workers: int) -> list[list[str]]:
    seeded = [[*c, f"trainer.seed={s}", f"data.seed={s}"] for c in REQUIRED for s in (0, 5)]
    extra = EXTRA if workers % 2 == 0 else EXTRA[:1]
    return [[*LOGREG, *c] for c in [*seeded, *extra]]


@pytest.mark.long
@pytest.mark.slow
@pytest.mark.parametrize("workers", [2, 4])
def test_simulated_workers_equal_real_gloo_ranks_in_float64(workers: int) -> None:
    cases = _cases(workers)
    cfgs = [sim_config(*c, workers=workers) for c in cases]
    real = run_ok(gloo_reference, workers, cfgs, timeout_s=240)
    for rank_result in real[1:]:  # after finalize() every rank holds the same replica
        for a, b in zip(real[0], rank_result):
            assert (a["params"] == b["params"]).all()
    sims = [Simulator(cfg, workers, dtype=torch.float64).run() for cfg in cfgs]
    for case, sim, ref in zip(cases, sims, real[0]):
        diff = (sim.flat_params() - torch.from_numpy(ref["params"])).abs().max().item()
        assert diff <= 1e-12, (case, diff)
        steps = [s.step for s in sim.syncs]
        assert steps[: len(ref["synced_at"])] == ref["synced_at"], case  # the same rounds, decided alike
        assert sim.rounds == ref["rounds"], case
    # The check can fail: a neighbouring case (other seed or schedule) is far away.
    far = (sims[0].flat_params() - torch.from_numpy(real[0][1]["params"])).abs().max().item()
    assert far > 1e-3
    stich = [s for c, s in zip(cases, sims) if "schedule=stich" in c][0]
    assert stich.syncs[0].step == int((200 / (workers * 2)) ** 0.5) > 1
    adaptive = [s for c, s in zip(cases, sims) if "schedule=noise_adaptive" in c][0]
    gaps = {b.step - a.step for a, b in zip(adaptive.syncs, adaptive.syncs[1:])}
    assert workers != 2 or len(gaps) > 1, gaps  # at K = 2 the measured noise scale does move H


def test_one_simulated_worker_is_plain_training_bit_for_bit() -> None:
    """K = 1 against the reference loop on no process group (LocalSGD at world size 1 is an identity)."""
    cases = [[*LOGREG, "schedule.H=4", "trainer.max_steps=30", "optimizer.momentum=0.5", "optimizer.weight_decay=0.01"],
             [*LOGREG, "schedule.H=4", "trainer.max_steps=30", "optimizer=adamw", "optimizer.lr=0.01"]]
    cfgs = [sim_config(*c, workers=1) for c in cases]
    for cfg, ref in zip(cfgs, gloo_reference(0, 1, cfgs)):
        sim = Simulator(cfg, 1, dtype=torch.float64).run()
        assert torch.equal(sim.flat_params(), torch.from_numpy(ref["params"]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_many_workers_at_h1_equal_minibatch_sgd_on_their_joint_batch(seed: int) -> None:
    """Plain SGD averaged every step: x ← x − γ·mean_k g_k, computed here by hand on one model at K = 64."""
    K, b, T, lr = 64, 3, 12, 0.5
    cfg = sim_config(*LOGREG, "optimizer.momentum=0", "schedule.H=1", f"trainer.batch_size={b}",
                     f"trainer.max_steps={T}", f"optimizer.lr={lr}", f"trainer.seed={seed}", workers=K)
    sim = Simulator(cfg, K, dtype=torch.float64)
    model = nn.Linear(12, 2).double()
    with torch.no_grad():
        for p, q in zip(model.parameters(), sim.replicas):
            p.copy_(q[0])
    x, y = sim.x_train, sim.y_train
    samplers = [ShardSampler(sim.data.num_train, k, K, seed) for k in range(K)]
    for _ in range(T):
        idx = torch.cat([s.next_indices(b) for s in samplers])
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(lr * p.grad)
    result = sim.run()
    expected = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert (result.flat_params() - expected).abs().max().item() <= 1e-12
    assert result.rounds == T and result.samples == K * b * T


def test_hierarchical_groups_average_only_within_consecutive_workers() -> None:
    cfg = sim_config(*LOGREG, "schedule=hierarchical", "schedule.H_group=2", "schedule.H_global=8",
                     "schedule.group_size=4", "trainer.max_steps=6", workers=8)
    seen = []
    Simulator(cfg, 8, dtype=torch.float64,
              on_sync=lambda sim, rec: seen.append((rec, sim.replicas[0].detach().clone()))).run()
    (first, w), (*_, (last, w_end)) = seen[0], seen
    assert first.step == 2 and first.group_size == 4
    assert torch.equal(w[0], w[3]) and torch.equal(w[4], w[7]) and not torch.equal(w[0], w[4])
    assert last.group_size == 8 and all(torch.equal(w_end[0], w_end[k]) for k in range(8))  # finalize: global


@pytest.mark.parametrize("override, named", [
    ("schedule=ddp", "schedule=ddp"),
    ("optimizer=stn", "optimizer=stn"),
    ("sync.compress=int8", "sync.compress='int8'"),
    ("sync.optimizer_state=reset", "sync.optimizer_state='reset'"),
    ("trainer.grad_accum_steps=2", "trainer.precision/grad_accum_steps"),
])
def test_what_it_cannot_simulate_is_refused_by_name(override: str, named: str) -> None:
    extra = ["schedule.H=4"] if override.startswith("sync.compress") else []
    with pytest.raises(ConfigError, match="cannot simulate") as err:
        Simulator(sim_config(override, *extra, workers=2), 2)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_models_with_buffers_and_bad_worker_counts_are_refused() -> None:
    data = [o for o in LOGREG if not o.startswith("model=")]
    with pytest.raises(ConfigError, match="has buffers"):
        Simulator(sim_config(*data, "model=custom", "model._target_=torch.nn.BatchNorm1d", "+model.num_features=12",
                             workers=2), 2)
    with pytest.raises(ConfigError, match="workers=0"):
        Simulator(sim_config(*LOGREG, workers=1), 0)


def test_shared_epoch_permutation_gives_each_rank_the_shard_it_had() -> None:
    """The cache shared by the simulated workers hands out exactly the per-rank draw of before."""
    n, world, seed = 103, 4, 9
    samplers = [ShardSampler(n, r, world, seed) for r in range(world)]
    for epoch in range(3):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for r, s in enumerate(samplers):
            assert torch.equal(s.next_indices(n // world), perm[r::world][: n // world])


@pytest.mark.parametrize("n, world", [(103, 4), (64, 8), (10, 3)])
def test_shard_group_rows_are_the_ranks_samplers_across_epochs_and_batch_changes(n: int, world: int) -> None:
    seed = 3
    samplers = [ShardSampler(n, r, world, seed) for r in range(world)]
    group = ShardGroup(n, world, seed)
    for b in [1, 5, 2, 7, n // world, 3, 2 * (n // world) + 1, 4]:  # crossing epochs, and a batch above a shard
        rows = group.next_indices(b)
        assert rows.shape == (world, b)
        for r, s in enumerate(samplers):
            assert torch.equal(rows[r], s.next_indices(b)), (b, r)
    assert (group.epoch, group.cursor, group.samples_seen) == (samplers[0].epoch, samplers[0].cursor,
                                                               samplers[0].samples_seen)


def test_a_run_stopped_by_its_sync_callback_ends_there_with_equal_replicas() -> None:
    cfg = sim_config(*LOGREG, "schedule.H=4", "trainer.max_steps=40", workers=3)
    seen: list[int] = []

    def stop_at_12(sim: Simulator, record) -> bool:
        seen.append(record.step)
        spread = max(float((p.detach() - p.detach()[:1]).abs().max()) for p in sim.replicas)
        assert spread == 0.0  # every replica is the average when the callback sees it
        return record.step >= 12

    result = Simulator(cfg, 3, dtype=torch.float64, on_sync=stop_at_12).run()
    assert seen == [4, 8, 12] and result.steps == 12 and result.rounds == 3
    full = Simulator(cfg, 3, dtype=torch.float64, on_sync=lambda sim, r: None).run()
    assert full.steps == 40 and full.rounds == 10
    assert result.samples == 3 * 12 * 4


def test_noise_scale_after_each_average_is_the_two_batch_estimate_of_the_workers_gradients() -> None:
    """At the first step after a global average the K gradients share one point: B_small = b, B_big = K·b."""
    from localsgd.ramps import two_batch_estimates

    K, b, seed = 4, 4, 2
    cfg = sim_config(*LOGREG, "schedule.H=3", "trainer.max_steps=7", f"trainer.seed={seed}", workers=K)
    sim = Simulator(cfg, K, dtype=torch.float64, measure_noise=True)
    start = {n: p.detach()[0].clone() for n, p in zip(sim.names, sim.replicas)}
    sim.run()
    assert [s for s, _, _ in sim.noise] == [0, 3, 6]  # the start, then after every average
    # by hand at step 0: each worker's batch from its own ShardSampler, one plain backward each
    model = sim.model
    grads = []
    for k in range(K):
        idx = ShardSampler(sim.data.num_train, k, K, seed).next_indices(b)
        for n, p in model.named_parameters():
            p.data.copy_(start[n])
            p.grad = None
        sim.loss_fn(model(sim.x_train[idx]), sim.y_train[idx]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
    g = torch.stack(grads)
    small = float((g * g).sum(1).mean())
    big = float(g.mean(0) @ g.mean(0))
    want = two_batch_estimates(small, big, b, K * b)
    assert sim.noise[0][1] == pytest.approx(want[0], rel=1e-12, abs=1e-15)
    assert sim.noise[0][2] == pytest.approx(want[1], rel=1e-12)
    with pytest.raises(ConfigError, match="measure_noise needs workers >= 2"):
        Simulator(sim_config(*LOGREG, workers=1), 1, measure_noise=True)


def test_an_early_stop_reports_the_batch_of_its_last_step_not_of_the_budget() -> None:
    cfg = sim_config(*LOGREG, "schedule.H=4", "trainer.max_steps=40", "ramp=phases", "ramp.starts=[0,0.5]",
                     "ramp.batch_factors=[1,4]", "ramp.lr_factors=[1,1]", workers=2)
    stopped = Simulator(cfg, 2, dtype=torch.float64, on_sync=lambda sim, r: r.step >= 12).run()
    full = Simulator(cfg, 2, dtype=torch.float64).run()
    assert (stopped.steps, stopped.final_batch_size, stopped.samples) == (12, 4, 2 * 12 * 4)
    assert (full.steps, full.final_batch_size, full.samples) == (40, 16, 2 * (20 * 4 + 20 * 16))
