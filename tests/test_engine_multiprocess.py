"""LocalSGD on real Gloo process groups (2 and 4 ranks on localhost, every collective timed out)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as tdist
from torch import nn

import localsgd
from localsgd.schedules import Fixed

from .distributed import run_ok, run_ranks

pytestmark = pytest.mark.slow


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 3))


def _gather_state(model: nn.Module) -> list[dict[str, torch.Tensor]]:
    out: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, {k: v.clone() for k, v in model.state_dict().items()})
    return out


def _identical_after_every_sync(rank: int, world: int, policy: str, mode: str = "before") -> dict:
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sync = localsgd.LocalSGD(model, opt, schedule=Fixed(3), buffers=policy, agreement_check=mode)
    gen = torch.Generator().manual_seed(100 + rank)  # different data on every rank
    checks = []
    for _ in range(10):
        x, y = torch.randn(8, 5, generator=gen) * (rank + 1), torch.randint(0, 3, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sync.step(loss=loss):
            checks.append(_gather_state(model))
    sync.finalize()
    checks.append(_gather_state(model))
    report = {"rounds": sync.stats.rounds, "bytes": sync.stats.bytes, "check_bytes": sync.stats.check_bytes,
              "params_equal": [], "buffers_equal": [], "buffers_rank0": []}
    for states in checks:
        ref = states[0]
        for name in ref:
            same = all(torch.equal(s[name], ref[name]) for s in states)
            is_param = name in dict(model.named_parameters())
            report["params_equal" if is_param else "buffers_equal"].append((name, same))
    report["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    report["float_buffer_bytes"] = sum(b.numel() * b.element_size() for b in model.buffers()
                                       if b.is_floating_point())
    report["num_batches_tracked"] = int(model[1].num_batches_tracked)
    return report


@pytest.mark.parametrize(("world", "mode"), [(2, "before"), (2, "overlapped"), (2, "fused"), (4, "fused")])
def test_parameters_and_buffers_identical_after_every_sync_and_finalize(world: int, mode: str) -> None:
    reports = run_ok(_identical_after_every_sync, world, "average", mode, timeout_s=120)
    r = reports[0]
    assert r["rounds"] == 4  # syncs after steps 3, 6, 9 and the final partial round
    assert all(same for _, same in r["params_equal"])
    assert all(same for _, same in r["buffers_equal"])
    # Exact accounting: payload = rounds x (parameter bytes + float buffer bytes); the check apart.
    assert r["bytes"] == r["rounds"] * (r["param_bytes"] + r["float_buffer_bytes"])
    n_int_buffers = 1
    full_check = 8 * (2 * 5 + 3 * world + 1 + n_int_buffers)  # int64 words of the MAX fingerprint
    if mode == "fused":  # the first sync checks in full; the others carry 9 float32 words per rank + 1
        assert r["check_bytes"] == full_check + (r["rounds"] - 1) * 4 * (9 * world + 1)
    else:
        assert r["check_bytes"] == r["rounds"] * full_check
    assert all(rep["num_batches_tracked"] == 10 for rep in reports)


def test_buffer_policy_local_leaves_buffers_different() -> None:
    r = run_ok(_identical_after_every_sync, 2, "local", timeout_s=120)[0]
    assert all(same for _, same in r["params_equal"])
    running = [same for name, same in r["buffers_equal"] if "running" in name]
    assert running and not any(running)
    assert r["bytes"] == r["rounds"] * r["param_bytes"]


def _broadcast_buffers(rank: int, world: int) -> dict:
    model = _bn_model()
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(1), buffers="broadcast")
    with torch.no_grad():
        model[1].running_mean.fill_(float(rank + 1))
        for p in model.parameters():
            p.add_(rank)
    sync.step()
    mean_param = _bn_model()[0].weight + sum(range(world)) / world
    return {"running_mean": model[1].running_mean.tolist(),
            "weight_error": float((model[0].weight - mean_param).abs().max())}


def test_buffer_policy_broadcast_takes_rank0_buffers_and_averages_parameters() -> None:
    for out in run_ok(_broadcast_buffers, 2):
        assert out["running_mean"] == [1.0] * 12  # rank 0's buffer, unscaled
        assert out["weight_error"] < 1e-6


def _h1_equals_large_batch(rank: int, world: int) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 10), nn.Tanh(), nn.Linear(10, 4))
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(7, 10), nn.Tanh(), nn.Linear(10, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.2)
    sync = localsgd.LocalSGD(model, opt, schedule=Fixed(1))
    gen = torch.Generator().manual_seed(5)
    worst = 0.0
    for _ in range(15):
        x, y = torch.randn(6 * world, 7, generator=gen), torch.randint(0, 4, (6 * world,), generator=gen)
        shard = slice(6 * rank, 6 * (rank + 1))  # equal shards of the same global batch
        loss = nn.functional.cross_entropy(model(x[shard]), y[shard])
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert sync.step()
        ref_loss = nn.functional.cross_entropy(ref(x), y)
        ref_opt.zero_grad()
        ref_loss.backward()
        ref_opt.step()
        worst = max(worst, max(float((a - b).abs().max()) for a, b in zip(model.parameters(), ref.parameters())))
    return worst


@pytest.mark.long
@pytest.mark.parametrize("world", [2, 4])
def test_h1_plain_sgd_equals_single_process_on_concatenated_batch(world: int) -> None:
    assert max(run_ok(_h1_equals_large_batch, world, timeout_s=120)) < 1e-6


def _quadratic(rank: int, world: int, H: int) -> float:
    """f(x) = ½xᵀAx − bᵀx with additive noise: the averaged iterate is mini-batch SGD exactly."""
    d, lr, steps = 5, 0.05, 7 * H
    g = torch.Generator().manual_seed(11)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = m @ m.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    noise = torch.randn(steps, world, d, generator=g, dtype=torch.float64)
    x = nn.Parameter(torch.zeros(d, dtype=torch.float64))
    holder = nn.Module()
    holder.x = x
    opt = torch.optim.SGD([x], lr=lr)
    sync = localsgd.LocalSGD(holder, opt, schedule=Fixed(H))
    y = torch.zeros(d, dtype=torch.float64)  # mini-batch SGD with batch = all workers' noise
    worst = 0.0
    for t in range(steps):
        opt.zero_grad()
        x.grad = A @ x.detach() - b + noise[t, rank]
        opt.step()
        y = y - lr * (A @ y - b + noise[t].mean(0))
        if sync.step():
            worst = max(worst, float((x.detach() - y).abs().max()))
    assert sync.stats.rounds == 7
    return worst


@pytest.mark.parametrize("H", [1, 3, 7])
def test_quadratic_averaged_iterate_equals_minibatch_sgd(H: int) -> None:
    assert max(run_ok(_quadratic, 2, H)) < 1e-10


def _nan_on_one_rank(rank: int, world: int, mode: str = "before") -> str:
    model = _bn_model()
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(4), agreement_check=mode)
    for step in range(1, 9):  # a clean first round, so the fused mode's one-collective check sees the NaN
        if rank == 1 and step == 6:
            with torch.no_grad():
                model[0].weight[0, 0] = float("nan")
        sync.step(loss=torch.tensor(1.0))
    return "no error"


@pytest.mark.parametrize("mode", ["before", "overlapped", "fused"])
def test_nan_on_one_rank_raises_on_every_rank_before_averaging(mode: str) -> None:
    out = run_ranks(_nan_on_one_rank, 2, mode, timeout_s=60)
    for status, msg in out:
        assert status == "error"
        assert "NonFiniteError" in msg and "rank 1 at step 8" in msg


def _words_at_a_bucket_edge(rank: int, world: int) -> tuple[int, int, int]:
    """A bucket cap that ends 5 floats before the data does (so 14 of the 19 words would have sat in
    a bucket already in flight): every fused round must still pass, on every rank alike."""
    model = _bn_model()  # 60 + 12 + 12 + 36 + 3 parameters, 24 float buffer elements: 147 data floats
    n_data = sum(p.numel() for p in model.parameters()) + 24
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(1), bucket_cap_mb=(n_data - 5) * 4 / 2**20)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(40):
        with torch.no_grad():
            model[0].weight.add_(torch.randn(model[0].weight.shape, generator=gen))
        sync.step(loss=torch.tensor(1.0 + rank))
    tail = sync.layout.check_tail.numel() * 4
    full_check = 8 * (2 * 5 + 3 * world + 1 + 1)
    return sync.stats.check_bytes, full_check + 39 * tail, len(sync.layout.buffers[0].buckets)


def test_fused_check_words_never_share_a_bucket_in_flight() -> None:
    for got, want, n_buckets in run_ok(_words_at_a_bucket_edge, 2, timeout_s=120):
        assert n_buckets == 2 and got == want  # no round fell back to the full check


def _nan_in_a_late_bucket(rank: int, world: int) -> tuple[str, bool, int, bool]:
    """Fused check over several buckets (each scanned right before it leaves): a NaN that sits in the
    last parameter bucket of rank 1 is named, no NaN reaches any sum on any rank (every bucket is
    inspected the moment it arrives), and the failed sync leaves each replica as it was."""
    from localsgd import dist
    from localsgd.errors import NonFiniteError

    model = _bn_model()
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(4), bucket_cap_mb=40 * 4 / 2**20)  # 40 floats each
    n_buckets = len(sync.layout.buffers[0].buckets)
    in_flight: dict[int, torch.Tensor] = {}
    sums_finite = []
    start, wait = dist.all_reduce_sum_async, dist.wait

    def recording_start(tensor, group=None, average=False):  # type: ignore[no-untyped-def]
        handle = start(tensor, group=group, average=average)
        in_flight[id(handle)] = tensor
        return handle

    def recording_wait(handle, what="all-reduce"):  # type: ignore[no-untyped-def]
        wait(handle, what)
        if id(handle) in in_flight:
            sums_finite.append(bool(torch.isfinite(in_flight.pop(id(handle))).all()))

    dist.all_reduce_sum_async, dist.wait = recording_start, recording_wait
    try:
        for step in range(1, 9):
            if rank == 1 and step == 6:
                with torch.no_grad():
                    model[3].bias[2] = float("nan")  # the last parameter: the last bucket before the buffers
            before = {k: v.clone() for k, v in model.state_dict().items()}
            try:
                sync.step(loss=torch.tensor(1.0))
            except NonFiniteError as exc:
                after = model.state_dict()
                untouched = all(torch.equal(v, before[k]) or (torch.isnan(v) == torch.isnan(before[k])).all()
                                and torch.equal(v.nan_to_num(), before[k].nan_to_num()) for k, v in after.items())
                return str(exc), all(sums_finite) and len(sums_finite) > n_buckets, n_buckets, untouched
    finally:
        dist.all_reduce_sum_async, dist.wait = start, wait
    return "no error", True, n_buckets, False


def test_fused_check_scans_every_bucket_before_it_leaves() -> None:
    for msg, sums_finite, n_buckets, untouched in run_ok(_nan_in_a_late_bucket, 2, timeout_s=60):
        assert n_buckets >= 4
        assert "rank 1 at step 8" in msg
        assert sums_finite  # rank 1 sent zeros from the NaN's bucket on: no sum ever saw it
        assert untouched  # and the discarded average was undone on both ranks


def _failed_sync_leaves_replicas_untouched(rank: int, world: int, mode: str, policy: str,
                                           cause: str) -> dict[str, bool]:
    """A sync that fails its check (a NaN in rank 1's parameters, or an inf in its averaged Adam
    state): afterwards every rank's parameters, buffers and optimizer state are exactly what they
    were right before that sync (``raise``), or those of the last good sync (``skip_round``)."""
    from localsgd.errors import NonFiniteError

    model = _bn_model()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sync = localsgd.LocalSGD(model, opt, schedule=Fixed(3), agreement_check=mode, on_nonfinite=policy,
                             optimizer_state="average" if cause == "optimizer_state" else "keep")
    gen = torch.Generator().manual_seed(100 + rank)

    def local_step() -> torch.Tensor:
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.detach()

    def snapshot() -> tuple[dict, dict]:
        return ({k: v.clone() for k, v in model.state_dict().items()},
                {k: v.clone() if isinstance(v, torch.Tensor) else v
                 for p, st in opt.state.items() for k, v in ((f"{id(p)}.{n}", x) for n, x in st.items())})

    def differing(a: tuple[dict, dict], b: tuple[dict, dict]) -> list[str]:
        """Entries (model state, then optimizer state) that differ; NaN equals NaN, inf equals inf."""
        out = [f"{i}:{k}" for i in (0, 1) for k in sorted(set(a[i]) ^ set(b[i]))]
        return out + [f"{i}:{k}" for i in (0, 1) for k in a[i] if k in b[i] and not torch.equal(
            torch.nan_to_num(torch.as_tensor(a[i][k]), posinf=7.0),
            torch.nan_to_num(torch.as_tensor(b[i][k]), posinf=7.0))]

    for _ in range(6):  # two good rounds (the second one fused, where fused is on)
        loss = local_step()
        sync.step(loss=loss)
    last_good = snapshot()
    for _ in range(2):
        sync.step(loss=local_step())
    loss = local_step()
    if rank == 1:
        with torch.no_grad():
            if cause == "parameters":
                model[0].weight[1, 2] = float("nan")
            else:
                next(iter(opt.state.values()))["exp_avg_sq"][0] = float("inf")
    before = snapshot()
    error = None
    try:
        sync.step(loss=loss)
    except NonFiniteError as exc:
        error = str(exc)
    after = snapshot()
    return {"error": error, "differ_from_before": differing(after, before),
            "differ_from_last_good": differing(after, last_good)}


_FAILURE_CASES = [(mode, policy, cause) for mode in ("fused", "before", "overlapped")
                  for policy in ("raise", "skip_round") for cause in ("parameters", "optimizer_state")]


def _every_failed_sync(rank: int, world: int) -> list[dict]:
    return [_failed_sync_leaves_replicas_untouched(rank, world, *case) for case in _FAILURE_CASES]


def test_a_failed_sync_leaves_every_replica_as_it_was() -> None:
    """All three check modes x raise/skip_round x a NaN parameter or an inf Adam moment (one spawn)."""
    for rank, outs in enumerate(run_ok(_every_failed_sync, 2, timeout_s=180)):
        for (mode, policy, cause), out in zip(_FAILURE_CASES, outs):
            case = (rank, mode, policy, cause, out)
            if policy == "raise":
                assert out["error"] is not None and "rank 1 at step 9" in out["error"], case
                assert out["differ_from_before"] == [], case
            else:
                assert out["error"] is None and out["differ_from_last_good"] == [], case


def _evaluation_average_with_a_nan(rank: int, world: int) -> str:
    model = _bn_model()
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(100))
    with torch.no_grad():
        model[0].weight.add_(float(rank))
    sync.step()
    if rank == 1:
        with torch.no_grad():
            model[3].weight[0, 0] = float("inf")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        with sync.averaged():
            return "evaluated"
    except localsgd.errors.NonFiniteError as exc:
        unchanged = all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return f"{exc} unchanged={unchanged}"


def test_averaged_evaluation_checks_finiteness_first() -> None:
    for msg in run_ok(_evaluation_average_with_a_nan, 2, timeout_s=60):
        assert "rank 1 at step 1" in msg and "evaluation average" in msg and msg.endswith("unchanged=True")


def _mismatched_schedules(rank: int, world: int, mode: str = "before") -> str:
    model = _bn_model()
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(2 if rank == 0 else 3), agreement_check=mode)
    for _ in range(6):
        sync.step()
    return "no error"


def _step_counts_drift_after_a_good_round(rank: int, world: int) -> str:
    model = _bn_model()
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(2))  # the default fused check
    sync.step()
    sync.step()  # a good first round: the fused check takes over
    if rank == 1:
        sync.local_step += 2  # two steps rank 1 took without telling the engine
    for _ in range(4):
        sync.step()
    return "no error"


@pytest.mark.parametrize("mode", ["before", "overlapped"])
def test_mismatched_schedules_raise_on_every_rank_without_hanging(mode: str) -> None:
    out = run_ranks(_mismatched_schedules, 2, mode, timeout_s=60)
    for status, msg in out:
        assert status == "error"
        assert "ScheduleDisagreementError" in msg and "ranges over [2, 3]" in msg
        assert "ranks differing from rank 0: [1]" in msg


def test_fused_check_names_the_step_disagreement_on_every_rank() -> None:
    out = run_ranks(_step_counts_drift_after_a_good_round, 2, timeout_s=60)
    for status, msg in out:
        assert status == "error"
        assert "ScheduleDisagreementError" in msg and "step ranges over [4, 5]" in msg
        assert "ranks differing from rank 0: [1]" in msg


def _int_buffers_differ(rank: int, world: int) -> tuple[int, float]:
    """Integer buffers that drift apart are not an error: the full check takes their maximum."""
    model = _bn_model()
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(float(rank))
    sync.step()  # first sync (full check)
    model[1].num_batches_tracked.fill_(10 + rank)
    with torch.no_grad():
        model[0].bias.add_(float(rank))
    sync.step()  # fused: the hashes differ, so every rank falls back to the full check, which agrees
    return int(model[1].num_batches_tracked), float(model[0].bias[0] - _bn_model()[0].bias[0])


def test_fused_check_falls_back_and_takes_the_max_of_integer_buffers() -> None:
    out = run_ok(_int_buffers_differ, 2)
    assert [n for n, _ in out] == [11, 11]
    # round 1 averages rank offsets 0 and 1 to 0.5; round 2 adds 0 and 1 and averages again: 1.0
    assert all(abs(shift - 1.0) < 1e-6 for _, shift in out)


def _optimizer_state_policy(rank: int, world: int, policy: str) -> list[float]:
    model = _bn_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sync = localsgd.LocalSGD(model, opt, schedule=Fixed(2), optimizer_state=policy)
    gen = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x, y = torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sync.step()
    bufs = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    out: list = [None] * world
    tdist.all_gather_object(out, bufs)
    return [float((a - b).abs().max()) for a, b in zip(out[0], out[1])]  # per parameter, rank 0 vs rank 1


@pytest.mark.long
def test_optimizer_state_average_makes_momentum_identical_and_keep_does_not() -> None:
    averaged, kept = run_ok(_optimizer_state_policy, 2, "average")[0], run_ok(_optimizer_state_policy, 2, "keep")[0]
    assert len(averaged) == len(kept) == 6  # one momentum buffer per parameter of _bn_model
    assert averaged == [0.0] * 6 and all(d > 0 for d in kept)


def _averaged_context(rank: int, world: int) -> dict:
    model = _bn_model()
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(100))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(float(rank))
    sync.step()
    local = {k: v.clone() for k, v in model.state_dict().items()}
    with sync.averaged():
        averaged = {k: v.clone() for k, v in model.state_dict().items()}
    not_restored = [k for k, v in model.state_dict().items() if not torch.equal(v, local[k])]
    expected = _bn_model()[0].weight + 0.5
    return {"not_restored": not_restored, "average_error": float((averaged["0.weight"] - expected).abs().max()),
            "eval_bytes": sync.stats.eval_bytes, "payload_bytes": sync.payload_bytes}


def test_averaged_context_evaluates_the_average_and_restores_local_replicas() -> None:
    for out in run_ok(_averaged_context, 2):
        assert out["not_restored"] == []
        assert out["average_error"] < 1e-6
        assert out["eval_bytes"] == out["payload_bytes"]


def _skip_round(rank: int, world: int, mode: str) -> dict:
    """A NaN on rank 1 under a one-latency check: both ranks roll back to the last sync and go on."""
    model = _bn_model()
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(2), on_nonfinite="skip_round", agreement_check=mode)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(float(rank))
    sync.step()
    sync.step()  # a good round: replicas averaged
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        if rank == 1:
            model[0].weight[0, 0] = float("nan")
    sync.step()
    sync.step()  # NaN on rank 1: rank 1 sends zeros, both see the flag and restore the last sync
    differ = [k for k, v in model.state_dict().items() if not torch.equal(v, good[k])]
    return {"differ_from_last_sync": differ, "skipped_rounds": sync.stats.skipped_rounds, "rounds": sync.stats.rounds}


@pytest.mark.parametrize("mode", ["overlapped", "fused"])
def test_one_latency_check_with_skip_round_rolls_every_rank_back(mode: str) -> None:
    for out in run_ok(_skip_round, 2, mode):
        assert out == {"differ_from_last_sync": [], "skipped_rounds": 1, "rounds": 1}


def _pre_average_hook(rank: int, world: int) -> tuple[list[float], bool]:
    """The hook runs on every rank before each average, may run its own collective, and its
    changes to the replica are what gets averaged (Delta-STN moves replicas to consensus λ there)."""
    from localsgd import dist as ldist

    model = _bn_model()
    seen: list[float] = []

    def hook(group: object) -> None:
        count = torch.ones(1)
        ldist.all_reduce_sum_(count, group=group, what="test hook")
        seen.append(float(count))
        with torch.no_grad():
            model[0].bias.add_(float(rank))  # rank r shifts its replica by r just before averaging

    sync = localsgd.LocalSGD(model, None, schedule=Fixed(2), pre_average=hook)
    for _ in range(4):
        sync.step()
    shift = sum(range(world)) / world  # averaged shift per round
    expected = _bn_model()[0].bias + 2 * shift
    return seen, bool(torch.allclose(model[0].bias, expected))


def test_pre_average_hook_runs_before_every_average_and_its_changes_are_averaged() -> None:
    for seen, ok in run_ok(_pre_average_hook, 2):
        assert seen == [2.0, 2.0] and ok


def _fused_words_under_average(rank: int, world: int, avg_support: str) -> dict:
    """The fused check's words survive an average inside the collective exactly, at any world size.

    ``avg_support``: "probe" (this PyTorch's Gloo, which averages in the collective), "sum" (an
    older Gloo that rejects ReduceOp.AVG when the collective is created: the probe must fall back
    to summing and dividing).
    """
    from localsgd import dist as ldist

    if avg_support in ("sum", "sum_at_wait"):
        real_all_reduce = tdist.all_reduce

        class _RejectedWork:  # some releases raise only when the work runs, out of wait()
            def wait(self) -> None:
                raise RuntimeError("Cannot use ReduceOp.AVG with Gloo")

        def old_gloo_all_reduce(tensor, op=tdist.ReduceOp.SUM, group=None, async_op=False):  # type: ignore[no-untyped-def]
            if op == tdist.ReduceOp.AVG:
                if avg_support == "sum_at_wait" and async_op:
                    return _RejectedWork()
                raise RuntimeError("Cannot use ReduceOp.AVG with Gloo")
            return real_all_reduce(tensor, op=op, group=group, async_op=async_op)

        tdist.all_reduce = old_gloo_all_reduce
    model = _bn_model()
    sync = localsgd.LocalSGD(model, None, schedule=Fixed(1))
    gen = torch.Generator().manual_seed(rank)
    losses, params_ok = [], []
    for step in range(1, 7):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        before = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        every = [torch.zeros_like(before) for _ in range(world)]
        tdist.all_gather(every, before)
        loss = 0.1 * (rank + 1) + step / 7  # a different round loss on every rank
        sync.step(loss=torch.tensor(loss))
        after = torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])
        params_ok.append(bool(torch.allclose(after, torch.stack(every).mean(0), atol=1e-6, rtol=0)))
        # the engine keeps losses as float32; the mean over ranks is taken in float64, in rank order
        per_rank = [float(torch.tensor(0.1 * (r + 1) + step / 7, dtype=torch.float32)) for r in range(world)]
        losses.append((sync.last_round_loss, sum(per_rank) / world))
    return {"averaged_in_collective": ldist.average_in_collective(), "params_ok": params_ok,  # cached: no collective
            "losses": losses, "check_bytes": sync.stats.check_bytes, "rounds": sync.stats.rounds}


@pytest.mark.parametrize(("world", "avg_support"), [(3, "probe"), (2, "sum"), (2, "sum_at_wait")])
def test_fused_check_words_exact_whether_the_collective_averages_or_sums(world: int, avg_support: str) -> None:
    for r in run_ok(_fused_words_under_average, world, avg_support, timeout_s=120):
        if avg_support != "probe":
            assert r["averaged_in_collective"] is False
        else:  # Gloo averages in the collective in PyTorch 2.11 and 2.13 (seen); older releases may not
            assert isinstance(r["averaged_in_collective"], bool)
            if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 11):
                assert r["averaged_in_collective"] is True
        assert all(r["params_ok"])
        # The round loss rides as float64 bits in 16-bit words: exact only if every word was restored.
        assert all(got == want for got, want in r["losses"][1:]), r["losses"]
        # No fallback to the full check after the first sync: every hash word arrived intact.
        full_check = 8 * (2 * 5 + 3 * world + 1 + 1)
        assert r["check_bytes"] == full_check + (r["rounds"] - 1) * 4 * (9 * world + 1)


def _hierarchical_fused(rank: int, world: int) -> dict:
    """Group syncs (2 of 4 ranks) use the fused check too: their words sit at the end of the tail."""
    from localsgd.schedules import Hierarchical

    model = _bn_model()
    sync = localsgd.LocalSGD(model, None, schedule=Hierarchical(H_group=1, H_global=4, group_size=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(float(rank))
    for _ in range(8):
        sync.step(loss=torch.tensor(0.5 + rank))
    tail = sync.layout.check_tail.numel() * 4
    return {"check_bytes": sync.stats.check_bytes, "tail": tail, "loss": sync.last_round_loss,
            "bias": float(model[0].bias[0].detach() - _bn_model()[0].bias[0].detach())}


def test_hierarchical_group_syncs_pass_the_fused_check() -> None:
    out = run_ok(_hierarchical_fused, 4, timeout_s=120)
    # Steps 1-3 are group syncs before any global one: full MAX check in the group of 2 (int64 words);
    # step 4 is the first global sync: full check over 4; steps 5-8 (3 group syncs and a global one)
    # ride in the average, and none of them falls back to the full check.
    in_group, in_world = 8 * (2 * 5 + 3 * 2 + 1 + 1), 8 * (2 * 5 + 3 * 4 + 1 + 1)
    for r in out:
        assert r["check_bytes"] == 3 * in_group + in_world + 4 * r["tail"], r
        assert r["loss"] == (0.5 + 1.5 + 2.5 + 3.5) / 4  # the global mean of the ranks' round losses
    assert all(abs(r["bias"] - 1.5) < 1e-6 for r in out)  # the global mean of the rank offsets 0..3
