"""``data=tokens``: language-model windows drawn from memory-mapped token files.

The files are nanoGPT's ``.bin`` layout (Karpathy, nanoGPT, 2023): one flat array of token ids in native
byte order, no header, ``uint16`` when the vocabulary fits (GPT-2's 50,257 does), else ``uint32``. A
``meta.json`` beside them (written by ``localsgd-prepare-text``, :mod:`localsgd.data.text`) gives the
vocabulary and the dtype; files without one need ``data.vocab_size`` (and ``data.dtype``).

A training sample is a window of ``block_size + 1`` consecutive tokens: the first ``block_size`` are
the input, the last ``block_size`` (shifted by one) the next-token targets. Each rank draws window starts
uniformly from its own contiguous ``1/world`` of ``train.bin`` (disjoint shards, as every worker of
local SGD trains on its own data) with its own generator, whose state is checkpointed, so a resume
draws exactly the windows an uninterrupted run would have. The evaluation set is ``eval_windows``
fixed windows spread evenly over ``val.bin``, split across ranks; the loss is the mean token
negative log-likelihood, so its ``exp`` is the perplexity.

Without files, ``data.corpus=stdlib`` (the default) needs none: on first use it tokenizes the running
interpreter's standard library byte-level into a cache (:func:`localsgd.data.text.prepare_stdlib`), which
``+experiment=gpt_text`` trains on.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .base import DATASETS, Batch, Problems, TrainingData

CORPORA = ("stdlib",)
DTYPES = ("auto", "uint16", "uint32")


@DATASETS.add
@dataclass
class TokensConfig:
    """``data=tokens``: ``data.train_bin`` and ``data.val_bin``, else the corpus ``data.corpus`` (stdlib)."""

    name: str = "tokens"
    train_bin: str | None = None
    val_bin: str | None = None
    # Without train_bin: stdlib, the interpreter's standard library, byte-level, prepared once and cached.
    corpus: str | None = "stdlib"
    block_size: int = 256  # tokens of context per window
    dtype: str = "auto"  # auto: meta.json's (else uint16) | uint16 | uint32
    vocab_size: int = 0  # 0: meta.json's
    eval_windows: int = 256  # fixed validation windows, spread evenly over val.bin
    cache_dir: str | None = None  # for corpus=stdlib: None: $LOCALSGD_CACHE_DIR, else ~/.cache/localsgd

    def problems(self) -> Problems:
        if self.corpus is not None and self.corpus not in CORPORA:
            yield "corpus", self.corpus, f"must be null or one of {CORPORA}"
        if bool(self.train_bin) != bool(self.val_bin):
            yield ("train_bin" if not self.train_bin else "val_bin", None,
                   "is needed as well: give both data.train_bin and data.val_bin (localsgd-prepare-text makes them)")
        elif not self.train_bin and self.corpus is None:
            yield "corpus", None, "needs data.train_bin and data.val_bin then (localsgd-prepare-text makes them)"
        if self.block_size < 1:
            yield "block_size", self.block_size, "must be >= 1"
        if self.dtype not in DTYPES:
            yield "dtype", self.dtype, f"must be one of {DTYPES}"
        if self.vocab_size < 0:
            yield "vocab_size", self.vocab_size, "must be >= 0 (0: from meta.json)"
        if self.eval_windows < 1:
            yield "eval_windows", self.eval_windows, "must be >= 1"

    def build(self) -> TokenData:
        from . import text

        if not self.train_bin:  # corpus=stdlib
            root = text.prepare_stdlib(text.stdlib_dir(self.cache_dir))
            train, val = root / "train.bin", root / "val.bin"
        else:
            train, val = Path(str(self.train_bin)).expanduser(), Path(str(self.val_bin)).expanduser()
        for key, path in (("data.train_bin", train), ("data.val_bin", val)):
            if not path.is_file():
                raise FileNotFoundError(f"{key}={str(path)!r}: no such file; make token files with "
                                        "localsgd-prepare-text, or set data.corpus=stdlib")
        meta_path = train.parent / "meta.json"
        meta = text.load_meta(train.parent) if meta_path.is_file() else {}
        vocab = self.vocab_size or int(meta.get("vocab_size", 0))
        if vocab < 1:
            raise ValueError(f"data.train_bin={str(train)!r} has no meta.json beside it to give the vocabulary; "
                             "set data.vocab_size (50257 for GPT-2's tokenizer)")
        dtype = self.dtype if self.dtype != "auto" else str(meta.get("dtype", "uint16"))
        if vocab > np.iinfo(np.dtype(dtype)).max + 1:
            raise ValueError(f"data.vocab_size={vocab} does not fit data.dtype={dtype}; use uint32")
        return TokenData(text.read_tokens(train, dtype), text.read_tokens(val, dtype), self.block_size, vocab,
                         self.eval_windows, str(meta.get("tokenizer", "unknown")))


def sequence_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over every position: logits ``(B, T, V)``, targets ``(B, T)``."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


class TokenData(TrainingData):
    """Windows of two token arrays (train, validation); see the module docstring."""

    name = "tokens"
    loss_fn = staticmethod(sequence_cross_entropy)
    reports_perplexity = True
    train_accuracy = False  # a window's logits are (B, T, V): too large to keep for a logging window

    def __init__(self, train: np.ndarray, val: np.ndarray, block_size: int, vocab_size: int, eval_windows: int,
                 tokenizer: str = "unknown") -> None:
        need = block_size + 1
        if len(val) < need:
            raise ValueError(f"the validation tokens ({len(val)}) are fewer than one window of block_size + 1 = "
                             f"{need}; lower data.block_size or use more text")
        self.train, self.val = train, val
        self.block_size, self.num_classes, self.tokenizer = block_size, vocab_size, tokenizer
        self.tokens_per_sample = block_size
        n_eval = min(eval_windows, len(val) - block_size)
        self.eval_starts = np.linspace(0, len(val) - need, n_eval).round().astype(np.int64)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.block_size,)

    def train_stream(self, rank: int, world: int, seed: int, device: torch.device) -> TokenWindows:
        lo, hi = rank * len(self.train) // world, (rank + 1) * len(self.train) // world
        if hi - lo < self.block_size + 2:
            raise ValueError(f"train.bin's {len(self.train)} tokens over {world} worker(s) leave {hi - lo} per "
                             f"worker, fewer than a window of block_size + 1 = {self.block_size + 1} (plus one); "
                             "lower data.block_size, use more text or fewer workers")
        return TokenWindows(self.train, lo, hi, self.block_size, seed * 1_000_003 + 104_729 * (rank + 1), device)

    def eval_batches(self, rank: int, world: int, batch_size: int, device: torch.device) -> Iterator[Batch]:
        starts = self.eval_starts[rank::world]
        for i in range(0, len(starts), batch_size):
            yield windows(self.val, starts[i : i + batch_size], self.block_size, device)


def windows(tokens: np.ndarray, starts: np.ndarray, block_size: int, device: torch.device) -> Batch:
    """Inputs ``tokens[s : s+T]`` and targets ``tokens[s+1 : s+T+1]`` for each start ``s``, as int64."""
    rows = tokens[starts[:, None] + np.arange(block_size + 1)]
    both = torch.from_numpy(rows.astype(np.int64))
    if device.type == "cuda":
        both = both.pin_memory().to(device, non_blocking=True)
    return both[:, :-1], both[:, 1:]


class TokenWindows:
    """One rank's random windows of its contiguous shard ``[lo, hi)``, from a checkpointed generator."""

    def __init__(self, tokens: np.ndarray, lo: int, hi: int, block_size: int, seed: int, device: torch.device):
        self.tokens, self.lo, self.hi, self.block_size, self.device = tokens, lo, hi, block_size, device
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.samples_seen = 0

    def start(self, plan: Any, first_step: int, last_step: int) -> None:
        pass  # draws on demand

    def close(self) -> None:
        pass

    def next_batch(self, batch_size: int) -> Batch:
        # The last window ends at hi: starts in [lo, hi - block_size - 1].
        starts = torch.randint(self.lo, self.hi - self.block_size, (batch_size,), generator=self.generator)
        self.samples_seen += batch_size
        return windows(self.tokens, starts.numpy(), self.block_size, self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "samples_seen": self.samples_seen, "seed": self.seed,
                "lo": self.lo, "hi": self.hi, "block_size": self.block_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "lo", "hi", "block_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(f"token-stream checkpoint has {key}={state[key]}, this run has {getattr(self, key)}: "
                                 "refusing a silent mis-resume (the windows drawn would differ)")
        self.generator.set_state(state["generator"])
        self.samples_seen = int(state["samples_seen"])
