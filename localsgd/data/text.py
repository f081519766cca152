"""Token files for language-model training: text files in, ``train.bin``/``val.bin``/``meta.json`` out.

The ``.bin`` layout is nanoGPT's (Karpathy, nanoGPT, 2023, ``data/*/prepare.py``): one flat array of
token ids, little-endian (the native order of the x86 and ARM machines nanoGPT's ``np.memmap`` reads
rely on), no header, ``uint16`` when every id fits (GPT-2's 50,257 do) else ``uint32``
(:func:`token_dtype`). Where nanoGPT keeps the vocabulary in ``meta.pkl``, a ``meta.json`` beside the
files says how to read them (``format: "localsgd-tokens-1"``; the keys are :data:`META_KEYS`).

Tokenizers:

* ``bytes`` (:class:`ByteTokenizer`, the default): byte-level, as ByT5 (Xue et al., "ByT5: Towards a
  token-free future with pre-trained byte-to-byte models", TACL 2022, arXiv 2105.13626) but without its
  three special ids: a token is one byte of the UTF-8 encoding, 256 ids, nothing to train or download,
  and every string round-trips exactly.
* ``bpe`` (:class:`BPETokenizer`, optional: ``pip install 'localsgd[text]'``): a byte-level BPE of the
  ``tokenizers`` package trained here on the train split's files (never on val), saved as
  ``tokenizer.json`` beside the token files.

How :func:`prepare_text` builds a directory:

* Each file is read as bytes and decoded as strict UTF-8 (line endings untouched, so the byte tokens are
  exactly the file's bytes); a file that is not valid UTF-8 is skipped and counted (``skipped_files``).
* The split is *by file*, so no file is half in train and half in val: a file's key is its path relative
  to ``root`` (POSIX separators), ``h`` the SHA-1 of the key as a big-endian integer, and the file goes
  to val when ``h % 10000 < val_fraction * 10000`` (:func:`split_by_file`). The split depends only on the
  keys, never on the machine or the order the files were listed in. With two files or more, each split
  gets at least one (the train file of lowest ``h % 10000`` moves to val, or the val file of highest to
  train); a single file is all train.
* Each split holds its files in sorted key order, each tokenized on its own, joined by the tokens of
  :data:`SEPARATOR` (``"\\n\\n"``, a blank line) between consecutive files, so for the byte tokenizer
  ``decode(train.bin) == "\\n\\n".join(train texts)``.
* Every file is written atomically (a temp file in the same directory, fsynced, then ``os.replace``),
  and ``meta.json`` last, after removing any old one first: a crash leaves either a complete directory or
  one without ``meta.json``, which :func:`load_meta` refuses, never a ``meta.json`` beside partial data.

:func:`prepare_stdlib` is a corpus that needs no download: the running interpreter's standard library
(:func:`stdlib_files`), byte-level, prepared once into a cache under a file lock, so the ranks of a job
that all ask for it tokenize it once. Measured on CPython 3.11.7 (x86-64 Linux): 1,790 ``.py`` files,
31,525,224 bytes; 4 are not valid UTF-8 on purpose (``test/encoded_modules/``, ``test/tokenizedata/``,
``test/test_source_encoding.py``) and skipped; with ``val_fraction=0.05`` 1,688 files (29,378,373
tokens) go to train and 98 (2,137,280 tokens) to val: 63,031,306 bytes of ``uint16`` on disk, prepared
in under a second.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

FORMAT = "localsgd-tokens-1"
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"  # the bpe tokenizer, beside its token files
SPLITS = ("train", "val")
SEPARATOR = "\n\n"  # between consecutive files of a split: a blank line, as between paragraphs or top-level defs
SPLIT_BUCKETS = 10000  # h % 10000 < val_fraction * 10000: val fractions resolve to 0.01%
DEFAULT_BPE_VOCAB = 4096  # a tunable default for --tokenizer bpe, sized for corpora of a few MB
META_KEYS = ("vocab_size", "dtype", "tokenizer", "train_tokens", "val_tokens", "train_files", "val_files",
             "skipped_files", "source", "val_fraction", "format")
MISSING_TOKENIZERS = "the bpe tokenizer needs the tokenizers package: pip install tokenizers"
EXCLUDED_STDLIB_DIRS = ("site-packages", "dist-packages")  # installed packages, not the standard library


class TokenDataError(ValueError):
    """Input that cannot become token files, or a directory that is not a prepared one."""


class MissingTokenizersError(ImportError):
    """``--tokenizer bpe`` without the optional ``tokenizers`` package."""

    def __init__(self) -> None:
        super().__init__(MISSING_TOKENIZERS)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest of little-endian uint16/uint32 that holds every id in ``[0, vocab_size)``."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit uint32 token ids")
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def _file_dtype(dtype: Any) -> np.dtype:
    """``dtype`` ("uint16", np.uint16, ...) as the little-endian unsigned integer type of the token files."""
    dt = np.dtype(dtype)
    if dt.kind != "u" or dt.itemsize not in (2, 4):
        raise TokenDataError(f"token files hold uint16 or uint32 ids, not {dt}")
    return dt.newbyteorder("<")


# --------------------------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """Byte-level tokens: id ``b`` is the byte ``b`` of the UTF-8 encoding (no special ids)."""

    vocab_size = 256
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        """The UTF-8 bytes of ``text`` as ids, in the dtype of the token files (uint16)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(token_dtype(self.vocab_size))

    def decode(self, ids: Iterable[int] | np.ndarray, errors: str = "replace") -> str:
        """The text of byte ids. A cut multi-byte character (a model's sample may end in one) becomes
        U+FFFD with the default ``errors="replace"``; ``errors="strict"`` raises instead."""
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
        if arr.size == 0:
            return ""
        if arr.dtype.kind not in "iu" or arr.min() < 0 or arr.max() > 255:
            raise ValueError(f"byte ids are integers in [0, 256), got {arr.dtype} values in "
                             f"[{arr.min()}, {arr.max()}]")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors=errors)


def _import_tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError as err:
        raise MissingTokenizersError() from err
    return tokenizers


class BPETokenizer:
    """A byte-level BPE (the ``tokenizers`` package): trained on local text, saved as ``tokenizer.json``.

    ``vocab_size`` is the size the training reached, which is below the requested one when the corpus
    has fewer distinct merges to offer.
    """

    name = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = int(tokenizer.get_vocab_size())

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = DEFAULT_BPE_VOCAB) -> BPETokenizer:
        """A BPE with up to ``vocab_size`` ids (>= 256: the byte alphabet comes first) learned from ``texts``."""
        tk = _import_tokenizers()
        if vocab_size < 256:
            raise ValueError(f"a byte-level BPE needs vocab_size >= 256 (the byte alphabet), got {vocab_size}")
        tokenizer = tk.Tokenizer(tk.models.BPE())
        # add_prefix_space=False and no normalizer: the ids are a lossless recoding of the text's bytes.
        tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
                                         special_tokens=[], show_progress=False)
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: Path | str) -> BPETokenizer:
        """The tokenizer in ``path``: a ``tokenizer.json`` file or a directory holding one."""
        tk = _import_tokenizers()
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise TokenDataError(f"no BPE tokenizer at {path}")
        return cls(tk.Tokenizer.from_file(str(path)))

    def save(self, path: Path | str) -> Path:
        """Write ``tokenizer.json`` atomically (``path``: the file, or a directory to hold it)."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        _write_atomic(path, self.tokenizer.to_str().encode("utf-8"))
        return path

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tokenizer.encode(text).ids, dtype=token_dtype(self.vocab_size))

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(out_dir: Path | str) -> ByteTokenizer | BPETokenizer:
    """The tokenizer that made a prepared directory, to decode its ids (a model's samples, say)."""
    meta = load_meta(out_dir)
    if meta["tokenizer"] == ByteTokenizer.name:
        return ByteTokenizer()
    if meta["tokenizer"] == BPETokenizer.name:
        return BPETokenizer.load(Path(out_dir) / TOKENIZER_FILE)
    raise TokenDataError(f"{Path(out_dir) / META_FILE}: unknown tokenizer {meta['tokenizer']!r}")


# ------------------------------------------------------------------------------------------ token files


def _fsync_dir(directory: Path) -> None:
    """Make the renames in ``directory`` durable before what depends on them (meta.json) is written."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the renames are still atomic
    finally:
        os.close(fd)


class _AtomicFile:
    """A binary file written to a temp file in the target's directory, fsynced and renamed on success."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def __enter__(self) -> _AtomicFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
        self.file = os.fdopen(fd, "wb")
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a data cache may be shared
        return self

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
            self.file.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)


def _write_atomic(path: Path, data: bytes) -> None:
    with _AtomicFile(path) as f:
        f.write(data)


class TokenWriter:
    """A token file written chunk by chunk (each checked as :func:`write_tokens` does), atomically."""

    def __init__(self, path: Path | str, vocab_size: int, dtype: Any = None) -> None:
        self.path = Path(path)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(vocab_size) if dtype is None else _file_dtype(dtype)
        self.tokens = 0
        self._file = _AtomicFile(self.path)

    def __enter__(self) -> TokenWriter:
        self._file.__enter__()
        return self

    def write(self, ids: Iterable[int] | np.ndarray) -> int:
        arr = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids))
        if arr.size:
            _check_ids(arr, self.vocab_size, self.dtype, self.path, self.tokens)
            self._file.write(arr.astype(self.dtype, copy=False).tobytes())
        self.tokens += int(arr.size)
        return int(arr.size)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._file.__exit__(exc_type, exc, tb)


def _check_ids(arr: np.ndarray, vocab_size: int, dtype: np.dtype, path: Path, offset: int) -> None:
    """Every id an integer in ``[0, vocab_size)`` that ``dtype`` holds: else a ValueError naming the first bad one."""
    if arr.ndim != 1:
        raise ValueError(f"{path}: token ids are a flat sequence, got shape {arr.shape}")
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{path}: token ids must be integers, got dtype {arr.dtype}")
    dtype_max = int(np.iinfo(dtype).max)
    bound = min(vocab_size, dtype_max + 1)
    bad = np.flatnonzero((arr < 0) | (arr >= bound))
    if bad.size:
        i = int(bad[0])
        where = f"token id {int(arr[i])} at position {offset + i} of {path}"
        if int(arr[i]) < 0 or int(arr[i]) >= vocab_size:
            raise ValueError(f"{where} is outside [0, {vocab_size}) (vocab_size={vocab_size})")
        raise ValueError(f"{where} does not fit {dtype.name} (at most {dtype_max}); vocab_size={vocab_size} "
                         f"needs {token_dtype(vocab_size).name}")


def write_tokens(path: Path | str, ids: Iterable[int] | np.ndarray, vocab_size: int, dtype: Any = None) -> int:
    """Write ``ids`` as a headerless little-endian token file, atomically; returns the number of tokens.

    ``dtype`` defaults to :func:`token_dtype` of ``vocab_size``. Every id must be in ``[0, vocab_size)``
    and fit the dtype, else a ValueError names the first offending id, its position and the bound.
    """
    with TokenWriter(path, vocab_size, dtype) as writer:
        writer.write(ids)
    return writer.tokens


def read_tokens(path: Path | str, dtype: Any) -> np.ndarray:
    """The ids of a token file as a read-only ``np.memmap`` (a zero-length read-only array for an empty file,
    which cannot be mapped). ``dtype``: "uint16"/"uint32" or the numpy type, read little-endian."""
    path = Path(path)
    dt = _file_dtype(dtype)
    size = path.stat().st_size
    if size % dt.itemsize:
        raise TokenDataError(f"{path}: {size} bytes is not a whole number of {dt.name} tokens "
                             f"({dt.itemsize} bytes each): a truncated file, or the wrong dtype")
    if size == 0:
        empty = np.empty(0, dtype=dt)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dt, mode="r")


def load_meta(out_dir: Path | str) -> dict[str, Any]:
    """``meta.json`` of a prepared directory; TokenDataError when there is none or it is of another format."""
    path = Path(out_dir) / META_FILE
    if not path.is_file():
        raise TokenDataError(f"no {META_FILE} in {out_dir}: not a prepared token directory, or its preparation "
                             "did not finish (run localsgd-prepare-text)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise TokenDataError(f"{path} is not valid JSON ({err}); prepare the directory again") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise TokenDataError(f"{path} has format {found!r}, expected {FORMAT!r}; prepare the directory again")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise TokenDataError(f"{path} lacks {', '.join(missing)}; prepare the directory again")
    return meta


def load_split(out_dir: Path | str, split: str = "train") -> np.ndarray:
    """``train.bin`` or ``val.bin`` of a prepared directory, checked against the count in its ``meta.json``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta = load_meta(out_dir)
    tokens = read_tokens(Path(out_dir) / f"{split}.bin", meta["dtype"])
    if len(tokens) != meta[f"{split}_tokens"]:
        raise TokenDataError(f"{Path(out_dir) / f'{split}.bin'} holds {len(tokens)} tokens, {META_FILE} says "
                             f"{meta[f'{split}_tokens']}; prepare the directory again")
    return tokens


# ------------------------------------------------------------------------------------------ preparation


def file_key(path: Path, root: Path) -> str:
    """The split key of a file: its path relative to ``root``, with POSIX separators."""
    return Path(os.path.relpath(path, root)).as_posix()


def split_bucket(key: str) -> int:
    """``sha1(key) % 10000``: the file goes to val when this is below ``val_fraction * 10000``."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest(), "big") % SPLIT_BUCKETS


def split_by_file(keys: Iterable[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Sorted (train keys, val keys) of distinct file keys; see the module docstring for the rule."""
    check_val_fraction(val_fraction)
    buckets = {key: split_bucket(key) for key in keys}
    if len(buckets) == 1:
        return sorted(buckets), []
    val = sorted(key for key, b in buckets.items() if b < val_fraction * SPLIT_BUCKETS)
    train = sorted(set(buckets) - set(val))
    by_bucket = sorted(buckets, key=lambda k: (buckets[k], k))
    if not val:  # at least one of each: the train file nearest the threshold moves across
        val = [by_bucket[0]]
        train.remove(by_bucket[0])
    elif not train:
        train = [by_bucket[-1]]
        val.remove(by_bucket[-1])
    return train, val


def check_val_fraction(val_fraction: float) -> None:
    if not 0 < val_fraction < 1:
        raise TokenDataError(f"val_fraction must be in (0, 1), got {val_fraction}")


def _read_utf8(path: Path) -> str | None:
    """The text of a file as it is on disk, or None when it is not valid UTF-8."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _texts(paths: Sequence[Path]) -> Iterator[str]:
    for path in paths:
        text = _read_utf8(path)
        if text is not None:  # checked valid in the first pass; a file changed since is skipped, not a crash
            yield text


def _write_split(path: Path, paths: Sequence[Path], tok: ByteTokenizer | BPETokenizer) -> int:
    separator = tok.encode(SEPARATOR)
    with TokenWriter(path, tok.vocab_size) as writer:
        for i, text in enumerate(_texts(paths)):
            if i:
                writer.write(separator)
            writer.write(tok.encode(text))
    return writer.tokens


def prepare_text(files: Sequence[Path | str], out_dir: Path | str, *, val_fraction: float = 0.05,
                 tokenizer: str = "bytes", vocab_size: int | None = None, source: str,
                 root: Path | str | None = None) -> Path:
    """Tokenize ``files`` into ``out_dir``: ``train.bin``, ``val.bin`` (and ``tokenizer.json`` for bpe), then
    ``meta.json``; returns ``out_dir``.

    ``tokenizer``: "bytes" (``vocab_size`` None or 256) or "bpe" (``vocab_size``: the requested size,
    default :data:`DEFAULT_BPE_VOCAB`). ``source`` is recorded in ``meta.json`` (what the files are; the
    cache of :func:`prepare_stdlib` compares it). ``root``: the directory the split keys are relative to,
    default the deepest directory common to all files. Files are read twice (a check of every file's
    UTF-8, then the tokenizing, one file at a time), so a corpus need not fit in memory.
    """
    check_val_fraction(val_fraction)
    if tokenizer not in (ByteTokenizer.name, BPETokenizer.name):
        raise TokenDataError(f"tokenizer must be 'bytes' or 'bpe', got {tokenizer!r}")
    if tokenizer == ByteTokenizer.name and vocab_size not in (None, ByteTokenizer.vocab_size):
        raise TokenDataError(f"the bytes tokenizer has vocab_size 256; vocab_size={vocab_size} is for bpe")
    if tokenizer == BPETokenizer.name:
        _import_tokenizers()  # fail before reading anything
    out_dir = Path(out_dir)
    paths = sorted({Path(os.path.abspath(p)) for p in files})
    if not paths:
        raise TokenDataError("no input files")
    base = Path(os.path.abspath(root)) if root is not None else Path(os.path.commonpath([p.parent for p in paths]))
    by_key = {file_key(p, base): p for p in paths}
    valid = {key: p for key, p in by_key.items() if _read_utf8(p) is not None}
    skipped = sorted(set(by_key) - set(valid))
    if not valid:
        raise TokenDataError(f"none of the {len(paths)} input files is valid UTF-8 text")
    train_keys, val_keys = split_by_file(valid, val_fraction)
    split_paths = {"train": [valid[k] for k in train_keys], "val": [valid[k] for k in val_keys]}

    out_dir.mkdir(parents=True, exist_ok=True)
    # Removed first: from here until the new meta.json, the directory does not claim to be complete.
    (out_dir / META_FILE).unlink(missing_ok=True)
    if tokenizer == BPETokenizer.name:
        tok: ByteTokenizer | BPETokenizer = BPETokenizer.train(_texts(split_paths["train"]),
                                                              vocab_size or DEFAULT_BPE_VOCAB)
        tok.save(out_dir / TOKENIZER_FILE)
    else:
        tok = ByteTokenizer()
        (out_dir / TOKENIZER_FILE).unlink(missing_ok=True)  # a stale bpe tokenizer would mislead
    counts = {split: _write_split(out_dir / f"{split}.bin", split_paths[split], tok) for split in SPLITS}
    _fsync_dir(out_dir)
    meta = {
        "format": FORMAT,
        "vocab_size": tok.vocab_size,
        "dtype": token_dtype(tok.vocab_size).name,
        "tokenizer": tok.name,
        "train_tokens": counts["train"],
        "val_tokens": counts["val"],
        "train_files": len(train_keys),
        "val_files": len(val_keys),
        "skipped_files": len(skipped),
        "source": source,
        "val_fraction": val_fraction,
        "separator": SEPARATOR,
        "split": {"train": train_keys, "val": val_keys, "skipped": skipped},  # the keys (paths relative to root)
    }
    _write_atomic(out_dir / META_FILE, (json.dumps(meta, indent=1) + "\n").encode("utf-8"))
    _fsync_dir(out_dir)
    return out_dir


# ------------------------------------------------------------------------------------------ stdlib corpus


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source(root: Path | str | None = None) -> str:
    """What the stdlib corpus is, as recorded in ``meta.json``: the interpreter and the directory."""
    where = Path(root) if root is not None else stdlib_root()
    return f"python-stdlib {platform.python_implementation()} {platform.python_version()} {os.path.abspath(where)}"


def stdlib_files(root: Path | str | None = None) -> list[Path]:
    """Every ``*.py`` file under the standard library (``root``, default ``sysconfig``'s ``stdlib``), sorted,
    without anything under a ``site-packages`` or ``dist-packages`` directory (installed packages)."""
    root = Path(root) if root is not None else stdlib_root()
    found: list[Path] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in EXCLUDED_STDLIB_DIRS]
        found.extend(Path(directory) / n for n in names if n.endswith(".py"))
    return sorted((p for p in found if p.is_file()), key=lambda p: file_key(p, root))


def stdlib_dir(cache_dir: str | None = None) -> Path:
    """``stdlib-bytes-py<major>.<minor>`` in the cache of the generated data sets: ``cache_dir``, else
    ``$LOCALSGD_CACHE_DIR``, else ``~/.cache/localsgd`` (MNIST-1D's, ``localsgd.data.mnist1d.cache_root``)."""
    from .mnist1d import cache_root

    return cache_root(cache_dir) / f"stdlib-bytes-py{sys.version_info[0]}.{sys.version_info[1]}"


def _is_prepared(out_dir: Path, source: str, val_fraction: float) -> bool:
    try:
        meta = load_meta(out_dir)
    except TokenDataError:
        return False
    return (meta["source"] == source and meta["val_fraction"] == val_fraction
            and meta["tokenizer"] == ByteTokenizer.name)


def prepare_stdlib(out_dir: Path | str | None = None, *, val_fraction: float = 0.05,
                   root: Path | str | None = None) -> Path:
    """The standard library as byte tokens in ``out_dir`` (default :func:`stdlib_dir`), prepared once.

    Returns at once when ``meta.json`` there already records the same source, val_fraction and format.
    Otherwise prepares under an exclusive ``flock`` on ``<out_dir>.lock``: a concurrent caller (another
    rank of the same job) waits for the lock, then finds the finished ``meta.json`` and returns.
    """
    out_dir = Path(out_dir) if out_dir is not None else stdlib_dir()
    source = stdlib_source(root)
    if _is_prepared(out_dir, source, val_fraction):
        return out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(out_dir.with_name(out_dir.name + ".lock"), "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        if not _is_prepared(out_dir, source, val_fraction):  # the holder before us may have done it
            base = Path(root) if root is not None else stdlib_root()
            prepare_text(stdlib_files(base), out_dir, val_fraction=val_fraction, source=source, root=base)
    return out_dir
