"""``ponderlm data synthetic``: the generated documents are right (an independent solver parses
their text and recomputes every answer and its difficulty), every token's label follows the
rules of docs/SYNTHETIC.md, generation is seeded, and the result is an ordinary dataset whose
label shards are checked, read and windowed like its token shards."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import replace
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from ponderlm.cli.data import SYNTHETIC_OPTIONS
from ponderlm.data import (
    LabelShards,
    SyntheticConfig,
    Tokenizer,
    TokenShards,
    check_dataset,
    eval_windows,
    generate_documents,
    load_labels,
    load_meta,
    synthesize,
)
from ponderlm.data.dataset import DATASET
from ponderlm.errors import DataError
from ponderlm.owned import why_not_ours

from errorcases import TINY, Case, check_case, run_cli

CHAINS = SyntheticConfig(task="chains", train_docs=60, val_docs=6)
MODSUM = SyntheticConfig(task="modsum", train_docs=60, val_docs=6)
DIGITS = "0123456789"


def quiet(*_) -> None:
    pass


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    out = {}
    for cfg in (CHAINS, MODSUM):
        out[cfg.task] = root / cfg.task
        synthesize(replace(cfg, out_dir=out[cfg.task]), log=quiet)
    return out


# ------------------------------------------------------------ independent solvers
def solve_chains(symbols: list[str], cfg: SyntheticConfig) -> list[str]:
    """The label every token should have, worked out from the text alone. An assignment's side is
    ``free`` when another symbol there would still let the episode be completed (found by trying
    every symbol), a query's answer ``answer-h`` with h the look-ups from the queried variable to a
    digit, earlier queries counting as statements. Asserts the format and the facts the labels rest on."""
    C, H = cfg.chains, cfg.max_hops
    labels: list[str] = []
    episodes = " ".join(symbols).split(" | ")
    assert len(episodes) == cfg.episodes
    for e, text in enumerate(episodes):
        statements = [s.split() for s in text.split(";")]
        assert statements[-1] == [] and all(len(s) == 3 for s in statements[:-1]), text
        statements = statements[:-1]
        assert [s[1] for s in statements] == ["="] * (C * H) + ["?"] * cfg.queries
        if e:
            labels.append("syntax")  # the separator
        value: dict[str, str] = {}
        for lhs, _, rhs in statements[: C * H]:
            lefts = {x for x in LETTERS if x not in value and any(completable({**value, x: r}, C, H) for r in SYMBOLS)}
            rights = {r for r in SYMBOLS if completable({**value, lhs: r}, C, H)}
            assert lhs in lefts and rhs in rights
            labels += [
                "free" if len(lefts) > 1 else "syntax",
                "syntax",
                "free" if len(rights) > 1 else "syntax",
                "syntax",
            ]
            value[lhs] = rhs
        assert completable(value, C, H) and len(value) == C * H  # the episode: C chains of H, own digits
        asked: dict[str, str] = {}
        for var, _, answer in statements[C * H :]:
            assert var in value and var not in asked and len(value) - len(asked) >= 2
            digit, hops = var, 0
            while digit not in DIGITS:  # down the chain; a variable asked earlier: its answer
                digit, hops = asked[digit] if digit in asked else value[digit], hops + 1
            assert answer == digit
            asked[var] = answer
            labels += ["free", "syntax", f"answer-{hops}", "syntax"]
    return labels


LETTERS = "abcdefghijklmnopqrstuvwxyz"
SYMBOLS = "0123456789" + LETTERS


def completable(value: dict[str, str], C: int, H: int) -> bool:
    """Whether assignments ``value`` (each variable once) can be extended into C chains of exactly
    H variables ending in C distinct digits: by search over which chain each piece goes into."""
    refs = [v for v in value.values() if v not in DIGITS]
    digits = [v for v in value.values() if v in DIGITS]
    if len(refs) != len(set(refs)) or len(digits) != len(set(digits)) or len(digits) > C:
        return False
    pieces = []  # (variables, ends in a digit)
    for top in set(value) - set(refs):
        n, v = 1, value[top]
        while v in value:
            n, v = n + 1, value[v]
        pieces.append((n + (v not in DIGITS), v in DIGITS))
    if sum(n for n, _ in pieces) < len(set(value) | set(refs)):
        return False  # a cycle: some variable is on no piece
    return _pack(tuple(sorted(pieces)), tuple([(0, False)] * C), H)


@cache
def _pack(pieces: tuple, chains: tuple, H: int) -> bool:
    if not pieces:
        return True
    (n, d), rest = pieces[-1], pieces[:-1]
    for i, (used, has_digit) in enumerate(chains):
        if used + n <= H and not (d and has_digit):
            nxt = tuple(sorted((*chains[:i], (used + n, has_digit or d), *chains[i + 1 :])))
            if _pack(rest, nxt, H):
                return True
    return False


def solve_modsum(symbols: list[str], cfg: SyntheticConfig) -> list[str]:
    """The label every token should have, from the text alone: each sum recomputed, its operands counted."""
    labels: list[str] = []
    lines = " ".join(symbols).split(" ;")
    assert lines[-1] == "" and len(lines) == cfg.lines + 1
    for line in lines[:-1]:
        left, answer = line.split(" = ")
        operands = left.split(" + ")
        n = len(operands)
        assert 2 <= n <= cfg.max_operands and all(o.strip() in DIGITS[: cfg.modulus] for o in operands)
        assert int(answer) == sum(int(o) for o in operands) % cfg.modulus
        for k in range(1, n + 1):  # operand, then "+" or "="
            labels += ["free", "syntax" if k in (1, cfg.max_operands) else "free"]
        labels += [f"answer-{n}", "syntax"]
    return labels


SOLVE = {"chains": solve_chains, "modsum": solve_modsum}


# ------------------------------------------------------------ the documents
@pytest.mark.parametrize(
    "cfg",
    [CHAINS, MODSUM, replace(CHAINS, max_hops=6, chains=3, queries=5, episodes=2),
     replace(CHAINS, max_hops=1, chains=5, queries=4), replace(CHAINS, max_hops=2, chains=2, queries=3),
     replace(MODSUM, max_operands=2, lines=5), replace(MODSUM, modulus=2)],
    ids=["chains", "modsum", "chains_h6", "chains_h1", "chains_c2", "modsum_n2", "modsum_parity"],
)  # fmt: skip
def test_an_independent_solver_agrees_with_every_answer_and_label(cfg):
    docs = generate_documents(cfg, "train", 40)
    for symbols, labels in docs:
        assert len(symbols) == len(labels)
        assert SOLVE[cfg.task](symbols, cfg) == labels
        for s, c in zip(symbols, labels, strict=True):
            assert s in DIGITS if c.startswith("answer-") else c in ("syntax", "free")
            if s in ("=", ";", "?", "|"):
                assert c == "syntax" or (cfg.task == "modsum" and s == "=")


def test_every_difficulty_occurs():
    for cfg, lo, hi in ((CHAINS, 1, CHAINS.max_hops), (MODSUM, 2, MODSUM.max_operands)):
        seen = Counter(c for _, labels in generate_documents(cfg, "train", 100) for c in labels)
        assert set(seen) == set(cfg.classes()) == {"syntax", "free", *(f"answer-{d}" for d in range(lo, hi + 1))}
        answers = [seen[f"answer-{d}"] for d in range(lo, hi + 1)]
        assert min(answers) > 0.4 * max(answers), answers  # no difficulty is rare


def test_documents_are_seeded_and_independent_of_how_many_are_made():
    a = generate_documents(CHAINS, "train", 5)
    assert a == generate_documents(CHAINS, "train", 5)
    assert a[3] == generate_documents(CHAINS, "train", 1, start=3)[0]
    assert a != generate_documents(replace(CHAINS, seed=1), "train", 5)
    assert a != generate_documents(CHAINS, "val", 5)


# ------------------------------------------------------------ the dataset
def test_the_dataset_is_an_ordinary_dataset_with_aligned_labels(datasets):
    for task, ds in datasets.items():
        meta = check_dataset(ds)
        tok = Tokenizer.load(ds / "tokenizer.json")
        assert tok.eot_id == 0 and meta["tokenizer"]["vocab_size"] == tok.vocab_size < 64
        cfg = CHAINS if task == "chains" else MODSUM
        for split, n_docs in (("train", cfg.train_docs), ("val", cfg.val_docs)):
            tokens = TokenShards(ds, split)
            classes, labels = load_labels(ds, split)
            assert classes == cfg.classes() and len(labels) == tokens.n_tokens
            ids = tokens.window(0, 0, tokens.n_tokens)
            assert tok.encode(tok.decode(ids)) == ids.tolist()  # word-level: decoding round-trips
            docs = generate_documents(cfg, split, n_docs)
            assert tok.decode(ids) == " ".join(" ".join(s) + " <|endoftext|>" for s, _ in docs)
            expected = [c for _, lab in docs for c in [*lab, "syntax"]]  # each document closed by EOT
            assert [classes[i] for i in labels] == expected


def test_label_shards_label_the_evaluation_windows(datasets):
    ds = datasets["chains"]
    tokens, labels = TokenShards(ds, "val"), LabelShards(ds, "val")
    x, y = eval_windows(tokens, 32, 20), eval_windows(labels, 32, 20)
    assert x.shape == y.shape == (20, 33)
    answer = y >= labels.classes.index("answer-1")
    digits = Tokenizer.load(ds / "tokenizer.json").encode(" ".join("0123456789"))
    assert answer.any() and np.isin(x[answer].numpy(), digits).all()
    assert (labels.window(0, 5, 7) == y[0, 5:12].numpy()).all()


def test_same_options_give_the_same_bytes_and_another_seed_other_bytes(datasets, tmp_path):
    synthesize(replace(CHAINS, out_dir=tmp_path / "again"), log=quiet)
    synthesize(replace(CHAINS, out_dir=tmp_path / "seed1", seed=1), log=quiet)
    for name in ("train_000.bin", "train_labels_000.bin", "val_000.bin", "val_labels_000.bin", "tokenizer.json"):
        assert (tmp_path / "again" / name).read_bytes() == (datasets["chains"] / name).read_bytes()
    assert (tmp_path / "seed1" / "train_000.bin").read_bytes() != (tmp_path / "again" / "train_000.bin").read_bytes()


def test_label_shards_follow_the_token_shards_across_shard_boundaries(tmp_path):
    meta = synthesize(replace(MODSUM, out_dir=tmp_path / "d", train_docs=30, shard_tokens=1024), log=quiet)
    shards = meta["splits"]["train"]["shards"]
    assert len(shards) > 3
    labels = LabelShards(tmp_path / "d", "train")
    assert labels.sizes.tolist() == [sh["tokens"] for sh in shards]
    assert [sh["file"] for sh in meta["labels"]["splits"]["train"]["shards"]][:2] == [
        "train_labels_000.bin", "train_labels_001.bin"]  # fmt: skip
    check_dataset(tmp_path / "d")


def test_label_shards_count_as_files_ponderlm_wrote(datasets, tmp_path):
    """A synthetic dataset holds only what ponderlm wrote, so `--overwrite` (of either builder) may
    replace it; a stray file next to its label shards still makes it foreign."""
    ds = copy_of(datasets["modsum"], tmp_path / "d")
    assert why_not_ours(ds, DATASET) is None
    (ds / "notes.txt").write_text("mine")
    assert "notes.txt" in why_not_ours(ds, DATASET)


def test_a_tiny_training_run_works_on_it(datasets, tmp_path):
    from ponderlm.runs.config import load_run_config
    from ponderlm.training.trainer import train

    for task, ds in datasets.items():
        overrides = [*TINY, "model.max_seq_len=32", f"train.data_dir={ds}", f"train.out_dir={tmp_path / task}"]
        cfg, explicit = load_run_config(None, overrides)
        res = train(cfg, explicit, log=quiet)
        assert np.isfinite(res["val"]["loss"])


# ------------------------------------------------------------ damaged and foreign datasets
def copy_of(ds: Path, dest: Path, edit=None) -> Path:
    shutil.copytree(ds, dest)
    if edit is not None:
        meta = json.loads((dest / "meta.json").read_text())
        edit(meta)
        (dest / "meta.json").write_text(json.dumps(meta))
    return dest


@pytest.mark.parametrize(
    "edit,message",
    [(lambda m: m["labels"].update(classes="syntax"), "labels.classes must be a list of 1 to 256 distinct class names"),
     (lambda m: m["labels"].update(classes=["a", "a"]), "labels.classes must be a list of 1 to 256 distinct"),
     (lambda m: m["labels"]["splits"].pop("val"), "labels.splits must be an object with the splits of splits"),
     (lambda m: m["labels"]["splits"]["val"]["shards"].append(m["labels"]["splits"]["val"]["shards"][0]),
      "labels.splits.val has 2 shards for the 1 of splits.val"),
     (lambda m: m["labels"]["splits"]["val"]["shards"][0].update(file="val_000.bin"),
      "labels.splits.val.shards[0].file 'val_000.bin' is listed twice"),
     (lambda m: m["labels"]["splits"]["val"]["shards"][0].update(tokens=7),
      "labels.splits.val.shards[0] has 7 labels for 1314 tokens"),
     (lambda m: m.update(labels=[]), "labels must be an object")],
)  # fmt: skip
def test_a_malformed_labels_entry_is_a_clear_error(datasets, tmp_path, edit, message):
    ds = copy_of(datasets["chains"], tmp_path / "d", edit)
    with pytest.raises(DataError) as e:
        load_meta(ds)
    assert f"d/meta.json: {message}" in str(e.value)


def test_check_dataset_checks_label_shards_like_token_shards(datasets, tmp_path):
    ds = copy_of(datasets["chains"], tmp_path / "d")
    shard = ds / "val_labels_000.bin"
    shard.write_bytes(bytes(reversed(shard.read_bytes())))  # same size, other labels
    with pytest.raises(DataError) as e:
        check_dataset(ds)
    assert "val_labels_000.bin was changed after the dataset was built" in str(e.value)
    assert "rebuild it with `ponderlm data synthetic --out" in str(e.value)
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(DataError) as e:
        check_dataset(ds)
    assert "val_labels_000.bin has 1,313 bytes, meta.json says 1,314 tokens" in str(e.value)


def test_a_dataset_without_labels_says_so(datasets, tmp_path):
    ds = copy_of(datasets["chains"], tmp_path / "d", lambda m: m.pop("labels"))
    check_dataset(ds)  # still a dataset (the label shards are now just extra files)
    with pytest.raises(DataError, match="has no token labels; make a labelled dataset with `ponderlm data synthetic`"):
        LabelShards(ds, "val")


# ------------------------------------------------------------ the command line
def test_cli_writes_a_dataset_and_prints_a_summary(tmp_path):
    r = run_cli(["data", "synthetic", "--task", "modsum", "--out", "d", "--train-docs", "20", "--val-docs", "3",
                 "--max-operands", "4"], tmp_path)  # fmt: skip
    assert r.returncode == 0 and r.stderr == ""
    assert "| train | 20 |" in r.stdout and "answer-4" in r.stdout and "wrote d in" in r.stdout
    assert load_meta(tmp_path / "d")["synthetic"]["options"] == {"lines": 40, "max_operands": 4, "modulus": 10}
    again = run_cli(["data", "synthetic", "--task", "modsum", "--out", "d", "--train-docs", "20", "--val-docs", "3",
                     "--max-operands", "4"], tmp_path)  # fmt: skip
    assert again.returncode == 0 and "up to date" in again.stdout
    other = run_cli(["data", "synthetic", "--task", "chains", "--out", "d", "--train-docs", "5", "--val-docs", "2",
                     "--overwrite"], tmp_path)  # fmt: skip
    assert other.returncode == 0, other.stderr
    assert load_meta(tmp_path / "d")["synthetic"]["task"] == "chains"


def test_cli_defaults_are_the_config_defaults():
    for _task, flag, default, _help in SYNTHETIC_OPTIONS:
        assert getattr(SyntheticConfig(), flag[2:].replace("-", "_")) == default


def small(w, s: Path, *extra: str) -> None:
    synthesize(SyntheticConfig(task="chains", out_dir=s / "d", train_docs=5, val_docs=2), log=quiet)
    if "notes" in extra:
        (s / "d" / "notes.txt").write_text("mine\n")
    if "damage" in extra:
        shard = s / "d" / "train_labels_000.bin"
        shard.write_bytes(bytes(reversed(shard.read_bytes())))


def _syn(*args: str) -> list[str]:
    return ["data", "synthetic", *args]


def _chains(*args: str) -> list[str]:
    return _syn("--task", "chains", "--out", "d", "--train-docs", "5", "--val-docs", "2", *args)


def foreign(w, s: Path) -> None:
    (s / "d").mkdir()
    (s / "d" / "notes.txt").write_text("not a dataset\n")


FOREIGN = "ponderlm replaces only what it made: choose another --out"
CASES = [  # rows of docs/ERRORS.md (tests/errorcases.CASE_MODULES)
    Case("synthetic_unknown_task", lambda w, s: _syn("--task", "sums", "--out", "d"),
         "argument --task: invalid choice: 'sums'"),
    Case("synthetic_no_hops", lambda w, s: _chains("--max-hops", "0"), "--max-hops must be >= 1, got 0"),
    Case("synthetic_no_documents", lambda w, s: _chains("--train-docs", "0"), "--train-docs must be >= 1, got 0"),
    Case("synthetic_no_val_documents", lambda w, s: _chains("--val-docs", "-3"), "--val-docs must be >= 1, got -3"),
    Case("synthetic_modulus_too_big", lambda w, s: _syn("--task", "modsum", "--out", "d", "--modulus", "11"),
         "--modulus must be <= 10 (answers are single digits), got 11"),
    Case("synthetic_one_operand", lambda w, s: _syn("--task", "modsum", "--out", "d", "--max-operands", "1"),
         "--max-operands must be >= 2, got 1"),
    Case("synthetic_too_many_chains", lambda w, s: _chains("--chains", "9", "--max-hops", "2"),
         "--chains must be <= 8 (each chain ends in its own digit), got 9"),
    Case("synthetic_too_many_variables", lambda w, s: _chains("--chains", "5", "--max-hops", "5"),
         "--chains x --max-hops must be <= 24 (single-letter variables), got 5 x 5 = 25"),
    Case("synthetic_too_many_queries", lambda w, s: _chains("--chains", "2", "--max-hops", "2", "--queries", "4"),
         "--queries must be < --chains x --max-hops = 4 (the last query still has two variables to choose from), "
         "got 4"),
    Case("synthetic_option_of_the_other_task", lambda w, s: _chains("--max-operands", "5"),
         "--max-operands applies to --task modsum, not chains"),
    Case("synthetic_not_an_integer", lambda w, s: _chains("--queries", "two"),
         "argument --queries: invalid int value: 'two'"),
    Case("synthetic_out_not_a_dataset", lambda w, s: _chains("--overwrite"),
         f"d is not a dataset made by ponderlm; {FOREIGN}", setup=foreign),
    Case("synthetic_out_is_a_file", lambda w, s: _chains(), "d is a file, not a directory; choose another --out",
         setup=lambda w, s: (s / "d").write_text("x")),
    Case("synthetic_out_other_settings", lambda w, s: _chains("--seed", "3"),
         "d exists; it holds a dataset built with other settings; pass --overwrite to rebuild it or choose another "
         "--out", setup=small),
    Case("synthetic_out_with_user_files", lambda w, s: _chains("--seed", "3", "--overwrite"),
         f"d holds files ponderlm did not write (notes.txt); {FOREIGN}", setup=lambda w, s: small(w, s, "notes")),
    Case("synthetic_damaged_same_settings", lambda w, s: _chains(),
         "d holds this dataset, damaged: d/train_labels_000.bin was changed after the dataset was built (checksum "
         "mismatch with meta.json); pass --overwrite to rebuild it", setup=lambda w, s: small(w, s, "damage")),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_cli_errors_are_one_line_and_change_nothing(case, tmp_path):
    world = tmp_path / "world"
    world.mkdir()
    r = check_case(case, SimpleNamespace(root=world), tmp_path)
    assert r.returncode == 2
