"""Data prepare on stand-in packages (the real code path: archives, parsing, hash split, shards)."""

import hashlib
import importlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from ponderlm.data import (
    PrepareConfig,
    TokenShards,
    TrainBatches,
    check_dataset,
    eval_windows,
    load_meta,
    prepare,
    verify,
)
from ponderlm.data.prepare import assign_split
from ponderlm.data.sources import Document, fetch, strip_gutenberg
from ponderlm.data.tokenizer import Tokenizer, trainer_pieces
from ponderlm.errors import DataError, DirectoryLocked, OwnershipError, UserError
from ponderlm.owned import DirLock

from errorcases import answer_ctrl_c
from fakepkgs import WORDS, make_fake_packages

prepare_mod = importlib.import_module("ponderlm.data.prepare")  # the module (ponderlm.data.prepare is the function)
dataset_mod = importlib.import_module("ponderlm.data.dataset")


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
    with pytest.raises(UserError, match="other settings; pass --overwrite"):
        prepare(other)
    assert sorted(p.name for p in cfg.out_dir.parent.iterdir()) == ["cache", "ds"]  # no temporary, no lock


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


FAKE_PIP = """
import sys, time
args = sys.argv[1:]
if "--fail" in args[0]:
    print("ERROR: No matching distribution found for nopkg==1")
    sys.exit(1)
if "--progress-bar" in args and "--old" in args[0]:
    print("error: invalid choice: 'raw'   (--progress-bar)")
    sys.exit(2)
dest = args[args.index("--dest") + 1]
for i in range(4):
    print(f"Progress {i * 1000000} of 3000000", flush=True)
    time.sleep(0.15)
open(dest + "/nopkg-1-py3-none-any.whl", "w").write("x")
"""


@pytest.mark.parametrize("kind", ["--fail", "--ok", "--old"])
def test_fetch_shows_progress_and_names_a_failure(tmp_path, monkeypatch, kind):
    sources = importlib.import_module("ponderlm.data.sources")
    monkeypatch.setattr(sources, "PIP", [sys.executable, "-c", FAKE_PIP, kind])
    monkeypatch.setattr(sources, "FETCH_HEARTBEAT", 0.2)
    logs = []
    if kind == "--fail":
        with pytest.raises(DataError, match=r"could not fetch nopkg==1 .*No matching distribution"):
            fetch("nopkg==1", "nopkg-1*", tmp_path, log=logs.append)
        return
    assert fetch("nopkg==1", "nopkg-1*", tmp_path, log=logs.append).name == "nopkg-1-py3-none-any.whl"
    progress = [line for line in logs if line.startswith("  fetching nopkg==1: ")]
    assert progress, logs
    if kind == "--ok":  # pip's raw progress is shown as MB of the total
        assert any(" of 3.0 MB, " in line for line in progress), progress


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


# ------------------------------------------------------------ check_dataset
@pytest.fixture
def small_ds(tmp_path):
    """A fresh small dataset (BPE 300) built from user text, two train shards."""
    lines = [json.dumps({"text": para}) for para in words_text(40_000).split("\n\n")]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    cfg = PrepareConfig(out_dir=tmp_path / "ds", sources=(), inputs=[tmp_path / "a.jsonl"], vocab_size=300,
                        shard_tokens=8192, val_fraction=0.1)  # fmt: skip
    prepare(cfg, log=lambda *_: None)
    return cfg


def words_text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return "\n\n".join(" ".join(rng.choice(WORDS) for _ in range(60)) + "." for _ in range(n_chars // 300))


@pytest.fixture
def hashed(monkeypatch):
    """The files check_dataset reads in full (checksums), in order."""
    calls = []
    real = dataset_mod._file_sha256

    def counting(path):
        calls.append(path.name)
        return real(path)

    monkeypatch.setattr(dataset_mod, "_file_sha256", counting)
    return calls


def test_check_dataset_uses_the_checksums_written_at_build(small_ds, hashed):
    d = small_ds.out_dir
    meta = check_dataset(d)
    assert meta == load_meta(d) and len(meta["splits"]["train"]["shards"]) >= 2
    assert hashed == []  # recorded as verified while building: the first training run reads nothing again
    assert sorted(p.name for p in d.iterdir()) == sorted(
        [".ponderlm", ".verified.json", "meta.json", "tokenizer.json"]
        + [sh["file"] for sp in meta["splits"].values() for sh in sp["shards"]]
    )
    assert sorted(p.name for p in d.parent.iterdir()) == ["a.jsonl", "ds"]  # no lock, no temporary left


def test_check_dataset_detects_a_same_size_rewrite_and_caches_by_identity(small_ds, hashed, tmp_path):
    d = small_ds.out_dir
    copy = tmp_path / "copy"
    shutil.copytree(d, copy)  # new inodes: everything is verified once more, then cached
    n = sum(len(sp["shards"]) for sp in load_meta(copy)["splits"].values())
    check_dataset(copy)
    assert len(hashed) == n
    cache = (copy / ".verified.json").read_bytes()
    check_dataset(copy)
    assert len(hashed) == n and (copy / ".verified.json").read_bytes() == cache  # cache hit: no re-hash, no rewrite

    shard = copy / "train_001.bin"
    arr = np.fromfile(shard, dtype=np.uint16)
    np.roll(arr, 3).tofile(shard)  # same size, same inode, new mtime
    changed = r"train_001.bin was changed after the dataset was built \(checksum mismatch with meta.json\)"
    with pytest.raises(DataError, match=changed + r"; rebuild it with `ponderlm data prepare --out .* --overwrite`"):
        check_dataset(copy)
    assert hashed[n:] == ["train_001.bin"]  # train_000.bin hit the cache; the check stops at the first mismatch
    assert (copy / ".verified.json").read_bytes() == cache  # a failed check writes nothing
    check_dataset(copy, verify_hashes=False)  # sizes only: passes


def test_check_dataset_without_a_writable_directory_skips_the_cache(small_ds, hashed, monkeypatch, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(small_ds.out_dir, copy)
    (copy / ".verified.json").unlink()

    def refuse(path, data):
        raise OwnershipError(f"read-only file system while writing {path}")

    monkeypatch.setattr(dataset_mod, "atomic_write", refuse)
    check_dataset(copy)
    check_dataset(copy)
    assert len(hashed) == 2 * sum(len(sp["shards"]) for sp in load_meta(copy)["splits"].values())
    assert not (copy / ".verified.json").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "tokenizer.json").unlink(), r"tokenizer.json is missing: the dataset cannot be used without"),
        (lambda d: (d / "tokenizer.json").write_text("{"), r"tokenizer.json is not a tokenizer file \(invalid JSON"),
        (lambda d: (d / "tokenizer.json").write_text('{"a": 1}'), r"tokenizer.json is not a tokenizer file \("),
        (lambda d: Tokenizer.train_bpe(["some other text"] * 9, 270).save(d / "tokenizer.json"),
         r"tokenizer.json has 2\d\d entries, meta.json records 300"),
        (lambda d: (d / "val_000.bin").unlink(), r"val_000.bin is missing \(listed in meta.json\)"),
        (lambda d: (d / "train_001.bin").write_bytes(b"\0\0"), r"train_001.bin has 2 bytes, meta.json says"),
    ],
)  # fmt: skip
def test_check_dataset_refuses_damaged_files(small_ds, damage, message):
    damage(small_ds.out_dir)
    with pytest.raises(DataError, match=message + r".*; rebuild it with `ponderlm data prepare --out "):
        check_dataset(small_ds.out_dir)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: "oops", r"invalid JSON \(Expecting value"),
        (lambda m: json.dumps([m]), r"not a JSON object \(found list\)"),
        (lambda m: json.dumps({k: v for k, v in m.items() if k != "splits"}), r"missing key 'splits'"),
        (lambda m: json.dumps({**m, "dtype": "int8"}), r"unknown dtype 'int8' \(expected uint16 or uint32\)"),
        (lambda m: json.dumps({**m, "tokenizer": {**m["tokenizer"], "vocab_size": "300"}}),
         r"tokenizer.vocab_size must be a positive integer, got '300'"),
        (lambda m: json.dumps({**m, "tokenizer": {**m["tokenizer"], "file": "/etc/passwd"}}),
         r"tokenizer.file must be a file name inside the dataset"),
        (lambda m: json.dumps({**m, "splits": {"train": {"tokens": 5, "shards": [{"file": "a.bin"}]}}}),
         r"splits.train.shards\[0\].tokens must be a token count, got None"),
        (lambda m: json.dumps({**m, "splits": {"train": {"tokens": 5, "shards": []}}}),
         r"splits.train.tokens \(5\) is not the sum of its shards' tokens"),
    ],
)  # fmt: skip
def test_load_meta_names_the_file_and_the_problem(small_ds, change, message):
    p = small_ds.out_dir / "meta.json"
    p.write_text(change(json.loads(p.read_text())))
    with pytest.raises(DataError, match=r"ds/meta.json: " + message + r".*; the dataset is damaged: prepare it again"):
        load_meta(small_ds.out_dir)
    with pytest.raises(DataError, match=message):
        TokenShards(small_ds.out_dir, "train")  # training and evaluation read meta.json through load_meta


def test_a_newer_format_asks_for_an_upgrade(small_ds):
    p = small_ds.out_dir / "meta.json"
    p.write_text(json.dumps({**json.loads(p.read_text()), "format_version": 99}))
    with pytest.raises(DataError, match="format_version 99 was written by a newer ponderlm"):
        load_meta(small_ds.out_dir)


# ------------------------------------------------------- prepare: ownership
def test_a_dataset_made_before_markers_is_still_recognised(small_ds):
    d = small_ds.out_dir
    (d / ".ponderlm").unlink()
    logs = []
    prepare(small_ds, log=logs.append)
    assert "up to date" in logs[0] and not (d / ".ponderlm").exists()
    other = replace(small_ds, vocab_size=301)
    with pytest.raises(UserError, match="exists; it holds a dataset built with other settings; pass --overwrite"):
        prepare(other, log=lambda *_: None)
    prepare(replace(other, overwrite=True), log=lambda *_: None)
    assert load_meta(d)["tokenizer"]["vocab_size"] == 301 and (d / ".ponderlm").is_file()


def test_overwrite_rebuilds_a_damaged_dataset_built_with_the_same_settings(small_ds):
    d = small_ds.out_dir
    shard = d / "train_000.bin"
    good = shard.read_bytes()
    shard.write_bytes(good[::-1])
    with pytest.raises(DataError, match=r"holds this dataset, damaged: .*checksum mismatch.*; pass --overwrite"):
        prepare(small_ds, log=lambda *_: None)
    assert shard.read_bytes() == good[::-1]  # refused: nothing touched
    logs = []
    prepare(replace(small_ds, overwrite=True), log=logs.append)
    assert shard.read_bytes() == good and "rebuilding it" in logs[0]
    check_dataset(d)


def test_the_dataset_own_tokenizer_may_be_reused_in_place(small_ds):
    """--tokenizer D/tokenizer.json --out D --overwrite: the file is read before D is replaced."""
    d = small_ds.out_dir
    before = Tokenizer.load(d / "tokenizer.json")
    cfg = replace(small_ds, tokenizer=str(d / "tokenizer.json"), overwrite=True)
    meta = prepare(cfg, log=lambda *_: None)
    after = Tokenizer.load(d / "tokenizer.json")
    assert after.tk.get_vocab() == before.tk.get_vocab() and meta["tokenizer"]["kind"] == "file"
    logs = []
    prepare(cfg, log=logs.append)  # the same settings: the re-saved tokenizer is the same file
    assert "up to date" in logs[0]


def test_prepare_through_a_symlink_builds_in_the_target(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "a.txt").write_text(words_text(3000))
    cfg = PrepareConfig(out_dir=tmp_path / "link", sources=(), inputs=[tmp_path / "a.txt"], vocab_size=300)
    prepare(cfg, log=lambda *_: None)
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / "meta.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "link", "real"]


def test_an_input_given_twice_is_read_once(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text(words_text(3000))
    (tmp_path / "b.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps({"text": "a line with a BOM first"}).encode())
    once = PrepareConfig(out_dir=tmp_path / "d1", sources=(), inputs=[tmp_path / "in", tmp_path / "b.jsonl"],
                         vocab_size=300)  # fmt: skip
    twice = replace(once, out_dir=tmp_path / "d2", inputs=[*once.inputs, tmp_path / "in" / "a.txt", tmp_path / "in"])
    m1, m2 = prepare(once, log=lambda *_: None), prepare(twice, log=lambda *_: None)
    assert m1["sources"]["user"]["counts"] == m2["sources"]["user"]["counts"]


def test_a_second_prepare_waits_for_nobody_after_the_first_ends(small_ds):
    """The lock is released (and its file removed) whether prepare succeeds or fails."""
    with pytest.raises(DataError):
        prepare(replace(small_ds, inputs=[small_ds.out_dir.parent / "nope.txt"]), log=lambda *_: None)
    with DirLock(small_ds.out_dir), pytest.raises(DirectoryLocked, match="is in use by another ponderlm process"):
        prepare(small_ds, log=lambda *_: None)
    prepare(small_ds, log=lambda *_: None)
    assert not list(small_ds.out_dir.parent.glob(".*"))


# ------------------------------------------------------------ BPE training
def test_trainer_pieces_cut_only_long_whitespace_free_runs():
    prose = "An ordinary sentence, with words of ordinary length.\n\nAnd a second paragraph."
    assert list(trainer_pieces([prose])) == [prose]
    text = "head " + "x" * 1000 + " tail " + "y" * 300
    pieces = list(trainer_pieces([text], max_run=256))
    assert "".join(pieces) == text and len(pieces) == 5  # x: 4 pieces (the last one runs on into " tail y..."), y: 2
    assert all(len(run) <= 256 for piece in pieces for run in piece.split())


def test_normal_text_trains_exactly_as_without_the_bound(tmp_path):
    """The bound changes nothing for text with normal words: same merges, same ids."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from ponderlm.data.inputs import Reading
    from ponderlm.data.prepare import _units

    cfg = PrepareConfig(cache_dir=make_fake_packages(tmp_path / "cache"), inputs=[])
    texts = [d.text for u in _units(cfg, [], log=lambda *_: None)[0] for d in u.documents(Reading())]
    assert max(len(run) for t in texts for run in t.split()) < 256  # ordinary words only
    bounded = Tokenizer.train_bpe(texts, 400)
    raw = HFTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    raw.train_from_iterator(texts, trainer=trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))  # fmt: skip
    assert bounded.tk.to_str() == raw.to_str()
    assert bounded.encode_batch(texts[:50]) == [e.ids for e in raw.encode_batch(texts[:50], add_special_tokens=False)]


def test_bpe_on_text_without_whitespace_is_fast():
    rng = random.Random(0)
    text = "".join(rng.choice(WORDS) for _ in range(400_000))[:400_000]  # ~36 s unbounded on 2 cores
    t0 = time.monotonic()
    tok = Tokenizer.train_bpe([text], 8192)
    assert time.monotonic() - t0 < 15 and tok.vocab_size == 8192
    assert tok.decode(tok.encode(text[:5000])) == text[:5000]  # encoding sees the whole text


def test_ctrl_c_during_bpe_training_ends_prepare_at_once(tmp_path):
    letters = np.random.default_rng(0).integers(ord("a"), ord("z") + 1, 3_000_000, dtype=np.uint8)
    (tmp_path / "nospace.txt").write_bytes(letters.tobytes())  # seconds of BPE training even with the bound
    p = subprocess.Popen([sys.executable, "-m", "ponderlm", "data", "prepare", "--input", "nospace.txt", "--out", "d"],
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=answer_ctrl_c)  # fmt: skip
    try:
        for line in p.stdout:
            if "training a byte-level BPE tokenizer" in line:
                break
        else:
            pytest.fail(f"prepare ended before training: {p.wait()} {p.stderr.read()}")
        time.sleep(0.5)
        assert p.poll() is None, "training finished before the signal: make the text longer"
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        rc = p.wait(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert rc == 130 and "interrupted" in p.stderr.read()
    assert elapsed < 5, elapsed
    assert sorted(q.name for q in tmp_path.iterdir()) == ["nospace.txt"]  # no dataset, temporary or lock


# ---------------------------------------------------------------- tokenizer
@pytest.mark.parametrize(
    "content, message",
    [
        (None, "tokenizer file not found"),
        ("plain words\n", r"is not a tokenizer file \(invalid JSON: Expecting value"),
        ('{"version": "1.0"}', r"is not a tokenizer file \("),
        (b"\xff\xfe", r"is not a tokenizer file \(not UTF-8 text\)"),
        ("[" * 100_000, r"is not a tokenizer file \(invalid JSON"),
    ],
)
def test_tokenizer_load_names_what_is_wrong(tmp_path, content, message):
    p = tmp_path / "tok.json"
    if isinstance(content, bytes):
        p.write_bytes(content)
    elif content is not None:
        p.write_text(content)
    with pytest.raises(DataError, match=message):
        Tokenizer.load(p)
    with pytest.raises(DataError, match="is a directory"):
        Tokenizer.load(tmp_path)


def test_tokenizer_save_writes_what_hf_writes(tmp_path):
    tok = Tokenizer.train_bpe(["some text to learn from"] * 5, 270)
    tok.save(tmp_path / "a.json")
    tok.tk.save(str(tmp_path / "b.json"))
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_an_empty_shard_listed_in_meta_is_read_as_empty(small_ds):
    d = small_ds.out_dir
    meta = json.loads((d / "meta.json").read_text())
    empty = {"file": "train_999.bin", "tokens": 0, "sha256": hashlib.sha256(b"").hexdigest()}
    meta["splits"]["train"]["shards"].append(empty)
    (d / "meta.json").write_text(json.dumps(meta))
    (d / "train_999.bin").write_bytes(b"")
    assert check_dataset(d) == meta and TokenShards(d, "train").sizes[-1] == 0  # numpy cannot map an empty file
