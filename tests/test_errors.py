"""Every user mistake in docs/ERRORS.md, run through the real command line: a one-line ``error: ...``
on stderr naming the problem, exit status 2, no traceback, and nothing written, changed or left
behind on disk (no output directory, no temporary file, existing outputs untouched). The harness is
``tests/errorcases.py``; the other ``tests/test_errors_*.py`` modules add their families of cases."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from errorcases import CASE_MODULES, Case, build_world, check_case
from errorcases import train_args as _train

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("errors"))


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
         "empty.txt is empty"),
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
         "is not an evaluation output made by ponderlm; ponderlm replaces only what it made: choose another --out"),
    Case("export_out_exists", lambda w, s: ["export", str(w.run), str(w.outs / "export")],
         "is not a transformers export made by ponderlm; ponderlm replaces only what it made"),
    Case("convert_out_exists", lambda w, s: ["convert", "--from-hf", str(w.foreign), "--out", str(w.outs / "export")],
         "is not a run made by ponderlm; ponderlm replaces only what it made: choose another --out"),
    Case("train_into_existing_run", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={w.run}"),
         "already holds a run; pass --resume to continue it or --overwrite to start over"),
    Case("train_overwrite_foreign_dir", lambda w, s: _train(f"train.data_dir={w.ds}", f"train.out_dir={w.foreign}",
                                                            "--overwrite"),
         "is not a run made by ponderlm; ponderlm replaces only what it made: choose another train.out_dir"),
]  # fmt: skip

# rows of docs/ERRORS.md run by tests/test_train.py::test_cli_errors_are_one_line, not repeated here
ELSEWHERE = {"unknown_key": "Did you mean: 'd_model'", "mistyped_value": "could not be converted to Float"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_user_error(case, w, tmp_path):
    r = check_case(case, w, tmp_path)
    assert r.returncode == case.exit and r.stderr.strip() == r.stderr.strip().splitlines()[0]  # one line


def all_cases() -> list[Case]:
    out = []
    for name in CASE_MODULES:
        out += importlib.import_module(name).CASES
    return out


def test_the_table_lists_every_case():
    """docs/ERRORS.md has one row per case of every tests/test_errors*.py module, and its message
    column holds the text each test asserts."""
    rows = {}
    for line in (REPO / "docs" / "ERRORS.md").read_text().splitlines():
        m = re.match(r"\|\s*`(\w+)`\s*\|", line)
        if m:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert m.group(1) not in rows, f"duplicate row {m.group(1)}"
            rows[m.group(1)] = line
            assert cells[-1].isdigit(), line  # the exit status column
    cases = all_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    expected = {c.id: c.message for c in cases} | ELSEWHERE
    assert sorted(rows) == sorted(expected)
    for name, message in expected.items():
        assert message.replace("|", "\\|") in rows[name], (name, message)
    for c in cases:
        assert rows[c.id].strip().strip("|").split("|")[-1].strip() == str(c.exit), c.id
    train_tests = (REPO / "tests" / "test_train.py").read_text()
    for message in ELSEWHERE.values():
        assert message in train_tests, message
