"""Very long .jsonl lines, built as users build them: checked in full first, then their text read
again from the file (or a temporary copy of a compressed line) a window at a time. Token for token
the dataset the same lines held whole give, refusals and skip counts included; with small limits
(blocks of 7 bytes, paragraphs over 300 characters not held, Cutter segments of 100) so that every
escape, surrogate pair and UTF-8 character is cut somewhere."""

from __future__ import annotations

import gzip
import importlib
import json
import random

import pytest
from test_prepare_stream import build, digest, documents, tok_file  # noqa: F401 -- tok_file is a fixture

from ponderlm.data.cut import Cutter
from ponderlm.errors import DataError

prepare_mod = importlib.import_module("ponderlm.data.prepare")
inputs_mod = importlib.import_module("ponderlm.data.inputs")
jsonline_mod = importlib.import_module("ponderlm.data.jsonline")
longtext_mod = importlib.import_module("ponderlm.data.longtext")

ODD = ['"', "\\", "\t", "\n", "é", "😀", "数", "\u2028", "/", "\x01"]


def long_text(seed: int, paragraphs: int = 40) -> str:
    """Paragraphs (blank lines, single newlines) of words and characters that JSON escapes or
    writes in several bytes, some paragraphs far over the 300 characters held."""
    rng = random.Random(seed)
    words = documents(1, seed=seed, words=400)[0].split()
    out = []
    for _ in range(paragraphs):
        n = rng.choice([3, 40, 200, 900])
        out.append(" ".join(rng.choice(words) + (rng.choice(ODD) if rng.random() < 0.2 else "") for _ in range(n)))
    seps = ["\n\n", "\n \n", "\n\t\n\n", "  \n\n  "]
    return "  \n" + "".join(p + rng.choice(seps) for p in out) + " \n"


def line(obj, ascii_only: bool = True) -> bytes:
    return json.dumps(obj, ensure_ascii=ascii_only).encode() + b"\n"


def lines() -> dict[str, bytes]:
    good = [line({"id": 0, "text": long_text(1)}), line({"text": long_text(2), "n": [1, {"text": "x"}]}, False)]
    good.append(line({"text": long_text(3) + "x" * 500 + " end"}))  # no place to cut for 500 characters
    good.append(line({"text": "short one"}))
    good.append(line({"text": "  \n\n " * 200 + "a" + " \n" * 300}))  # mostly whitespace: one small document
    bad = {
        "garbage": line({"text": long_text(4)})[:-1] + b" x\n",
        "duplicate": b'{"text": ' + json.dumps(long_text(5)).encode() + b', "text": "the last one"}\n',
        "lone": line({"text": long_text(6) + "\ud800"}),
        "late_non_utf8": line({"text": long_text(7)})[:-2] + b', "z": "\xff"}\n',
        "missing": line({"body": long_text(8)}),
    }
    return {**{f"good{i}": g for i, g in enumerate(good)}, **bad}


def small_limits(monkeypatch, stream: bool) -> list[int]:
    """Set the limits; returns [lines read again, of their documents those not held] (counted)."""
    monkeypatch.setattr(prepare_mod, "Cutter", lambda tk: Cutter(tk, segment=100, max_uncut=300))
    seen = [0, 0]
    real = longtext_mod.long_documents

    def counting(*a, **k):
        seen[0] += 1
        for d in real(*a, **k):
            seen[1] += isinstance(d, longtext_mod.LongDocument)
            yield d

    monkeypatch.setattr(inputs_mod, "long_documents", counting)
    if stream:
        monkeypatch.setattr(inputs_mod, "LONG_LINE", 50)
        monkeypatch.setattr(inputs_mod, "SPILL_LINE", 60)
        monkeypatch.setattr(jsonline_mod, "_BLOCK", 7)
        monkeypatch.setattr(longtext_mod, "LONG_CHARS", 300)
    else:  # every line held whole and parsed by json.loads
        monkeypatch.setattr(inputs_mod, "LONG_LINE", 1 << 40)
        monkeypatch.setattr(inputs_mod, "SPILL_LINE", 1 << 40)
    return seen


def write(path, data: bytes) -> None:
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        data = pytest.importorskip("zstandard").ZstdCompressor().compress(data)
    path.write_bytes(data)


@pytest.mark.parametrize("name", ["x.jsonl", "x.jsonl.gz", "x.jsonl.zst"])
def test_long_lines_read_again_build_the_dataset_held_lines_build(tmp_path, tok_file, monkeypatch, name):  # noqa: F811
    all_lines = lines()
    data = b"\xef\xbb\xbf" + b"".join(all_lines.values())  # a byte order mark first
    write(tmp_path / name, data)
    results = []
    for stream in (False, True):
        seen = small_limits(monkeypatch, stream)
        refusals = []
        for key in ("good2", "garbage", "lone", "late_non_utf8", "missing"):  # each bad line alone: its refusal
            write(tmp_path / f"one-{name}", all_lines["good0"] + all_lines[key] + all_lines["good1"])
            with pytest.raises(DataError) as e:
                build(tmp_path / f"r{stream}", [tmp_path / f"one-{name}"], tok_file)
            refusals.append(str(e.value).split("; ")[0].replace(str(tmp_path), ""))
        meta = build(tmp_path / f"d{stream}", [tmp_path / name], tok_file, skip_bad_documents=True)
        results.append((refusals, meta["skipped"], digest(tmp_path / f"d{stream}")))
        assert (seen[0] >= 10 and seen[1] > 10) if stream else seen == [0, 0], seen
    assert results[0][1] == {"too_long": 1, "invalid_json": 1, "non_utf8": 2, "missing_field": 1}
    assert "no place where the tokenizer's pre-tokenization splits" in results[0][0][0]
    assert results[1] == results[0]


def test_a_bpe_trained_on_long_lines_read_again_is_the_same(tmp_path, monkeypatch):
    """The BPE sample takes the long documents as texts read again: the same tokenizer, the same
    dataset (one document of 150,000 characters: cut by the trainer's own Cutter too)."""
    text = documents(1, seed=3, words=30_000)[0].replace("\n\n", " ")
    data = line({"text": long_text(9)}) + line({"text": text}) + line({"text": long_text(10)}, False)
    write(tmp_path / "b.jsonl", data)
    digests = []
    for stream in (False, True):
        seen = small_limits(monkeypatch, stream)
        build(tmp_path / f"b{stream}", [tmp_path / "b.jsonl"], None, vocab_size=300)
        digests.append((digest(tmp_path / f"b{stream}"), (tmp_path / f"b{stream}" / "tokenizer.json").read_text()))
        assert seen[1] >= (6 if stream else 0)  # twice: the BPE sample, then the tokenizing pass
    assert digests[1] == digests[0]
