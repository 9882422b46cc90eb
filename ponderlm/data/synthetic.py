"""``ponderlm data synthetic``: documents of controlled difficulty, with a class label per token.

Every token is ``syntax`` (fixed by the format and the counts it prescribes), ``free`` (not
determined by what precedes it: no computation can be sure of it) or ``answer-<d>`` (determined by
what precedes it, after d steps of computation). Two tasks (docs/SYNTHETIC.md gives the grammar and
the rule behind every label):

- ``chains``: episodes of shuffled assignments ``x = y ;`` / ``y = 7 ;`` forming chains, then
  queries ``x ? 7 ;`` whose answer needs h hops (h in 1..H);
- ``modsum``: sums ``4 + 9 + 1 = 4 ;`` mod M (10 by default) of n operands (n in 2..N), the
  answer ``answer-n``.

The result is an ordinary dataset directory (the meta.json, tokenizer.json and token shards
``data prepare`` writes, built the same way: under a lock, in a hidden sibling renamed into place)
plus one uint8 label shard per token shard, ``{split}_labels_{i:03d}.bin``, listed under the
optional ``labels`` key of meta.json. :class:`LabelShards` reads them exactly as
:class:`~ponderlm.data.TokenShards` reads tokens. Generation is seeded per document: the same
options give byte-identical shards, and document i does not depend on how many are made.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from ponderlm.data.batches import TokenShards, eval_windows
from ponderlm.data.build import build_dataset, write_meta
from ponderlm.data.dataset import FORMAT_VERSION, TRAIN, VAL
from ponderlm.data.shards import ShardWriter
from ponderlm.data.tokenizer import EOT, Tokenizer
from ponderlm.errors import DataError

TASKS = ("chains", "modsum")
GENERATOR_VERSION = 2  # part of the fingerprint: bump when the same options would give other documents
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")  # variable names
DIGITS = tuple("0123456789")
SEP = "|"  # between the episodes of a chains document
VOCAB = (EOT, "<unk>", *DIGITS, *LETTERS, "=", ";", "?", "+", SEP)  # id = position; <unk> only for foreign text
SYNTAX, FREE = "syntax", "free"
MAX_VARIABLES = 24  # of an episode: >= 2 letters stay unused, so a fresh left side is never forced
MAX_CHAINS = 8  # each ends in its own digit: >= 3 digits stay possible for the last one
MAX_OPERANDS = 20
_CHUNK = 1000  # documents generated and written at a time


@dataclass
class SyntheticConfig:
    """What ``ponderlm data synthetic`` makes (the fields are its options)."""

    task: str = "chains"  # "chains" or "modsum"
    out_dir: Path = Path("data/chains")
    seed: int = 0
    train_docs: int = 10_000
    val_docs: int = 200
    # chains
    episodes: int = 3  # episodes per document
    chains: int = 4  # C: chains per episode, each ending in its own digit
    max_hops: int = 3  # H: variables per chain; a query needs 1..H look-ups
    queries: int = 6  # Q: queries per episode, each of a variable not asked before
    # modsum
    lines: int = 40  # sums per document
    max_operands: int = 6  # N: a sum has 2..N operands
    modulus: int = 10  # M: operands are digits 0..M-1, the answer their sum mod M
    shard_tokens: int = 50_000_000
    overwrite: bool = False

    def check(self) -> None:
        """Refuse impossible settings before anything is written; messages name the CLI options."""
        if self.task not in TASKS:
            raise DataError(f"unknown --task {self.task!r}; choose {' or '.join(TASKS)}")
        at_least = [("--train-docs", self.train_docs, 1), ("--val-docs", self.val_docs, 1),
                    ("--shard-tokens", self.shard_tokens, 1024)]  # fmt: skip
        if self.task == "chains":
            at_least += [("--episodes", self.episodes, 1), ("--chains", self.chains, 2),
                         ("--max-hops", self.max_hops, 1), ("--queries", self.queries, 1)]  # fmt: skip
        else:
            at_least += [("--lines", self.lines, 1), ("--max-operands", self.max_operands, 2),
                         ("--modulus", self.modulus, 2)]  # fmt: skip
        for option, value, lo in at_least:
            if value < lo:
                raise DataError(f"{option} must be >= {lo}, got {value}")
        if self.task == "chains":
            if self.chains > MAX_CHAINS:
                raise DataError(
                    f"--chains must be <= {MAX_CHAINS} (each chain ends in its own digit), got {self.chains}"
                )
            if self.chains * self.max_hops > MAX_VARIABLES:
                raise DataError(f"--chains x --max-hops must be <= {MAX_VARIABLES} (single-letter variables), got "
                                f"{self.chains} x {self.max_hops} = {self.chains * self.max_hops}")  # fmt: skip
            if self.queries >= self.chains * self.max_hops:
                raise DataError(f"--queries must be < --chains x --max-hops = {self.chains * self.max_hops} (the last "
                                f"query still has two variables to choose from), got {self.queries}")  # fmt: skip
        if self.task == "modsum" and self.max_operands > MAX_OPERANDS:
            raise DataError(f"--max-operands must be <= {MAX_OPERANDS}, got {self.max_operands}")
        if self.task == "modsum" and self.modulus > len(DIGITS):
            raise DataError(f"--modulus must be <= {len(DIGITS)} (answers are single digits), got {self.modulus}")

    def options(self) -> dict:
        """The settings that decide the documents of this task."""
        chains = ("episodes", "chains", "max_hops", "queries")
        return {
            k: getattr(self, k) for k in (chains if self.task == "chains" else ("lines", "max_operands", "modulus"))
        }

    def classes(self) -> list[str]:
        """Class names; a label shard holds indices into this list."""
        lo, hi = (1, self.max_hops) if self.task == "chains" else (2, self.max_operands)
        return [SYNTAX, FREE, *(f"answer-{d}" for d in range(lo, hi + 1))]

    def fingerprint(self) -> str:
        key = dict(v=FORMAT_VERSION, generator=GENERATOR_VERSION, task=self.task, seed=self.seed,
                   docs=[self.train_docs, self.val_docs], options=self.options(), shard=self.shard_tokens)  # fmt: skip
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ chains
def _fragments(value: dict[str, str]) -> list[tuple[int, bool]]:
    """The pieces the assignments ``value`` (variable -> variable or digit) have built so far, as
    (variables, ends in a digit): each runs from a variable nothing refers to down to a digit or to a
    variable not assigned yet (counted)."""
    referenced = {v for v in value.values() if not v.isdigit()}
    out = []
    for top in value:
        if top in referenced:
            continue
        n, v = 1, value[top]
        while not v.isdigit() and v in value:
            n, v = n + 1, value[v]
        out.append((n + (not v.isdigit()), v.isdigit()))
    return out


def _completable(value: dict[str, str], C: int, H: int) -> bool:
    """Whether more assignments can turn ``value`` into an episode: C chains of exactly H variables,
    each ending in its own digit. Fresh letters pad any piece, so this is packing the pieces into C
    chains of capacity H with at most one digit-ended piece (at the bottom) in each."""
    frags = sorted(_fragments(value), reverse=True)
    if any(n > H for n, _ in frags) or sum(d for _, d in frags) > C:
        return False
    room, digit = [H] * C, [False] * C

    def place(i: int) -> bool:
        if i == len(frags):
            return True
        n, d = frags[i]
        seen = set()
        for b in range(C):
            key = (room[b], digit[b])
            if key in seen or room[b] < n or (d and digit[b]):
                continue
            seen.add(key)  # bins alike are tried once
            room[b] -= n
            digit[b] |= d
            if place(i + 1):
                return True
            room[b] += n
            digit[b] = key[1]
        return False

    return place(0)


def _next_assignments(value: dict[str, str], C: int, H: int) -> dict[str, set[str]]:
    """Every left side that may come next, with the right sides it may take (the episode still
    completable). One fresh letter and one unused digit stand for all of them: ``*`` and ``#``."""
    referenced = {v for v in value.values() if not v.isdigit()}
    pending = sorted(referenced - set(value))
    tops = [t for t in value if t not in referenced]
    parents = {v: u for u, v in value.items()}
    out: dict[str, set[str]] = {}
    for x in [*pending, "*"]:
        lhs = "\x00" if x == "*" else x  # a fresh letter: a name no letter can clash with
        options = {"#", "*", *tops}
        if x != "*":  # x's own piece cannot be joined under x (a cycle)
            top = x
            while top in parents:
                top = parents[top]
            options.discard(top)
        # a (C+1)-th digit makes C+1 digit-ended pieces, which _completable refuses
        ok = {r for r in options if _completable({**value, lhs: {"#": "0", "*": "\x01"}.get(r, r)}, C, H)}
        if ok:
            out[x] = ok
    return out


def _chains_episode(rng: random.Random, C: int, H: int, Q: int, sym: list[str], lab: list[str]) -> None:
    """Append one episode: C chains of H variables each ending in its own digit, their C * H
    assignments in a random order, then Q queries of distinct variables. A query's hop count h is
    the number of look-ups that reach a digit, earlier queries counting as assignments; h is drawn
    uniform among the counts the unasked variables offer. Assignment tokens are ``free`` when the
    episode could go on with another symbol there, ``syntax`` when the counts force it."""
    letters = rng.sample(LETTERS, C * H)
    digits = rng.sample(DIGITS, C)
    chains = [letters[c * H : (c + 1) * H] for c in range(C)]  # chain c from its top down to its digit
    stmts = [
        (v, chain[i + 1] if i + 1 < H else digits[c]) for c, chain in enumerate(chains) for i, v in enumerate(chain)
    ]
    rng.shuffle(stmts)
    value: dict[str, str] = {}
    for x, rhs in stmts:
        nxt = _next_assignments(value, C, H)
        lhs_free = len(nxt) > 1 or "*" in nxt
        key = x if x in nxt else "*"
        rights = nxt[key]
        rhs_free = len(rights) > 1 or bool(rights & {"#", "*"})  # a fresh letter or unused digit: several
        sym += (x, "=", rhs, ";")
        lab += (FREE if lhs_free else SYNTAX, SYNTAX, FREE if rhs_free else SYNTAX, SYNTAX)
        value[x] = rhs
    answer = {v: digits[c] for c, chain in enumerate(chains) for v in chain}
    asked: set[str] = set()
    for _ in range(Q):
        hops = {v: _hops(v, value, asked) for v in letters if v not in asked}
        offered = sorted(set(hops.values()))
        h = rng.choice(offered)
        v = rng.choice([u for u in letters if hops.get(u) == h])
        asked.add(v)
        sym += (v, "?", answer[v], ";")
        lab += (FREE, SYNTAX, f"answer-{h}", SYNTAX)


def _hops(v: str, value: dict[str, str], asked: set[str]) -> int:
    """Look-ups from ``v`` to a digit: down its chain, stopping early at a variable already queried
    (its query states its digit: one more look-up)."""
    n = 1
    while not value[v].isdigit():
        v = value[v]
        n += 1
        if v in asked:
            return n
    return n


def _chains_document(rng: random.Random, cfg: SyntheticConfig) -> tuple[list[str], list[str]]:
    sym: list[str] = []
    lab: list[str] = []
    for e in range(cfg.episodes):
        if e:
            sym.append(SEP)
            lab.append(SYNTAX)
        _chains_episode(rng, cfg.chains, cfg.max_hops, cfg.queries, sym, lab)
    return sym, lab


# ------------------------------------------------------------------ modsum
def _modsum_document(rng: random.Random, cfg: SyntheticConfig) -> tuple[list[str], list[str]]:
    """``lines`` sums ``a + b (+ ...) = s ;`` of n uniform in 2..N digits (uniform in 0..M-1), s
    their sum mod M. The sign after operand k is ``+`` for k = 1 (n >= 2) and ``=`` for k = N:
    syntax; between, it says whether the sum goes on: free."""
    N, M = cfg.max_operands, cfg.modulus
    sym: list[str] = []
    lab: list[str] = []
    for _ in range(cfg.lines):
        n = rng.randint(2, N)
        ops = [rng.randrange(M) for _ in range(n)]
        for k, a in enumerate(ops, 1):
            sym += (DIGITS[a], "+" if k < n else "=")
            lab += (FREE, SYNTAX if k in (1, N) else FREE)
        sym += (DIGITS[sum(ops) % M], ";")
        lab += (f"answer-{n}", SYNTAX)
    return sym, lab


def generate_documents(cfg: SyntheticConfig, split: str = TRAIN, count: int = 1,
                       start: int = 0) -> list[tuple[list[str], list[str]]]:  # fmt: skip
    """Documents ``start .. start + count - 1`` of ``split``, in memory: (symbols, class names),
    one of each per token. In the shards each document is followed by the end-of-text token
    (class ``syntax``). Document i depends only on (task, options, seed, split, i)."""
    make = _chains_document if cfg.task == "chains" else _modsum_document
    return [make(random.Random(f"ponderlm-synthetic:{cfg.task}:{cfg.seed}:{split}:{i}"), cfg)
            for i in range(start, start + count)]  # fmt: skip


def make_tokenizer() -> Tokenizer:
    """A word-level tokenizer over :data:`VOCAB` (``<|endoftext|>`` = 0), splitting on whitespace:
    a document is its symbols joined by spaces, and decode(ids) encodes back to ids."""
    tk = HFTokenizer(models.WordLevel({s: i for i, s in enumerate(VOCAB)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([EOT])
    return Tokenizer(tk, "wordlevel")


# ------------------------------------------------------------------ writing
def synthesize(cfg: SyntheticConfig, log=print) -> dict:
    """Build (or find up to date) the dataset in cfg.out_dir; returns its meta dict."""
    cfg.check()
    out = Path(cfg.out_dir)
    fp = cfg.fingerprint()
    t0 = time.time()
    meta, built = build_dataset(out, fp, cfg.overwrite, lambda tmp, _: _build(cfg, tmp, fp), log)
    if built:
        log(summary(meta))
        log(f"wrote {out} in {time.time() - t0:.1f}s")
    return meta


def _build(cfg: SyntheticConfig, tmp: Path, fp: str) -> dict:
    """Generate both splits into ``tmp``: token and label shards, tokenizer.json, meta.json and the
    verification cache; returns the meta."""
    classes = cfg.classes()
    class_id = {c: i for i, c in enumerate(classes)}
    token_id = {s: i for i, s in enumerate(VOCAB)}
    splits, label_splits, counts = {}, {}, {}
    for split, n_docs in ((TRAIN, cfg.train_docs), (VAL, cfg.val_docs)):
        tokens = ShardWriter(tmp, split, np.uint16, cfg.shard_tokens)
        labels = ShardWriter(tmp, f"{split}_labels", np.uint8, cfg.shard_tokens)
        per_class = np.zeros(len(classes), dtype=np.int64)
        for start in range(0, n_docs, _CHUNK):
            ids: list[int] = []
            labs: list[int] = []
            for sym, lab in generate_documents(cfg, split, min(_CHUNK, n_docs - start), start):
                ids += [token_id[s] for s in sym]
                ids.append(0)  # <|endoftext|> closes every document, as in `data prepare`
                labs += [class_id[c] for c in lab]
                labs.append(class_id[SYNTAX])
            tokens.write(np.asarray(ids, dtype=np.uint16))
            lab_arr = np.asarray(labs, dtype=np.uint8)
            labels.write(lab_arr)
            per_class += np.bincount(lab_arr, minlength=len(classes))
        shards = tokens.finish()
        splits[split] = {"tokens": sum(s["tokens"] for s in shards), "shards": shards}
        label_splits[split] = {"shards": labels.finish()}
        counts[split] = {"documents": n_docs, "classes": dict(zip(classes, per_class.tolist(), strict=True))}

    labels = {"classes": classes, "dtype": "uint8", "splits": label_splits}
    synthetic = {"task": cfg.task, "seed": cfg.seed, "generator": GENERATOR_VERSION, "options": cfg.options(),
                 "counts": counts}  # counts: documents and tokens of each class, per split  # fmt: skip
    return write_meta(tmp, fp, make_tokenizer(), np.uint16, splits, labels=labels, synthetic=synthetic)


def summary(meta: dict) -> str:
    """Documents, tokens and tokens per class of each split, as a Markdown table."""
    syn = meta["synthetic"]
    classes = meta["labels"]["classes"]
    opts = ", ".join(f"{k}={v}" for k, v in syn["options"].items())
    rows = [f"{syn['task']} ({opts}, seed {syn['seed']})",
            "| split | documents | tokens | " + " | ".join(classes) + " |",
            "|---|" + "---:|" * (2 + len(classes))]  # fmt: skip
    for split, c in syn["counts"].items():
        cells = [f"{c['documents']:,}", f"{meta['splits'][split]['tokens']:,}"]
        cells += [f"{c['classes'][k]:,}" for k in classes]
        rows.append(f"| {split} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ------------------------------------------------------------------ reading labels
class LabelShards(TokenShards):
    """The label shards of one split: ``window(shard, start, length)`` gives the class ids of the
    tokens ``TokenShards(data_dir, split).window(shard, start, length)`` gives, so
    :func:`ponderlm.data.eval_windows` takes the labels of its windows; ``classes`` names them."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        super().__init__(data_dir, split, labels=True)


def load_labels(data_dir: str | Path, split: str) -> tuple[list[str], np.ndarray]:
    """(class names, class id of every token of ``split``), aligned with the split's token shards
    read one after the other."""
    shards = LabelShards(data_dir, split)
    arrays = shards.arrays
    return shards.classes, arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def window_labels(data_dir: Path, meta: dict, split: str, seq_len: int,
                  max_windows: int) -> tuple[list[str], torch.Tensor] | None:  # fmt: skip
    """For a labelled dataset: (class names, the (N, seq_len + 1) class ids of the windows
    ``eval_windows(TokenShards(data_dir, split), seq_len, max_windows)`` takes, row for row);
    None for a dataset without labels."""
    if "labels" not in meta:
        return None
    shards = LabelShards(data_dir, split)
    return shards.classes, eval_windows(shards, seq_len, max_windows)
