"""Averaging Self-Tuning Networks across local-SGD workers.

Plain rule (ours, not from the STN papers): everything
learnable is a model parameter (elementary and response weights, bottlenecks, and h, s), so local
SGD's arithmetic mean (Stich, ICLR 2019, arXiv 1805.09767) averages them all, the hyperparameters
in *unconstrained* space: the mean of h, not of sigmoid(h).

Jacobian-corrected rule (Delta-STN only; also ours): when workers disagree on the
hyperparameters, worker k's elementary weights are its best response at *its own* h_k. Before the
average, each worker moves them to its best-response prediction at the consensus h̄ = mean_k h_k,

    W_e,k ← W_e,k + (V_k (h̄ − h_k)) ⊙_row W_h,k          (and the biases alike)

which is Delta-STN's centred response evaluated at δ = h̄ − h_k (Bae & Grosse, NeurIPS 2020, arXiv
2010.13514; its centred parameterisation), and sets h_k ← h̄; then everything is averaged as usual. It costs one extra
all-reduce of H numbers, is exact to first order in h̄ − h_k, and changes nothing when all h_k agree.
For plain STN the response (V h) ⊙ W_h is bilinear in V and W_h, so no such correction is offered.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import dist
from .convert import StnModel


@torch.no_grad()
def move_to_hyperparameters_(stn: StnModel, h_target: torch.Tensor) -> None:
    """Set this replica's elementary weights to ŵ(h_target) by its own response, and h to h_target."""
    if not stn.context.centered:
        raise ValueError("moving to other hyperparameters needs the centred (Delta-STN) parameterisation")
    delta = h_target.to(stn.space.h) - stn.space.h
    for layer in stn.layers:
        layer.move_general_(delta)
    stn.space.h.copy_(h_target)


def consensus_pre_average(stn: StnModel) -> Callable[[Any], None]:
    """The ``LocalSGD(pre_average=...)`` hook of Jacobian-corrected averaging."""

    def pre_average(group: Any) -> None:
        h_bar = stn.space.h.detach().clone()
        dist.all_reduce_sum_(h_bar, group=group, what="Delta-STN consensus hyperparameters")
        h_bar /= dist.group_size(group)
        # A non-finite h on some rank is left for the engine's check to report (or roll back): moving
        # every replica's weights by it would spread the NaN to ranks that are fine.
        if bool(torch.isfinite(h_bar).all()):
            move_to_hyperparameters_(stn, h_bar)

    return pre_average
