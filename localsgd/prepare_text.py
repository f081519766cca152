"""``localsgd-prepare-text``: text files to the token files ``data=tokens`` trains on (:mod:`localsgd.data.text`).

    localsgd-prepare-text FILES_OR_DIRS ... --out DIR [--val-fraction 0.05] [--tokenizer bytes|bpe]
                          [--vocab-size N] [--glob PATTERN ...]
    localsgd-prepare-text --stdlib [--out DIR] [--val-fraction 0.05]

A file argument is taken whatever its name; a directory is walked for the ``--glob`` patterns (matched
against file names; repeatable; default :data:`DEFAULT_GLOBS`, prose: ``*.txt``, ``*.md``, ``*.rst``; pass
``--glob '*.py'`` for code), skipping hidden files and directories (``.git``, ``.venv``, ...). Files that
are not valid UTF-8 are skipped and counted. ``--stdlib`` takes the running interpreter's standard library
instead (``*.py``, without site-packages) into the cache ``data.corpus=stdlib`` reads (``--out`` to put
it elsewhere); it is prepared once, a second run returns at once.

Prints one summary line. A problem with the input (no files, a missing path, a bad fraction, bpe without
the ``tokenizers`` package) is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from .data import text

PROG = "localsgd-prepare-text"
DEFAULT_GLOBS = ("*.txt", "*.md", "*.rst")


class InputError(Exception):
    """A problem with the command's input, reported as one line and exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``localsgd-prepare-text: ...``) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: {message} (see --help)\n")


def walk(directory: Path, globs: Sequence[str]) -> list[Path]:
    """The files under ``directory`` whose names match one of ``globs``, hidden files and directories skipped."""
    found = []
    for where, subdirs, names in os.walk(directory):
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
        found.extend(Path(where) / n for n in names
                     if not n.startswith(".") and any(fnmatch.fnmatch(n, g) for g in globs))
    return found


def collect_files(inputs: Sequence[Path], globs: Sequence[str]) -> list[Path]:
    """The files named by ``inputs`` (files as given, directories walked), sorted and without repeats."""
    files: set[Path] = set()
    for path in inputs:
        if path.is_dir():
            files.update(Path(os.path.abspath(p)) for p in walk(path, globs))
        elif path.is_file():
            files.add(Path(os.path.abspath(path)))
        elif path.exists():
            raise InputError(f"{path} is neither a file nor a directory")
        else:
            raise InputError(f"{path}: no such file or directory")
        if not os.access(path, os.R_OK):
            raise InputError(f"{path}: permission denied")
    if not files:
        raise InputError(f"no input files: the directories hold no {' or '.join(globs)} files (use --glob)")
    return sorted(files)


def format_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 999.5 or unit == "GB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{n} B"
        n /= 1000
    return f"{n:.3g} GB"


def summary(out_dir: Path) -> str:
    """One line: files per split, tokens per split, vocabulary, where, and the bytes on disk."""
    meta = text.load_meta(out_dir)
    on_disk = sum(p.stat().st_size for p in out_dir.iterdir() if p.is_file() and not p.name.endswith(".tmp"))
    files = meta["train_files"] + meta["val_files"] + meta["skipped_files"]
    return (f"{files} files ({meta['train_files']} train, {meta['val_files']} val, {meta['skipped_files']} skipped "
            f"as not UTF-8): {meta['train_tokens']:,} train tokens, {meta['val_tokens']:,} val tokens, "
            f"{meta['tokenizer']} vocab {meta['vocab_size']} ({meta['dtype']}) -> {out_dir} "
            f"({format_bytes(on_disk)} on disk)")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description="Tokenize text files into train.bin, val.bin and meta.json "
                                                  "(nanoGPT's layout) for data=tokens.")
    parser.add_argument("inputs", nargs="*", type=Path, metavar="FILES_OR_DIRS",
                        help="text files, and directories to search for --glob")
    parser.add_argument("--stdlib", action="store_true",
                        help="the running interpreter's standard library instead of FILES_OR_DIRS (cached)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output directory (required unless --stdlib, whose default is the data.corpus=stdlib "
                             "cache: $LOCALSGD_CACHE_DIR, else ~/.cache/localsgd)")
    parser.add_argument("--val-fraction", type=float, default=0.05,
                        help="share of the files (not tokens) that go to val.bin, in (0, 1) (default: 0.05)")
    parser.add_argument("--tokenizer", choices=("bytes", "bpe"), default="bytes",
                        help="bytes: UTF-8 bytes, 256 ids (default); bpe: byte-level BPE trained on the train "
                             "files (needs the tokenizers package)")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help=f"bpe vocabulary size, >= 256 (default: {text.DEFAULT_BPE_VOCAB})")
    parser.add_argument("--glob", action="append", default=None, metavar="PATTERN",
                        help=f"file-name pattern for directories, repeatable (default: {' '.join(DEFAULT_GLOBS)})")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if not 0 < args.val_fraction < 1:
        raise InputError(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    if args.tokenizer == "bytes" and args.vocab_size is not None:
        raise InputError("--vocab-size is for --tokenizer bpe (bytes have 256 ids)")
    if args.vocab_size is not None and args.vocab_size < 256:
        raise InputError(f"--vocab-size must be >= 256 (the byte alphabet), got {args.vocab_size}")
    if args.stdlib and args.inputs:
        raise InputError("--stdlib takes no FILES_OR_DIRS")
    if not args.stdlib and not args.inputs:
        raise InputError("no FILES_OR_DIRS given (or --stdlib)")
    if args.out is None and not (args.stdlib and args.tokenizer == "bytes"):
        raise InputError("--out DIR is required")


def prepare(args: argparse.Namespace) -> Path:
    if args.stdlib and args.tokenizer == "bytes":
        return text.prepare_stdlib(args.out, val_fraction=args.val_fraction)
    if args.stdlib:  # bpe: not the byte cache, an ordinary directory of its own
        root = text.stdlib_root()
        return text.prepare_text(text.stdlib_files(root), args.out, val_fraction=args.val_fraction,
                                 tokenizer="bpe", vocab_size=args.vocab_size, source=text.stdlib_source(root),
                                 root=root)
    files = collect_files(args.inputs, args.glob or DEFAULT_GLOBS)
    source = "files " + " ".join(os.path.abspath(p) for p in args.inputs)
    return text.prepare_text(files, args.out, val_fraction=args.val_fraction, tokenizer=args.tokenizer,
                             vocab_size=args.vocab_size, source=source)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        out_dir = prepare(args)
    except (InputError, text.TokenDataError, text.MissingTokenizersError, OSError) as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return 2
    print(summary(out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
