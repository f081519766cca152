"""Outer optimizers (SlowMo, Wang et al., ICLR 2020, arXiv 1910.00643; DiLoCo, Douillard et al., arXiv 2311.08105):
identities, the DiLoCo and SlowMo worked examples, checkpoints, configs."""

from __future__ import annotations

import copy

import pytest
import torch

from localsgd.outer import (
    OUTER,
    AverageConfig,
    AverageOuter,
    NesterovConfig,
    NesterovOuter,
    OuterOptimizer,
    SlowMoConfig,
    SlowMoOuter,
    build,
)


def _round(opt: OuterOptimizer, x_t: list[torch.Tensor], x_bar: list[torch.Tensor], lr: float) -> list[torch.Tensor]:
    out = [t.clone() for t in x_bar]
    opt.step([t.clone() for t in x_t], out, lr)
    return out


def _random_run(opt: OuterOptimizer, rounds: int, seed: int) -> list[list[torch.Tensor]]:
    """Each round: workers drift from the current global x; returns x_{t+1} per round (two dtype groups)."""
    gen = torch.Generator().manual_seed(seed)
    x = [torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(7, generator=gen, dtype=torch.float32)]
    history = []
    for r in range(rounds):
        x_bar = [t + 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in x]
        x = _round(opt, x, x_bar, lr=0.05 + 0.01 * r)
        history.append(x)
    return history


@pytest.mark.parametrize("opt", [NesterovOuter(lr=1, momentum=0), SlowMoOuter(alpha=1, beta=0)],
                         ids=["nesterov(1,0)", "slowmo(1,0)"])
def test_identity_settings_equal_plain_averaging(opt: OuterOptimizer) -> None:
    ref = _random_run(AverageOuter(), rounds=6, seed=3)
    got = _random_run(opt, rounds=6, seed=3)
    for a, b in zip(ref, got):
        for ta, tb in zip(a, b):
            tol = 1e-12 if ta.dtype == torch.float64 else 1e-5
            torch.testing.assert_close(tb, ta, rtol=tol, atol=tol)


def test_average_keeps_the_average_and_needs_no_copy() -> None:
    opt = AverageOuter()
    assert not opt.needs_global_copy
    assert NesterovOuter.needs_global_copy and SlowMoOuter.needs_global_copy
    x_bar = torch.tensor([1.0, 2.0])
    opt.step([], [x_bar], 0.1)  # the engine keeps no x_t copy for `average`
    assert x_bar.tolist() == [1.0, 2.0] and opt.steps == 1


def _diloco_example(opt: OuterOptimizer) -> list[float]:
    """θ₀ = 0; in every round the workers' mean ends 1.0 above the round start (Δ = −1)."""
    theta = torch.zeros(1, dtype=torch.float64)
    out = []
    for _ in range(2):
        x_bar = theta + 1.0
        opt.step([theta.clone()], [x_bar], 1e-3)
        theta = x_bar
        out.append(float(theta))
    return out


def test_diloco_worked_example() -> None:
    # v₁ = −1, θ₁ = 0 − 0.7(−1 + 0.9·(−1)) = 1.33; v₂ = −1.9, θ₂ = 1.33 + 0.7(1 + 0.9·1.9) = 3.227
    theta1, theta2 = _diloco_example(NesterovOuter(lr=0.7, momentum=0.9))
    assert theta1 == pytest.approx(1.33, abs=1e-6)
    assert theta2 == pytest.approx(3.227, abs=1e-6)


def test_diloco_matches_torch_sgd_nesterov_on_the_pseudo_gradient() -> None:
    gen = torch.Generator().manual_seed(0)
    ours = NesterovOuter(lr=0.7, momentum=0.9)
    p = torch.nn.Parameter(torch.randn(20, generator=gen, dtype=torch.float64))
    sgd = torch.optim.SGD([p], lr=0.7, momentum=0.9, nesterov=True)
    theta = p.detach().clone()
    for _ in range(5):
        x_bar = theta + torch.randn(20, generator=gen, dtype=torch.float64)
        p.grad = theta - x_bar  # the pseudo-gradient Δ
        sgd.step()
        opt_out = x_bar.clone()
        ours.step([theta.clone()], [opt_out], 1e-3)
        torch.testing.assert_close(opt_out, p.detach(), rtol=1e-12, atol=1e-12)
        theta = opt_out
    # and the scalar worked example through torch SGD
    q = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    sgd = torch.optim.SGD([q], lr=0.7, momentum=0.9, nesterov=True)
    seen = []
    for _ in range(2):
        q.grad = torch.full((1,), -1.0, dtype=torch.float64)
        sgd.step()
        seen.append(float(q.detach()))
    assert seen == pytest.approx(_diloco_example(NesterovOuter(0.7, 0.9)), abs=1e-12)


def test_slowmo_hand_computed_two_rounds() -> None:
    # α = 1.5, β = 0.5; x₀ = 0; each round the average ends 1.0 above the start (x_t − x̄ = −1).
    # Round 1, γ₁ = 0.1:  u₁ = 0.5·0 + (−1)/0.1 = −10;           x₁ = 0 − 1.5·0.1·(−10) = 1.5
    # Round 2, γ₂ = 0.05: u₂ = 0.5·(−10) + (−1)/0.05 = −25;      x₂ = 1.5 − 1.5·0.05·(−25) = 3.375
    opt = SlowMoOuter(alpha=1.5, beta=0.5)
    x = torch.zeros(3, dtype=torch.float64)
    for gamma, want_x, want_u in ((0.1, 1.5, -10.0), (0.05, 3.375, -25.0)):
        x_bar = x + 1.0
        opt.step([x.clone()], [x_bar], gamma)
        x = x_bar
        torch.testing.assert_close(x, torch.full((3,), want_x, dtype=torch.float64), rtol=0, atol=1e-9)
        u = opt.state_dict()["momentum_buffers"][0]
        torch.testing.assert_close(u, torch.full((3,), want_u, dtype=torch.float64), rtol=0, atol=1e-9)


def test_slowmo_rejects_a_non_positive_inner_lr() -> None:
    with pytest.raises(ValueError, match="inner learning rate"):
        SlowMoOuter().step([torch.zeros(2)], [torch.ones(2)], 0.0)


def test_mismatched_buffers_are_rejected() -> None:
    with pytest.raises(ValueError, match="buffer 0 differs"):
        NesterovOuter().step([torch.zeros(2)], [torch.zeros(3)], 0.1)
    with pytest.raises(ValueError, match="global buffers"):
        NesterovOuter().step([torch.zeros(2)], [], 0.1)


@pytest.mark.parametrize("make", [lambda: NesterovOuter(0.7, 0.9), lambda: SlowMoOuter(0.8, 0.6)],
                         ids=["nesterov", "slowmo"])
def test_state_dict_round_trip_mid_run_reproduces_the_next_step(make) -> None:
    gen = torch.Generator().manual_seed(1)
    x = [torch.randn(30, generator=gen), torch.randn(4, generator=gen, dtype=torch.float64)]
    opt = make()
    for r in range(3):
        x = _round(opt, x, [t + 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in x], 0.1 / (r + 1))
    saved = copy.deepcopy(opt.state_dict())
    x_bar = [t + 0.1 * torch.randn(t.shape, generator=gen, dtype=t.dtype) for t in x]
    want = _round(opt, x, x_bar, 0.02)
    restored = make()
    restored.load_state_dict(saved)
    assert restored.steps == 3
    got = _round(restored, x, x_bar, 0.02)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    assert torch.equal(opt.state_dict()["momentum_buffers"][0], restored.state_dict()["momentum_buffers"][0])


def test_state_dict_of_another_optimizer_is_refused() -> None:
    with pytest.raises(ValueError, match="slowmo"):
        NesterovOuter().load_state_dict(SlowMoOuter().state_dict())


def test_state_dict_before_the_first_step_round_trips() -> None:
    opt = NesterovOuter()
    fresh = NesterovOuter()
    fresh.load_state_dict(opt.state_dict())
    a, b = [torch.ones(3)], [torch.ones(3)]
    opt.step([torch.zeros(3)], a, 0.1)
    fresh.step([torch.zeros(3)], b, 0.1)
    assert torch.equal(a[0], b[0])


def test_registry_builds_every_config() -> None:
    assert OUTER.names() == ["average", "nesterov", "slowmo"]
    assert isinstance(build(AverageConfig()), AverageOuter)
    n = build(NesterovConfig(lr=0.5, momentum=0.8))
    assert isinstance(n, NesterovOuter) and (n.lr, n.momentum) == (0.5, 0.8)
    s = build(SlowMoConfig(alpha=2.0, beta=0.3))
    assert isinstance(s, SlowMoOuter) and (s.alpha, s.beta) == (2.0, 0.3)
    for entry in OUTER.entries():
        assert list(entry.config_cls().problems()) == []


@pytest.mark.parametrize(
    "cfg, field",
    [
        (NesterovConfig(lr=0.0), "lr"),
        (NesterovConfig(lr=-1.0), "lr"),
        (NesterovConfig(momentum=1.0), "momentum"),
        (NesterovConfig(momentum=-0.1), "momentum"),
        (SlowMoConfig(alpha=0.0), "alpha"),
        (SlowMoConfig(beta=1.0), "beta"),
        (SlowMoConfig(beta=-0.5), "beta"),
    ],
)
def test_bad_configs_are_named(cfg, field: str) -> None:
    assert [p[0] for p in cfg.problems()] == [field]
    with pytest.raises(ValueError, match=field):
        build(cfg)


def _outer_run(steps: range, model: torch.nn.Module, opt: torch.optim.Optimizer, sync) -> None:
    for step in steps:
        g = torch.Generator().manual_seed(step)
        x, y = torch.randn(8, 3, generator=g), torch.randn(8, 2, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        sync.step()


def test_engine_state_saved_mid_round_keeps_the_outer_round_start() -> None:
    """A LocalSGD state_dict taken between syncs must carry x_t, or the next outer step is wrong."""
    import localsgd
    from localsgd.schedules import Fixed

    def build(seed: int = 0):
        torch.manual_seed(seed)
        model = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        return model, opt, localsgd.LocalSGD(model, opt, schedule=Fixed(4), outer=NesterovOuter())

    model, opt, sync = build()
    _outer_run(range(10), model, opt, sync)  # two rounds, then 2 steps into the third
    saved = copy.deepcopy((model.state_dict(), opt.state_dict(), sync.state_dict()))
    assert saved[2]["outer_round_start"] is not None
    _outer_run(range(10, 12), model, opt, sync)  # the third round's outer step
    model2, opt2, sync2 = build(seed=1)  # other weights: everything must come from the checkpoint
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    sync2.load_state_dict(saved[2])
    _outer_run(range(10, 12), model2, opt2, sync2)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    assert sync.state_dict()["outer_round_start"] is None  # right after a sync x_t is the parameters


# ------------------------------------------------------------------ in place: exact, and no temporary


def _diloco_reference(x_t: torch.Tensor, x_bar: torch.Tensor, v: torch.Tensor, lr: float, mu: float) -> torch.Tensor:
    """DiLoCo's outer Nesterov step (arXiv 2311.08105) as torch.optim.SGD(nesterov=True) on Δ, with a temporary."""
    delta = torch.sub(x_t, x_bar)  # Δ = x_t − x̄
    v.mul_(mu).add_(delta)  # v ← μ v + Δ
    delta.add_(v, alpha=mu)  # Δ + μ v
    return x_t.clone().add_(delta, alpha=-lr)  # x_{t+1} = x_t − lr (Δ + μ v)


def _slowmo_reference(x_t: torch.Tensor, x_bar: torch.Tensor, u: torch.Tensor, alpha: float, beta: float,
                      gamma: float) -> torch.Tensor:
    """SlowMo (Wang et al., arXiv 1910.00643, Alg. 1): u ← β u + (x_t − x̄)/γ, x_{t+1} = x_t − α γ u."""
    u.mul_(beta).add_(torch.sub(x_t, x_bar), alpha=1.0 / gamma)
    return x_t.clone().add_(u, alpha=-alpha * gamma)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("chunk_numel", [1 << 22, 1000, 37], ids=["whole", "chunks1000", "chunks37"])
@pytest.mark.parametrize("kind", ["nesterov", "slowmo"])
def test_in_place_step_is_bit_identical_to_the_reference_formulas(kind: str, chunk_numel: int,
                                                                   dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(11)
    sizes = (70_001, 5, 1)
    opt = (NesterovOuter(0.7, 0.9, chunk_numel=chunk_numel) if kind == "nesterov"
           else SlowMoOuter(0.8, 0.6, chunk_numel=chunk_numel))
    x = [torch.randn(n, generator=gen, dtype=dtype) for n in sizes]
    momentum = [torch.zeros(n, dtype=dtype) for n in sizes]
    for r in range(4):
        x_bar = [t + 0.1 * torch.randn(t.shape, generator=gen, dtype=dtype) for t in x]
        gamma = 0.1 / (r + 1)
        if kind == "nesterov":
            want = [_diloco_reference(a, b, m, 0.7, 0.9) for a, b, m in zip(x, x_bar, momentum)]
        else:
            want = [_slowmo_reference(a, b, m, 0.8, 0.6, gamma) for a, b, m in zip(x, x_bar, momentum)]
        opt.step(x, x_bar, gamma)
        for got, w in zip(x_bar, want):
            assert torch.equal(got, w), r
        for got, m in zip(opt.state_dict()["momentum_buffers"], momentum):
            assert torch.equal(got, m), r
        x = x_bar


def _peak_cpu_bytes_allocated(fn) -> int:
    """The highest running total of CPU memory allocated (and not yet freed) while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    running = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        running += event.self_cpu_memory_usage
        peak = max(peak, running)
    return peak


@pytest.mark.parametrize("make", [lambda: NesterovOuter(0.7, 0.9), lambda: SlowMoOuter(0.8, 0.6)],
                         ids=["nesterov", "slowmo"])
def test_outer_step_allocates_no_full_size_temporary(make) -> None:
    n = 1 << 18
    x_t = torch.randn(n)
    x_bar = x_t + 0.01
    opt = make()
    opt.step([x_t.clone()], [x_bar.clone()], 0.1)  # the first step creates the momentum buffer (state)
    args = ([x_t], [x_bar], 0.1)
    assert _peak_cpu_bytes_allocated(lambda: torch.sub(x_t, x_bar)) >= x_t.nbytes  # the probe sees a temporary
    peak = _peak_cpu_bytes_allocated(lambda: opt.step(*args))
    assert peak < x_t.nbytes // 16, f"the outer step allocated {peak} bytes for a {x_t.nbytes}-byte buffer"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("make", [lambda c: NesterovOuter(0.7, 0.9, chunk_numel=c),
                                  lambda c: SlowMoOuter(0.8, 0.6, chunk_numel=c)], ids=["nesterov", "slowmo"])
def test_round_start_on_the_host_is_staged_in_chunks(make) -> None:
    n, chunk = 1 << 22, 1 << 16
    gen = torch.Generator().manual_seed(2)
    x_host = torch.randn(n, generator=gen)
    x_bar = (x_host + 0.01 * torch.randn(n, generator=gen)).cuda()
    x_device = x_host.cuda()
    on_device, on_host = make(chunk), make(chunk)
    for measured in (False, True):  # the first step also creates the momentum buffers
        want, got = x_bar.clone(), x_bar.clone()
        on_device.step([x_device], [want], 0.1)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        on_host.step([x_host], [got], 0.1)
        torch.cuda.synchronize()
        if measured:  # one staging buffer of `chunk` elements, never a full-size copy of x_t
            assert torch.cuda.max_memory_allocated() - before < x_host.nbytes // 8
        assert x_host.device.type == "cpu" and torch.equal(got, want)


def test_non_contiguous_buffers_are_rejected() -> None:
    wide = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="contiguous"):
        NesterovOuter().step([wide[:, 0]], [torch.zeros(4)], 0.1)


def test_each_config_builds_its_own_optimizer_through_the_registry() -> None:
    from omegaconf import OmegaConf

    for entry in OUTER.entries():
        cfg = entry.config_cls()
        assert type(cfg.build()) is type(OUTER.build(cfg)) and cfg.build().name == entry.name
    node = build(OmegaConf.structured(SlowMoConfig(alpha=2.0, beta=0.25)))
    assert isinstance(node, SlowMoOuter) and (node.alpha, node.beta) == (2.0, 0.25)
