"""Inputs too large or odd: the cases of the table "Inputs too large or odd" in docs/ERRORS.md (run
by ``check_case``: one-line error, exit 2, nothing on disk changed), and the long texts that are
handled rather than refused (``analyze`` and ``generate`` tokenize only what the context can use).

Config sizes, a checkpoint's model_config.json and manifest.json, an export's config.json,
tokenizer files and texts each get a bound from their size or from the memory they would need
(``ponderlm/limits.py``); beyond it the command refuses before reading or allocating.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from errorcases import Case, build_world, check_case, run_cli
from errorcases import train_args as _train


@pytest.fixture(scope="module")
def w(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("errors_limits"))


# ------------------------------------------------------------------ broken checkpoints, built in a case's scratch dir
def edited_checkpoint(edit):
    """A setup: the world's checkpoint copied to SCRATCH/ck, ``edit(ck)`` applied, and its manifest
    rewritten to match (so the checks after the checksums are reached)."""

    def setup(w, s):
        ck = s / "ck"
        shutil.copytree(w.ck, ck)
        edit(ck)
        mf = json.loads((ck / "manifest.json").read_text())
        mf["files"] = {n: hashlib.sha256((ck / n).read_bytes()).hexdigest() for n in mf["files"]}
        (ck / "manifest.json").write_text(json.dumps(mf))

    return setup


def set_model_config(**changes):
    def edit(ck):
        cfg = json.loads((ck / "model_config.json").read_text())
        (ck / "model_config.json").write_text(json.dumps({**cfg, **changes}))

    return edit


def sparse(path: Path, size: int) -> None:
    """A file of ``size`` zero bytes that takes no disk space."""
    with open(path, "ab") as f:
        f.truncate(size)


def write(name: str, data: bytes | str):
    def edit(ck):
        p = ck / name
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)

    return edit


def more_tokens(ck):
    """The checkpoint's tokenizer with 100 tokens added: 500 entries for a model of 448."""
    from tokenizers import Tokenizer

    tk = Tokenizer.from_file(str(ck / "tokenizer.json"))
    tk.add_tokens([f"extra{i}" for i in range(100)])
    tk.save(str(ck / "tokenizer.json"))


def safetensors_header(header: bytes, length: int | None = None) -> bytes:
    return struct.pack("<Q", len(header) if length is None else length) + header


def huge_export(w, s):
    """A directory that says it is a ponderlm export whose model has a width of a million."""
    (s / "hf").mkdir()
    ponder = {**json.loads((w.ck / "model_config.json").read_text()), "d_model": 1_000_000}
    (s / "hf" / "config.json").write_text(json.dumps({"model_type": "ponderlm", "ponder": ponder}))


def big_file(name: str, size: int):
    def setup(w, s):
        sparse(s / name, size)

    return setup


GENERATE = ["generate", "--prompt", "The", "--max-new-tokens", "2"]

CASES = [
    Case("train_model_too_big", lambda w, s: _train("model.d_model=1000000", f"train.data_dir={w.ds}",
                                                    f"train.out_dir={s / 'run'}"),
         "training this config needs at least 64.0 TB of memory (weights 16.0 TB, gradients and AdamW state 48.0 TB"),
    Case("train_batch_too_big", lambda w, s: _train("train.batch_size=1000000000", f"train.data_dir={w.ds}",
                                                    f"train.out_dir={s / 'run'}"),
         "activations of a micro-batch of 1000000000 x 32 tokens"),
    Case("train_max_seq_len_overflow", lambda w, s: _train("model.max_seq_len=100000000000000000000",
                                                           f"train.data_dir={w.ds}", f"train.out_dir={s / 'run'}"),
         "model.max_seq_len=100000000000000000000"),
    Case("train_jacobi_iters_huge", lambda w, s: _train("model.jacobi_iters=1000000000000", f"train.out_dir={s / 'r'}"),
         "jacobi_iters and jacobi_train_iters must be at most max_seq_len x (K+1) = 3072 (the passes reach the "
         "recurrence exactly within one per slot of a sequence), got 1000000000000"),
    Case("train_threads_huge", lambda w, s: _train("train.threads=1000000000", f"train.out_dir={s / 'r'}"),
         "train.threads must be in [0, 4096], got 1000000000"),
    Case("train_dist_timeout_huge", lambda w, s: _train("train.dist_timeout_s=100000000000000000000",
                                                        f"train.out_dir={s / 'r'}"),
         "train.dist_timeout_s must be <= 31536000 (a year), got 100000000000000000000"),
    Case("threads_huge", lambda w, s: [*GENERATE[:1], "--checkpoint", str(w.run), *GENERATE[1:], "--threads",
                                       "1000000000"],
         "argument --threads: must be an integer in [1, 4096], got 1000000000 (see `ponderlm generate --help`)"),
    Case("train_config_nested", lambda w, s: ["train", "--config", str(s / "c.yaml"), f"train.out_dir={s / 'r'}"],
         "c.yaml: not valid YAML (nested too deeply)",
         setup=lambda w, s: (s / "c.yaml").write_text("model: " + "[" * 100_000 + "]" * 100_000 + "\n")),
    Case("train_config_huge_file", lambda w, s: ["train", "--config", str(s / "c.yaml"), f"train.out_dir={s / 'r'}"],
         "c.yaml is 20.0 MB, larger than any config file (ponderlm reads at most 16.8 MB)",
         setup=big_file("c.yaml", 20_000_000)),
    Case("train_overwrite_dir_with_nested_config", lambda w, s: _train(f"train.data_dir={w.ds}",
                                                                       f"train.out_dir={s / 'd'}", "--overwrite"),
         "is not a run made by ponderlm; ponderlm replaces only what it made: choose another train.out_dir",
         setup=lambda w, s: ((s / "d").mkdir(), (s / "d" / "config.yaml").write_text("[" * 100_000))),
    Case("eval_jacobi_iters_huge", lambda w, s: ["eval", "--checkpoint", str(w.run), "--tasks", "val",
                                                 "--jacobi-iters", "1000000000000", "--out", str(s / "e")],
         "--jacobi-iters must be at most max_seq_len x (K+1) = 96 for this model (the passes reach the recurrence "
         "within one per slot), got 1000000000000"),
    Case("checkpoint_model_too_big", lambda w, s: ["generate", "--checkpoint", str(s / "ck"), *GENERATE[1:]],
         "the model of model_config.json needs at least 16.0 TB of memory for its weights (4,001,094,000,003 "
         "parameters; vocab_size=448, d_model=1000000",
         setup=edited_checkpoint(set_model_config(d_model=1_000_000))),
    Case("checkpoint_config_wrong_type", lambda w, s: ["generate", "--checkpoint", str(s / "ck"), *GENERATE[1:]],
         "invalid model_config.json (max_seq_len must be an integer >= 1, got 'long')",
         setup=edited_checkpoint(set_model_config(max_seq_len="long"))),
    Case("checkpoint_config_nested", lambda w, s: ["eval", "--checkpoint", str(s / "ck"), "--out", str(s / "e")],
         "invalid model_config.json (JSON nested too deeply)",
         setup=edited_checkpoint(write("model_config.json", "[" * 100_000 + "]" * 100_000))),
    Case("checkpoint_config_huge_file", lambda w, s: ["generate", "--checkpoint", str(s / "ck"), *GENERATE[1:]],
         "model_config.json is 20.0 MB, larger than any model_config.json (ponderlm reads at most 16.8 MB))",
         setup=edited_checkpoint(lambda ck: sparse(ck / "model_config.json", 20_000_000))),
    Case("checkpoint_manifest_huge_file", lambda w, s: ["generate", "--checkpoint", str(s / "ck"), *GENERATE[1:]],
         "unreadable manifest.json (",
         setup=lambda w, s: (shutil.copytree(w.ck, s / "ck"), sparse(s / "ck" / "manifest.json", 20_000_000))),
    Case("checkpoint_manifest_files_a_list", lambda w, s: ["generate", "--checkpoint", str(s / "ck"), *GENERATE[1:]],
         ": unreadable manifest.json",
         setup=lambda w, s: (shutil.copytree(w.ck, s / "ck"),
                             (s / "ck" / "manifest.json").write_text('{"files": ["model.safetensors"]}'))),
    Case("checkpoint_safetensors_header_huge", lambda w, s: ["generate", "--checkpoint", str(s / "ck"), *GENERATE[1:]],
         "model.safetensors is not a readable safetensors file (Error while deserializing header: header too large)",
         setup=edited_checkpoint(write("model.safetensors", safetensors_header(b"{}", 2**60)))),
    Case("checkpoint_safetensors_tensor_huge", lambda w, s: ["generate", "--checkpoint", str(s / "ck"),
                                                             *GENERATE[1:]],
         "model.safetensors is not a readable safetensors file (Error while deserializing header: ",
         setup=edited_checkpoint(write("model.safetensors", safetensors_header(json.dumps(
             {"norm.weight": {"dtype": "F32", "shape": [100_000, 100_000], "data_offsets": [0, 4 * 10**10]}}
         ).encode()) + bytes(64)))),
    Case("checkpoint_tokenizer_beyond_model", lambda w, s: ["generate", "--checkpoint", str(s / "ck"),
                                                            *GENERATE[1:]],
         "tokenizer.json has 500 entries, more than the model's vocab_size 448 (ids beyond it have no embedding); "
         "it is not this model's tokenizer",
         setup=edited_checkpoint(more_tokens)),
    Case("checkpoint_tokenizer_huge_file", lambda w, s: ["analyze", "--checkpoint", str(s / "ck"), "--out",
                                                         str(s / "a")],
         "tokenizer.json is 300.0 MB, larger than any tokenizer file (ponderlm reads at most 268.4 MB)",
         setup=edited_checkpoint(lambda ck: sparse(ck / "tokenizer.json", 300_000_000))),
    Case("export_model_too_big", lambda w, s: ["generate", "--checkpoint", str(s / "hf"), *GENERATE[1:]],
         ": the model of config.json needs at least 16.0 TB of memory for its weights (4,001,094,000,003 "
         "parameters; ponder.vocab_size=448, ponder.d_model=1000000",
         setup=huge_export),
    Case("analyze_file_too_large", lambda w, s: ["analyze", "--checkpoint", str(w.run), "--file", str(s / "big.txt"),
                                                 "--out", str(s / "a")],
         "big.txt is 70.0 MB, larger than any text ponderlm shows (ponderlm reads at most 67.1 MB); only the first "
         "max_seq_len tokens are used: pass the file's beginning (e.g. head -c 1000000 FILE)",
         setup=big_file("big.txt", 70_000_000)),
    Case("generate_prompt_huge", lambda w, s: ["generate", "--checkpoint", str(w.run), "--prompt", "the " * 5_000_000,
                                               "--max-new-tokens", "4"],
         "prompt (more than 32 tokens) + --max-new-tokens (4) exceeds the model's context of 32 tokens"),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_limit_error(case, w, tmp_path):
    r = check_case(case, w, tmp_path)
    assert r.returncode == case.exit and case.message in r.stderr


# ------------------------------------------------------------------ handled, not refused
def test_analyze_shows_the_beginning_of_a_long_text(w, tmp_path):
    """A 20 MB --text is analyzed as its first max_seq_len tokens (the note says there are more),
    the same tokens as the whole text's encoding begins with."""
    from ponderlm.data.tokenizer import Tokenizer

    text = "The quick brown fox jumps over the lazy dog. " * 450_000
    r = run_cli(["analyze", "--checkpoint", str(w.run), "--text", text, "--out", str(tmp_path / "a")], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: the text has more than 32 tokens; showing the first 32 (max_seq_len)" in r.stdout
    shown = json.loads((tmp_path / "a" / "analysis.json").read_text())["text"]
    assert shown["truncated"] and shown["tokens"] == 32
    tok = Tokenizer.load(w.ck / "tokenizer.json")
    assert [t["token"] for t in shown["per_token"]] == [tok.decode([i]) for i in tok.encode(text[:5000])[:32]]


def test_analyze_of_a_50mb_file_stays_small(w, tmp_path):
    """The peak memory of `analyze --file` on 50 MB of text: it was 9.4 GB (the whole text tokenized,
    139 s); now the file's bytes and a context's worth of tokens (about 0.4 GB, as for a short text)."""
    big = tmp_path / "big.txt"
    line = "the quick brown fox jumps over a lazy dog and then some more words.\n"
    big.write_text(line * (50_000_000 // len(line)))
    # VmHWM, the peak of this process's own memory map: ru_maxrss would keep the forking pytest's RSS
    # across exec (Linux folds the old map's peak into it), which after a long suite is over 1 GB
    code = ("import re, sys; from ponderlm.cli.main import main; rc = main(sys.argv[1:]); "
            "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1); "
            "print('maxrss_kb', hwm, file=sys.stderr); sys.exit(rc)")  # fmt: skip
    argv = ["analyze", "--checkpoint", str(w.run), "--file", str(big), "--windows", "2", "--out", str(tmp_path / "a")]
    r = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    peak_kb = int(r.stderr.split("maxrss_kb")[-1].split()[0])
    assert peak_kb < 1_200_000, peak_kb  # under 1.2 GB (50 MB of text as a str, torch, the model)
