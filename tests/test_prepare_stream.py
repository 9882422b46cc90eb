"""The streaming dataset builder, run as users run it: real files of every format it claims, real
worker processes, real SIGKILL / Ctrl-C and a full disk, and the same bytes out in every case."""

from __future__ import annotations

import gzip
import hashlib
import importlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ponderlm.data import PrepareConfig, TokenShards, check_dataset, prepare
from ponderlm.data.inputs import paragraph_pieces
from ponderlm.data.sources import split_long
from ponderlm.data.tokenizer import Tokenizer
from ponderlm.errors import DataError
from ponderlm.progress import Progress

from errorcases import answer_ctrl_c
from fakepkgs import WORDS

prepare_mod = importlib.import_module("ponderlm.data.prepare")
inputs_mod = importlib.import_module("ponderlm.data.inputs")
QUIET = {"log": lambda *_: None}


def documents(n: int, seed: int = 0, words: int = 60) -> list[str]:
    rng = random.Random(seed)
    return ["\n\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, words))) + "."
                        for _ in range(rng.randint(1, 4))) for _ in range(n)]  # fmt: skip


def jsonl(docs: list[str], field: str = "text") -> bytes:
    return "".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(docs)).encode()


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    Tokenizer.train_bpe(documents(300, seed=99), 400).save(path)
    return path


def build(out: Path, inputs: list, tok: Path | None, **kw) -> dict:
    kw.setdefault("val_fraction", 0.05)
    cfg = PrepareConfig(out_dir=out, cache_dir=out.parent / "cache", sources=(), inputs=list(inputs),
                        tokenizer=str(tok) if tok else "bpe", **kw)  # fmt: skip
    return prepare(cfg, **QUIET)


def digest(d: Path) -> dict:
    """Every shard's bytes and meta.json (less its creation time) of a dataset."""
    meta = json.loads((d / "meta.json").read_text())
    meta.pop("created")
    shards = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.glob("*.bin"))}
    return {"meta": meta, "shards": shards}


# ------------------------------------------------------------------ paragraphs
@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab \n\t", max_size=300), max_chars=st.integers(3, 40), chunk=st.integers(1, 17))
def test_streamed_pieces_are_the_pieces_of_the_whole_text(text, max_chars, chunk):
    """A .txt read 1 MB at a time is cut exactly as the whole text was (``split_long``)."""
    if len(text.strip()) <= max_chars:
        return  # split_long keeps such a text whole; streaming is only used for files far above the limit
    chunks = (text[i : i + chunk] for i in range(0, len(text), chunk))
    assert list(paragraph_pieces(chunks, max_chars)) == [d.text for d in split_long("s", "x", text, max_chars)]


def test_a_big_txt_streams_into_the_same_dataset(tmp_path, tok_file, monkeypatch):
    text = "\n\n".join(documents(400, seed=3))
    (tmp_path / "book.txt").write_text(text)
    build(tmp_path / "a", [tmp_path / "book.txt"], tok_file)
    monkeypatch.setattr(inputs_mod, "WHOLE_TXT", 0)  # stream it, 1 kB at a time
    monkeypatch.setattr(inputs_mod, "READ_CHUNK", 1000)
    build(tmp_path / "b", [tmp_path / "book.txt"], tok_file)
    assert digest(tmp_path / "b") == digest(tmp_path / "a")
    counts = digest(tmp_path / "a")["meta"]["sources"]["user"]["counts"]
    assert sum(c["documents"] for c in counts.values()) > 5  # cut into pieces


# ------------------------------------------------------------------ formats
def write_formats(root: Path, docs: list[str]) -> dict[str, list[Path]]:
    """The same documents as every input format ponderlm reads."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    zstd = pytest.importorskip("zstandard")
    root.mkdir()
    (root / "c.jsonl").write_bytes(jsonl(docs))
    (root / "c.jsonl.gz").write_bytes(gzip.compress(jsonl(docs)))
    (root / "c.jsonl.zst").write_bytes(zstd.ZstdCompressor().compress(jsonl(docs)))
    pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), root / "c.parquet", row_group_size=7)
    (root / "txt").mkdir()
    for i, t in enumerate(docs):
        (root / "txt" / f"doc{i:04d}.txt").write_text(t)
    out = {"jsonl": [root / "c.jsonl"], "gz": [root / "c.jsonl.gz"], "zst": [root / "c.jsonl.zst"],
           "parquet": [root / "c.parquet"], "txt": [root / "txt"]}  # fmt: skip
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(root / "saved"), max_shard_size="20KB")
    out["saved"] = [root / "saved"]
    return out


def test_every_format_gives_the_same_tokens(tmp_path, tok_file):
    """With every document in train, the token stream depends on the texts and their order only."""
    docs = documents(60, seed=1)
    formats = write_formats(tmp_path / "in", docs)
    shards = {}
    for name, inputs in formats.items():
        meta = build(tmp_path / name, inputs, tok_file, val_fraction=0.0)
        assert meta["sources"]["user"]["counts"]["train"]["documents"] == len(docs), name
        shards[name] = digest(tmp_path / name)["shards"]
    assert all(s == shards["jsonl"] for s in shards.values()), {k: v for k, v in shards.items()}
    ids = TokenShards(tmp_path / "parquet", "train").arrays[0]
    tok = Tokenizer.load(tok_file)
    assert tok.decode(ids).split("<|endoftext|>")[:-1] == docs


def test_text_field_globs_and_saved_datasets_with_another_column(tmp_path, tok_file):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    docs = documents(40, seed=2)
    (tmp_path / "parts").mkdir()
    for i in range(4):
        (tmp_path / "parts" / f"p{i}.jsonl.gz").write_bytes(gzip.compress(jsonl(docs[i * 10 : i * 10 + 10], "body")))
    pq.write_table(pa.table({"body": docs}), tmp_path / "all.parquet")
    a = build(tmp_path / "a", [tmp_path / "parts" / "*.jsonl.gz"], tok_file, text_field="body", val_fraction=0.0)
    b = build(tmp_path / "b", [tmp_path / "all.parquet"], tok_file, text_field="body", val_fraction=0.0)
    assert a["splits"]["train"]["tokens"] == b["splits"]["train"]["tokens"]
    assert digest(tmp_path / "a")["shards"] == digest(tmp_path / "b")["shards"]


# ------------------------------------------------------------------ workers and resume
def many_files(root: Path, n_files: int = 12, per_file: int = 60) -> list[Path]:
    root.mkdir()
    files = []
    for i in range(n_files):
        f = root / f"part{i:02d}.jsonl"
        f.write_bytes(jsonl(documents(per_file, seed=100 + i)))
        files.append(f)
    return files


def test_output_is_the_same_bytes_for_any_number_of_workers(tmp_path, tok_file, monkeypatch):
    files = many_files(tmp_path / "in")
    monkeypatch.setattr(prepare_mod, "BATCH_DOCS", 7)  # many batches in flight, arriving out of order
    digests = []
    for n in (1, 2, 3):
        build(tmp_path / f"w{n}", files, tok_file, workers=n, parallel_min_bytes=0, shard_tokens=1024)
        digests.append(digest(tmp_path / f"w{n}"))
    assert len(digests[0]["shards"]) > 20
    assert digests[0] == digests[1] == digests[2]
    # --workers is not a setting of the dataset: another count finds it up to date
    logs = []
    prepare(PrepareConfig(out_dir=tmp_path / "w1", sources=(), inputs=files, tokenizer=str(tok_file), workers=2,
                          val_fraction=0.05, shard_tokens=1024), log=logs.append)  # fmt: skip
    assert "up to date" in logs[-1]


KILLABLE = """
import sys
from pathlib import Path
from ponderlm.data import PrepareConfig, prepare
import ponderlm.data.prepare as p
p.BATCH_DOCS = 5
out, tok, *files = sys.argv[1:]
prepare(PrepareConfig(out_dir=Path(out), sources=(), inputs=[Path(f) for f in files], tokenizer=tok, workers=2,
                      parallel_min_bytes=0, shard_tokens=1024, val_fraction=0.05, resume=True))
"""


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _alive(procs: list[tuple[int, bytes]]) -> list[str]:
    """The command lines of ``procs`` (pid, command line) still running (not zombies, pids not reused)."""
    out = []
    for pid, cmdline in procs:
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline and cmdline:
                out.append(cmdline.decode(errors="replace")[:120])
        except OSError:
            pass
    return out


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    t0 = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, f"the build ended before its first checkpoint: {proc.communicate()}"
        assert time.monotonic() - t0 < timeout
        time.sleep(0.005)


def test_a_build_killed_with_sigkill_resumes_into_the_same_dataset(tmp_path, tok_file):
    files = many_files(tmp_path / "in", n_files=16)
    build(tmp_path / "ref", files, tok_file, shard_tokens=1024)
    for attempt in range(3):  # kill it three times, at different moments, then let it finish
        p = subprocess.Popen([sys.executable, "-c", KILLABLE, str(tmp_path / "d"), str(tok_file), *map(str, files)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        _wait_for(tmp_path / ".d.tmp" / "build.json", p)
        time.sleep(0.2 * attempt)
        workers = [(w, Path(f"/proc/{w}/cmdline").read_bytes()) for w in _children(p.pid)]
        p.kill()
        p.wait()
        if (tmp_path / "d").exists():
            break  # it finished before the kill
        t0 = time.monotonic()  # the orphaned workers see their parent gone and exit
        while (alive := _alive(workers)) and time.monotonic() - t0 < 10:
            time.sleep(0.05)
        assert not alive, f"processes outlived the build: {alive}"
    logs = []
    prepare(PrepareConfig(out_dir=tmp_path / "d", sources=(), inputs=files, tokenizer=str(tok_file), workers=2,
                          parallel_min_bytes=0, shard_tokens=1024, val_fraction=0.05, resume=True),
            log=logs.append)  # fmt: skip
    assert any("resuming the interrupted build" in line for line in logs) or (tmp_path / "d").exists()
    assert digest(tmp_path / "d") == digest(tmp_path / "ref")
    assert not (tmp_path / ".d.tmp").exists()
    check_dataset(tmp_path / "d")


def test_ctrl_c_keeps_the_finished_shards_and_resume_is_required(tmp_path, tok_file):
    files = many_files(tmp_path / "in", n_files=30)
    build(tmp_path / "ref", files, tok_file, shard_tokens=1024)
    argv = [sys.executable, "-m", "ponderlm", "data", "prepare", "--input", *map(str, files), "--tokenizer",
            str(tok_file), "--out", "d", "--shard-tokens", "1024", "--val-fraction", "0.05"]  # fmt: skip
    p = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=answer_ctrl_c)  # fmt: skip
    _wait_for(tmp_path / ".d.tmp" / "build.json", p)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    if (tmp_path / "d").exists():
        pytest.skip("the build finished before the signal arrived")
    assert p.returncode == 130 and "interrupted" in err
    assert "--resume" in out and (tmp_path / ".d.tmp" / "build.json").exists()
    journal = json.loads((tmp_path / ".d.tmp" / "build.json").read_text())
    sizes = {sh["file"]: sh["tokens"] * 2 for w in journal["writers"].values() for sh in w["shards"]}
    opened = {w["open"]["file"]: w["open"]["tokens"] * 2 for w in journal["writers"].values() if w["open"]}
    on_disk = {q.name: q.stat().st_size for q in (tmp_path / ".d.tmp").glob("*.bin")}
    assert on_disk == {**sizes, **opened}  # cut back to the checkpoint: nothing written after it is left
    r = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 2 and "an interrupted build of this dataset is in" in r.stderr and "--resume" in r.stderr
    r = subprocess.run([*argv, "--resume"], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "resuming the interrupted build" in r.stdout
    assert digest(tmp_path / "d") == digest(tmp_path / "ref")


def test_a_full_disk_keeps_the_finished_shards_and_resume_completes(tmp_path, tok_file):
    from test_errors_data import mount_tmpfs, undo_setups

    files = many_files(tmp_path / "in", n_files=30)
    build(tmp_path / "ref", files, tok_file, shard_tokens=1024)
    total = sum(q.stat().st_size for q in (tmp_path / "ref").glob("*.bin"))
    mount_tmpfs(tmp_path / "mnt", f"size={total // 2}")
    try:
        with pytest.raises(DataError, match=r"disk full while writing .*; the \d+ shards finished so far are kept in "):
            build(tmp_path / "mnt" / "d", files, tok_file, shard_tokens=1024)
        kept = tmp_path / "mnt" / ".d.tmp"
        assert (kept / "build.json").exists() and len(list(kept.glob("*.bin"))) > 1
        subprocess.run(["mount", "-o", f"remount,size={total * 3}", str(tmp_path / "mnt")], check=True)
        build(tmp_path / "mnt" / "d", files, tok_file, shard_tokens=1024, resume=True)
        assert digest(tmp_path / "mnt" / "d") == digest(tmp_path / "ref")
    finally:
        undo_setups()


# ------------------------------------------------------------------ bad documents
def test_bad_documents_are_refused_with_their_place_or_skipped_and_counted(tmp_path, tok_file):
    zstd = pytest.importorskip("zstandard")
    docs = documents(30, seed=4)
    lines = jsonl(docs).splitlines(keepends=True)
    lines[3] = b'{"text": "caf\xe9"}\n'  # latin-1
    lines[7] = b'{"body": "no text field"}\n'
    lines[9] = b"{not json\n"
    (tmp_path / "bad.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=r"bad.jsonl:4 is not UTF-8 text \(byte [\d,]+ of the file\); convert it first, "
                                        r"or pass --skip-bad-documents"):  # fmt: skip
        build(tmp_path / "a", [tmp_path / "bad.jsonl"], tok_file)
    assert not (tmp_path / "a").exists() and not (tmp_path / ".a.tmp").exists()
    meta = build(tmp_path / "a", [tmp_path / "bad.jsonl"], tok_file, skip_bad_documents=True)
    assert meta["skipped"] == {"non_utf8": 1, "missing_field": 1, "invalid_json": 1}
    counts = meta["sources"]["user"]["counts"]
    assert sum(c["documents"] for c in counts.values()) == 27
    # a corrupt stretch of a compressed file: refused with its offset, or the rest of the file skipped
    docs = documents(3000, seed=5)  # megabytes: the damage lies after many whole reads
    packed = bytearray(zstd.ZstdCompressor().compress(jsonl(docs)))
    packed[len(packed) // 2 : len(packed) // 2 + 8] = b"\xff" * 8
    (tmp_path / "bad.jsonl.zst").write_bytes(bytes(packed))
    with pytest.raises(DataError, match=r"bad.jsonl.zst: corrupt jsonl.zst data near byte [\d,]+ of the compressed "
                                        r"file \(ZstdError"):  # fmt: skip
        build(tmp_path / "b", [tmp_path / "bad.jsonl.zst"], tok_file)
    meta = build(tmp_path / "b", [tmp_path / "bad.jsonl.zst"], tok_file, skip_bad_documents=True, val_fraction=0.0)
    assert meta["skipped"] == {"corrupt_stream": 1}
    assert 0.3 * len(docs) < meta["sources"]["user"]["counts"]["train"]["documents"] < 0.5 * len(docs)


def test_long_lines_read_from_their_bytes_build_the_same_dataset(tmp_path, tok_file, monkeypatch):
    """Every line through jsonline.field_bytes (LONG_LINE 0) against json.loads: the same shards,
    the same refusals with the same places, the same counts of skipped documents."""
    docs = documents(40, seed=6)
    lines = jsonl(docs).splitlines(keepends=True)
    lines[0] = b"\xef\xbb\xbf" + lines[0]  # a byte order mark
    other_fields = {"a": [1, {"text": "x"}], "text": docs[2] + " \u00e9\U0001f600\\", "z": None}
    lines[2] = json.dumps(other_fields).encode() + b"\n"
    lines[4] = json.dumps({"text": "caf\u00e9 \ud800 lone"}).encode() + b"\n"  # valid JSON, not Unicode text
    lines[5] = b'{"text": "caf\xe9"}\n'
    lines[7] = b'{"body": "no text field"}\n'
    lines[9] = b'{"text": "not json",}\n'
    lines[11] = b'{"text": "bad \\q escape"}\n'
    (tmp_path / "bad.jsonl").write_bytes(b"".join(lines))
    results = []
    for long_line in (1 << 20, 0, 16):  # 16: the streamed path with a head holding the BOM
        monkeypatch.setattr(inputs_mod, "LONG_LINE", long_line)
        refusals = []
        for bad in (4, 5, 7, 9, 11):  # each bad line alone among good ones: its own refusal
            (tmp_path / "one.jsonl").write_bytes(b"".join([*lines[:4], lines[bad], *lines[12:]]))
            with pytest.raises(DataError) as e:
                build(tmp_path / f"a{long_line}", [tmp_path / "one.jsonl"], tok_file)
            refusals.append(str(e.value).split("; ")[0].replace(str(tmp_path), ""))
        meta = build(tmp_path / f"a{long_line}", [tmp_path / "bad.jsonl"], tok_file, skip_bad_documents=True)
        results.append((refusals, meta["skipped"], digest(tmp_path / f"a{long_line}")))
    assert results[0][0] == [
        "/one.jsonl:5: the text holds a lone surrogate escape (\\ud800-\\udfff)",
        f"/one.jsonl:5 is not UTF-8 text (byte {len(b''.join(lines[:4])) + 13:,} of the file)",
        '/one.jsonl:5: each line needs a JSON object with a string "text" field',
        "/one.jsonl:5: not valid JSON",
        "/one.jsonl:5: not valid JSON",
    ]
    assert results[0][1] == {"non_utf8": 2, "missing_field": 1, "invalid_json": 2}
    assert results[1] == results[0] == results[2]


def test_a_line_over_the_limit_is_refused_or_skipped_unread(tmp_path, tok_file, monkeypatch):
    """A .jsonl line longer than MAX_LINE (here 300 bytes) is a bad document (too_long): read past
    in small reads, never held; the lines after it are read as usual, plain or compressed."""
    monkeypatch.setattr(inputs_mod, "MAX_LINE", 300)
    monkeypatch.setattr(inputs_mod, "READ_CHUNK", 7)
    docs = [d[:200] for d in documents(12, seed=9)]
    lines = jsonl(docs).splitlines(keepends=True)
    long = json.dumps({"text": "word " * 400}).encode() + b"\n"
    (tmp_path / "x.jsonl").write_bytes(b"".join([*lines[:5], long, *lines[5:]]))
    (tmp_path / "x.jsonl.gz").write_bytes(gzip.compress(b"".join([*lines[:5], long, *lines[5:]])))
    (tmp_path / "ok.jsonl").write_bytes(b"".join(lines))
    with pytest.raises(DataError, match=rf"x.jsonl:6 is longer than 300 bytes \({len(long):,} bytes\); cut it into "
                                        "shorter documents, or pass --skip-bad-documents"):  # fmt: skip
        build(tmp_path / "a", [tmp_path / "x.jsonl"], tok_file)
    build(tmp_path / "ok", [tmp_path / "ok.jsonl"], tok_file, val_fraction=0.0)
    for name in ("x.jsonl", "x.jsonl.gz"):
        meta = build(tmp_path / f"d-{name}", [tmp_path / name], tok_file, skip_bad_documents=True, val_fraction=0.0)
        assert meta["skipped"] == {"too_long": 1}
        assert digest(tmp_path / f"d-{name}")["shards"] == digest(tmp_path / "ok")["shards"]


def test_parquet_row_groups_are_read_a_few_rows_at_a_time(tmp_path, tok_file, monkeypatch):
    """Row groups of 7 rows read 3 rows at a time give the same dataset; a cell over MAX_LINE bytes is
    a bad document (too_long), refused with its row or skipped, in Parquet and saved datasets."""
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    docs = [d[:250] for d in documents(30, seed=10)]
    pq.write_table(pa.table({"text": docs}), tmp_path / "ok.parquet", row_group_size=7)
    build(tmp_path / "a", [tmp_path / "ok.parquet"], tok_file, val_fraction=0.0)
    monkeypatch.setattr(inputs_mod, "PARQUET_BATCH_ROWS", 3)
    build(tmp_path / "b", [tmp_path / "ok.parquet"], tok_file, val_fraction=0.0)
    assert digest(tmp_path / "b") == digest(tmp_path / "a")
    monkeypatch.setattr(inputs_mod, "MAX_LINE", 300)
    long = [*docs[:9], "word " * 100, *docs[9:]]
    pq.write_table(pa.table({"text": long}), tmp_path / "long.parquet", row_group_size=7)
    datasets.Dataset.from_dict({"text": long}).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(DataError, match=r"long.parquet: row 9 is longer than 300 bytes \(500 bytes\); cut it into "
                                        "shorter documents, or pass --skip-bad-documents"):  # fmt: skip
        build(tmp_path / "c", [tmp_path / "long.parquet"], tok_file)
    for name in ("long.parquet", "saved"):
        meta = build(tmp_path / f"d-{name}", [tmp_path / name], tok_file, skip_bad_documents=True, val_fraction=0.0)
        assert meta["skipped"] == {"too_long": 1}
        assert digest(tmp_path / f"d-{name}")["shards"] == digest(tmp_path / "a")["shards"]


def test_a_saved_dataset_with_bytes_that_are_not_utf8_names_the_rows(tmp_path, tok_file, monkeypatch):
    """Arrow batches are converted 3 rows at a time here: the slice with the bad bytes is named and
    skipped; the rows around it are read."""
    pa, datasets = pytest.importorskip("pyarrow"), pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["x"]}).save_to_disk(str(tmp_path / "saved"))
    (arrow,) = (tmp_path / "saved").glob("*.arrow")
    raw = pa.array([f"row {i} words".encode() for i in range(7)], pa.binary()).to_pylist()
    raw[4] = b"caf\xe9"
    binary = pa.array(raw, pa.binary())
    column = pa.Array.from_buffers(pa.string(), len(binary), binary.buffers())
    batch = pa.record_batch([column], names=["text"])
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    monkeypatch.setattr(inputs_mod, "PARQUET_BATCH_ROWS", 3)
    with pytest.raises(DataError, match=r"rows 3-5 hold text that is not UTF-8 \(unexpected end of data\); fix the "
                                        "input, or pass --skip-bad-documents"):  # fmt: skip
        build(tmp_path / "a", [tmp_path / "saved"], tok_file)
    meta = build(tmp_path / "a", [tmp_path / "saved"], tok_file, skip_bad_documents=True, val_fraction=0.0)
    assert meta["skipped"] == {"non_utf8": 1}
    assert meta["sources"]["user"]["counts"]["train"]["documents"] == 4


def test_a_tokenizer_file_that_truncates_or_pads_does_neither(tmp_path, tok_file):
    """A tokenizer.json with truncation (5 tokens) and padding (to 64) switched on: without the
    switch-off every document became 5 tokens, or 64 with padding."""
    from tokenizers import Tokenizer as HFTokenizer

    docs = documents(20, seed=8)
    (tmp_path / "c.jsonl").write_bytes(jsonl(docs))
    hf = HFTokenizer.from_file(str(tok_file))
    hf.enable_truncation(5)
    hf.enable_padding(length=64, pad_id=0, pad_token="<|endoftext|>")
    (tmp_path / "tok.json").write_text(hf.to_str())
    build(tmp_path / "a", [tmp_path / "c.jsonl"], tmp_path / "tok.json", val_fraction=0.0)
    build(tmp_path / "b", [tmp_path / "c.jsonl"], tok_file, val_fraction=0.0)
    assert digest(tmp_path / "a")["shards"] == digest(tmp_path / "b")["shards"]
    ids = TokenShards(tmp_path / "a", "train").arrays[0]
    assert Tokenizer.load(tok_file).decode(ids).split("<|endoftext|>")[:-1] == docs


def test_a_corrupt_parquet_row_group_is_named(tmp_path, tok_file):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    docs = documents(100, seed=5)
    pq.write_table(pa.table({"text": docs}), tmp_path / "t.parquet", row_group_size=20, use_dictionary=False)
    column = pq.ParquetFile(tmp_path / "t.parquet").metadata.row_group(2).column(0)
    data = bytearray((tmp_path / "t.parquet").read_bytes())
    data[column.data_page_offset + 2 : column.data_page_offset + 18] = b"\xff" * 16  # its page header
    (tmp_path / "t.parquet").write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"t.parquet: row group 2 \(rows 40-59\) cannot be read"):
        build(tmp_path / "a", [tmp_path / "t.parquet"], tok_file)
    meta = build(tmp_path / "a", [tmp_path / "t.parquet"], tok_file, skip_bad_documents=True, val_fraction=0.0)
    assert meta["skipped"] == {"corrupt_row_group": 1}
    assert meta["sources"]["user"]["counts"]["train"]["documents"] == 80


def test_a_missing_optional_package_names_the_extra(monkeypatch):
    real = importlib.import_module

    def without_zstd(name, *a):
        if name.startswith("zstandard"):
            raise ImportError(name)
        return real(name, *a)

    monkeypatch.setattr(inputs_mod.importlib, "import_module", without_zstd)
    with pytest.raises(DataError, match=r"needs the zstandard package: pip install 'ponderlm\[data\]'"):
        inputs_mod.need("zstandard")


def test_a_tokenizer_over_65536_entries_writes_uint32(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i + 2 for i in range(70_000)}}
    tk = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    Tokenizer(tk, "file").save(tmp_path / "big.json")
    rng = random.Random(0)
    docs = [" ".join(f"w{rng.randrange(70_000)}" for _ in range(50)) for _ in range(200)]
    (tmp_path / "x.jsonl").write_bytes(jsonl(docs))
    meta = build(tmp_path / "d", [tmp_path / "x.jsonl"], tmp_path / "big.json", val_fraction=0.1)
    assert meta["dtype"] == "uint32"
    ids = np.concatenate([a for sp in ("train", "val") for a in TokenShards(tmp_path / "d", sp).arrays])
    assert ids.max() > 65_536 and len(ids) == 200 * 51


def test_bin_inputs_split_in_chunks_as_in_one_pass(tmp_path, tok_file, monkeypatch):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 40, 300)
    arr = np.concatenate([np.append(rng.integers(1, 300, n), 0) for n in lengths]).astype(np.uint16)[:-3]  # open end
    arr.tofile(tmp_path / "pre.bin")
    doc_of_token = np.concatenate([[0], np.cumsum(arr[:-1] == 0)])  # the one-pass definition
    seed = int.from_bytes(hashlib.sha1(b"pre.bin").digest()[:8], "big")
    is_val = (np.random.default_rng(seed).random(int(doc_of_token[-1]) + 1) < 0.2)[doc_of_token]
    monkeypatch.setattr(prepare_mod, "BIN_CHUNK", 7)  # documents run across many chunks
    build(tmp_path / "d", [tmp_path / "pre.bin"], tok_file, val_fraction=0.2)
    for split, mask in (("train", ~is_val), ("val", is_val)):
        assert np.array_equal(np.concatenate(TokenShards(tmp_path / "d", split).arrays), arr[mask])


def test_the_bpe_trains_on_a_bounded_sample(tmp_path):
    docs = documents(2500, seed=6, words=120)  # about 1.8 MB of text
    (tmp_path / "x.jsonl").write_bytes(jsonl(docs))
    meta = build(tmp_path / "d", [tmp_path / "x.jsonl"], None, vocab_size=300, bpe_sample_mb=1)
    chars = meta["bpe"]["trained_on_characters"]
    # a hash-drawn sample at the rate the input's size suggests, never more than the bound
    assert meta["bpe"]["sample_mb"] == 1 and (1 << 19) < chars <= (1 << 20) + max(map(len, docs))
    assert chars < 0.6 * sum(map(len, docs))


def test_a_resumed_bpe_build_is_the_uninterrupted_one(tmp_path, monkeypatch):
    """The tokenizer trained before the interruption is reused, and meta.json says how it was trained."""
    files = many_files(tmp_path / "in", n_files=6)
    build(tmp_path / "ref", files, None, vocab_size=300, shard_tokens=1024)
    real = prepare_mod.CorpusBuild.maybe_checkpoint
    calls = []

    def interrupt_after_three(self, *a, **kw):
        real(self, *a, **kw)
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(prepare_mod.CorpusBuild, "maybe_checkpoint", interrupt_after_three)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "d", files, None, vocab_size=300, shard_tokens=1024)
    monkeypatch.setattr(prepare_mod.CorpusBuild, "maybe_checkpoint", real)
    assert (tmp_path / ".d.tmp" / "build.json").exists()
    build(tmp_path / "d", files, None, vocab_size=300, shard_tokens=1024, resume=True)
    assert digest(tmp_path / "d") == digest(tmp_path / "ref")
    assert digest(tmp_path / "d")["meta"]["bpe"]["trained_on_characters"] > 0


def test_progress_eta_is_the_remaining_work_at_the_rate_shown():
    now = [0.0]
    p = Progress("x", 1000, lambda *_: None, window=10, clock=lambda: now[0], tty=False)
    for t, done in [(1, 100), (2, 200), (12, 300), (13, 310), (14, 320)]:  # fast, then slow
        now[0] = float(t)
        p.update(done)
    assert p.rate.per_s == pytest.approx((320 - 200) / (14 - 2))  # the window forgot the fast start
    assert p.rate.eta_s(1000 - 320) == pytest.approx((1000 - 320) / 10)
    assert "10 B/s" in p.line() and "ETA 1:08" in p.line()


def test_prepare_logs_progress_with_rate_and_eta(tmp_path, tok_file, monkeypatch):
    files = many_files(tmp_path / "in", n_files=3)
    monkeypatch.setattr(prepare_mod, "BATCH_DOCS", 5)
    monkeypatch.setattr(prepare_mod.Progress, "__init__", _every_update(prepare_mod.Progress.__init__))
    logs = []
    prepare(PrepareConfig(out_dir=tmp_path / "d", sources=(), inputs=files, tokenizer=str(tok_file),
                          val_fraction=0.05), log=logs.append)  # fmt: skip
    lines = [line for line in logs if line.startswith("tokenizing: read ") and " of " in line]
    assert lines and all("/s, " in line and "ETA " in line for line in lines), logs


def _every_update(init):
    def patched(self, *a, **kw):
        init(self, *a, **{**kw, "every": 0.0, "tty": False})

    return patched


def test_an_empty_input_file_is_refused(tmp_path, tok_file):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.jsonl is empty"):
        build(tmp_path / "d", [tmp_path / "empty.jsonl"], tok_file)
    assert os.listdir(tmp_path) == ["empty.jsonl"]
