"""Token files (:mod:`localsgd.data.text`) and ``localsgd-prepare-text``: byte round trips, the uint16/uint32
bound, the by-file split, what ``train.bin`` holds byte for byte, a crash that leaves no ``meta.json``, the
cached and locked stdlib corpus on a fake standard library, and the command's output and one-line errors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from localsgd import prepare_text as cli
from localsgd.data import text

ROOT = Path(__file__).resolve().parents[1]
SEP = "\n\n"
TEXTS = {
    "a.txt": "plain ascii\n",
    "b.txt": "emoji 😀 and CJK 中文字\n",
    "c.md": "# heading\r\nwindows line endings kept\r\n",
    "d.txt": "",
    "sub/e.txt": "naïve café\n",
    "sub/f.txt": "tabs\tand\x00control\n",
    "sub/deeper/g.txt": "ünïcödé " * 20,
    "h.txt": "h",
    "i.txt": "i i i",
    "j.txt": "j\n" * 50,
}
NOT_UTF8 = "sub/latin1.txt"


def make_corpus(root: Path) -> list[Path]:
    """The files of TEXTS under ``root`` (written as bytes, line endings untouched) and one Latin-1 file."""
    for name, body in TEXTS.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body.encode("utf-8"))
    (root / NOT_UTF8).write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    return [root / name for name in [*TEXTS, NOT_UTF8]]


@pytest.fixture
def corpus(tmp_path: Path) -> list[Path]:
    return make_corpus(tmp_path / "corpus")


def bucket(key: str) -> int:
    """The split rule written out independently of the library: sha1 as a big-endian integer, mod 10000."""
    return int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10000


# ------------------------------------------------------------------------------------------------ tokens


@pytest.mark.parametrize("s", ["plain ascii", "emoji 😀👍🏽 CJK 中文字 é", "", "\r\n\x00\x7f\u2028 controls"])
def test_byte_tokenizer_round_trip(s: str) -> None:
    tok = text.ByteTokenizer()
    ids = tok.encode(s)
    assert ids.dtype == np.uint16
    assert ids.tolist() == list(s.encode("utf-8"))
    assert tok.decode(ids) == s
    assert tok.decode(ids.tolist(), errors="strict") == s


def test_byte_tokenizer_decode_of_cut_character_and_bad_ids() -> None:
    tok = text.ByteTokenizer()
    assert tok.encode("é").tolist() == [0xC3, 0xA9]
    assert tok.decode([104, 0xC3]) == "h\ufffd"  # a sample cut inside a character
    with pytest.raises(UnicodeDecodeError):
        tok.decode([104, 0xC3], errors="strict")
    with pytest.raises(ValueError, match=r"\[0, 256\)"):
        tok.decode([104, 256])


def test_token_dtype() -> None:
    assert text.token_dtype(256) == np.uint16
    assert text.token_dtype(50257) == np.uint16
    assert text.token_dtype(65536) == np.uint16
    assert text.token_dtype(65537) == np.uint32
    with pytest.raises(ValueError):
        text.token_dtype(0)


def test_write_tokens_checks_the_uint16_bound(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    with pytest.raises(ValueError, match=r"token id 65536 at position 2 .* outside \[0, 65536\)"):
        text.write_tokens(path, [0, 65535, 65536], vocab_size=65536)
    with pytest.raises(ValueError, match=r"token id 70000 .* does not fit uint16 \(at most 65535\)"):
        text.write_tokens(path, [1, 70000], vocab_size=70001, dtype="uint16")
    with pytest.raises(ValueError, match=r"token id -1 at position 0"):
        text.write_tokens(path, [-1], vocab_size=256)
    with pytest.raises(ValueError, match="integers"):
        text.write_tokens(path, np.array([1.5]), vocab_size=256)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temp file left behind


def test_write_tokens_uses_uint32_above_65536(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    assert text.write_tokens(path, [65536, 1, 70000], vocab_size=70001) == 3
    assert path.stat().st_size == 3 * 4
    assert path.read_bytes() == np.array([65536, 1, 70000], dtype="<u4").tobytes()
    assert text.read_tokens(path, "uint32").tolist() == [65536, 1, 70000]
    assert text.write_tokens(path, [65535, 0], vocab_size=65536) == 2  # replaces the file
    assert path.read_bytes() == b"\xff\xff\x00\x00"  # little-endian uint16, no header


def test_read_tokens_is_read_only_and_rejects_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    text.write_tokens(path, [1, 2, 3], vocab_size=256)
    tokens = text.read_tokens(path, "uint16")
    assert isinstance(tokens, np.memmap) and not tokens.flags.writeable
    assert tokens.tolist() == [1, 2, 3]
    with open(path, "r+b") as f:
        f.truncate(5)
    with pytest.raises(text.TokenDataError, match=rf"{path}: 5 bytes is not a whole number of uint16"):
        text.read_tokens(path, np.uint16)
    path.write_bytes(b"")
    assert len(text.read_tokens(path, "uint16")) == 0


# ----------------------------------------------------------------------------------------- prepare_text


def test_prepare_text_files_hold_exactly_the_joined_splits(tmp_path: Path, corpus: list[Path]) -> None:
    out = text.prepare_text(corpus, tmp_path / "out", val_fraction=0.3, source="test corpus")
    meta = text.load_meta(out)
    assert set(text.META_KEYS) <= set(meta)
    assert (meta["format"], meta["vocab_size"], meta["dtype"], meta["tokenizer"]) == (
        "localsgd-tokens-1", 256, "uint16", "bytes")
    assert (meta["source"], meta["val_fraction"], meta["skipped_files"]) == ("test corpus", 0.3, 1)
    assert meta["split"]["skipped"] == [NOT_UTF8]
    train, val = meta["split"]["train"], meta["split"]["val"]
    assert (meta["train_files"], meta["val_files"]) == (len(train), len(val))
    assert sorted(train + val) == sorted(TEXTS) and not set(train) & set(val)
    assert train == sorted(train) and val == sorted(val)
    assert val == sorted(k for k in TEXTS if bucket(k) < 3000)
    tok = text.ByteTokenizer()
    for split, keys in (("train", train), ("val", val)):
        path = out / f"{split}.bin"
        tokens = text.load_split(out, split)
        assert path.stat().st_size == 2 * meta[f"{split}_tokens"] == 2 * len(tokens)
        assert tok.decode(tokens, errors="strict") == SEP.join(TEXTS[k] for k in keys)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_split_is_deterministic_and_by_file(tmp_path: Path, corpus: list[Path]) -> None:
    a = text.prepare_text(corpus, tmp_path / "a", val_fraction=0.3, source="s")
    moved = tmp_path / "elsewhere" / "copy"
    shutil.copytree(tmp_path / "corpus", moved)
    b = text.prepare_text(sorted((moved / n for n in [*TEXTS, NOT_UTF8]), reverse=True), tmp_path / "b",
                          val_fraction=0.3, source="s")
    for name in ("train.bin", "val.bin"):  # the split and the order depend on relative paths only
        assert (a / name).read_bytes() == (b / name).read_bytes()
    keys = list(TEXTS)
    assert text.split_by_file(keys, 0.3) == text.split_by_file(reversed(keys), 0.3)
    for fraction in (0.05, 0.3, 0.5, 0.9):
        train, val = text.split_by_file(keys, fraction)
        assert sorted(train + val) == sorted(keys) and not set(train) & set(val) and train and val


def test_split_keeps_one_file_in_each(tmp_path: Path) -> None:
    keys = ["x.txt", "y.txt"]
    train, val = text.split_by_file(keys, 0.0001)  # no bucket below 1: the lowest moves to val
    assert val == [min(keys, key=bucket)] and train == [max(keys, key=bucket)]
    train, val = text.split_by_file(keys, 0.9999)  # every bucket below 9999: the highest stays in train
    assert train == [max(keys, key=bucket)] and val == [min(keys, key=bucket)]
    assert text.split_by_file(["only.txt"], 0.9999) == (["only.txt"], [])
    with pytest.raises(text.TokenDataError, match=r"val_fraction must be in \(0, 1\)"):
        text.split_by_file(keys, 0.0)


def test_a_crash_mid_write_leaves_no_meta(tmp_path: Path, corpus: list[Path],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    out = text.prepare_text(corpus, tmp_path / "out", val_fraction=0.3, source="s")
    write_split = text._write_split

    def dies_on_val(path: Path, paths: list[Path], tok: text.ByteTokenizer) -> int:
        if path.name == "val.bin":
            raise KeyboardInterrupt("killed while writing val.bin")
        return write_split(path, paths, tok)

    monkeypatch.setattr(text, "_write_split", dies_on_val)
    with pytest.raises(KeyboardInterrupt):
        text.prepare_text(corpus, out, val_fraction=0.5, source="s")
    assert not (out / "meta.json").exists()
    with pytest.raises(text.TokenDataError, match="no meta.json"):
        text.load_meta(out)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_all_invalid_or_no_files_is_an_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(text.TokenDataError, match="none of the 1 input files is valid UTF-8"):
        text.prepare_text([bad], tmp_path / "out", source="s")
    with pytest.raises(text.TokenDataError, match="no input files"):
        text.prepare_text([], tmp_path / "out", source="s")
    with pytest.raises(text.TokenDataError, match="vocab_size=300 is for bpe"):
        text.prepare_text([bad], tmp_path / "out", vocab_size=300, source="s")


def test_load_meta_refuses_another_format(tmp_path: Path) -> None:
    (tmp_path / "meta.json").write_text(json.dumps({"format": "nanogpt-pkl", "vocab_size": 65}))
    with pytest.raises(text.TokenDataError, match="format 'nanogpt-pkl', expected 'localsgd-tokens-1'"):
        text.load_meta(tmp_path)
    (tmp_path / "meta.json").write_text("{")
    with pytest.raises(text.TokenDataError, match="not valid JSON"):
        text.load_meta(tmp_path)


def test_bpe_round_trips_and_reloads(tmp_path: Path, corpus: list[Path]) -> None:
    pytest.importorskip("tokenizers")
    out = text.prepare_text(corpus, tmp_path / "out", val_fraction=0.3, tokenizer="bpe", vocab_size=300,
                            source="s")
    meta = text.load_meta(out)
    tok = text.load_tokenizer(out)
    assert isinstance(tok, text.BPETokenizer) and (out / "tokenizer.json").is_file()
    assert meta["tokenizer"] == "bpe" and 256 <= meta["vocab_size"] == tok.vocab_size <= 300
    for split in ("train", "val"):
        tokens = text.load_split(out, split)
        assert tok.decode(tokens) == SEP.join(TEXTS[k] for k in meta["split"][split])
    s = "emoji 😀 CJK 中文 \r\n  two spaces"
    assert tok.decode(tok.encode(s)) == s


def test_bpe_without_tokenizers_says_what_to_install(tmp_path: Path, corpus: list[Path],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # import tokenizers now raises ImportError
    with pytest.raises(ImportError, match="the bpe tokenizer needs the tokenizers package: pip install tokenizers"):
        text.prepare_text(corpus, tmp_path / "out", tokenizer="bpe", source="s")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------- stdlib corpus


@pytest.fixture
def fake_stdlib(tmp_path: Path) -> Path:
    root = tmp_path / "lib" / "python3.x"
    files = {"os.py": "import sys\n", "json/__init__.py": "'''json'''\n", "json/decoder.py": "x = 1\n",
             "site-packages/pkg/mod.py": "installed = True\n", "site-packages/top.py": "t = 1\n",
             "deb/dist-packages/d.py": "d = 1\n", "README.txt": "not python\n", "encodings/bad.py": None}
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(body.encode() if body is not None else b"# -*- coding: latin-1 -*-\n\xe9\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "os.cpython-311.pyc").write_bytes(b"\x00")
    return root


def test_stdlib_files_excludes_installed_packages(fake_stdlib: Path) -> None:
    found = [p.relative_to(fake_stdlib).as_posix() for p in text.stdlib_files(fake_stdlib)]
    assert found == ["encodings/bad.py", "json/__init__.py", "json/decoder.py", "os.py"]


def test_prepare_stdlib_is_cached(tmp_path: Path, fake_stdlib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCALSGD_CACHE_DIR", str(tmp_path / "data"))
    out = text.prepare_stdlib(root=fake_stdlib)
    assert out == tmp_path / "data" / f"stdlib-bytes-py{sys.version_info[0]}.{sys.version_info[1]}"
    meta = text.load_meta(out)
    assert sorted(meta["split"]["train"] + meta["split"]["val"]) == ["json/__init__.py", "json/decoder.py", "os.py"]
    assert meta["skipped_files"] == 1 and meta["source"] == text.stdlib_source(fake_stdlib)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("prepare_text ran although the cache was complete")

    monkeypatch.setattr(text, "prepare_text", must_not_run)
    assert text.prepare_stdlib(root=fake_stdlib) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    with pytest.raises(AssertionError, match="cache was complete"):  # another val_fraction is another corpus
        text.prepare_stdlib(root=fake_stdlib, val_fraction=0.5)


def test_concurrent_prepare_stdlib_prepares_once(tmp_path: Path, fake_stdlib: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    prepare = text.prepare_text

    def slow_prepare(*args: object, **kwargs: object) -> Path:
        calls.append(threading.get_ident())
        time.sleep(0.3)  # long enough for the other caller to reach the lock
        return prepare(*args, **kwargs)

    monkeypatch.setattr(text, "prepare_text", slow_prepare)
    start = threading.Barrier(3)
    results: list[Path] = []

    def caller() -> None:
        start.wait()
        results.append(text.prepare_stdlib(tmp_path / "out", root=fake_stdlib))

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(calls) == 1 and results == [tmp_path / "out"] * 3
    meta = text.load_meta(tmp_path / "out")
    assert len(text.load_split(tmp_path / "out", "train")) == meta["train_tokens"]


CONCURRENT = """
import sys, time
from localsgd.data import text
prepare = text.prepare_text
def traced(*args, **kwargs):
    print("prepared", flush=True)
    time.sleep(1.0)
    return prepare(*args, **kwargs)
text.prepare_text = traced
print(text.prepare_stdlib(sys.argv[1], root=sys.argv[2]))
"""


def test_two_processes_prepare_stdlib_once(tmp_path: Path, fake_stdlib: Path) -> None:
    """Two ranks of one job starting together: one prepares, the other waits on the lock or finds the cache."""
    cmd = [sys.executable, "-c", textwrap.dedent(CONCURRENT), str(tmp_path / "out"), str(fake_stdlib)]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    lines = [line for out, _ in outputs for line in out.splitlines()]
    assert lines.count("prepared") == 1 and lines.count(str(tmp_path / "out")) == 2
    assert text.load_meta(tmp_path / "out")["train_files"] + text.load_meta(tmp_path / "out")["val_files"] == 3


# ---------------------------------------------------------------------------------------------- the CLI


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "LOCALSGD_CACHE_DIR": str(cwd / "data")}
    return subprocess.run([sys.executable, "-m", "localsgd.prepare_text", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_the_token_files(tmp_path: Path, corpus: list[Path]) -> None:
    (tmp_path / "corpus" / ".git").mkdir()
    (tmp_path / "corpus" / ".git" / "HEAD.txt").write_text("hidden\n")
    (tmp_path / "corpus" / "code.py").write_text("not matched by the default globs\n")
    proc = run_cli(str(tmp_path / "corpus"), "--out", str(tmp_path / "out"), "--val-fraction", "0.3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    meta = text.load_meta(tmp_path / "out")
    assert sorted(meta["split"]["train"] + meta["split"]["val"]) == sorted(TEXTS)
    assert meta["skipped_files"] == 1
    on_disk = sum(p.stat().st_size for p in (tmp_path / "out").iterdir())
    assert proc.stdout.splitlines() == [
        f"{len(TEXTS) + 1} files ({meta['train_files']} train, {meta['val_files']} val, 1 skipped as not UTF-8): "
        f"{meta['train_tokens']:,} train tokens, {meta['val_tokens']:,} val tokens, bytes vocab 256 (uint16) -> "
        f"{tmp_path / 'out'} ({cli.format_bytes(on_disk)} on disk)"]


def test_cli_bad_input_is_one_line_and_status_2(tmp_path: Path) -> None:
    proc = run_cli(str(tmp_path / "missing"), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"localsgd-prepare-text: {tmp_path / 'missing'}: no such file or directory"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("args", "message"), [
    (["{corpus}", "--out", "{out}", "--val-fraction", "1.5"], r"--val-fraction must be in \(0, 1\), got 1.5"),
    (["{corpus}", "--out", "{out}", "--val-fraction", "x"], "invalid float value: 'x'"),
    (["{corpus}/sub/deeper", "--out", "{out}", "--glob", "*.rst"], r"no input files: .* \*\.rst files"),
    (["{corpus}"], "--out DIR is required"),
    ([], "no FILES_OR_DIRS given"),
    (["{corpus}", "--stdlib"], "--stdlib takes no FILES_OR_DIRS"),
    (["{corpus}", "--out", "{out}", "--vocab-size", "300"], "--vocab-size is for --tokenizer bpe"),
    (["{corpus}", "--out", "{out}", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_cli_errors(tmp_path: Path, corpus: list[Path], capsys: pytest.CaptureFixture[str], args: list[str],
                    message: str) -> None:
    argv = [a.format(corpus=tmp_path / "corpus", out=tmp_path / "out") for a in args]
    try:
        status = cli.main(argv)
    except SystemExit as exit_:  # argparse's own errors (through OneLineParser) exit
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1 and err.startswith("localsgd-prepare-text: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_cli_glob_and_stdlib_cache(tmp_path: Path, corpus: list[Path], fake_stdlib: Path,
                                   monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "corpus" / "code.py").write_text("print('hi')\n")
    assert cli.main([str(tmp_path / "corpus"), "--glob", "*.py", "--glob", "g.*", "--out", str(tmp_path / "py")]) == 0
    split = text.load_meta(tmp_path / "py")["split"]
    assert sorted(split["train"] + split["val"]) == ["code.py", "sub/deeper/g.txt"] and split["skipped"] == []
    monkeypatch.setattr(text, "stdlib_root", lambda: fake_stdlib)
    monkeypatch.setenv("LOCALSGD_CACHE_DIR", str(tmp_path / "data"))
    capsys.readouterr()
    assert cli.main(["--stdlib"]) == 0
    assert capsys.readouterr().out.startswith("4 files (")
    assert text.load_meta(text.stdlib_dir())["source"] == text.stdlib_source(fake_stdlib)
