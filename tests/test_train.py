"""The trainer end to end: real torchrun launches, outputs, resume after a kill, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from localsgd.metrics import human_bytes

from .launch_helpers import TINY, output, records, single, torchrun

pytestmark = pytest.mark.slow

SUMMARY_KEYS = {"final_eval_loss", "final_eval_accuracy", "steps", "samples", "comm_rounds", "comm_bytes",
                "comm_seconds", "wall_seconds", "world_size", "backend", "schedule"}


@pytest.mark.long
def test_two_rank_run_writes_one_run_dir_with_metrics_and_summary(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = torchrun(tmp_path, run_dir, [*TINY, "schedule.H=4"])
    assert proc.returncode == 0, output(proc)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert summary["world_size"] == 2 and summary["backend"] == "gloo" and summary["schedule"] == "fixed(H=4)"
    assert summary["steps"] == 40 and summary["samples"] == 40 * 16 * 2
    assert summary["comm_rounds"] == 10
    n_params = sum(t.numel() for t in torch.load(run_dir / "checkpoints/step-40/model.pt").values())
    assert summary["comm_bytes"] == 10 * 4 * n_params  # MLP: no buffers
    assert summary["final_eval_accuracy"] > 0.5
    # One output directory for the whole run: a single .hydra/, nothing per rank.
    assert [p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "cache"] == ["run"]
    assert (run_dir / ".hydra").is_dir()
    train = records(run_dir, "train")
    assert [r["step"] for r in train] == [10, 20, 30, 40]
    assert [r["step"] for r in records(run_dir, "eval")] == [20]
    assert "run directory:" in proc.stdout and "communication rounds" in proc.stdout
    # Rank 0 says where the run lives before the first step, and the train records say the current H.
    assert proc.stdout.index(f"localsgd: run directory {run_dir}") < proc.stdout.index("communication rounds")
    assert proc.stdout.count("localsgd: run directory") == 1  # once, by rank 0
    assert "2 worker(s), gloo on cpu; seed 0" in proc.stdout and "schedule fixed(H=4)" in proc.stdout
    assert [r["H"] for r in train] == [4, 4, 4, 4]
    assert summary["final_H"] == 4 and summary["h_history"] == [[0, 4]]
    assert summary["seed"] == 0 and summary["torch"] == torch.__version__ and "git_commit" in summary
    # train.log: the console's text without the bar (the bar is off here, so progress lines show too).
    log = (run_dir / "train.log").read_text().splitlines()
    assert log[0].endswith(f"localsgd: run directory {run_dir}") and "  new run, 40 steps" in log[3]
    assert any(line.endswith("step 40/40: loss " + f"{train[-1]['loss']:.4f}" + ", accuracy "
                             + f"{train[-1]['accuracy']:.4f}" + ", lr 0.1, batch 16, H 4, rounds 10, comm "
                             + human_bytes(summary["comm_bytes"])) for line in log), log
    assert any(line.endswith("eval at step 20: loss " + f"{records(run_dir, 'eval')[0]['eval_loss']:.4f}"
                             + ", accuracy " + f"{records(run_dir, 'eval')[0]['eval_accuracy']:.4f}")
               for line in log), log
    assert any("communication rounds" in line for line in log)  # the summary table


def test_single_process_runs_without_torchrun(tmp_path: Path) -> None:
    proc = single(tmp_path, tmp_path / "run", [*TINY, "checkpoint=off"])
    assert proc.returncode == 0, output(proc)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 1 and summary["comm_rounds"] == 5
    assert summary["comm_bytes"] == 0 and summary["comm_check_bytes"] == 0  # a group of one sends nothing


def test_ddp_baseline_runs_through_the_same_loop(tmp_path: Path) -> None:
    proc = torchrun(tmp_path, tmp_path / "run", [*TINY, "schedule=ddp", "checkpoint=off"])
    assert proc.returncode == 0, output(proc)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["schedule"] == "ddp" and s["comm_rounds"] == 40
    n_params = 64 * 32 + 32 + 32 * 10 + 10
    assert s["comm_bytes"] == 40 * 4 * n_params  # one gradient all-reduce of every parameter per step


def _final_model(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / f"checkpoints/step-{step}/model.pt")


KILL_RUN = [*TINY, "schedule.H=2", "checkpoint.every_rounds=1", "checkpoint.keep_latest_k=3",
            "trainer.max_steps=16", "trainer.log_every=1", "model.dropout=0.2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    tmp = tmp_path_factory.mktemp("uninterrupted")
    ref = torchrun(tmp, tmp / "ref", KILL_RUN)
    assert ref.returncode == 0, output(ref)
    return _final_model(tmp / "ref", 16)


@pytest.mark.parametrize("fault", ["kill:rank=1,step=7", "kill:rank=0,step=8", "kill_during_save:rank=0,step=10",
                                   "kill_during_purge:rank=0,step=10"])
@pytest.mark.long
def test_killed_rank_resumes_and_matches_uninterrupted_run_bit_for_bit(
        tmp_path: Path, fault: str, uninterrupted: dict[str, torch.Tensor]) -> None:
    hit = torchrun(tmp_path, tmp_path / "hit", KILL_RUN, max_restarts=1, LOCALSGD_FAULT=fault)
    assert hit.returncode == 0, output(hit)
    starts = records(tmp_path / "hit", "start")
    assert [s["restart_count"] for s in starts] == [0, 1] and starts[1]["resumed"]
    assert [r["step"] for r in records(tmp_path / "hit", "train")] == list(range(1, 17))  # none lost or repeated
    a, b = uninterrupted, _final_model(tmp_path / "hit", 16)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    leftovers = [p.name for p in (tmp_path / "hit" / "checkpoints").iterdir() if p.suffix in (".tmp", ".deleting")]
    assert leftovers == []
    kept = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "hit" / "checkpoints").glob("step-*"))
    assert kept == [12, 14, 16]  # keep_latest_k = 3 committed checkpoints, the newest never deleted


@pytest.mark.long
def test_corrupt_checkpoint_is_named_and_fallback_resumes_from_previous(tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = [*TINY, "schedule.H=5", "checkpoint.every_rounds=2", "checkpoint.keep_latest_k=3"]
    proc = torchrun(tmp_path, run, args)
    assert proc.returncode == 0, output(proc)
    ckpts = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert ckpts == [20, 30, 40]
    shard = run / "checkpoints/step-40/rank1.pt"
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    strict = torchrun(tmp_path, run, [*args, "checkpoint.fallback=false"])
    assert strict.returncode != 0
    assert "step-40/rank1.pt: sha256 mismatch" in strict.stderr + strict.stdout
    assert "checkpoint.fallback=true" in strict.stderr + strict.stdout
    loose = torchrun(tmp_path, run, args)
    assert loose.returncode == 0, output(loose)
    assert "rank1.pt: sha256 mismatch" in loose.stderr + loose.stdout
    starts = records(run, "start")
    assert starts[-1]["step"] == 30 and starts[-1]["resumed"]


@pytest.mark.long
@pytest.mark.parametrize("damage", ["truncate_manifest", "delete_rank_file"])
def test_damaged_checkpoint_without_fallback_exits_before_training(tmp_path: Path, damage: str) -> None:
    run = tmp_path / "run"
    args = [*TINY, "schedule.H=5", "checkpoint.every_rounds=4"]
    assert torchrun(tmp_path, run, args).returncode == 0
    step = run / "checkpoints/step-40"
    if damage == "truncate_manifest":
        text = (step / "manifest.json").read_text()
        (step / "manifest.json").write_text(text[: len(text) // 2])
        expect = "manifest.json: unreadable manifest"
    else:
        (step / "rank0.pt").unlink()
        expect = "rank0.pt: missing"
    n_train = len(records(run, "train"))
    proc = torchrun(tmp_path, run, [*args, "checkpoint.fallback=false"])
    assert proc.returncode != 0
    assert expect in proc.stderr + proc.stdout
    assert len(records(run, "train")) == n_train  # no training step was taken


@pytest.mark.long
def test_nan_on_one_rank_stops_every_rank_and_writes_no_checkpoint_after(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = torchrun(tmp_path, run, [*TINY, "schedule.H=4", "checkpoint.every_rounds=1"],
                    LOCALSGD_FAULT="nan:rank=0,step=5")
    assert proc.returncode != 0
    text = proc.stderr + proc.stdout
    # Parameters turn NaN after step 5, so the first non-finite loss is step 6's; caught at the sync after 8.
    assert "NonFiniteError" in text and "rank 0 at step 6" in text and "sync after step 8" in text
    steps = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert steps == [4]


def test_ranks_with_different_configs_abort_naming_the_key(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .distributed import free_port
    from .launch_helpers import env_for

    port = str(free_port())
    procs = []
    for rank, h in ((0, 2), (1, 3)):
        env = env_for(tmp_path, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "localsgd.train", f"hydra.run.dir={tmp_path / 'run'}",
                                       *TINY, f"schedule.H={h}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 2 for p in procs), outs
    # Said once, by rank 0, in one line; rank 1 leaves with the same code and says nothing.
    lines = [line for line in outs[0].splitlines() if line.startswith("localsgd:")]
    assert len(lines) == 1 and "schedule.H: rank 0 has 2, rank 1 has 3" in lines[0], outs[0][-3000:]
    assert "Traceback" not in outs[0] + outs[1] and "localsgd:" not in outs[1], outs[1][-3000:]


@pytest.mark.parametrize("mode", ["offline", "disabled"])
def test_wandb_offline_writes_one_run_under_rank0_dir_and_disabled_writes_none(tmp_path: Path, mode: str) -> None:
    run = tmp_path / "run"
    proc = torchrun(tmp_path, run, [*TINY, f"logging.wandb={mode}", "checkpoint=off"], WANDB_MODE=mode)
    assert proc.returncode == 0, output(proc)
    wandb_dirs = list(tmp_path.rglob("wandb"))
    if mode == "offline":
        assert wandb_dirs == [run / "wandb"]
        assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    else:
        assert wandb_dirs == []


@pytest.mark.parametrize(("schedule", "period", "signame"), [
    (["schedule.H=4"], 4, "SIGTERM"), (["schedule=ddp", "schedule.stop_check_every=3"], 3, "SIGTERM"),
    (["schedule.H=4"], 4, "SIGINT")])
@pytest.mark.long
def test_sigterm_commits_a_checkpoint_at_the_next_sync_and_exits_75_then_resumes(
        tmp_path: Path, schedule: list[str], period: int, signame: str) -> None:
    """SIGTERM (a scheduler's preemption) and a first Ctrl-C alike: stop at the next sync with a
    checkpoint, one line saying where, exit 75; the rerun resumes there."""
    import signal
    import subprocess
    import sys
    import time

    from .launch_helpers import env_for

    run = tmp_path / "run"
    args = [sys.executable, "-m", "localsgd.train", f"hydra.run.dir={run}", *TINY, "trainer.max_steps=1000000",
            "trainer.log_every=5", *schedule, "checkpoint.every_rounds=100000"]

    def trained_since_start(n_starts: int) -> int:
        if not (run / "metrics.jsonl").exists():
            return 0
        recs = records(run)
        starts = [i for i, r in enumerate(recs) if r["event"] == "start"]
        if len(starts) < n_starts:
            return 0
        return sum(1 for r in recs[starts[-1]:] if r["event"] == "train")

    def start_and_stop(n_starts: int) -> subprocess.CompletedProcess:
        proc = subprocess.Popen(args, cwd=tmp_path, env=env_for(tmp_path), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if trained_since_start(n_starts) >= 3:  # the loop (and its signal handler) is running
                break
            time.sleep(0.2)
        proc.send_signal(getattr(signal, signame))
        out, err = proc.communicate(timeout=60)
        return subprocess.CompletedProcess(args, proc.returncode, out, err)

    first = start_and_stop(1)
    assert first.returncode == 75, output(first)
    stopped = records(run, "preempted")[-1]["step"]
    assert stopped % period == 0 and (run / f"checkpoints/step-{stopped}/manifest.json").exists()
    assert f"stopped at step {stopped}, checkpoint step-{stopped}" in first.stderr, output(first)
    assert f"run the same command with hydra.run.dir={run}" in first.stderr, output(first)
    assert "Traceback" not in first.stderr, output(first)
    second = start_and_stop(2)
    assert second.returncode == 75, output(second)
    assert records(run, "start")[-1] == {**records(run, "start")[-1], "resumed": True, "step": stopped,
                                         "resumed_from": str(run / "checkpoints" / f"step-{stopped}")}
    assert f"resuming from step-{stopped} of {run}" in second.stdout, output(second)


def test_hung_rank_turns_into_a_timeout_error_not_a_hang(tmp_path: Path) -> None:
    """Rank 1 sleeps inside step 3; rank 0's next collective must end in a CollectiveTimeout naming it.

    The two ranks are started directly (the environment torchrun would give them), so the test waits for
    rank 0 and then kills the sleeper, instead of waiting out torchrun's 30 s SIGTERM-to-SIGKILL grace.
    """
    import subprocess
    import sys
    import time

    from .distributed import free_port
    from .launch_helpers import env_for

    port = free_port()
    cmd = [sys.executable, "-m", "localsgd.train", f"hydra.run.dir={tmp_path / 'run'}", *TINY, "schedule.H=4",
           "checkpoint=off", "comm.train_timeout_s=4"]
    ranks = [subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env_for(tmp_path, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                          LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                                          LOCALSGD_FAULT="sleep:rank=1,step=3,secs=600"))
             for r in range(2)]
    begin = time.monotonic()
    try:
        out0, _ = ranks[0].communicate(timeout=120)  # the sleeping rank would take 600 s
        took = time.monotonic() - begin
    finally:
        for proc in ranks:
            proc.kill()
            proc.wait()
    assert ranks[0].returncode != 0, out0
    assert "CollectiveTimeout" in out0 and "rank 0" in out0, out0
    assert took < 100, took  # the timeout (4 s), not the sleep, ended rank 0


@pytest.mark.long
def test_resume_with_another_world_size_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert torchrun(tmp_path, run, [*TINY, "schedule.H=5", "checkpoint.every_rounds=4"]).returncode == 0
    proc = torchrun(tmp_path, run, [*TINY, "schedule.H=5", "checkpoint.every_rounds=4"], nproc=1)
    assert proc.returncode != 0
    assert "was written by 2 ranks, this run has 1" in proc.stderr + proc.stdout


@pytest.mark.parametrize(("schedule", "described"), [
    (["schedule=adacomm", "schedule.tau0=4", "schedule.interval_steps=8"], "adacomm(tau0=4)"),
    (["schedule=stich", "schedule.paper_lr=true", "schedule.mu=0.05", "schedule.L=1.0"], "stich(H=1)"),
    (["schedule=post_local", "schedule.H=4", "optimizer.lr_decay=step", "optimizer.decay_milestones=[0.25]"],
     "post_local(switch=10, H=4)"),
])
def test_trainer_runs_issue_schedules_end_to_end(tmp_path: Path, schedule: list[str], described: str) -> None:
    proc = torchrun(tmp_path, tmp_path / "run", [*TINY, *schedule, "checkpoint=off"])
    assert proc.returncode == 0, output(proc)
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert s["schedule"] == described
    if described.startswith("stich"):
        lrs = [r["lr"] for r in records(tmp_path / "run", "train")]
        a = 16 * 1.0 / 0.05  # max(16 kappa, H)
        assert lrs == pytest.approx([4 / (0.05 * (a + step - 1)) for step in (10, 20, 30, 40)])
    if described.startswith("post_local"):
        assert s["comm_rounds"] == 10 + 30 // 4 + 1  # H=1 until step 10, then every 4, then the final partial


@pytest.mark.long
def test_identity_outer_optimizers_equal_plain_averaging_end_to_end(tmp_path: Path) -> None:
    finals = {}
    for outer in (["outer=average"], ["outer=nesterov", "outer.lr=1.0", "outer.momentum=0.0"],
                  ["outer=slowmo", "outer.alpha=1.0", "outer.beta=0.0"]):
        run = tmp_path / outer[0].split("=")[1]
        proc = torchrun(tmp_path, run, [*TINY, "schedule.H=4", *outer])
        assert proc.returncode == 0, output(proc)
        finals[outer[0]] = _final_model(run, 40)
    ref = finals.pop("outer=average")
    for name, model in finals.items():
        for k in ref:
            torch.testing.assert_close(model[k], ref[k], rtol=0, atol=1e-6, msg=f"{name}: {k}")


@pytest.mark.long
def test_batch_ramp_resume_after_a_kill_is_exact(tmp_path: Path) -> None:
    args = [*KILL_RUN, "ramp=step", "ramp.milestones=[0.25,0.5]", "ramp.b_max=64"]
    ref = torchrun(tmp_path, tmp_path / "ref", args)
    assert ref.returncode == 0, output(ref)
    hit = torchrun(tmp_path, tmp_path / "hit", args, max_restarts=1, LOCALSGD_FAULT="kill:rank=1,step=9")
    assert hit.returncode == 0, output(hit)
    batches = [r["batch_size"] for r in records(tmp_path / "hit", "train")]
    assert batches == [16] * 4 + [32] * 4 + [64] * 8  # x2 at steps 4 and 8 (0-based), capped at b_max
    a, b = _final_model(tmp_path / "ref", 16), _final_model(tmp_path / "hit", 16)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lrs = [r["lr"] for r in records(tmp_path / "hit", "train")]
    assert lrs == [0.1] * 4 + [0.2] * 4 + [0.4] * 8  # linear LR coupling to the current batch


def test_noise_scale_ramp_measures_and_logs(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = torchrun(tmp_path, run, [*TINY, "ramp=noise_scale", "ramp.measure_every_rounds=1", "schedule.H=2",
                                    "checkpoint=off", "trainer.log_every=5"])
    assert proc.returncode == 0, output(proc)
    train = records(run, "train")
    # Early two-batch estimates of tr(Σ) and |G|² are noisy (either EMA may still be <= 0: NaN);
    # by the end both are positive and B_simple is a batch size.
    assert len(train) == 8 and train[-1]["b_simple"] > 0
    summary = json.loads((run / "summary.json").read_text())
    n_params = 64 * 32 + 32 + 32 * 10 + 10
    # one all-reduce of one float64 gradient (+ its squared norm) at the first step of each of the 20 rounds
    assert summary["noise_scale_bytes"] == 20 * 8 * (n_params + 1)


def test_noise_adaptive_schedule_sets_h_from_the_probe_on_two_ranks(tmp_path: Path) -> None:
    import math

    run = tmp_path / "run"
    proc = torchrun(tmp_path, run, [*TINY, "schedule=noise_adaptive", "schedule.measure_every_rounds=1",
                                    "schedule.warmup_measurements=1", "trainer.batch_size=320", "checkpoint=off",
                                    "trainer.log_every=1"])
    assert proc.returncode == 0, output(proc)  # the ranks agreed on every H (the engine checks each round)
    train = records(run, "train")
    summary = json.loads((run / "summary.json").read_text())
    history = summary["h_history"]  # [step, H] at each change, starting at H_start = 1
    assert history[0] == [0, 1] and len({h for _, h in history}) >= 3, history
    # every H it chose is the rule's H = isqrt(floor(K·b / B_simple)) for an estimate the run logged
    rule = {min(math.isqrt(math.floor(2 * 320 / r["b_simple"])), 16) for r in train if r["b_simple"]}
    assert {h for _, h in history[1:]} <= rule, (history, rule)
    # one measurement at the first step of every round that has one: an extra gradient all-reduce each
    n_params = 64 * 32 + 32 + 32 * 10 + 10
    assert summary["noise_scale_bytes"] == summary["comm_rounds"] * 8 * (n_params + 1)


@pytest.mark.long
def test_a_finished_run_is_not_trained_again_a_fresh_start_sets_old_outputs_aside_and_a_busy_dir_is_refused(
        tmp_path: Path) -> None:
    import os
    import re

    from localsgd.rundir import RunDirLock

    run = tmp_path / "run"
    assert single(tmp_path, run, TINY).returncode == 0
    before = (run / "metrics.jsonl").read_bytes()
    again = single(tmp_path, run, TINY)
    assert again.returncode == 0, output(again)
    assert f"localsgd: run directory {run} already holds a completed run (step 40" in again.stderr, output(again)
    assert (run / "metrics.jsonl").read_bytes() == before  # untouched: no second final record
    # Starting over on purpose: the earlier run's records and checkpoints move aside, nothing is mixed.
    fresh = single(tmp_path, run, [*TINY, "checkpoint.resume=false"])
    assert fresh.returncode == 0, output(fresh)
    assert "the earlier run's outputs were moved aside (metrics.jsonl -> metrics.jsonl.1" in fresh.stderr
    assert (run / "metrics.jsonl.1").read_bytes() == before
    assert [r["event"] for r in records(run) if r["event"] in ("start", "final")] == ["start", "final"]
    assert (run / "checkpoints.1" / "step-40" / "manifest.json").exists()
    # A run directory in use by another job: refused at once, in one line naming the owner.
    with RunDirLock(run):
        busy = single(tmp_path, run, [*TINY, "checkpoint.resume=false"])
    assert busy.returncode == 2, output(busy)
    lines = [line for line in busy.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and re.fullmatch(rf"localsgd: run directory {re.escape(str(run))} is in use by pid "
                                            rf"{os.getpid()} on host \S+ since .+; use another hydra.run.dir or "
                                            "stop that run", lines[0]), lines
    assert not (run / "metrics.jsonl.2").exists()  # the refused job moved nothing


@pytest.mark.long
def test_a_run_extends_when_nothing_depends_on_max_steps_and_is_refused_by_name_otherwise(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert single(tmp_path, run, [*TINY, "trainer.max_steps=24"]).returncode == 0
    longer = single(tmp_path, run, [*TINY, "trainer.max_steps=40"])
    assert longer.returncode == 0, output(longer)
    assert "localsgd: extending the run from 24 to 40 steps (resuming at step 24)" in longer.stderr
    assert json.loads((run / "summary.json").read_text())["steps"] == 40
    assert [r["step"] for r in records(run, "train")] == [10, 20, 24, 30, 40]  # every step once, none lost
    cosine = tmp_path / "cosine"
    assert single(tmp_path, cosine, [*TINY, "trainer.max_steps=24", "optimizer.lr_decay=cosine"]).returncode == 0
    refused = single(tmp_path, cosine, [*TINY, "trainer.max_steps=40", "optimizer.lr_decay=cosine"])
    assert refused.returncode != 0
    assert ("trainer.max_steps 24 -> 40 cannot extend this run: optimizer.lr_decay=cosine depend(s) on "
            "trainer.max_steps") in refused.stderr, output(refused)


def test_multirun_under_torchrun_is_refused_in_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from .launch_helpers import env_for

    # The environment torchrun gives rank 0 of two; the refusal comes before any rendezvous.
    proc = subprocess.run([sys.executable, "-m", "localsgd.train", "-m", *TINY, "schedule.H=2,4"], cwd=tmp_path,
                          env=env_for(tmp_path, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2",
                                      MASTER_ADDR="127.0.0.1", MASTER_PORT="1"),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, output(proc)
    assert [line for line in proc.stderr.splitlines() if line.strip()] == [
        "localsgd: multirun (-m) does not work under torchrun (every rank would start its own sweep); run sweeps "
        "without torchrun: python -m localsgd.train -m hydra/launcher=submitit_local ... (docs/launching.md)"]
    assert not (tmp_path / "multirun").exists() and not (tmp_path / "outputs").exists()
