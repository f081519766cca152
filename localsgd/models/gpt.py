"""A decoder-only transformer language model in the shape of GPT-2 (Radford, Wu, Child, Luan, Amodei &
Sutskever, "Language Models are Unsupervised Multitask Learners", OpenAI 2019, Section 2.3), built from
the decoder of Vaswani et al., "Attention Is All You Need", NeurIPS 2017, arXiv 1706.03762, Section 3.

Shapes: token ids ``idx`` of shape ``(B, T)`` (an integer tensor, ``T <= block_size``) map to next-token
logits of shape ``(B, T, V)``, where ``V`` is the vocabulary (the dataset's ``num_classes``) and
position ``t`` sees only tokens ``0..t``. The config's ``build(input_shape, num_classes)`` takes
``input_shape == (T,)``, the dataset's token window. The loss is cross entropy over the flattened
``(B*T, V)`` logits against ``(B*T,)`` targets (the inputs shifted by one token).

The network, with ``C = n_embd``:

* token embedding ``(V, C)`` plus a learned position embedding ``(block_size, C)`` (as in GPT-1,
  Radford et al. 2018; Vaswani et al. use fixed sinusoids), then dropout;
* ``n_layer`` pre-LayerNorm blocks ``x + attn(ln_1(x))`` then ``x + mlp(ln_2(x))`` (GPT-2 Section 2.3
  moved LayerNorm to the input of each sub-block), with a final LayerNorm after the last block;
* ``attn``: ``n_head`` heads of causal scaled dot-product attention ``softmax(Q K^T / sqrt(d_k)) V``
  (Vaswani et al. Section 3.2.1, Eq. 1; multi-head Section 3.2.2) with ``d_k = C / n_head``, through
  ``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``; dropout on the attention
  weights and on the output projection;
* ``mlp``: ``Linear(C, 4C)``, GELU (Hendrycks & Gimpel 2016, arXiv 1606.08415; the exact erf form,
  where GPT-2 used its tanh approximation), ``Linear(4C, C)``, dropout (the width ``4C`` is Vaswani
  et al.'s ``d_ff = 4 d_model``, Section 3.3);
* the LM head ``Linear(C, V, bias=False)``, whose weight is the token embedding's when ``tie_weights``
  (Press & Wolf, EACL 2017, arXiv 1608.05859; Vaswani et al. Section 3.4): one Parameter, counted once.

Initialisation: Linear and Embedding weights from N(0, 0.02) (GPT-1, Radford et al. 2018, Section 4.1),
biases 0, LayerNorm weight 1 and bias 0; the two residual output projections of each block (attention
and MLP) from N(0, 0.02 / sqrt(2 * n_layer)): GPT-2 Section 2.3 scales "the weights of residual layers at
initialization by a factor of 1/sqrt(N) where N is the number of residual layers", and each block adds
two. Every draw comes from torch's global RNG, so seeding before building gives every worker the same
model. Constants from the papers: 0.02, 1/sqrt(2 * n_layer), 4C, pre-LN. Tunable defaults of ours:
``n_layer=4, n_head=4, n_embd=128`` (small enough for CPU tests), ``dropout=0.0``, ``bias=True``.

Parameter counts (``num_parameters()``, tied weights; each block has ``12 C^2 + 13 C`` with biases; the
non-embedding count leaves out the token and position tables, Kaplan et al. 2020's ``N``):

=========================================  =====  ==========  ===========  ===============
config                                     vocab  block_size  parameters   non-embedding
=========================================  =====  ==========  ===========  ===============
n_layer=2, n_head=4, n_embd=128 (tests)      256         128      445,952          396,800
n_layer=4, n_head=4, n_embd=128 (default)    256         128      842,496          793,344
n_layer=6, n_head=6, n_embd=384 (~10M)       256         256   10,844,160       10,647,552
n_layer=12, n_head=12, n_embd=768 (GPT-2)  50257        1024  124,439,808       85,056,000
=========================================  =====  ==========  ===========  ===============

The last row is GPT-2 small, the "117M" model of the paper's Table 2 (124M counted exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .base import MODELS, Problems, check_classes, check_dropout, check_shape, raise_problems

INIT_STD = 0.02  # GPT-1 (Radford et al. 2018), Section 4.1


@MODELS.add
@dataclass
class GPTConfig:
    """``model=gpt``: a GPT-2-shaped decoder-only transformer; inputs (T,) token ids, ``num_classes`` = vocab."""

    name: str = "gpt"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128  # must be a multiple of n_head (each head gets n_embd // n_head dimensions)
    block_size: int = 0  # longest context, the position table's length; 0: the data's token window T
    dropout: float = 0.0  # on embeddings, attention weights and residual branches
    bias: bool = True  # biases in the Linear layers and LayerNorms
    tie_weights: bool = True  # the LM head reuses the token embedding matrix

    def problems(self) -> Problems:
        for key in ("n_layer", "n_head", "n_embd"):
            if getattr(self, key) < 1:
                yield key, getattr(self, key), "must be >= 1"
        if self.n_head >= 1 and self.n_embd >= 1 and self.n_embd % self.n_head:
            yield "n_embd", self.n_embd, f"must be a multiple of n_head={self.n_head}"
        if self.block_size < 0:
            yield "block_size", self.block_size, "must be >= 0 (0: the data's token window)"
        yield from check_dropout(self.dropout)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        raise_problems("gpt", self.problems())
        (window,) = check_shape("gpt", input_shape, 1, "(T,), a window of T token ids")
        if 0 < self.block_size < window:
            raise ValueError(
                f"model.block_size={self.block_size} is shorter than the data's token window T={window}; "
                f"set model.block_size=0 (use the window) or >= {window}"
            )
        return GPT(
            vocab_size=check_classes("gpt", num_classes),
            block_size=int(self.block_size) or window,
            n_layer=int(self.n_layer),
            n_head=int(self.n_head),
            n_embd=int(self.n_embd),
            dropout=float(self.dropout),
            bias=bool(self.bias),
            tie_weights=bool(self.tie_weights),
        )


class CausalSelfAttention(nn.Module):
    """``n_head`` heads of masked attention: position t attends to positions 0..t only."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.n_head, self.dropout = n_head, dropout
        self.qkv = nn.Linear(n_embd, 3 * n_embd, bias=bias)  # Q, K and V of every head in one matmul
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)  # a residual output projection (scaled init)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        # (B, T, 3C) -> three (B, n_head, T, C / n_head) tensors
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_head, width // self.n_head).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(batch, length, width)))


class MLP(nn.Module):
    """The position-wise feed-forward network ``Linear(C, 4C) -> GELU -> Linear(4C, C)``."""

    def __init__(self, n_embd: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.proj = nn.Linear(4 * n_embd, n_embd, bias=bias)  # a residual output projection (scaled init)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.gelu rather than an nn.GELU module: optimizer=stn puts tuned dropout after activation modules,
        # and localsgd.config.has_activation_modules states that this model has none.
        return self.dropout(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """One pre-LayerNorm transformer block: ``x + attn(ln_1(x))``, then ``x + mlp(ln_2(x))``."""

    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token ids ``(B, T)`` with ``T <= block_size`` -> next-token logits ``(B, T, vocab_size)``."""

    def __init__(
        self,
        vocab_size: int,
        block_size: int,
        n_layer: int = 4,
        n_head: int = 4,
        n_embd: int = 128,
        dropout: float = 0.0,
        bias: bool = True,
        tie_weights: bool = True,
    ) -> None:
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head}")
        self.vocab_size, self.block_size, self.tie_weights = vocab_size, block_size, tie_weights
        self.tok_emb = nn.Embedding(vocab_size, n_embd)
        self.pos_emb = nn.Embedding(block_size, n_embd)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(n_embd, n_head, dropout, bias) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd, bias=bias)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)
        if tie_weights:
            self.head.weight = self.tok_emb.weight
        self._init_weights(n_layer)

    def _init_weights(self, n_layer: int) -> None:
        for module in self.modules():
            if module is self.head and self.tie_weights:
                continue  # its weight is the token embedding's, drawn once below
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=INIT_STD)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        # GPT-2 Section 2.3: residual layers scaled by 1/sqrt(N), N = 2 * n_layer residual layers.
        residual_std = INIT_STD / math.sqrt(2 * n_layer)
        for block in self.blocks:
            for proj in (block.attn.proj, block.mlp.proj):
                nn.init.normal_(proj.weight, mean=0.0, std=residual_std)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters, a tied matrix once; ``non_embedding`` leaves out the token and position tables."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_emb.weight.numel() + self.pos_emb.weight.numel()
        return total

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype.is_complex:
            raise ValueError(f"GPT takes token ids shaped (B, T) of an integer dtype, got {tuple(idx.shape)} "
                             f"{idx.dtype}")
        length = idx.shape[1]
        if length > self.block_size:
            raise ValueError(f"GPT got a sequence of T={length} tokens, longer than its block_size="
                             f"{self.block_size}; set model.block_size >= {length}")
        positions = torch.arange(length, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))
