"""``ponderlm data synthetic``: documents of controlled difficulty, with a class label per token.

Every token is ``syntax`` (fixed by the format and the counts it prescribes), ``free`` (not
determined by what precedes it: no computation can be sure of it) or ``answer-<d>`` (determined by
what precedes it, after d steps of computation). Two tasks (docs/SYNTHETIC.md gives the grammar and
the rule behind every label):

- ``chains``: episodes of shuffled assignments ``x = y ;`` / ``y = 7 ;`` forming chains, then
  queries ``x ? 7 ;`` whose answer needs h hops (h in 1..H);
- ``modsum``: sums ``4 + 9 + 1 = 4 ;`` mod 10 of n operands (n in 2..N), the answer ``answer-n``.

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

from .loader import TokenShards, eval_windows
from .prepare import (
    FORMAT_VERSION,
    TRAIN,
    VAL,
    ShardWriter,
    build_dataset,
    write_meta,
)
from .sources import DataError
from .tokenizer import EOT, Tokenizer

TASKS = ("chains", "modsum")
GENERATOR_VERSION = 1  # part of the fingerprint: bump when the same options would give other documents
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")  # variable names
DIGITS = tuple("0123456789")
SEP = "|"  # between the episodes of a chains document
VOCAB = (EOT, "<unk>", *DIGITS, *LETTERS, "=", ";", "?", "+", SEP)  # id = position; <unk> only for foreign text
SYNTAX, FREE = "syntax", "free"
# an assignment names at most two new variables, so 12 of them leave >= 4 unused letters for every left side
MAX_ASSIGNMENTS = 12
MAX_OPERANDS = 20
# how the chains grow (probabilities, not rules: every alternative keeps a positive probability); these
# values give queries of each hop count about equally often (H=4, K=12, Q=3: 28/28/24/20 %)
P_PENDING = 0.8  # left side: a referenced, unassigned variable (when there is one) rather than a fresh name
P_JOIN = 0.8  # right side, when the chain goes on: the top of another fragment (when one fits) rather than a fresh name
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
    episodes: int = 5  # episodes per document
    assignments: int = 12  # assignments per episode (K)
    queries: int = 3  # queries per episode (Q), each on its own chain
    max_hops: int = 4  # H: chains hold 1..H assignments; a query needs 1..H hops
    # modsum
    lines: int = 40  # sums per document
    max_operands: int = 6  # N: a sum has 2..N operands
    shard_tokens: int = 50_000_000
    overwrite: bool = False

    def check(self) -> None:
        """Refuse impossible settings before anything is written; messages name the CLI options."""
        if self.task not in TASKS:
            raise DataError(f"unknown --task {self.task!r}; choose {' or '.join(TASKS)}")
        at_least = [("--train-docs", self.train_docs, 1), ("--val-docs", self.val_docs, 1),
                    ("--shard-tokens", self.shard_tokens, 1024)]  # fmt: skip
        if self.task == "chains":
            at_least += [("--episodes", self.episodes, 1), ("--queries", self.queries, 1),
                         ("--max-hops", self.max_hops, 1)]  # fmt: skip
        else:
            at_least += [("--lines", self.lines, 1), ("--max-operands", self.max_operands, 2)]
        for option, value, lo in at_least:
            if value < lo:
                raise DataError(f"{option} must be >= {lo}, got {value}")
        if self.task == "chains" and not self.max_hops + self.queries <= self.assignments <= MAX_ASSIGNMENTS:
            lo = self.max_hops + self.queries  # a chain of H assignments and Q more chains to query
            raise DataError(
                f"--assignments must be in [--max-hops + --queries, {MAX_ASSIGNMENTS}] = [{lo}, {MAX_ASSIGNMENTS}] for "
                f"--max-hops {self.max_hops} --queries {self.queries}, got {self.assignments}"
            )
        if self.task == "modsum" and self.max_operands > MAX_OPERANDS:
            raise DataError(f"--max-operands must be <= {MAX_OPERANDS}, got {self.max_operands}")

    def options(self) -> dict:
        """The settings that decide the documents of this task."""
        chains = ("episodes", "assignments", "queries", "max_hops")
        return {k: getattr(self, k) for k in (chains if self.task == "chains" else ("lines", "max_operands"))}

    def classes(self) -> list[str]:
        """Class names; a label shard holds indices into this list."""
        lo, hi = (1, self.max_hops) if self.task == "chains" else (2, self.max_operands)
        return [SYNTAX, FREE, *(f"answer-{d}" for d in range(lo, hi + 1))]

    def fingerprint(self) -> str:
        key = dict(v=FORMAT_VERSION, generator=GENERATOR_VERSION, task=self.task, seed=self.seed,
                   docs=[self.train_docs, self.val_docs], options=self.options(), shard=self.shard_tokens)  # fmt: skip
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------ chains
class _Episode:
    """The assignments of one chains episode, drawn one at a time so that what may come next is
    explicit: the left side is a referenced variable not yet assigned or a fresh name (always >= 4
    of those); the right side is a digit (always allowed: the chain may end here), a fresh name, or
    the top of another fragment, keeping every chain at most H variables long. A reference left
    unassigned is a dead end, never queried."""

    def __init__(self, rng: random.Random, H: int) -> None:
        self.rng, self.H = rng, H
        self.unseen = list(LETTERS)
        self.value: dict[str, str] = {}  # assigned variable -> its right side (a variable or a digit)
        self.parent: dict[str, str] = {}  # referenced variable -> the variable assigned to it
        self.pending: dict[str, None] = {}  # referenced, not yet assigned (dicts: ordered sets, for determinism)
        self.tops: dict[str, None] = {}  # assigned, not referenced: where a fragment may grow upwards
        self.digits: list[str] = []  # the digits ending the chains, in the order they were written

    def fresh(self) -> str:
        return self.unseen.pop(self.rng.randrange(len(self.unseen)))

    def below(self, t: str) -> int:
        """Variables from ``t`` down to the bottom of its fragment."""
        n, v = 1, self.value.get(t)
        while v is not None and not v.isdigit():
            n, v = n + 1, self.value.get(v)
        return n

    def left(self) -> str:
        x = self.rng.choice(list(self.pending)) if self.pending and self.rng.random() < P_PENDING else self.fresh()
        self.pending.pop(x, None)
        return x

    def right(self, x: str, end_chain: bool) -> str:
        """Draw and record the right side of ``x = ...``; ``end_chain`` forces a digit."""
        top, m = x, 1  # the top of x's fragment and x's depth in it
        while top in self.parent:
            top, m = self.parent[top], m + 1
        if end_chain or self.rng.random() * (self.H - m + 1) < 1:  # chain lengths spread over m..H
            first = self.digits[0] if len(self.digits) == 1 else None  # two chains at least end differently
            rhs = self.rng.choice([d for d in DIGITS if d != first])
            self.digits.append(rhs)
        else:
            joinable = [t for t in self.tops if t != top and m + self.below(t) <= self.H]
            rhs = self.rng.choice(joinable) if joinable and self.rng.random() < P_JOIN else self.fresh()
            if rhs in self.tops:
                del self.tops[rhs]
            else:
                self.pending[rhs] = None
            self.parent[rhs] = x
        self.value[x] = rhs
        if x not in self.parent:
            self.tops[x] = None
        return rhs

    def chains(self) -> list[list[str]]:
        """The chains ending in a digit, each listed upwards from the variable assigned the digit (1 hop)."""
        out = []
        for v, rhs in self.value.items():
            if rhs.isdigit():
                chain = [v]
                while chain[-1] in self.parent:
                    chain.append(self.parent[chain[-1]])
                out.append(chain)
        return out


def _chains_episode(rng: random.Random, K: int, Q: int, H: int, sym: list[str], lab: list[str]) -> None:
    """Append one episode: K assignments (Q + 1 chains at least end in a digit), then Q queries,
    each on another of those chains, its hop count h uniform in 1..H among those they offer."""
    ep = _Episode(rng, H)
    for i in range(K):
        x = ep.left()
        rhs = ep.right(x, end_chain=Q + 1 - len(ep.digits) >= K - i)  # the last slots make the chains queries need
        sym += (x, "=", rhs, ";")
        lab += (FREE, SYNTAX, FREE, SYNTAX)
    chains = ep.chains()
    unasked = list(range(len(chains)))
    for _ in range(Q):
        while True:
            h = rng.randint(1, H)
            picks = [c for c in unasked if len(chains[c]) >= h]
            if picks:
                break
        c = rng.choice(picks)
        unasked.remove(c)
        sym += (chains[c][h - 1], "?", ep.value[chains[c][0]], ";")
        lab += (FREE, SYNTAX, f"answer-{h}", SYNTAX)


def _chains_document(rng: random.Random, cfg: SyntheticConfig) -> tuple[list[str], list[str]]:
    sym: list[str] = []
    lab: list[str] = []
    for e in range(cfg.episodes):
        if e:
            sym.append(SEP)
            lab.append(SYNTAX)
        _chains_episode(rng, cfg.assignments, cfg.queries, cfg.max_hops, sym, lab)
    return sym, lab


# ------------------------------------------------------------------ modsum
def _modsum_document(rng: random.Random, cfg: SyntheticConfig) -> tuple[list[str], list[str]]:
    """``lines`` sums ``a + b (+ ...) = s ;`` of n uniform in 2..N digits, s their sum mod 10.
    The sign after operand k is ``+`` for k = 1 (n >= 2) and ``=`` for k = N: syntax; between, it
    says whether the sum goes on: free."""
    N = cfg.max_operands
    sym: list[str] = []
    lab: list[str] = []
    for _ in range(cfg.lines):
        n = rng.randint(2, N)
        ops = [rng.randrange(10) for _ in range(n)]
        for k, a in enumerate(ops, 1):
            sym += (DIGITS[a], "+" if k < n else "=")
            lab += (FREE, SYNTAX if k in (1, N) else FREE)
        sym += (DIGITS[sum(ops) % 10], ";")
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
