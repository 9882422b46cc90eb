"""User mistakes and faults of ``ponderlm data prepare`` and of prepared datasets, run through the
real command line (see ``tests/errorcases.py``): an output that overlaps an input or is not a
dataset, a locked output, a full disk, a read-only location, damaged metadata, shards or
tokenizers, mistyped sources, tokenizers and numbers. Paths are relative to the case's scratch
directory, the command's working directory, so the messages are stable.

The disk-full and read-only cases mount a small tmpfs (we run as root in CI); they are skipped,
saying so, where mounting is not permitted, and every mount is undone in a ``finally``."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from errorcases import Case, build_world, check_case, run_cli
from errorcases import train_args as _train
from fakepkgs import WORDS

_MOUNTS: list[Path] = []  # tmpfs mounts made by a case's setup, undone after the case
_HELD: list = []  # DirLocks held by a case's setup (the "other process")


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("errors_data"))


# ------------------------------------------------------------------ setups
def mount_tmpfs(path: Path, options: str) -> None:
    """Mount a tmpfs on ``path`` (created); skip the test when mounting is not permitted."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the disk-full and read-only cases need a tmpfs mount")
    path.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        path.rmdir()
        pytest.skip(f"mounting a tmpfs is not permitted here ({r.stderr.strip() or r.returncode}); needs root")
    _MOUNTS.append(path)


def undo_setups() -> None:
    while _HELD:
        _HELD.pop().release()
    while _MOUNTS:
        path = _MOUNTS.pop()
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def words_text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    out, size = [], 0
    while size < n_chars:
        line = " ".join(rng.choice(WORDS) for _ in range(12)) + ".\n"
        out.append(line)
        size += len(line)
    return "".join(out)


def tiny_prepare(w, out: Path) -> None:
    """The dataset `data prepare --input TINY --vocab-size 300 --out OUT` builds."""
    from ponderlm.data import PrepareConfig, prepare

    prepare(PrepareConfig(out_dir=out, sources=(), inputs=[w.texts / "tiny.txt"], vocab_size=300), log=lambda *_: None)


def tiny_args(w, out: str = "d", *extra: str) -> list[str]:
    return ["data", "prepare", "--input", str(w.texts / "tiny.txt"), "--vocab-size", "300", "--out", out, *extra]


def texts_dir(w, s: Path) -> None:
    (s / "mytexts").mkdir()
    (s / "mytexts" / "story.txt").write_text("Once upon a time there was a dataset.\n")


def copy_ds(w, s: Path, edit=None) -> None:
    shutil.copytree(w.ds, s / "d")
    if edit is not None:
        edit(s / "d")


def edit_meta(change):
    def edit(d: Path) -> None:
        meta = json.loads((d / "meta.json").read_text())
        (d / "meta.json").write_text(json.dumps(change(meta)))

    return edit


def without(key: str):
    def change(meta: dict) -> dict:
        del meta[key]
        return meta

    return change


def with_value(path: tuple, value):
    def change(meta: dict) -> dict:
        node = meta
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        return meta

    return change


def rewrite_shard(d: Path) -> None:
    """The same size, other tokens: only the checksum tells."""
    shard = d / "train_000.bin"
    arr = np.fromfile(shard, dtype=np.uint16)
    np.roll(arr, 1).tofile(shard)


def hold_lock(w, s: Path) -> None:
    from ponderlm.owned import DirLock

    _HELD.append(DirLock((s / "d").resolve(), "--out").acquire())  # prepare locks the real path


def full_disk(w, s: Path) -> None:
    mount_tmpfs(s / "mnt", "size=256k")
    tiny_prepare(w, s / "mnt" / "d")
    (s / "big.txt").write_text(words_text(600_000))


def read_only(w, s: Path) -> None:
    mount_tmpfs(s / "ro", "ro,size=64k")


def write(name: str, data: bytes | str):
    def setup(w, s: Path) -> None:
        p = s / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)

    return setup


def corrupt_zst(w, s: Path) -> None:
    zstd = pytest.importorskip("zstandard")
    text = "".join(json.dumps({"text": words_text(400, seed=i)}) + "\n" for i in range(4000)).encode()
    packed = bytearray(zstd.ZstdCompressor().compress(text))
    packed[len(packed) // 2 : len(packed) // 2 + 8] = b"\xff" * 8
    (s / "bad.jsonl.zst").write_bytes(bytes(packed))


def parquet(column: str, corrupt_row_group: int | None = None):
    def setup(w, s: Path) -> None:
        pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
        texts = [words_text(300, seed=i) for i in range(100)]
        pq.write_table(pa.table({column: texts}), s / "t.parquet", row_group_size=20, use_dictionary=False)
        if corrupt_row_group is not None:
            chunk = pq.ParquetFile(s / "t.parquet").metadata.row_group(corrupt_row_group).column(0)
            data = bytearray((s / "t.parquet").read_bytes())
            data[chunk.data_page_offset + 2 : chunk.data_page_offset + 18] = b"\xff" * 16  # its page header
            (s / "t.parquet").write_bytes(bytes(data))

    return setup


def dataset_dict(w, s: Path) -> None:
    """The layout HF datasets' DatasetDict.save_to_disk writes (one saved Dataset per split)."""
    (s / "dd").mkdir()
    (s / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    for split in ("train", "test"):
        (s / "dd" / split).mkdir()
        (s / "dd" / split / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data.arrow"}]}))


def interrupted_other_settings(w, s: Path) -> None:
    """What a killed build with other settings leaves: its hidden, marked directory and journal."""
    from ponderlm.data.dataset import DATASET
    from ponderlm.owned import write_marker

    (s / ".d.tmp").mkdir()
    write_marker(s / ".d.tmp", DATASET)
    journal = {"version": 1, "fingerprint": "0" * 16, "dtype": "uint16", "unit": 0, "skip": 3, "per_source": {},
               "skipped": {}, "writers": {"train": {"shards": [{"file": "train_000.bin", "tokens": 1024,
                                                                 "sha256": "0" * 64}], "open": None}}}  # fmt: skip
    (s / ".d.tmp" / "build.json").write_text(json.dumps(journal))
    (s / ".d.tmp" / "train_000.bin").write_bytes(b"\0" * 2048)


def damaged_same_settings(w, s: Path) -> None:
    tiny_prepare(w, s / "d")
    rewrite_shard(s / "d")


def _prep(*args: str) -> list[str]:
    return ["data", "prepare", *args]


NOT_TOKENIZER = "is not a tokenizer file ("
DAMAGED = "the dataset is damaged: prepare it again into a new --out, or after removing d"

CASES = [
    # --out against the inputs and what is already there
    Case("prepare_out_is_input", lambda w, s: _prep("--input", "mytexts", "--out", "mytexts", "--overwrite"),
         "--out mytexts is the input mytexts; write the output somewhere else", setup=texts_dir),
    Case("prepare_out_inside_input", lambda w, s: _prep("--input", "mytexts", "--out", "mytexts/ds"),
         "--out mytexts/ds lies inside the input mytexts; write the output somewhere else", setup=texts_dir),
    Case("prepare_input_inside_out", lambda w, s: _prep("--input", "d/train_000.bin", "--tokenizer", "d/tokenizer.json",
                                                        "--out", "d", "--overwrite"),
         "--out d contains the input d/train_000.bin; write the output somewhere else", setup=copy_ds),
    Case("prepare_overwrite_not_a_dataset", lambda w, s: tiny_args(w, "mytexts", "--overwrite"),
         "mytexts is not a dataset made by ponderlm; ponderlm replaces only what it made: choose another --out",
         setup=texts_dir),
    Case("prepare_overwrite_user_files", lambda w, s: tiny_args(w, "d", "--overwrite"),
         "d holds files ponderlm did not write (notes.txt); ponderlm replaces only what it made: choose another --out",
         setup=lambda w, s: copy_ds(w, s, lambda d: (d / "notes.txt").write_text("mine\n"))),
    Case("prepare_other_settings", lambda w, s: tiny_args(w, "d"),
         "d exists; it holds a dataset built with other settings; pass --overwrite to rebuild it or choose another "
         "--out",
         setup=copy_ds),
    Case("prepare_out_is_file", lambda w, s: tiny_args(w, "afile"),
         "afile is a file, not a directory; choose another --out", setup=write("afile", "x")),
    Case("prepare_out_under_file", lambda w, s: tiny_args(w, "afile/d"),
         "afile is a file, not a directory", setup=write("afile", "x")),
    Case("prepare_fails_in_new_directories", lambda w, s: _prep("--input", str(w.texts / "latin1.txt"), "--out",
                                                                "new/sub/d"),
         "latin1.txt is not UTF-8 text (byte 3); convert it first"),
    Case("prepare_damaged_same_settings", lambda w, s: tiny_args(w, "d"),
         "d holds this dataset, damaged: d/train_000.bin was changed after the dataset was built (checksum mismatch "
         "with meta.json); pass --overwrite to rebuild it", setup=damaged_same_settings),
    Case("prepare_locked", lambda w, s: tiny_args(w, "d"),
         "is in use by another ponderlm process (pid ", setup=hold_lock, proc=True),
    Case("prepare_disk_full", lambda w, s: _prep("--input", "big.txt", "--vocab-size", "300", "--out", "mnt/d",
                                                 "--overwrite"),
         "disk full while writing", setup=full_disk),
    Case("prepare_read_only_out", lambda w, s: _prep("--input", str(w.texts / "latin1.txt"), "--out", "ro/d"),
         "read-only file system while locking", setup=read_only),
    # damaged metadata (checked by load_meta for every command that reads a dataset)
    Case("meta_invalid_json", lambda w, s: tiny_args(w, "d"),
         f"d/meta.json: invalid JSON (Expecting value: line 1 column 1 (char 0)); {DAMAGED}",
         setup=lambda w, s: copy_ds(w, s, lambda d: (d / "meta.json").write_text("oops"))),
    Case("meta_not_an_object", lambda w, s: tiny_args(w, "d"),
         f"d/meta.json: not a JSON object (found list); {DAMAGED}",
         setup=lambda w, s: copy_ds(w, s, lambda d: (d / "meta.json").write_text("[1, 2]"))),
    Case("meta_missing_key", lambda w, s: tiny_args(w, "d"), f"d/meta.json: missing key 'dtype'; {DAMAGED}",
         setup=lambda w, s: copy_ds(w, s, edit_meta(without("dtype")))),
    Case("meta_unknown_dtype", lambda w, s: tiny_args(w, "d"),
         f"d/meta.json: unknown dtype 'float32' (expected uint16 or uint32); {DAMAGED}",
         setup=lambda w, s: copy_ds(w, s, edit_meta(with_value(("dtype",), "float32")))),
    Case("meta_bad_shards", lambda w, s: tiny_args(w, "d"),
         f"d/meta.json: splits.train must be an object with a token count and a shards list; {DAMAGED}",
         setup=lambda w, s: copy_ds(w, s, edit_meta(with_value(("splits", "train", "shards"), "train_000.bin")))),
    Case("meta_shard_outside", lambda w, s: ["eval", "--checkpoint", str(w.run), "--tasks", "val", "--data", "d",
                                             "--out", "e"],
         "d/meta.json: splits.val.shards[0].file must be a file name inside the dataset, got '../run/config.yaml'",
         setup=lambda w, s: copy_ds(w, s, edit_meta(with_value(("splits", "val", "shards", 0, "file"),
                                                               "../run/config.yaml")))),
    # a dataset whose files changed: refused when training starts (check_dataset)
    Case("train_shard_changed", lambda w, s: _train("train.data_dir=d", f"train.out_dir={s / 'run'}"),
         "d/train_000.bin was changed after the dataset was built (checksum mismatch with meta.json); rebuild it "
         "with `ponderlm data prepare --out d --overwrite`", setup=lambda w, s: copy_ds(w, s, rewrite_shard)),
    Case("train_tokenizer_missing", lambda w, s: _train("train.data_dir=d", f"train.out_dir={s / 'run'}"),
         "d/tokenizer.json is missing: the dataset cannot be used without the tokenizer it was built with",
         setup=lambda w, s: copy_ds(w, s, lambda d: (d / "tokenizer.json").unlink())),
    Case("train_tokenizer_corrupt", lambda w, s: _train("train.data_dir=d", f"train.out_dir={s / 'run'}"),
         "d/tokenizer.json is not a tokenizer file (invalid JSON: ",
         setup=lambda w, s: copy_ds(w, s, lambda d: (d / "tokenizer.json").write_text('{"model": '))),
    # mistyped options
    Case("prepare_unknown_source", lambda w, s: _prep("--sources", "sotu,wikii", "--out", "d"),
         "unknown source 'wikii' in --sources; choose from sotu, shakespeare, bible, wiki, ptb"),
    Case("prepare_no_source", lambda w, s: _prep("--sources", ",", "--out", "d"),
         "nothing to prepare: no --sources and no --input; choose sources from sotu, shakespeare, bible, wiki, ptb"),
    Case("prepare_tokenizer_missing", lambda w, s: tiny_args(w, "d", "--tokenizer", "nope.json"),
         "--tokenizer nope.json: no such file; pass bpe, neox or a tokenizer.json file"),
    Case("prepare_tokenizer_directory", lambda w, s: tiny_args(w, "d", "--tokenizer", "mytexts"),
         "mytexts is not a tokenizer file (it is a directory); pass a tokenizer.json file", setup=texts_dir),
    Case("prepare_tokenizer_text_file", lambda w, s: tiny_args(w, "d", "--tokenizer", "mytexts/story.txt"),
         "mytexts/story.txt is not a tokenizer file (invalid JSON: Expecting value: line 1 column 1 (char 0))",
         setup=texts_dir),
    Case("prepare_tokenizer_other_json", lambda w, s: tiny_args(w, "d", "--tokenizer", "conf.json"),
         f"conf.json {NOT_TOKENIZER}", setup=write("conf.json", '{"vocab": ["a", "b"]}')),
    Case("prepare_odd_sized_bin", lambda w, s: _prep("--input", "ids.bin", "--tokenizer", str(w.ds / "tokenizer.json"),
                                                     "--out", "d"),
         "ids.bin has an odd number of bytes (5); a .bin input holds uint16 token ids, 2 bytes each",
         setup=write("ids.bin", b"\x01\x00\x02\x00\x03")),
    Case("prepare_bin_without_tokenizer", lambda w, s: _prep("--input", str(w.texts / "foreign_ids.bin"), "--out", "d"),
         "foreign_ids.bin holds token ids: pass the tokenizer they were made with (--tokenizer FILE.json)"),
    Case("prepare_jsonl_not_object", lambda w, s: _prep("--input", "x.jsonl", "--vocab-size", "300", "--out", "d"),
         'x.jsonl:2: each line needs a JSON object with a string "text" field',
         setup=write("x.jsonl", '{"text": "fine"}\n["text", "a list"]\n')),
    Case("prepare_dir_without_texts", lambda w, s: _prep("--input", "empty", "--out", "d"),
         "input directory empty holds no .txt, .jsonl(.gz/.zst) or .parquet files (give .bin files one by one)",
         setup=write("empty/ids.bin", b"\x01\x00")),
    Case("prepare_val_fraction_nan", lambda w, s: tiny_args(w, "d", "--val-fraction", "nan"),
         "--val-fraction must be in [0, 1), got nan"),
    Case("prepare_vocab_size_zero", lambda w, s: _prep("--input", str(w.texts / "tiny.txt"), "--vocab-size", "0",
                                                       "--out", "d"),
         "--vocab-size must be in [258, 1048576] for a BPE tokenizer, got 0"),
    Case("prepare_vocab_size_huge", lambda w, s: _prep("--input", str(w.texts / "tiny.txt"), "--vocab-size",
                                                       "1" + "0" * 30, "--out", "d"),
         "--vocab-size must be in [258, 1048576] for a BPE tokenizer, got 1000000000000000000000000000000"),
    Case("prepare_shard_tokens_negative", lambda w, s: tiny_args(w, "d", "--shard-tokens", "-5"),
         "--shard-tokens must be >= 1024, got -5"),
    Case("prepare_cache_dir_is_file", lambda w, s: _prep("--sources", "sotu", "--cache-dir", "cache", "--out", "d"),
         "package cache cache is a file, not a directory; choose another --cache-dir", setup=write("cache", "x")),
    # inputs of the formats a pretraining corpus comes in (read as a stream: refused where the damage is)
    Case("prepare_corrupt_zst", lambda w, s: _prep("--input", "bad.jsonl.zst", "--tokenizer",
                                                   str(w.ds / "tokenizer.json"), "--out", "d"),
         "bad.jsonl.zst: corrupt jsonl.zst data near byte", setup=corrupt_zst),
    Case("prepare_corrupt_parquet", lambda w, s: _prep("--input", "t.parquet", "--tokenizer",
                                                       str(w.ds / "tokenizer.json"), "--out", "d"),
         "t.parquet: row group 1 (rows 20-39) cannot be read", setup=parquet("text", corrupt_row_group=1)),
    Case("prepare_parquet_no_text_column", lambda w, s: _prep("--input", "t.parquet", "--out", "d"),
         "t.parquet has no column 'text' (columns: body); name the text column with --text-field",
         setup=parquet("body")),
    Case("prepare_jsonl_not_utf8", lambda w, s: _prep("--input", "x.jsonl", "--vocab-size", "300", "--out", "d"),
         "x.jsonl:2 is not UTF-8 text (byte 36 of the file); convert it first, or pass --skip-bad-documents to skip "
         "and count such documents", setup=write("x.jsonl", b'{"text": "fine words"}\n{"text": "caf\xe9"}\n')),
    Case("prepare_glob_matches_nothing", lambda w, s: _prep("--input", "corpus/*.jsonl.zst", "--out", "d"),
         "no files match corpus/*.jsonl.zst"),
    Case("prepare_dataset_dict", lambda w, s: _prep("--input", "dd", "--out", "d"),
         "dd holds a DatasetDict (splits: test, train); pass one split's directory, e.g. dd/test",
         setup=dataset_dict),
    Case("prepare_interrupted_other_settings", lambda w, s: tiny_args(w, "d"),
         "an interrupted build with other settings is in ", setup=interrupted_other_settings),
    Case("prepare_workers_zero", lambda w, s: tiny_args(w, "d", "--workers", "0"),
         "argument --workers: must be >= 1, got 0"),
    # bounded by the input: a document tokenized in pieces where it can be, refused where it cannot
    Case("prepare_document_without_a_cut", lambda w, s: _prep("--input", "x.jsonl", "--tokenizer",
                                                              str(w.ds / "tokenizer.json"), "--out", "d"),
         "x.jsonl: document x.jsonl:1#0 (1,100,000 characters) has over 1,048,576 characters with no place where the "
         "tokenizer's pre-tokenization splits (a space or line break between two characters): tokenized whole it "
         "would need ~200 bytes of memory per character; cut it into shorter documents, or pass --skip-bad-documents",
         setup=write("x.jsonl", '{"text": "fine words"}\n{"text": "' + "x" * 1_100_000 + '"}\n')),
    Case("prepare_file_name_not_utf8", lambda w, s: _prep("--input", os.fsdecode(b"caf\xe9.jsonl"), "--vocab-size",
                                                          "300", "--out", "d"),
         "caf\\xe9.jsonl:2: not valid JSON; fix the input, or pass --skip-bad-documents",
         setup=write(os.fsdecode(b"caf\xe9.jsonl"), b'{"text": "fine words"}\n{"text": \n')),
    Case("prepare_jsonl_lone_surrogate", lambda w, s: _prep("--input", "x.jsonl", "--vocab-size", "300", "--out", "d"),
         "x.jsonl:2: the text holds a lone surrogate escape (\\ud800-\\udfff); fix the input, or pass "
         "--skip-bad-documents to skip and count such documents",
         setup=write("x.jsonl", '{"text": "fine words"}\n{"text": "half \\ud83d of an emoji"}\n')),
]  # fmt: skip

# refusals of a directory that is not ours: the message must not suggest --overwrite (following it
# used to delete the user's texts)
NO_OVERWRITE_HINT = ("prepare_out_is_input", "prepare_overwrite_not_a_dataset", "prepare_overwrite_user_files",
                     "prepare_input_inside_out")  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_data_error(case, w, tmp_path):
    try:
        r = check_case(case, w, tmp_path)
    finally:
        undo_setups()
    assert r.returncode == case.exit and r.stderr.strip() == r.stderr.strip().splitlines()[0]  # one line


@pytest.mark.parametrize("case_id", NO_OVERWRITE_HINT)
def test_refusing_a_foreign_directory_never_suggests_overwrite(case_id, w, tmp_path):
    case = next(c for c in CASES if c.id == case_id)
    s = tmp_path / "s"
    s.mkdir()
    case.setup(w, s)
    r = run_cli(case.args(w, s), s)
    assert r.returncode == 2 and "--overwrite" not in r.stderr, r.stderr


def test_an_up_to_date_dataset_on_a_read_only_mount_is_found(w, tmp_path):
    """The read-only check must not stop `data prepare` (the quickstart runs it) from finding an
    intact dataset it has nothing to do for."""
    try:
        mount_tmpfs(tmp_path / "ro", "size=1m")
        tiny_prepare(w, tmp_path / "ro" / "d")
        subprocess.run(["mount", "-o", "remount,ro", str(tmp_path / "ro")], check=True)
        r = run_cli(tiny_args(w, "ro/d"), tmp_path)
        assert r.returncode == 0 and "up to date" in r.stdout, r.stderr
        rebuilt = run_cli(tiny_args(w, "ro/d", "--vocab-size", "301"), tmp_path)  # not up to date: refused, early
        assert rebuilt.returncode == 2 and "read-only file system while locking" in rebuilt.stderr, rebuilt.stderr
    finally:
        undo_setups()
