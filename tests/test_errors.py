"""Every user mistake in docs/ERRORS.md, run through the real command line: a one-line ``error: ...``
on stderr naming the problem, exit status 2, no traceback, and nothing written, changed or left
behind on disk (no output directory, no temporary file, existing outputs untouched)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ponderlm.config import load_run_config
from ponderlm.data import PrepareConfig, prepare
from ponderlm.train import train

from fakepkgs import build_fake_dataset

REPO = Path(__file__).parents[1]
TINY = [
    "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.d_ff=64", "model.max_ponder_steps=2",
    "train.seq_len=32", "train.batch_size=4", "train.max_steps=2", "train.eval_windows=4", "train.progress=false",
]  # fmt: skip


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    """One dataset, one tiny trained run (context 32 tokens) and the broken inputs built from them."""
    root = tmp_path_factory.mktemp("errors")
    ds = build_fake_dataset(root)
    run = root / "run"
    cfg, explicit = load_run_config(None, [*TINY, "model.max_seq_len=32", f"train.data_dir={ds}",
                                           f"train.out_dir={run}"])  # fmt: skip
    train(cfg, explicit, log=lambda *_: None)
    ck = sorted((run / "checkpoints").iterdir())[-1]

    trunc = root / "trunc_run"  # a run whose only checkpoint has its weights cut in half
    shutil.copytree(run, trunc)
    weights = trunc / "checkpoints" / ck.name / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    nomf = root / "no_manifest"  # a checkpoint directory without its manifest
    shutil.copytree(ck, nomf)
    (nomf / "manifest.json").unlink()
    foreign = root / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("not a run\n")

    bad_ids = root / "bad_ids_ds"  # a dataset whose shards hold ids its tokenizer does not have
    shutil.copytree(ds, bad_ids)
    for shard in bad_ids.glob("*.bin"):
        np.full(shard.stat().st_size // 2, 1000, dtype=np.uint16).tofile(shard)

    texts = root / "inputs"
    texts.mkdir()
    (texts / "empty.txt").write_text("")
    (texts / "empty.bin").write_bytes(b"")
    (texts / "tiny.txt").write_text("A corpus of one short sentence.\n")
    (texts / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    np.arange(0, 1000, dtype=np.uint16).tofile(texts / "foreign_ids.bin")
    tiny_ds = root / "tiny_ds"
    tiny_cfg = PrepareConfig(out_dir=tiny_ds, sources=(), inputs=[texts / "tiny.txt"], vocab_size=300)
    prepare(tiny_cfg, log=lambda *_: None)

    outs = root / "existing"  # outputs that already exist
    (outs / "eval").mkdir(parents=True)
    (outs / "eval" / "eval.md").write_text("an earlier evaluation\n")
    (outs / "export").mkdir()
    (outs / "export" / "keep.txt").write_text("keep\n")
    return SimpleNamespace(root=root, ds=ds, run=run, ck=ck, trunc=trunc, nomf=nomf, foreign=foreign,
                           bad_ids=bad_ids, texts=texts, tiny_ds=tiny_ds, outs=outs)  # fmt: skip


@dataclass
class Case:
    id: str
    args: object  # (w, scratch) -> argv after `ponderlm`
    message: str  # what stderr must contain (the stable part of the message)


def _train(*extra):
    return ["train", *TINY, *extra]


CASES = [
    Case("invalid_value_lr", lambda w, s: _train("train.lr=-1", f"train.out_dir={s / 'run'}"),
         "train.lr must be > 0, got -1.0"),
    Case("invalid_value_method", lambda w, s: _train("model.method=foo", f"train.out_dir={s / 'run'}"),
         "method must be one of ('vanilla', 'pause', 'loop', 'ponderlm1', 'ponderlm2', 'ponderlm3'), got 'foo'"),
    Case("missing_checkpoint", lambda w, s: ["eval", "--checkpoint", str(s / "nope"), "--tasks", "val"],
         "no such checkpoint or run directory"),
    Case("truncated_weights", lambda w, s: ["eval", "--checkpoint", str(w.trunc), "--tasks", "val",
                                            "--out", str(s / "eval")],
         "no complete checkpoint in this run (newest: "),
    Case("truncated_weights_generate", lambda w, s: ["generate", "--checkpoint", str(w.trunc), "--prompt", "The"],
         "model.safetensors is corrupt (checksum mismatch)"),
    Case("missing_manifest", lambda w, s: ["generate", "--checkpoint", str(w.nomf), "--prompt", "The"],
         "incomplete checkpoint (no manifest.json)"),
    Case("foreign_directory", lambda w, s: ["eval", "--checkpoint", str(w.foreign), "--tasks", "val"],
         "not a ponderlm checkpoint or run directory (no manifest.json, model.safetensors or checkpoints/)"),
    Case("resume_other_method", lambda w, s: _train("model.method=ponderlm2", "model.max_seq_len=32",
                                                    f"train.data_dir={w.ds}", f"train.out_dir={w.run}", "--resume"),
         "--resume with another model config than "),
    Case("resume_other_vocab", lambda w, s: _train("model.vocab_size=512", "model.max_seq_len=32",
                                                   f"train.data_dir={w.ds}", f"train.out_dir={w.run}", "--resume"),
         "model.vocab_size=512 (checkpoint: 448); drop those overrides or choose another train.out_dir"),
    Case("vocab_below_tokenizer", lambda w, s: _train("model.vocab_size=256", f"train.data_dir={w.ds}",
                                                      f"train.out_dir={s / 'run'}"),
         "model.vocab_size 256 < the tokenizer's 400 entries"),
    Case("bin_ids_beyond_tokenizer", lambda w, s: ["data", "prepare", "--input", str(w.texts / "foreign_ids.bin"),
                                                   "--tokenizer", str(w.ds / "tokenizer.json"), "--out", str(s / "d")],
         "token id 999 is outside the tokenizer's 400 entries; pass the tokenizer it was made with"),
    Case("dataset_ids_beyond_tokenizer", lambda w, s: _train(f"train.data_dir={w.bad_ids}",
                                                             f"train.out_dir={s / 'run'}"),
         "token id 1000 is outside the tokenizer's 400 entries (the dataset does not match its tokenizer.json)"),
    Case("empty_corpus", lambda w, s: ["data", "prepare", "--input", str(w.texts / "empty.txt"), "--out",
                                       str(s / "d")],
         "no training text to train a BPE tokenizer on"),
    Case("empty_bin", lambda w, s: ["data", "prepare", "--input", str(w.texts / "empty.bin"), "--tokenizer",
                                    str(w.ds / "tokenizer.json"), "--out", str(s / "d")],
         "empty.bin is empty"),
    Case("corpus_too_small", lambda w, s: _train("train.seq_len=256", f"train.data_dir={w.tiny_ds}",
                                                 f"train.out_dir={s / 'run'}"),
         "is too small for seq_len 256 (a shard needs at least 257); lower train.seq_len or prepare more text"),
    Case("non_utf8_prepare", lambda w, s: ["data", "prepare", "--input", str(w.texts / "latin1.txt"), "--out",
                                           str(s / "d")],
         "is not UTF-8 text (byte 3); convert it first"),
    Case("non_utf8_analyze", lambda w, s: ["analyze", "--checkpoint", str(w.run), "--file",
                                           str(w.texts / "latin1.txt"), "--out", str(s / "a")],
         "is not UTF-8 text (byte 3)"),
    Case("prompt_too_long", lambda w, s: ["generate", "--checkpoint", str(w.run), "--prompt", "the " * 40,
                                          "--max-new-tokens", "4"],
         "exceeds the model's context of 32 tokens; shorten the prompt or ask for fewer tokens"),
    Case("tau_above_one", lambda w, s: ["eval", "--checkpoint", str(w.run), "--tau", "1.5", "--out", str(s / "e")],
         "tau must be in the open interval (0, 1), got 1.5"),
    Case("tau_zero", lambda w, s: ["generate", "--checkpoint", str(w.run), "--prompt", "The", "--tau", "0"],
         "tau must be in the open interval (0, 1), got 0.0"),
    Case("eval_out_exists", lambda w, s: ["eval", "--checkpoint", str(w.run), "--tasks", "val", "--out",
                                          str(w.outs / "eval")],
         "eval.md exists; pass --overwrite to replace it or choose another --out"),
    Case("export_out_exists", lambda w, s: ["export", str(w.run), str(w.outs / "export")],
         "exists; pass --overwrite to replace it or choose another output directory"),
    Case("convert_out_exists", lambda w, s: ["convert", "--from-hf", str(w.foreign), "--out", str(w.outs / "export")],
         "exists; pass --overwrite to replace it or choose another --out"),
    Case("train_into_existing_run", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={w.run}"),
         "already holds a run; pass --resume to continue it or --overwrite to start over"),
    Case("train_overwrite_foreign_dir", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={w.foreign}",
                                                            "--overwrite"),
         "is not empty and is not a ponderlm run (no config.yaml or checkpoints/); choose another train.out_dir"),
]  # fmt: skip

# rows of docs/ERRORS.md run by tests/test_train.py::test_cli_errors_are_one_line, not repeated here
ELSEWHERE = {"unknown_key": "Did you mean: 'd_model'", "mistyped_value": "could not be converted to Float"}


def snapshot(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory under the roots, with file sizes and modification times."""
    out = {}
    for root in roots:
        for p in [root, *root.rglob("*")]:
            st = p.stat()
            out[str(p)] = (st.st_size, st.st_mtime_ns) if p.is_file() else (-1, 0)
    return out


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_error(case, w, tmp_path):
    scratch = tmp_path / "scratch"  # the command's working directory and where new outputs would go
    scratch.mkdir()
    before = snapshot(w.root, scratch)
    r = subprocess.run([sys.executable, "-m", "ponderlm", *case.args(w, scratch)], capture_output=True, text=True,
                       cwd=scratch, timeout=120)  # fmt: skip
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert case.message in lines[0], lines[0]
    if case.args(w, scratch)[0] != "data":  # `data prepare` logs its progress on stdout; nothing else prints
        assert r.stdout == "", r.stdout[-500:]
    assert snapshot(w.root, scratch) == before  # nothing created (no temporaries either), changed or removed


def test_the_table_lists_every_case():
    """docs/ERRORS.md has one row per case, and its message column holds the text each test asserts."""
    rows = {}
    for line in (REPO / "docs" / "ERRORS.md").read_text().splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|", line)
        if m:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[m.group(1)] = line
            assert cells[-1] == "2", line  # the exit status column
    expected = {c.id: c.message for c in CASES} | ELSEWHERE
    assert sorted(rows) == sorted(expected)
    for name, message in expected.items():
        assert message.replace("|", "\\|") in rows[name], (name, message)
    train_tests = (REPO / "tests" / "test_train.py").read_text()
    for message in ELSEWHERE.values():
        assert message in train_tests, message
