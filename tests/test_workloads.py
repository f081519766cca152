"""Real workloads: token windows, the step's precision / accumulation / clipping, a user's own model and data."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from localsgd.data import TokenData, TokensConfig
from localsgd.data.text import prepare_text
from localsgd.data.tokens import sequence_cross_entropy
from localsgd.models import GPTConfig
from localsgd.optim import StepContext, StepOptions
from localsgd.optim.torch_optim import optioned_step, supervised_step
from localsgd.registry import TargetConfig, instantiate_target, locate
from localsgd.train import target_overrides

from .launch_helpers import ROOT, env_for, output, records, torchrun

EXAMPLE = ROOT / "examples" / "own_project"


def _token_data(n_train: int = 5000, n_val: int = 700, block: int = 16, seed: int = 0) -> TokenData:
    rng = np.random.default_rng(seed)
    return TokenData(rng.integers(0, 256, n_train).astype(np.uint16), rng.integers(0, 256, n_val).astype(np.uint16),
                     block, 256, eval_windows=40)


# ---------------------------------------------------------------------- token windows
def test_token_windows_are_shifted_contiguous_runs_inside_the_ranks_disjoint_shards() -> None:
    data = _token_data()
    train = data.train.astype(np.int64)
    for rank in range(3):
        stream = data.train_stream(rank, 3, seed=4, device=torch.device("cpu"))
        lo, hi = rank * 5000 // 3, (rank + 1) * 5000 // 3
        x, y = stream.next_batch(64)
        assert x.shape == y.shape == (64, 16) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])  # the targets are the inputs shifted by one token
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            starts = [s for s in range(lo, hi - 16) if np.array_equal(train[s : s + 16], row_x)]
            assert starts and any(np.array_equal(train[s + 1 : s + 17], row_y) for s in starts)
        assert stream.samples_seen == 64


def test_token_stream_resumes_exactly_and_refuses_another_shard() -> None:
    data = _token_data()
    cpu = torch.device("cpu")
    ref = data.train_stream(1, 2, seed=9, device=cpu)
    expected = [ref.next_batch(8) for _ in range(5)]
    first = data.train_stream(1, 2, seed=9, device=cpu)
    for _ in range(2):
        first.next_batch(8)
    resumed = data.train_stream(1, 2, seed=9, device=cpu)
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    assert resumed.samples_seen == 16
    for want in expected[2:]:
        got = resumed.next_batch(8)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    other_rank = data.train_stream(0, 2, seed=9, device=cpu)
    with pytest.raises(ValueError, match="refusing a silent mis-resume"):
        other_rank.load_state_dict(first.state_dict())
    assert not torch.equal(data.train_stream(0, 2, 9, cpu).next_batch(8)[0], expected[0][0])  # ranks differ


def test_evaluation_windows_split_over_ranks_cover_the_set_once() -> None:
    data = _token_data()
    cpu = torch.device("cpu")
    whole = torch.cat([x for x, _ in data.eval_batches(0, 1, 7, cpu)])
    parts = [torch.cat([x for x, _ in data.eval_batches(r, 3, 7, cpu)]) for r in range(3)]
    assert len(whole) == 40 and sum(len(p) for p in parts) == 40
    interleaved = torch.stack([parts[i % 3][i // 3] for i in range(40)])
    assert torch.equal(interleaved, whole)
    assert int(data.eval_starts[-1]) == 700 - 17  # the last window ends at the end of val.bin


def test_tokens_config_reads_prepare_text_output_and_names_what_is_wrong(tmp_path: Path) -> None:
    texts = {f"f{i}.txt": f"def f{i}():\n    return {i} * 'ab\u00e9'\n" * 40 for i in range(12)}
    for name, body in texts.items():
        (tmp_path / name).write_text(body)
    out = prepare_text(sorted(tmp_path.glob("*.txt")), tmp_path / "tok", val_fraction=0.3, source="test")
    data = TokensConfig(train_bin=str(out / "train.bin"), val_bin=str(out / "val.bin"), block_size=32).build()
    meta = json.loads((out / "meta.json").read_text())
    assert data.num_classes == 256 and data.input_shape == (32,) and len(data.train) == meta["train_tokens"]
    assert data.tokens_per_sample == 32 and data.reports_perplexity and not data.train_accuracy
    with pytest.raises(FileNotFoundError, match=r"data.val_bin='.*nope.bin': no such file"):
        TokensConfig(train_bin=str(out / "train.bin"), val_bin=str(tmp_path / "nope.bin")).build()
    bare = tmp_path / "bare"
    bare.mkdir()
    np.arange(300, dtype=np.uint16).tofile(bare / "train.bin")
    np.arange(300, dtype=np.uint16).tofile(bare / "val.bin")
    with pytest.raises(ValueError, match="has no meta.json beside it.*set data.vocab_size"):
        TokensConfig(train_bin=str(bare / "train.bin"), val_bin=str(bare / "val.bin"), block_size=8).build()
    with pytest.raises(ValueError, match="data.vocab_size=70000 does not fit data.dtype=uint16"):
        TokensConfig(train_bin=str(bare / "train.bin"), val_bin=str(bare / "val.bin"), vocab_size=70000).build()
    with pytest.raises(ValueError, match=r"fewer than one window of block_size \+ 1 = 301"):
        TokensConfig(train_bin=str(bare / "train.bin"), val_bin=str(bare / "val.bin"), vocab_size=300,
                     block_size=300).build()
    problems = list(TokensConfig(train_bin="a.bin").problems())
    assert problems and problems[0][0] == "val_bin"


def test_sequence_loss_is_the_mean_over_every_position() -> None:
    logits, targets = torch.randn(3, 5, 11, dtype=torch.float64), torch.randint(0, 11, (3, 5))
    per_position = [F.cross_entropy(logits[b, t], targets[b, t]) for b in range(3) for t in range(5)]
    assert torch.allclose(sequence_cross_entropy(logits, targets), torch.stack(per_position).mean(), atol=1e-14)


# ---------------------------------------------------------------------- the step: accumulation, clipping, bf16
def _mlp64(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [2, 3, 8])
def test_accumulated_micro_batches_equal_one_step_on_the_whole_batch(seed: int, k: int) -> None:
    g = torch.Generator().manual_seed(100 + seed)
    x, y = torch.randn(8 * 3, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (24,), generator=g)
    whole, parts = _mlp64(seed), _mlp64(seed)
    opts = [torch.optim.SGD(m.parameters(), lr=0.3) for m in (whole, parts)]
    for _ in range(3):  # several steps: the accumulated gradient is reset between them
        a = supervised_step(whole, opts[0], (x, y), StepContext(loss_fn=F.cross_entropy))
        b = optioned_step(parts, opts[1], (x, y), StepContext(loss_fn=F.cross_entropy), StepOptions(micro_batches=k))
        assert abs(float(a.loss) - float(b.loss)) < 1e-10
    for p, q in zip(whole.parameters(), parts.parameters()):
        assert (p - q).abs().max() < 1e-10
    assert torch.equal(b.targets, y) and b.logits is not None and b.logits.shape == (24, 4)


def test_gradient_clipping_bounds_the_global_norm_of_the_update() -> None:
    model = _mlp64(0)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    x, y = torch.randn(16, 6, dtype=torch.float64) * 50, torch.randint(0, 4, (16,))
    ref = _mlp64(0)
    F.cross_entropy(ref(x), y).backward()
    raw = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ref.parameters()))
    assert raw > 0.05
    optioned_step(model, opt, (x, y), StepContext(loss_fn=F.cross_entropy), StepOptions(grad_clip=0.05))
    update = [b - p.detach() for b, p in zip(before, model.parameters())]
    norm = math.sqrt(sum(float(u.pow(2).sum()) for u in update))
    coef = 0.05 / (raw + 1e-6)  # torch's clip_grad_norm_ scales by max_norm / (norm + 1e-6)
    assert abs(norm - 0.05) < 1e-7 and abs(norm - raw * coef) < 1e-12  # lr 1: the update is the clipped gradient
    for u, p in zip(update, ref.parameters()):  # ... in the gradient's direction
        assert torch.allclose(u, p.grad * coef, atol=1e-12)


def test_step_options_are_none_on_the_defaults_and_fp16_needs_cuda() -> None:
    cpu = torch.device("cpu")
    assert StepOptions.build("fp32", 1, 0.0, cpu) is None  # the plain step, untouched
    assert StepOptions.build("bf16", 1, 0.0, cpu).autocast_dtype is torch.bfloat16
    assert StepOptions.build("fp32", 4, 0.0, cpu).micro_batches == 4
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        StepOptions.build("fp16", 1, 0.0, cpu)


def _text_data(seed: int, block: int = 32) -> TokenData:
    """Bytes of seeded sentences of a dozen words: structure a small GPT learns within tens of steps."""
    rng = np.random.default_rng(seed)
    words = ["local", "steps", "then", "one", "average", "of", "the", "workers", "model", "is", "sent", "back"]
    text = " ".join(rng.choice(words, 6000)).encode()
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.uint16)
    return TokenData(tokens[:-2000], tokens[-2000:], block, 256, eval_windows=16)


def _train_gpt(precision: str, seed: int, steps: int = 40) -> tuple[list[float], nn.Module]:
    data = _text_data(seed)
    torch.manual_seed(seed)
    model = GPTConfig(n_layer=2, n_head=2, n_embd=32).build(data.input_shape, data.num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    stream = data.train_stream(0, 1, seed, torch.device("cpu"))
    ctx = StepContext(loss_fn=data.loss_fn, options=StepOptions.build(precision, 1, 1.0, torch.device("cpu")))
    losses = [float(supervised_step(model, opt, stream.next_batch(16), ctx).loss) for _ in range(steps)]
    return losses, model


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_autocast_trains_the_fp32_weights_and_ends_near_fp32(seed: int) -> None:
    fp32, _ = _train_gpt("fp32", seed)
    bf16, model = _train_gpt("bf16", seed)
    assert all(math.isfinite(v) for v in bf16)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast: the weights stay fp32
    assert np.mean(bf16[-5:]) < bf16[0] - 1.0  # it learns (from ln 256 = 5.55 at the start)
    # The stated distance: the mean loss of the last 10 steps within 2 % of fp32's on the same seed.
    tail32, tail16 = np.mean(fp32[-10:]), np.mean(bf16[-10:])
    assert abs(tail16 - tail32) / tail32 < 0.02, (tail32, tail16)
    assert fp32 != bf16  # bf16 did run: the trajectories are not bit-identical


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["fused", "before"])
def test_a_bf16_model_averages_with_the_agreement_check(mode: str) -> None:
    from .distributed import run_ok

    results = run_ok(_bf16_average_worker, 2, mode)
    assert results[0] == results[1]


def _bf16_average_worker(rank: int, world: int, mode: str) -> list[float]:
    from localsgd.engine import LocalSGD
    from localsgd.schedules import Fixed

    torch.manual_seed(0)
    model = nn.Linear(8, 4).to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = LocalSGD(model, [opt], schedule=Fixed(2), agreement_check=mode)
    for _ in range(4):
        loss = model(torch.randn(4, 8, dtype=torch.bfloat16) * (rank + 1)).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync.step(loss=loss.detach())
    sync.finalize()
    assert sync.stats.rounds == 2 and all(p.dtype == torch.bfloat16 for p in model.parameters())
    return [float(v) for v in model.weight.detach().float().flatten()]


# ---------------------------------------------------------------------- a user's own model and data
def test_instantiate_target_passes_config_arguments_and_only_the_offered_ones_named() -> None:
    made = instantiate_target(TargetConfig("torch.nn.Linear", {"in_features": 3, "out_features": 2}),
                              input_shape=(3,), num_classes=2)
    assert isinstance(made, nn.Linear) and made.in_features == 3
    model = instantiate_target(TargetConfig("tests.test_workloads._sized", {"width": 5}), input_shape=(7,),
                               num_classes=3)
    assert model == ((7,), 3, 5)
    given = instantiate_target(TargetConfig("tests.test_workloads._sized", {"num_classes": 9}), input_shape=(7,),
                               num_classes=3)
    assert given == ((7,), 9, 1)  # the config wins over what the data offers
    with pytest.raises(ImportError, match="no module named 'no_such_pkg'"):
        locate("no_such_pkg.Net")
    with pytest.raises(ImportError, match="'torch.nn' has no attribute 'Nope'"):
        locate("torch.nn.Nope")


def _sized(input_shape: tuple[int, ...], num_classes: int, width: int = 1) -> tuple:
    return input_shape, num_classes, width


def test_target_overrides_select_custom_and_upsert_the_arguments() -> None:
    args = ["model._target_=pkg.Net", "model.width=64", "trainer.max_steps=5", "data=digits"]
    rewritten = target_overrides(args)
    assert rewritten == ["model=custom", "model._target_=pkg.Net", "++model.width=64", "trainer.max_steps=5",
                         "data=digits"]
    assert target_overrides(rewritten) == rewritten  # idempotent: the launcher and the workers both rewrite
    assert target_overrides(["model=mlp", "model.hidden=[8]"]) == ["model=mlp", "model.hidden=[8]"]


def _cli(tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = env_for(tmp, PYTHONPATH=f"{EXAMPLE}{os.pathsep}{ROOT}")
    return subprocess.run([sys.executable, "-m", "localsgd.run", "--nproc-per-node=1", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("overrides", "line"), [
    (["model=custom"], "model._target_ is missing: model=custom builds your own model from "
                       "model._target_=<module>.<Class>"),
    (["trainer.precision=bf16", "optimizer=stn"],
     "invalid config: trainer.precision='bf16': optimizer=stn runs its own local step, which has no "
     "precision, accumulation or clipping options; choose optimizer=sgd or optimizer=adamw"),
    (["trainer.precision=fp16"], "invalid config: trainer.precision='fp16': float16 autocast with a "
                                 "GradScaler needs CUDA"),
])
def test_bad_workload_options_are_refused_before_start(overrides: list[str], line: str) -> None:
    from hydra import compose, initialize_config_dir

    from localsgd.config import check_config, register_configs
    from localsgd.errors import ConfigError
    from localsgd.train import config_dir

    if "fp16" in line and torch.cuda.is_available():
        pytest.skip("fp16 is allowed with CUDA")
    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose("config", overrides=target_overrides(overrides))
    with pytest.raises(ConfigError) as err:
        check_config(cfg, world_size=1)
    assert str(err.value).startswith(line), err.value


def test_a_wrong_target_stops_the_launcher_in_one_line(tmp_path: Path) -> None:
    proc = _cli(tmp_path, "model._target_=my_project.model.ResNetMLP")
    assert proc.returncode == 2, output(proc)
    assert proc.stderr.strip() == ("localsgd: invalid config: model._target_='my_project.model.ResNetMLP': cannot "
                                   "import it ('my_project.model' has no attribute 'ResNetMLP')"), proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


GPT_RUN = ["data=tokens", "model=gpt", "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "data.block_size=16",
           "data.eval_windows=24", "optimizer=adamw", "optimizer.lr=3e-3", "trainer=smoke", "trainer.max_steps=12",
           "trainer.log_every=1", "trainer.eval_batch_size=8", "schedule.H=2", "checkpoint.every_rounds=1",
           "checkpoint.keep_latest_k=3", "trainer.precision=bf16", "trainer.grad_accum_steps=2",
           "trainer.grad_clip=1.0", "model.dropout=0.1"]


@pytest.mark.long
@pytest.mark.slow
def test_gpt_on_token_files_with_bf16_accumulation_and_clipping_resumes_bit_for_bit(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"m{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * i}\n" * 60)
    out = prepare_text(sorted(corpus.glob("*.py")), tmp_path / "tok", val_fraction=0.25, source="test")
    args = [*GPT_RUN, f"data.train_bin={out / 'train.bin'}", f"data.val_bin={out / 'val.bin'}"]
    ref = torchrun(tmp_path, tmp_path / "ref", args)
    assert ref.returncode == 0, output(ref)
    hit = torchrun(tmp_path, tmp_path / "hit", args, max_restarts=1, LOCALSGD_FAULT="kill:rank=1,step=7")
    assert hit.returncode == 0, output(hit)
    assert [r["step"] for r in records(tmp_path / "hit", "train")] == list(range(1, 13))
    a = torch.load(tmp_path / "ref/checkpoints/step-12/model.pt")
    b = torch.load(tmp_path / "hit/checkpoints/step-12/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a) and all(v.dtype == torch.float32 for v in a.values())
    summary = json.loads((tmp_path / "ref" / "summary.json").read_text())
    assert summary["final_eval_perplexity"] == pytest.approx(math.exp(summary["final_eval_loss"]), rel=1e-12)
    # Two workers x 12 steps x 2 micro-batches of 16 windows x 16 tokens.
    assert summary["samples"] == 2 * 12 * 2 * 16 and summary["tokens"] == summary["samples"] * 16
    assert math.isfinite(summary["final_eval_loss"]) and summary["final_eval_loss"] < math.log(256)
    assert "final eval perplexity" in ref.stdout and "tokens (all workers)" in ref.stdout


# ---------------------------------------------------------------------- torch.compile and the flat buffer
def _compiled_trajectory(rank: int, world: int, compiled: bool) -> list[list[float]]:
    """Local SGD (H = 2) on a model run through torch.compile or not; a parameter is replaced mid-run."""
    from localsgd.engine import LocalSGD
    from localsgd.schedules import Fixed

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    sync = LocalSGD(model, [opt], schedule=Fixed(2))
    step_model = torch.compile(model, backend="aot_eager") if compiled else model
    g = torch.Generator().manual_seed(10 + rank)
    seen = []
    for step in range(8):
        if step == 4:  # replaced, not moved: the engine re-flattens, the compiled module must follow
            model[2].weight = nn.Parameter(model[2].weight.detach().clone() * 0.5)
            opt.param_groups[0]["params"][2] = model[2].weight
            sync.rebuild_layout()
        x, y = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
        loss = F.cross_entropy(step_model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync.step(loss=loss.detach())
        with torch.no_grad():
            seen.append(step_model(torch.ones(1, 6, dtype=torch.float64)).flatten().tolist())
    sync.finalize()
    assert model[2].weight.data_ptr() in range(sync.param_buffers()[0].data_ptr(),
                                               sync.param_buffers()[0].data_ptr() + sync.param_buffers()[0].nbytes)
    return seen


@pytest.mark.long
@pytest.mark.slow
def test_a_compiled_step_model_trains_on_the_engines_flat_buffer_like_the_plain_one() -> None:
    from .distributed import run_ok

    plain = run_ok(_compiled_trajectory, 2, False, timeout_s=120)
    compiled = run_ok(_compiled_trajectory, 2, True, timeout_s=120)
    assert compiled == plain  # every output after every step, averages and the re-flattening included
    assert plain[0][1] == plain[1][1] and plain[0][0] != plain[1][0]  # averaged at step 2, apart after step 1


# ---------------------------------------------------------------------- the DataLoader path
def _digits():
    from localsgd.data import DigitsConfig

    return DigitsConfig().build()


# Forked workers here: the order does not depend on how a worker starts, and twelve spawns (each imports
# torch) would cost 20 s; the spawned default is covered by the test below and the torchrun tests.
@pytest.mark.parametrize("workers", [0, 2])
def test_the_loader_stream_gives_the_in_memory_streams_batches_and_resumes_mid_epoch(workers: int) -> None:
    from localsgd.data import LoaderOptions, loaded

    ds = _digits()
    cpu = torch.device("cpu")
    sizes = [32, 32, 48, 48, 48, 0, 48, 200, 200, 200, 200, 200, 200, 64]  # grows mid-epoch; a step without data
    plan = dict(enumerate(sizes)).__getitem__
    for rank, world in ((0, 1), (1, 2)):
        ref = ds.train_stream(rank, world, seed=3, device=cpu)
        want = [ref.next_batch(b) for b in sizes if b]
        data = loaded(ds, "dataloader", LoaderOptions(num_workers=workers, prefetch_factor=2, start_method="fork"))
        stream = data.train_stream(rank, world, seed=3, device=cpu)
        stream.start(plan, 0, len(sizes))
        got = [stream.next_batch(b) for b in sizes[:7] if b]
        state = copy.deepcopy(stream.state_dict())  # mid-epoch, with batches prefetched beyond it
        stream.close()
        resumed = data.train_stream(rank, world, seed=3, device=cpu)
        resumed.load_state_dict(state)
        resumed.start(plan, 7, len(sizes))
        got += [resumed.next_batch(b) for b in sizes[7:] if b]
        resumed.close()
        assert len(got) == len(want) and resumed.samples_seen == ref.samples_seen == sum(sizes)
        for (gx, gy), (wx, wy) in zip(got, want):
            assert torch.equal(gx, wx) and torch.equal(gy, wy)
        with pytest.raises(RuntimeError, match="the plan given to start"):
            off = data.train_stream(rank, world, seed=3, device=cpu)
            off.start(plan, 0, len(sizes))
            off.next_batch(31)


def test_map_style_evaluation_covers_the_test_set_once_over_ranks() -> None:
    from localsgd.data import LoaderOptions, loaded

    ds = _digits()
    data = loaded(ds, "dataloader", LoaderOptions())
    cpu = torch.device("cpu")
    parts = [torch.cat([y for _, y in data.eval_batches(r, 3, 50, cpu)]) for r in range(3)]
    assert [torch.equal(p, ds.y_test[r::3]) for r, p in enumerate(parts)] == [True] * 3
    assert data.input_shape == ds.input_shape and data.num_train == len(ds.y_train)


_FORKED_MARK = "unset"  # the test sets it in this process: a forked worker inherits it, a spawned one does not


class _WorkerIdentity(torch.utils.data.Dataset):
    """Items that say which process made them and what it saw of ``_FORKED_MARK``."""

    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ignores_ctrl_c = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        return torch.tensor([float(os.getpid()), float(_FORKED_MARK == "set"), float(ignores_ctrl_c)]), torch.tensor(i)


def test_evaluation_workers_are_spawned_ignore_ctrl_c_start_once_for_every_evaluation_and_stop_on_close() -> None:
    global _FORKED_MARK
    from localsgd.data import LoaderOptions, MapStyleData

    _FORKED_MARK = "set"
    handler = signal.getsignal(signal.SIGINT)  # whatever earlier tests left installed
    try:
        data = MapStyleData(_WorkerIdentity(), _WorkerIdentity(), 2, options=LoaderOptions(num_workers=2))
        cpu = torch.device("cpu")
        passes = [torch.cat([x for x, _ in data.eval_batches(0, 1, 3, cpu)]) for _ in range(3)]
    finally:
        _FORKED_MARK = "unset"
    pids = {int(p) for p in passes[0][:, 0]}
    assert len(pids) == 2 and os.getpid() not in pids
    assert all({int(p) for p in x[:, 0]} == pids for x in passes)  # the same two workers served every pass
    assert all(x[:, 1].sum() == 0 for x in passes)  # spawned: they never saw the mark set in this process
    assert all(bool(x[:, 2].all()) for x in passes)  # a terminal's Ctrl-C is the rank's to handle, not theirs
    assert signal.getsignal(signal.SIGINT) is handler  # and this process's handler is back
    data.close()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


LOADER_RUN = ["data=digits", "model=mlp", "model.hidden=[32]", "model.dropout=0.2", "trainer=smoke",
              "trainer.max_steps=16", "trainer.log_every=1", "schedule.H=2", "checkpoint.every_rounds=1",
              "checkpoint.keep_latest_k=3", "ramp=step", "ramp.milestones=[0.5]", "ramp.b_max=32"]


@pytest.mark.long
@pytest.mark.slow
def test_dataloader_runs_equal_the_in_memory_run_and_resume_after_a_kill_with_two_workers(tmp_path: Path) -> None:
    ref = torchrun(tmp_path, tmp_path / "ref", LOADER_RUN)
    assert ref.returncode == 0, output(ref)
    hit = torchrun(tmp_path, tmp_path / "hit", [*LOADER_RUN, "loader.mode=dataloader", "loader.num_workers=2"],
                   max_restarts=1, LOCALSGD_FAULT="kill:rank=1,step=9")
    assert hit.returncode == 0, output(hit)
    assert [r["step"] for r in records(tmp_path / "hit", "train")] == list(range(1, 17))
    assert [r["batch_size"] for r in records(tmp_path / "hit", "train")] == [16] * 8 + [32] * 8
    a = torch.load(tmp_path / "ref/checkpoints/step-16/model.pt")
    b = torch.load(tmp_path / "hit/checkpoints/step-16/model.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same samples in the same order, dropout included


@pytest.mark.long
@pytest.mark.slow
def test_a_user_model_and_dataset_read_from_disk_by_loader_workers_train_under_torchrun(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = torchrun(tmp_path, run, ["model._target_=my_project.model.ResidualMLP", "model.width=16",
                                    "data._target_=my_project.disk.spirals_on_disk", f"data.root={tmp_path / 'pts'}",
                                    "data.n=800", "loader.num_workers=2", "trainer=smoke", "trainer.max_steps=12",
                                    "schedule.H=4", "checkpoint=off"], PYTHONPATH=f"{EXAMPLE}{os.pathsep}{ROOT}")
    assert proc.returncode == 0, output(proc)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["model"] == "my_project.model.ResidualMLP" and summary["data"] == "my_project.disk.spirals_on_disk"
    assert summary["samples"] == 12 * 16 * 2
    width, depth = 16, 2  # the width from the command line, the depth the class's default
    n_params = 2 * width + width + depth * (2 * width + 2 * (width * width + width)) + width * 2 + 2
    assert summary["comm_bytes"] == summary["comm_rounds"] * 4 * n_params == 3 * 4 * n_params
    assert sorted(p.name for p in (tmp_path / "pts").iterdir()) == ["test_x.npy", "test_y.npy", "train_x.npy",
                                                                   "train_y.npy"]


def test_a_checkpoint_from_before_the_step_options_resumes_only_with_them_at_their_defaults() -> None:
    from localsgd.errors import CheckpointError
    from localsgd.trainer import check_resumable

    items = {"trainer.max_steps": 40, "trainer.precision": "fp32", "trainer.grad_accum_steps": 1,
             "trainer.grad_clip": 0.0, "trainer.compile": False, "loader.num_workers": 0, "model.name": "mlp"}
    older = {k: v for k, v in items.items() if not k.startswith(("trainer.precision", "trainer.grad", "trainer.comp",
                                                                  "loader."))}
    manifest = {"step": 20, "world_size": 2, "config": older}
    check_resumable(manifest, 2, items)  # the new keys at their defaults: the same run
    with pytest.raises(CheckpointError, match=r"trainer.precision: None -> 'bf16'"):
        check_resumable(manifest, 2, {**items, "trainer.precision": "bf16"})
    with pytest.raises(CheckpointError, match=r"model.hidden: None -> \[8\]"):
        check_resumable(manifest, 2, {**items, "model.hidden": [8]})  # a component's new key has no default here


@pytest.mark.timeout(120)
def test_a_run_that_fails_mid_loop_leaves_no_loader_worker_running(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # A library caller that catches the trainer's error must not keep the loader's worker processes: the
    # traceback it holds keeps the loop's locals (the stream, its DataLoader iterator) alive.
    import multiprocessing

    from hydra import compose, initialize_config_dir

    from localsgd.config import check_config, config_hash, flat_items, register_configs
    from localsgd.errors import NonFiniteError
    from localsgd.train import config_dir
    from localsgd.trainer import run_training

    register_configs()
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = check_config(compose("config", overrides=[
            "data=digits", "model=mlp", "model.hidden=[16]", "trainer=smoke", "trainer.max_steps=12",
            "trainer.eval_every=0", "trainer.threads=1", "schedule.H=4", "checkpoint=off",
            "loader.mode=dataloader", "loader.num_workers=2", "loader.start_method=fork"]))
    items = flat_items(cfg)
    monkeypatch.setenv("LOCALSGD_FAULT", "nan:rank=0,step=2")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    before = set(multiprocessing.active_children())
    try:
        with pytest.raises(NonFiniteError) as caught:
            run_training(cfg, tmp_path / "run", items, config_hash(items))
        assert caught.value.bad == {0: 3}  # the NaN weights of step 2 give step 3 a NaN loss; the average at 4 sees it
        assert set(multiprocessing.active_children()) == before
    finally:
        for sig, handler in handlers.items():  # run_training installs its preemption handler
            signal.signal(sig, handler)
