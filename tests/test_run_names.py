"""Run directory names: readable, sortable, the same on every rank of a launch and across restarts."""

from __future__ import annotations

import os
import time

import pytest

from localsgd.config import run_id
from localsgd.dist import _process_start_time

LAUNCH_KEYS = ("LOCALSGD_LAUNCH_TIME", "SLURM_JOB_START_TIME", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "WORLD_SIZE",
               "LOCAL_WORLD_SIZE")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key in LAUNCH_KEYS:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def stamp(t: float) -> str:
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(t))


def test_localsgd_run_and_slurm_give_their_start_time_and_id(env: pytest.MonkeyPatch) -> None:
    env.setenv("LOCALSGD_LAUNCH_TIME", "1764640683")
    env.setenv("TORCHELASTIC_RUN_ID", "3f2a9c1e-77aa-4b1e-9d0b-0123456789ab")
    assert run_id() == f"{stamp(1764640683)}_3f2a9c1e"
    assert run_id("lr sweep/a") == f"{stamp(1764640683)}_3f2a9c1e_lr-sweep-a"  # a name safe as a path part
    env.delenv("LOCALSGD_LAUNCH_TIME")
    env.delenv("TORCHELASTIC_RUN_ID")
    env.setenv("SLURM_JOB_ID", "4242")
    env.setenv("SLURM_JOB_START_TIME", "1764640000")
    assert run_id("baseline") == f"{stamp(1764640000)}_slurm-4242_baseline"


def test_one_node_torchrun_takes_the_agents_start_time_and_many_nodes_the_id_alone(env: pytest.MonkeyPatch) -> None:
    env.setenv("TORCHELASTIC_RUN_ID", "abcd1234")
    env.setenv("WORLD_SIZE", "2")
    env.setenv("LOCAL_WORLD_SIZE", "2")
    agent = _process_start_time(os.getppid())  # our parent plays the agent: every worker shares it
    assert agent is not None and agent <= time.time()
    assert run_id() == run_id() == f"{stamp(agent)}_abcd1234"
    env.setenv("WORLD_SIZE", "4")  # two nodes: their agents started at different times
    assert run_id() == "abcd1234"


def test_without_a_launcher_the_name_is_now_and_sorts_by_time(env: pytest.MonkeyPatch) -> None:
    before = time.time()
    name = run_id()
    day, clock, micros = name.split("_")
    assert len(micros) == 6 and micros.isdigit()
    assert stamp(before)[:16] <= f"{day}_{clock}"[:16] <= stamp(time.time())[:16]
