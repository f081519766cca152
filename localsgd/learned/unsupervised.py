"""The neuron-local unsupervised update rule of Metz, Maheswaranathan, Cheung & Sohl-Dickstein,
"Meta-Learning Update Rules for Unsupervised Representation Learning" (ICLR 2019, arXiv 1804.00222),
scaled down to meta-train on 2 CPU cores (the scaling-down is ours). The formulas
below follow the paper's description of the base model, the update rule and the meta-objective and, for
every constant, the released TF code (tensorflow/models ``research/learning_unsupervised_learning``, files
named below); the paper's section and equation numbers were not checked against the PDF, so none is cited.

**Base model** (released ``architectures/common.py``, ``more_local_weight_update.py``): an MLP whose layers compute
z = standardize_batch(x Wᵀ) + b (batch mean and variance, scale fixed to 1, no running statistics) and
x' = relu(z); the last layer's post-activation is the representation. Every layer also carries backward
weights V shaped like W that carry the top-down signal instead of Wᵀ (no weight transport).

**Update rule θ** (released ``more_local_weight_update.py``; shared by every neuron and every layer):

1. *Top error*: a per-unit network maps the top post-activation and the unit's batch statistics to a
   ``delta_dim``-channel error d per unit and example.
2. *Hidden state*: a per-unit network h = f_θ(x, z, d, b, statistics of the unit's incoming and outgoing
   weights) per unit and example, with batch normalisation over (examples, units) as in the released code.
3. *Error propagation*: δ = d ⊙ sigmoid(z) + Linear(h); d_below = δ·V, normalised to unit RMS over
   channels per unit.
4. *Weight update* for W_l (post units i, pre units j), each term normalised per receptive field (row):
   the weight itself ŵ (W with unit-RMS rows), large decay ŵ²·sign(ŵ), decorrelation Ĉ·ŵ (Ĉ the Gram matrix
   of the standardised post-activations), Hebbian −postᵀ·pre/B, and three low-rank readouts
   R = mean over channels of r_post(h_post)ᵀ r_pre(h_pre)/B used as R₀, exp(−ŵ²)⊙R_rbf and ŵ⊙R₁. A learned
   linear layer (coefficients initialised to 0.1) merges them, divided by the number of terms; the
   component that would shrink ‖W‖ is removed, the result renormalised per row, then ŵ/7 is subtracted
   so receptive fields cannot collapse. The bias update is a readout of h, averaged over the batch, its
   mean kept from going negative, and normalised. V receives the same update as W.
5. *Apply* (released ``optimizers.py``): p ← p(1 − lr) − lr·Δp.

**Meta-objective** (released ``meta_objective/linear_regression.py``): closed-form ridge regression
from the representation of a support set (``shots`` per class) to centred one-hot targets scaled to unit
norm, with a bias column and ridge factor 0.1 (bias unpenalised); query predictions normalised to unit
L2 norm; loss = Σ‖ŷ − y‖²/B + 0.1·‖w‖²/B. The update rule never sees labels; they enter only here.

Deviations (documented scale-downs, not paper constants): every per-unit network is an MLP over the
unit's own features (kernel 1). The only quantities that mix units are symmetric in them, as released:
batch-norm moments over a layer, the decorrelation Gram matrix, the whole-matrix growth projection and
the V-weighted error sum. So the rule is equivariant to relabelling units (tested). The released code
instead convolves over neighbouring units (kernel 3) and over the batch (top error) and feeds sin/cos
unit-ID features, all of which let a unit tell itself apart, so they are dropped. Its five "U"-matrix
terms (linear/square readouts through upper/lower symmetric or PSD matrices) are omitted: 7 of its 12
weight-update terms remain. Widths are small: ``delta_dim`` 8 (released 32), ``hidden`` 16 (released 64),
readout channels 4 (as released), top-error width 32 (released 64). The rule's learning rate defaults to
1e-3 (released 1e-4) because our inner runs are a few hundred steps, not thousands.

The worker-loop plugin (``optimizer=metz_unsupervised``) is :mod:`localsgd.optim.metz`; this module imports
nothing from :mod:`localsgd.optim`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FORMAT = "localsgd.metz_unsupervised"
CHECKPOINT_VERSION = 1  # bump when the rule's features or architecture change: old θ would be meaningless
BUNDLED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "metz_unsupervised.pt"
BN_EPS = 1e-6  # the released LinearBatchNorm's variance epsilon
W_INIT_STD, B_INIT_STD = 0.01, 0.1  # released truncated-normal init of W (and V) and of the offsets b
N_WEIGHT_TERMS = 7


# ---------------------------------------------------------------------------------------------- base model
@dataclass
class BaseNet:
    """The base network's state as plain tensors: W_l, V_l shaped [n_l, n_{l-1}], b_l shaped [n_l]."""

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    backward: list[torch.Tensor]

    @property
    def sizes(self) -> list[int]:
        return [self.weights[0].shape[1], *(w.shape[0] for w in self.weights)]

    def detach(self) -> BaseNet:
        return BaseNet([w.detach() for w in self.weights], [b.detach() for b in self.biases],
                       [v.detach() for v in self.backward])

    def tensors(self) -> list[torch.Tensor]:
        return [*self.weights, *self.biases, *self.backward]


def _trunc_normal(shape: Sequence[int], std: float, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    # TF's truncated_normal_initializer: N(0, std²) redrawn outside ±2 std.
    t = torch.empty(*shape, dtype=dtype)
    return nn.init.trunc_normal_(t, 0.0, std, -2 * std, 2 * std, generator=generator)


def init_base_net(sizes: Sequence[int], generator: torch.Generator, dtype: torch.dtype = torch.float32) -> BaseNet:
    """Released init: W, V ~ truncN(0, 0.01²), b ~ truncN(0, 0.1²); ``sizes`` = [inputs, hidden..., output]."""
    pairs = list(zip(sizes[:-1], sizes[1:]))
    weights = [_trunc_normal((n_out, n_in), W_INIT_STD, generator, dtype) for n_in, n_out in pairs]
    biases = [_trunc_normal((n_out,), B_INIT_STD, generator, dtype) for _, n_out in pairs]
    backward = [_trunc_normal((n_out, n_in), W_INIT_STD, generator, dtype) for n_in, n_out in pairs]
    return BaseNet(weights, biases, backward)


def standardize_batch(a: torch.Tensor) -> torch.Tensor:
    """Per unit (last dim) over the batch (first dim): zero mean, unit variance, no learned scale."""
    centered = a - a.mean(dim=0, keepdim=True)
    return centered * torch.rsqrt(centered.pow(2).mean(dim=0, keepdim=True) + BN_EPS)


def base_forward(net: BaseNet, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Post-activations xs (xs[0] = the input, xs[-1] = the representation) and pre-activations zs."""
    xs, zs = [x], []
    for w, b in zip(net.weights, net.biases):
        z = standardize_batch(xs[-1] @ w.t()) + b
        zs.append(z)
        xs.append(torch.relu(z))
    return xs, zs


def representation(net: BaseNet, x: torch.Tensor) -> torch.Tensor:
    return base_forward(net, x)[0][-1]


class StandardizedLinear(nn.Module):
    """z = standardize_batch(x Wᵀ) + b with backward weights V: the Metz base layer inside a user model.

    V is a parameter (so LocalSGD averages it, and checkpoints hold it) that no forward pass uses; only
    the update rule reads it. Batch statistics are used in evaluation too, as in the paper (no running
    statistics), so evaluate with batches of many examples.
    """

    def __init__(self, in_features: int, out_features: int, generator: torch.Generator) -> None:
        super().__init__()
        net = init_base_net([in_features, out_features], generator)
        self.weight = nn.Parameter(net.weights[0])
        self.bias = nn.Parameter(net.biases[0])
        self.backward_weight = nn.Parameter(net.backward[0], requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return standardize_batch(x @ self.weight.t()) + self.bias


# ---------------------------------------------------------------------------------------------- the rule θ
@dataclass
class RuleSpec:
    """Widths of the rule's networks (defaults are our scale-down; released values in the module docstring)."""

    delta_dim: int = 8
    hidden: int = 16
    top_hidden: int = 32
    readout_channels: int = 4
    hidden_blocks: int = 2  # residual per-unit blocks after the first layer of compute_h


class _UnitNorm(nn.Module):
    """Batch norm over (examples, units) per channel with a learned offset (Sonnet BatchNorm's default)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.offset = nn.Parameter(torch.zeros(channels))

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return _standardize_channels(a) + self.offset


def _standardize_channels(a: torch.Tensor) -> torch.Tensor:
    # Statistics over every (example, unit) of the layer: invariant to relabelling units.
    # (torch.var over a reshaped batch is several times slower on CPU than these two means.)
    flat = a.reshape(-1, a.shape[-1])
    centered = a - flat.mean(dim=0)
    return centered * torch.rsqrt(centered.reshape(-1, a.shape[-1]).pow(2).mean(dim=0) + 1e-5)


def _unit_stats(a: torch.Tensor, dim: int) -> torch.Tensor:
    """l1, l2, mean, std of ``a`` over ``dim`` (the released ``get_weight_stats``), stacked last."""
    l1 = a.abs().mean(dim=dim)
    l2 = torch.sqrt(a.pow(2).mean(dim=dim) + 1e-6)
    mean = a.mean(dim=dim)
    std = torch.sqrt((a - mean.unsqueeze(dim)).pow(2).mean(dim=dim) + 1e-8)
    return torch.stack([l1, l2, mean, std], dim=-1)


def _row_normalize(a: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    # Per receptive field (one post unit = one row); eps = 1 as released, so tiny terms stay tiny.
    return a * torch.rsqrt(eps + a.pow(2).mean(dim=1, keepdim=True))


class MetzRule(nn.Module):
    """θ: the meta-learned, neuron-local unsupervised update rule (see the module docstring)."""

    def __init__(self, spec: RuleSpec | None = None) -> None:
        super().__init__()
        self.spec = spec = spec or RuleSpec()
        d, h, c = spec.delta_dim, spec.hidden, spec.readout_channels
        # top error: [x, batch l1/l2/mean/std of x] per unit and example -> d
        self.top_in = nn.Linear(5, spec.top_hidden)
        self.top_norm1 = _UnitNorm(spec.top_hidden)
        self.top_mid = nn.Linear(spec.top_hidden, spec.top_hidden)
        self.top_norm2 = _UnitNorm(spec.top_hidden)
        self.top_out = nn.Linear(spec.top_hidden, d)
        # hidden state: [8 weight stats, bias, x, z, d] per unit and example -> h
        self.h_in = nn.Linear(8 + 1 + 2 + d, h)
        self.h_norm = _UnitNorm(h)
        self.h_blocks = nn.ModuleList(nn.Linear(h, h) for _ in range(spec.hidden_blocks))
        self.h_block_norms = nn.ModuleList(_UnitNorm(h) for _ in range(spec.hidden_blocks))
        self.to_delta = nn.Linear(h, d)
        self.bias_readout = nn.Linear(h, 1)
        # low-rank readouts of the post (top) and pre (bottom) hidden states, one pair per readout term
        self.readouts = nn.ModuleDict({f"{term}_{side}": nn.Linear(h, c)
                                       for term in ("order0", "rbf", "order1") for side in ("post", "pre")})
        self.merge = nn.Linear(N_WEIGHT_TERMS, 1)
        with torch.no_grad():
            self.merge.weight.fill_(0.1)
            self.merge.bias.zero_()

    # ---- the per-unit networks
    def top_error(self, x_top: torch.Tensor) -> torch.Tensor:
        """[B, n] top post-activations -> [B, n, D] error signal."""
        stats = _unit_stats(x_top, dim=0).unsqueeze(0).expand(x_top.shape[0], -1, -1)
        a = _standardize_channels(torch.cat([x_top.unsqueeze(-1), stats], dim=-1))
        a = torch.relu(self.top_norm1(self.top_in(a)))
        a = torch.relu(self.top_norm2(self.top_mid(a)))
        return self.top_out(a)

    def hidden_state(self, x: torch.Tensor, z: torch.Tensor, d: torch.Tensor, bias: torch.Tensor,
                     w_in: torch.Tensor | None, w_out: torch.Tensor | None) -> torch.Tensor:
        """h [B, n, H] of one layer's units from their activity, error, bias and weight statistics."""
        batch = x.shape[0]
        stats = [_unit_stats(w, dim=1) for w in (w_in,) if w is not None]  # incoming weights: rows
        stats += [_unit_stats(w, dim=0) for w in (w_out,) if w is not None]  # outgoing: columns
        if len(stats) == 1:  # an edge layer duplicates the statistics of the matrix it has
            stats = stats * 2
        w_stats = torch.cat(stats, dim=-1)  # [n, 8]
        w_stats = w_stats * torch.rsqrt(w_stats.pow(2).mean() + 1e-6)
        act = _standardize_channels(torch.cat([x.unsqueeze(-1), z.unsqueeze(-1), d], dim=-1))
        per_unit = torch.cat([w_stats, bias.unsqueeze(-1)], dim=-1).unsqueeze(0).expand(batch, -1, -1)
        a = torch.relu(self.h_norm(self.h_in(torch.cat([per_unit, act], dim=-1))))
        for lin, norm in zip(self.h_blocks, self.h_block_norms):
            a = a + torch.relu(norm(lin(a)))
        return a

    def _low_rank(self, term: str, h_post: torch.Tensor, h_pre: torch.Tensor) -> torch.Tensor:
        r_post = self.readouts[f"{term}_post"](h_post)  # [B, n_post, C]
        r_pre = self.readouts[f"{term}_pre"](h_pre)  # [B, n_pre, C]
        batch, channels = h_post.shape[0], r_post.shape[-1]
        return torch.einsum("bic,bjc->ij", r_post, r_pre) / (batch * channels)

    # ---- the weight and bias updates
    def weight_update(self, w: torch.Tensor, x_pre: torch.Tensor, x_post: torch.Tensor, h_pre: torch.Tensor,
                      h_post: torch.Tensor) -> torch.Tensor:
        """ΔW for W [n_post, n_pre] (the step is W ← W(1 − lr) − lr·ΔW)."""
        batch = x_pre.shape[0]
        w_hat = w * torch.rsqrt(w.pow(2).mean(dim=1, keepdim=True) + 1e-6)
        post = _center_scale(x_post)
        pre = _center_scale(x_pre)
        gram = post.t() @ post / (batch * math.sqrt(post.shape[1]))
        decorr = gram @ w_hat
        decorr = decorr * torch.rsqrt(decorr.pow(2).mean() + 1e-8)
        terms = [
            w_hat,
            w_hat.pow(2) * torch.sign(w_hat),  # large decay
            decorr,
            -(post.t() @ pre) / batch,  # Hebbian
            self._low_rank("order0", h_post, h_pre),
            torch.exp(-w_hat.pow(2)) * self._low_rank("rbf", h_post, h_pre),
            w_hat * self._low_rank("order1", h_post, h_pre),
        ]
        stacked = torch.stack([_row_normalize(t) for t in terms], dim=-1)
        change = self.merge(stacked).squeeze(-1) / len(terms)
        # Only updates perpendicular to W or growing it: W's length must not decay towards zero.
        shrink = torch.relu((change * w_hat).mean())
        change = (change - w_hat * shrink) / math.sqrt(len(terms))
        change = _row_normalize(change)
        return change - w_hat / 7.0  # the released fixed term that keeps receptive fields from collapsing

    def bias_update(self, h_post: torch.Tensor) -> torch.Tensor:
        change = self.bias_readout(h_post).squeeze(-1).mean(dim=0)  # [n_post]
        # The mean may be positive (biases shrink) but not negative: biases cannot all grow without bound.
        change = change - (-torch.relu(-change.mean()))
        return change * torch.rsqrt(0.5 + change.pow(2).mean())

    def updates(self, net: BaseNet, xs: Sequence[torch.Tensor], zs: Sequence[torch.Tensor]) -> tuple[
            list[torch.Tensor], list[torch.Tensor]]:
        """ΔW_l and Δb_l for every layer, from one batch's activations; labels are not an input."""
        n_layers = len(net.weights)
        d = self.top_error(xs[-1])
        hs: list[torch.Tensor] = [torch.empty(0)] * (n_layers + 1)
        for l in range(n_layers, -1, -1):  # top-down: layer l's units, l = 0 is the input
            z = zs[l - 1] if l > 0 else xs[0]
            bias = net.biases[l - 1] if l > 0 else torch.zeros_like(xs[0][0])
            w_in = net.weights[l - 1] if l > 0 else None
            w_out = net.weights[l] if l < n_layers else None
            hs[l] = self.hidden_state(xs[l], z, d, bias, w_in, w_out)
            if l > 0:
                delta = d * torch.sigmoid(z).unsqueeze(-1) + self.to_delta(hs[l])
                d = torch.einsum("bic,ij->bjc", delta, net.backward[l - 1])
                d = d * torch.rsqrt(d.pow(2).mean(dim=-1, keepdim=True) + 1e-6)
        dw = [self.weight_update(net.weights[l], xs[l], xs[l + 1], hs[l], hs[l + 1]) for l in range(n_layers)]
        db = [self.bias_update(hs[l + 1]) for l in range(n_layers)]
        return dw, db

    def step(self, net: BaseNet, x: torch.Tensor, lr: float) -> BaseNet:
        """One unsupervised step on the unlabeled batch ``x`` (differentiable in θ for meta-training)."""
        xs, zs = base_forward(net, x)
        dw, db = self.updates(net, xs, zs)
        keep = 1.0 - lr
        return BaseNet([w * keep - lr * g for w, g in zip(net.weights, dw)],
                       [b * keep - lr * g for b, g in zip(net.biases, db)],
                       [v * keep - lr * g for v, g in zip(net.backward, dw)])  # V gets W's update


def _center_scale(a: torch.Tensor) -> torch.Tensor:
    a = a - a.mean(dim=0, keepdim=True)
    return a * torch.rsqrt(a.pow(2).mean(dim=0, keepdim=True) + 1e-6)


# ---------------------------------------------------------------------------------------------- meta-objective
RIDGE = 0.1  # released ridge_factor


def ridge_readout(features: torch.Tensor, labels: torch.Tensor, num_classes: int, ridge: float = RIDGE
                  ) -> torch.Tensor:
    """Closed-form ridge weights [F + 1, K] from features to centred, unit-norm one-hot targets."""
    a = torch.cat([features, torch.ones_like(features[:, :1])], dim=1)
    penalty = torch.full((a.shape[1],), ridge, dtype=a.dtype, device=a.device)
    penalty[-1] = 0.0  # the bias column is not penalised
    return torch.linalg.solve(a.t() @ a + torch.diag(penalty), a.t() @ _targets(labels, num_classes, a.dtype))


def _targets(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    # A comparison instead of F.one_hot, which has no vmap batching rule.
    y = (labels.unsqueeze(-1) == torch.arange(num_classes, device=labels.device)).to(dtype)
    y = y - y.mean()
    return y * torch.rsqrt(y.pow(2).sum(dim=1).mean())


def ridge_meta_loss(support: torch.Tensor, support_labels: torch.Tensor, query: torch.Tensor,
                    query_labels: torch.Tensor, num_classes: int, ridge: float = RIDGE) -> tuple[
                        torch.Tensor, torch.Tensor]:
    """(loss, accuracy) of the released linear-regression meta-objective on a support/query split."""
    w = ridge_readout(support, support_labels, num_classes, ridge)
    pred = torch.cat([query, torch.ones_like(query[:, :1])], dim=1) @ w
    pred_unit = pred * torch.rsqrt(pred.pow(2).sum(dim=1, keepdim=True) + 1e-12)
    target = _targets(query_labels, num_classes, query.dtype)
    batch = support.shape[0]
    loss = (pred_unit - target).pow(2).sum() / query.shape[0] + ridge * w[:-1].pow(2).sum() / batch
    accuracy = (pred.argmax(dim=1) == query_labels).to(query.dtype).mean()
    return loss, accuracy.detach()


def few_shot_eval(net: BaseNet, x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor,
                  y_query: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta-loss and accuracy of ``net``'s representation; support and query share one batch's statistics."""
    feats = representation(net, torch.cat([x_support, x_query]))
    n = x_support.shape[0]
    return ridge_meta_loss(feats[:n], y_support, feats[n:], y_query, num_classes)


# ---------------------------------------------------------------------------------------------- many networks at once
def stack_nets(nets: Sequence[BaseNet]) -> BaseNet:
    """Independent base networks of one architecture as one BaseNet with a leading network dimension."""
    return BaseNet(*([torch.stack(ts) for ts in zip(*(getattr(n, f) for n in nets))]
                     for f in ("weights", "biases", "backward")))


def step_many(rule: MetzRule, nets: BaseNet, x: torch.Tensor, lr: float) -> BaseNet:
    """:meth:`MetzRule.step` on stacked networks, each with its own batch ``x[k]`` (torch.func.vmap).

    One vectorised call costs far fewer kernel launches than a loop over networks; the result is the
    same as looping (up to float summation order).
    """
    def one(ws: list[torch.Tensor], bs: list[torch.Tensor], vs: list[torch.Tensor], xx: torch.Tensor) -> tuple[
            list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        out = rule.step(BaseNet(list(ws), list(bs), list(vs)), xx, lr)
        return out.weights, out.biases, out.backward

    w, b, v = torch.func.vmap(one)(nets.weights, nets.biases, nets.backward, x)
    return BaseNet(list(w), list(b), list(v))


def few_shot_eval_many(nets: BaseNet, x_support: torch.Tensor, y_support: torch.Tensor, x_query: torch.Tensor,
                       y_query: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`few_shot_eval` per stacked network (every input has the leading network dimension)."""
    def one(ws: list[torch.Tensor], bs: list[torch.Tensor], xs: torch.Tensor, ys: torch.Tensor, xq: torch.Tensor,
            yq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return few_shot_eval(BaseNet(list(ws), list(bs), []), xs, ys, xq, yq, num_classes)

    return torch.func.vmap(one)(nets.weights, nets.biases, x_support, y_support, x_query, y_query)


# ---------------------------------------------------------------------------------------------- checkpoints
def save_rule(rule: MetzRule, path: Path, meta: dict[str, Any]) -> None:
    state = {k: v.detach().cpu().float().clone() for k, v in rule.state_dict().items()}
    # Metadata as plain JSON types, so torch.load(weights_only=True) accepts the file.
    plain = json.loads(json.dumps(meta, default=str))
    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "spec": asdict(rule.spec),
                "state_dict": state, "meta": plain}, path)


def load_rule(path: str | Path | None = None) -> tuple[MetzRule, dict[str, Any]]:
    """θ and its metadata from ``path`` (default: the bundled checkpoint), frozen (no gradients)."""
    path = Path(path) if path else BUNDLED_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"no Metz rule checkpoint at {path}; run localsgd-meta-train-unsupervised "
                                "or set optimizer.checkpoint to a file it wrote")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("format") != CHECKPOINT_FORMAT or blob.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"{path} is not a version-{CHECKPOINT_VERSION} Metz rule checkpoint (format "
                         f"{blob.get('format')!r}, version {blob.get('version')!r}); meta-train a new one")
    rule = MetzRule(RuleSpec(**blob["spec"]))
    rule.load_state_dict(blob["state_dict"])
    rule.requires_grad_(False)
    return rule, dict(blob.get("meta", {}))

