"""LocalSGD in a plain PyTorch training loop: each rank trains on its own data, replicas are averaged every H steps.

    torchrun --standalone --nproc_per_node=2 examples/own_loop.py
    torchrun --standalone --nproc_per_node=4 examples/own_loop.py --steps 400 --H 16
    python examples/own_loop.py            # one process: the same code, averaging is an identity

The task is a small regression: every rank draws its own inputs (a different seed per rank, as if each
held a shard of the data) with targets from one shared teacher network, so all ranks learn the same
function. Rank 0 prints the held-out loss before and after training, the communication, and whether
the replicas ended bit-for-bit identical (``finalize()`` averages the last, partial round).
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as tdist
from torch import nn

import localsgd

INPUTS = 16
SAMPLES_PER_RANK = 2048
BATCH = 32


def make_model() -> nn.Module:
    # The same seed on every rank, so the replicas start identical (LocalSGD averages; it does not
    # broadcast the initial parameters).
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(INPUTS, 32), nn.Tanh(), nn.Linear(32, 1))


def teacher_targets(x: torch.Tensor) -> torch.Tensor:
    """The function every rank learns: fixed weights (seed 1234), the same on every rank."""
    g = torch.Generator().manual_seed(1234)
    w1, w2 = torch.randn(INPUTS, 8, generator=g), torch.randn(8, 1, generator=g)
    return torch.tanh(x @ w1) @ w2


def rank_data(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's shard: its own inputs (seed 100 + rank) with the teacher's targets and a little noise."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(SAMPLES_PER_RANK, INPUTS, generator=g)
    return x, teacher_targets(x) + 0.01 * torch.randn(SAMPLES_PER_RANK, 1, generator=g)


def held_out() -> tuple[torch.Tensor, torch.Tensor]:
    """The same evaluation set on every rank (seed 7), so the printed losses compare."""
    x = torch.randn(1024, INPUTS, generator=torch.Generator().manual_seed(7))
    return x, teacher_targets(x)


def replicas_identical(model: nn.Module) -> bool:
    """Whether every rank holds exactly rank 0's parameters (all-gathers the flat parameter vector)."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if not tdist.is_initialized() or tdist.get_world_size() == 1:
        return True
    everyone = [torch.empty_like(flat) for _ in range(tdist.get_world_size())]
    tdist.all_gather(everyone, flat)
    return all(torch.equal(everyone[0], other) for other in everyone[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="local optimizer steps per rank")
    parser.add_argument("--H", type=int, default=8, help="average every H local steps")
    parser.add_argument("--lr", type=float, default=0.05)
    args = parser.parse_args()

    localsgd.dist.init()  # torchrun's environment, or a one-rank group without a launcher
    rank, world = localsgd.dist.rank(), localsgd.dist.world_size()
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    sync = localsgd.LocalSGD(model, optimizer, schedule=localsgd.schedules.Fixed(args.H))
    loss_fn = nn.MSELoss()
    x, y = rank_data(rank)
    x_eval, y_eval = held_out()
    with torch.no_grad():
        initial = loss_fn(model(x_eval), y_eval).item()

    order = torch.Generator().manual_seed(rank)
    for _ in range(args.steps):
        batch = torch.randint(len(x), (BATCH,), generator=order)
        loss = loss_fn(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sync.step(loss=loss)  # True when this step ended a round and the replicas were averaged
    sync.finalize()  # average the partial last round, if any: every replica ends identical

    with torch.no_grad():
        final = loss_fn(model(x_eval), y_eval).item()
    identical = replicas_identical(model)
    if rank == 0:
        print(f"world size {world}, {args.steps} local steps per rank, H = {args.H}: {sync.stats.rounds} averaging "
              f"rounds, {sync.stats.bytes} bytes sent, {sync.stats.seconds:.3f} s in syncs")
        print(f"held-out loss: {initial:.4f} -> {final:.4f}")
        print(f"replicas identical: {identical}")
    localsgd.dist.barrier("end of training")  # leave together: no rank tears Gloo down under a peer
    # destroy the group and exit without interpreter finalisation, whose Gloo/TCPStore teardown now and
    # then aborts a finished process (SIGABRT), which torchrun would report as a failed run
    localsgd.dist.leave(0)


if __name__ == "__main__":
    main()
