"""Data prepare on stand-in packages (the real code path: archives, parsing, hash split, shards)."""

import hashlib
import json
import subprocess

import numpy as np
import pytest

from ponderlm.data import DataError, PrepareConfig, TokenShards, TrainBatches, eval_windows, prepare, verify
from ponderlm.data.prepare import assign_split
from ponderlm.data.sources import Document, fetch, strip_gutenberg
from ponderlm.data.tokenizer import Tokenizer

from fakepkgs import make_fake_packages


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    cache = make_fake_packages(root / "cache")
    cfg = PrepareConfig(out_dir=root / "ds", cache_dir=cache, vocab_size=400, val_fraction=0.05)
    logs = []
    meta = prepare(cfg, log=logs.append)
    return cfg, meta, logs


def test_prepare_writes_splits_meta_and_checksums(dataset):
    cfg, meta, logs = dataset
    out = cfg.out_dir
    assert set(meta["splits"]) == {"train", "val", "ptb_valid", "ptb_test"}
    assert meta["dtype"] == "uint16" and meta["tokenizer"]["vocab_size"] == 400
    assert set(meta["sources"]) == {"sotu", "shakespeare", "bible", "wiki", "ptb"}
    for split in meta["splits"].values():
        for sh in split["shards"]:
            data = (out / sh["file"]).read_bytes()
            assert len(data) == 2 * sh["tokens"]
            assert hashlib.sha256(data).hexdigest() == sh["sha256"]
    total = sum(c.get("train", {}).get("tokens", 0) for c in (s["counts"] for s in meta["sources"].values()))
    assert total == meta["splits"]["train"]["tokens"]
    assert meta["sources"]["ptb"]["counts"]["ptb_test"]["documents"] == 1
    assert verify(out) == meta
    assert any("sotu" in line for line in logs)


def test_tokens_decode_to_the_documents(dataset):
    cfg, meta, _ = dataset
    tok = Tokenizer.load(cfg.out_dir / "tokenizer.json")
    ptb = np.fromfile(cfg.out_dir / meta["splits"]["ptb_test"]["shards"][0]["file"], dtype=np.uint16)
    assert ptb[-1] == tok.eot_id and (ptb[:-1] != tok.eot_id).all()
    text = tok.decode(ptb[:-1].tolist())
    assert len(text.splitlines()) == 60  # PTB test kept whole, one sentence a line
    train = np.fromfile(cfg.out_dir / "train_000.bin", dtype=np.uint16)
    decoded = tok.decode(train.tolist())
    assert "DUPLICATE SHOULD BE SKIPPED" not in decoded  # *_gut_f* files are skipped
    assert "GUTENBERG" not in decoded and "LICENSE" not in decoded  # header/footer stripped
    assert text.split("\n")[0] not in decoded  # held-out PTB test sentences are not in train


def test_prepare_is_idempotent_and_refuses_to_clobber(dataset, tmp_path):
    cfg, meta, _ = dataset
    mtime = (cfg.out_dir / "train_000.bin").stat().st_mtime_ns
    logs = []
    again = prepare(cfg, log=logs.append)
    assert again["fingerprint"] == meta["fingerprint"] and "up to date" in logs[0]
    assert (cfg.out_dir / "train_000.bin").stat().st_mtime_ns == mtime
    other = PrepareConfig(out_dir=cfg.out_dir, cache_dir=cfg.cache_dir, vocab_size=500, val_fraction=0.05)
    with pytest.raises(DataError, match="other settings; pass --overwrite"):
        prepare(other)
    assert not cfg.out_dir.with_name(cfg.out_dir.name + ".tmp").exists()


def test_hash_split_is_stable_and_about_the_fraction():
    docs = [Document("s", f"doc{i}", "x") for i in range(20000)]
    splits = [assign_split(d, 0.01) for d in docs]
    assert splits == [assign_split(d, 0.01) for d in docs]
    assert 0.007 < splits.count("val") / len(docs) < 0.013
    assert assign_split(Document("ptb", "test", "x", split="ptb_test"), 0.5) == "ptb_test"


def test_user_inputs_txt_jsonl_bin(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("hello world. " * 400)
    (tmp_path / "in" / "b.jsonl").write_text("\n".join(json.dumps({"text": f"line {i} of text"}) for i in range(50)))
    bpe = PrepareConfig(out_dir=tmp_path / "ds", cache_dir=tmp_path / "c", sources=(), inputs=[tmp_path / "in"],
                        vocab_size=300, val_fraction=0.1)  # fmt: skip
    meta = prepare(bpe, log=lambda *_: None)
    assert meta["sources"]["user"]["counts"]["train"]["documents"] > 0
    tok = tmp_path / "ds" / "tokenizer.json"
    arr = np.array([5, 6, 7, 0] * 500, dtype=np.uint16)  # pre-tokenised documents ending in EOT (id 0)
    arr.tofile(tmp_path / "pre.bin")
    cfg = PrepareConfig(out_dir=tmp_path / "ds2", cache_dir=tmp_path / "c", sources=(), inputs=[tmp_path / "pre.bin"],
                        tokenizer=str(tok), val_fraction=0.1)  # fmt: skip
    meta2 = prepare(cfg, log=lambda *_: None)
    sp = meta2["splits"]
    assert sp["train"]["tokens"] + sp["val"]["tokens"] == 2000 and sp["val"]["tokens"] % 4 == 0


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"\xff\xfe bad bytes", "is not UTF-8"),
        (b'{"text": 1}\n', 'string "text" field'),
        (b"{oops\n", "not valid JSON"),
    ],
)
def test_bad_user_input_is_a_clear_error(tmp_path, content, needle):
    f = tmp_path / ("x.txt" if b"bad" in content else "x.jsonl")
    f.write_bytes(content)
    cfg = PrepareConfig(out_dir=tmp_path / "ds", cache_dir=tmp_path / "c", sources=(), inputs=[f])
    with pytest.raises(DataError, match=needle):
        prepare(cfg, log=lambda *_: None)
    assert not (tmp_path / "ds").exists()


def test_fetch_failure_is_a_clear_error(tmp_path, monkeypatch):
    def failing(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for nopkg==1")

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(DataError, match=r"could not fetch nopkg==1 .*No matching distribution"):
        fetch("nopkg==1", "nopkg-1*", tmp_path, log=lambda *_: None)


def test_strip_gutenberg():
    t = "junk\n*** START OF THE PROJECT GUTENBERG EBOOK Y ***\nbody text\n"
    t += "*** END OF THE PROJECT GUTENBERG EBOOK Y ***\nx"
    assert strip_gutenberg(t) == "body text"
    assert strip_gutenberg("plain") == "plain"


def test_loader_batches_are_deterministic_and_rank_slices_compose(dataset):
    cfg, _, _ = dataset
    shards = TokenShards(cfg.out_dir, "train")
    b = TrainBatches(shards, seq_len=16, seed=3)
    x1, y1 = b.batch(5, 8)
    x2, _ = b.batch(5, 8)
    assert (x1 == x2).all() and (y1[:, :-1] == x1[:, 1:]).all()
    lo, hi = b.batch(5, 8, 0, 4)[0], b.batch(5, 8, 4, 8)[0]
    assert (x1[:4] == lo).all() and (x1[4:] == hi).all()  # two ranks read the global batch
    assert not (b.batch(6, 8)[0] == x1).all()
    v = eval_windows(TokenShards(cfg.out_dir, "val"), 16, 5)
    assert v.shape[1] == 17 and (v == eval_windows(TokenShards(cfg.out_dir, "val"), 16, 5)).all()
    with pytest.raises(DataError, match="too small for seq_len"):
        TrainBatches(shards, seq_len=10**8, seed=0)
