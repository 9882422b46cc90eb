"""``ponderlm data prepare``: documents -> hash split -> tokens -> memmap shards + meta.json.

A dataset is a directory ponderlm owns (:mod:`ponderlm.owned`). Everything the user can get wrong
(settings, sources, inputs, the tokenizer, an output that overlaps an input or is not a dataset)
is checked before the corpus is read; the dataset is then built under a lock on ``--out`` in a
hidden, marked sibling and renamed into place, so a crash, a full disk or a Ctrl-C never leaves a
half-written dataset, a temporary or the previous dataset damaged, and two processes never build
the same one. ``--overwrite`` replaces only a dataset ponderlm made, holding only what it writes.
A second run with the same settings finds ``meta.json`` with the same fingerprint (and the
dataset intact) and does nothing.

A ``--tokenizer FILE`` may lie inside ``--out`` (rebuilding a dataset with its own
``tokenizer.json``): it is read in full before anything is replaced. Inputs and the package
cache may not overlap ``--out``.

:func:`check_dataset` is the check a dataset gets before training: metadata, shard sizes, shard
checksums (cached by file identity in ``.verified.json``) and its tokenizer.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import tarfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..owned import (
    DirectoryLocked,
    DirLock,
    OwnershipError,
    atomic_write,
    building,
    check_disjoint,
    check_replaceable,
    read_marker,
)
from .sources import DEFAULT_SOURCES, SOURCES_BY_NAME, DataError, Document, fetch, read_user_text, user_files
from .tokenizer import MAX_BPE_VOCAB, Tokenizer, interruptible, read_tokenizer_file

FORMAT_VERSION = 1
TRAIN, VAL = "train", "val"
DTYPES = ("uint16", "uint32")
VERIFIED = ".verified.json"  # (file, size, mtime_ns, inode, sha256) of shards whose checksum was verified
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a plain file name inside the dataset
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass
class PrepareConfig:
    out_dir: Path = Path("data/default")
    cache_dir: Path = Path.home() / ".cache" / "ponderlm" / "packages"
    tokenizer: str = "bpe"  # "bpe" (trained on the train split), "neox", or a tokenizer.json path
    vocab_size: int = 8192  # for "bpe"
    sources: tuple[str, ...] = tuple(s.name for s in DEFAULT_SOURCES)  # default-corpus sources
    inputs: list[Path] = field(default_factory=list)  # user .txt/.jsonl/.bin files or directories
    val_fraction: float = 0.01
    shard_tokens: int = 50_000_000
    overwrite: bool = False

    def check(self) -> None:
        """Refuse impossible settings before anything is read or written (no fetch, no lock). The
        messages name the command-line options these fields come from."""
        if not (math.isfinite(self.val_fraction) and 0.0 <= self.val_fraction < 1.0):
            raise DataError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens < 1024:
            raise DataError(f"--shard-tokens must be >= 1024, got {self.shard_tokens}")
        if self.tokenizer == "bpe" and not 257 < self.vocab_size <= MAX_BPE_VOCAB:
            raise DataError(
                f"--vocab-size must be in [258, {MAX_BPE_VOCAB}] for a BPE tokenizer, got {self.vocab_size}"
            )
        tok_file = self.tokenizer_file()
        if tok_file is not None and not tok_file.exists():
            raise DataError(f"--tokenizer {tok_file}: no such file; pass bpe, neox or a tokenizer.json file")
        unknown = [s for s in self.sources if s not in SOURCES_BY_NAME]
        if unknown:
            raise DataError(f"unknown source {unknown[0]!r} in --sources; choose from {', '.join(SOURCES_BY_NAME)}")
        if not self.sources and not self.inputs:
            raise DataError(
                f"nothing to prepare: no --sources and no --input; choose sources from {', '.join(SOURCES_BY_NAME)} "
                "or pass --input FILE"
            )

    def tokenizer_file(self) -> Path | None:
        return None if self.tokenizer in ("bpe", "neox") else Path(self.tokenizer)

    def fingerprint(self) -> str:
        stats = []
        for p in sorted(map(Path, self.inputs)):
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            stats += [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]
        tok_file = self.tokenizer_file()
        key = dict(
            v=FORMAT_VERSION,
            tokenizer=self.tokenizer,
            vocab=self.vocab_size if self.tokenizer == "bpe" else None,
            sources=[SOURCES_BY_NAME[s].spec for s in dict.fromkeys(self.sources)],
            inputs=stats,
            val=self.val_fraction,
            shard=self.shard_tokens,
        )
        if tok_file is not None:  # another tokenizer at the same path is another dataset
            key["tokenizer_sha256"] = hashlib.sha256(tok_file.read_bytes()).hexdigest()
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def assign_split(doc: Document, val_fraction: float) -> str:
    """Stable hash split: the same document always lands in the same split."""
    if doc.split is not None:
        return doc.split
    h = int.from_bytes(hashlib.sha1(f"{doc.source}\0{doc.doc_id}".encode()).digest()[:8], "big")
    return VAL if h / 2**64 < val_fraction else TRAIN


class ShardWriter:
    """Appends token arrays to ``{split}_{i:03d}.bin`` files of at most ``shard_tokens``."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.root, self.split, self.dtype, self.limit = root, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._f = None
        self._n = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._f = open(self.root / name, "wb")  # noqa: SIM115 -- closed in _close
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})
        self._n = 0

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self.shards[-1]["tokens"] = self._n
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._f = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._f is None or self._n >= self.limit:
                self._close()
                self._open()
            take = tokens[: self.limit - self._n]
            b = take.tobytes()
            self._f.write(b)
            self._hash.update(b)
            self._n += len(take)
            tokens = tokens[len(take) :]

    def finish(self) -> list[dict]:
        self._close()
        return self.shards


def _collect(cfg: PrepareConfig, texts: list[Path], log) -> tuple[list[Document], dict]:
    docs: list[Document] = []
    fetched = {}
    for name in dict.fromkeys(cfg.sources):  # a source named twice is read once
        src = SOURCES_BY_NAME[name]
        archive = fetch(src.spec, src.archive, cfg.cache_dir, log)
        try:
            got = list(src.read(archive))
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, tarfile.TarError) as e:
            raise DataError(f"cannot read {archive} ({type(e).__name__}: {e}); delete it to fetch it again") from None
        fetched[name] = {"spec": src.spec, "archive": archive.name, "license": src.license}
        log(f"  {name:12s} {src.spec:32s} {len(got):6d} documents")
        docs += got
    if texts:
        user = list(read_user_text(texts))
        log(f"  {'user':12s} {len(texts)} file(s){'':20s} {len(user):6d} documents")
        docs += user
    return docs, fetched


def _check_bins(bins: list[Path], tok: Tokenizer) -> None:
    """Pre-tokenised inputs must hold only ids the tokenizer has (checked before anything is
    written; size and emptiness are checked by ``user_files``)."""
    if bins and tok.vocab_size > 65536:
        raise DataError(".bin inputs are uint16 token files; they need a tokenizer of at most 65,536 entries")
    for path in bins:
        top = int(np.memmap(path, dtype=np.uint16, mode="r").max())
        if top >= tok.vocab_size:
            raise DataError(
                f"{path}: token id {top} is outside the tokenizer's {tok.vocab_size} entries; pass the tokenizer it "
                "was made with (--tokenizer FILE.json)"
            )


def _split_bin(path: Path, eot: int, val_fraction: float) -> dict[str, np.ndarray]:
    """Pre-tokenised uint16 file (documents separated by EOT) -> train/val tokens, split by a
    seeded per-document draw (stable for a given file name)."""
    arr = np.fromfile(path, dtype=np.uint16)
    if arr.size == 0:
        raise DataError(f"{path} is empty")
    doc_of_token = np.concatenate([[0], np.cumsum(arr[:-1] == eot)])  # EOT closes its document
    seed = int.from_bytes(hashlib.sha1(path.name.encode()).digest()[:8], "big")
    is_val = np.random.default_rng(seed).random(int(doc_of_token[-1]) + 1) < val_fraction
    tok_val = is_val[doc_of_token]
    return {TRAIN: arr[~tok_val], VAL: arr[tok_val]}


def _target(out: Path) -> Path:
    """The real directory ``--out`` names (".", "..", a symlink): the lock, the hidden temporary
    and the rename are beside it, whichever way it is spelled."""
    target = out.resolve()
    if target.parent == target:
        raise DataError(f"--out {out} is the root directory; choose a directory for the dataset")
    return target


def _looks_like_dataset(out: Path) -> bool:
    """A marked dataset, or an unmarked directory whose meta.json has a dataset's keys (made
    before markers existed): its metadata is then checked strictly."""
    marker = read_marker(out)
    if marker is not None:
        return marker["kind"] == "dataset"
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"format_version", "fingerprint", "splits"} <= set(meta)


def _same_settings(out: Path, fp: str) -> dict | None:
    """The (validated) meta of the dataset in ``out`` when it was built with these settings."""
    if not (out / "meta.json").is_file() or not _looks_like_dataset(out):
        return None
    meta = load_meta(out)
    return meta if meta["fingerprint"] == fp else None


def _log_up_to_date(out: Path, meta: dict, log) -> dict:
    log(f"{out}: up to date ({meta['splits'].get(TRAIN, {}).get('tokens', 0):,} train tokens); nothing to do")
    return meta


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Build (or find up to date) the dataset in cfg.out_dir; returns its meta dict."""
    cfg.check()
    out = Path(cfg.out_dir)
    inputs = [Path(p) for p in cfg.inputs]
    texts, bins = user_files(inputs)
    if bins and cfg.tokenizer == "bpe":
        raise DataError(
            f"{bins[0]} holds token ids: pass the tokenizer they were made with (--tokenizer FILE.json); a BPE "
            "trained now would give them other meanings"
        )
    tok_file = cfg.tokenizer_file()
    # read in full before anything is replaced (it may be the tokenizer.json of the dataset in --out)
    file_tok = Tokenizer.load(tok_file, hint="pass a tokenizer.json file") if tok_file is not None else None
    if file_tok is not None:
        _check_bins(bins, file_tok)
    uses_cache = bool(cfg.sources) or cfg.tokenizer == "neox"
    check_disjoint(out, inputs + ([Path(cfg.cache_dir)] if uses_cache else []), "--out")
    fp = cfg.fingerprint()

    def tokenizer() -> Tokenizer | None:  # under the lock, before the build: no temporary while downloading
        return Tokenizer.neox(cfg.cache_dir, log) if cfg.tokenizer == "neox" else file_tok

    t0 = time.time()
    meta, built = build_dataset(out, fp, cfg.overwrite, lambda tmp, tok: _build(cfg, tmp, fp, texts, bins, tok, log),
                                log, before=tokenizer)  # fmt: skip
    if built:
        log(summary_table(meta))
        log(f"wrote {out} in {time.time() - t0:.0f}s")
    return meta


EXISTS_HINT = "it holds a dataset built with other settings; pass --overwrite to rebuild it or choose another --out"


def build_dataset(out: Path, fp: str, overwrite: bool, build: Callable[[Path, Any], dict], log,
                  before: Callable[[], Any] = lambda: None) -> tuple[dict, bool]:  # fmt: skip
    """The protocol every dataset builder follows: under a lock on ``out``, find the dataset with
    fingerprint ``fp`` up to date (and intact) and do nothing, or check that ``out`` may be
    replaced, run ``before()`` (e.g. a download) and then ``build(tmp, what before returned)`` in a
    hidden marked sibling renamed into place. Returns (meta, whether it was built)."""
    target = _target(out)
    lock = DirLock(target, "--out")
    try:
        lock.acquire()
    except DirectoryLocked:
        raise
    except OwnershipError:  # a read-only location: an intact up-to-date dataset there is still fine
        meta = _same_settings(out, fp)
        if meta is not None and _dataset_problem(out, meta) is None:
            return _log_up_to_date(out, meta, log), False
        raise
    try:
        meta = _same_settings(out, fp)
        if meta is not None:
            problem = _dataset_problem(out, meta)
            if problem is None:
                return _log_up_to_date(out, meta, log), False
            if not overwrite:
                raise DataError(f"{out} holds this dataset, damaged: {problem}; pass --overwrite to rebuild it")
            log(f"{out} is damaged ({problem}); rebuilding it")
        check_replaceable(out, "dataset", overwrite=overwrite, choose="--out", exists_hint=EXISTS_HINT)
        if os.path.ismount(target):
            raise DataError(
                f"--out {out} is a mount point, which cannot be replaced by a rename; choose a directory in it"
            )
        ready = before()
        with building(target, "dataset") as tmp:
            return build(tmp, ready), True
    finally:
        lock.release()


def _build(cfg: PrepareConfig, tmp: Path, fp: str, texts: list[Path], bins: list[Path], tok: Tokenizer | None,
           log) -> dict:  # fmt: skip
    """Collect, split and tokenize the corpus into ``tmp`` (a BPE trained on the train split
    unless ``tok`` is given); writes the shards, tokenizer.json and meta.json and returns the meta."""
    log(f"collecting documents (package cache: {cfg.cache_dir})")
    docs, fetched = _collect(cfg, texts, log)
    by_split: dict[str, list[Document]] = {}
    for d in docs:
        by_split.setdefault(assign_split(d, cfg.val_fraction), []).append(d)
    if tok is None:  # "bpe"
        tok = _train_bpe(by_split.get(TRAIN, []), cfg.vocab_size, log)
    _check_bins(bins, tok)  # (again, for neox: a file tokenizer's were checked before the lock)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32

    splits_meta, per_source = {}, {}
    for split in sorted(set(by_split) | ({TRAIN, VAL} if bins else set())):
        writer = ShardWriter(tmp, split, dtype, cfg.shard_tokens)
        _write_documents(writer, split, by_split.get(split, []), tok, per_source)
        _write_bins(writer, split, bins, tok.eot_id, cfg.val_fraction, per_source)
        shards = writer.finish()
        splits_meta[split] = {"tokens": sum(s["tokens"] for s in shards), "shards": shards}
    if splits_meta.get(TRAIN, {}).get("tokens", 0) == 0:
        raise DataError("the corpus produced no training tokens")
    sources = {name: {**fetched.get(name, {}), "counts": c} for name, c in sorted(per_source.items())}
    return write_meta(tmp, fp, tok, dtype, splits_meta, val_fraction=cfg.val_fraction, sources=sources)


def _train_bpe(train_docs: list[Document], vocab_size: int, log) -> Tokenizer:
    train_texts = [d.text for d in train_docs]
    if not train_texts:
        raise DataError("no training text to train a BPE tokenizer on")
    log(f"training a byte-level BPE tokenizer ({vocab_size} entries) on the train split")
    return Tokenizer.train_bpe(train_texts, vocab_size)


def _count(per_source: dict, source: str, split: str) -> dict[str, int]:
    """The (documents, tokens) counter of one source in one split."""
    return per_source.setdefault(source, {}).setdefault(split, {"documents": 0, "tokens": 0})


def _write_documents(writer: ShardWriter, split: str, docs: list[Document], tok: Tokenizer, per_source: dict) -> None:
    """Tokenize ``docs`` in chunks (each document closed by end-of-text) into ``writer``, counting per source."""
    for i in range(0, len(docs), 512):
        chunk = docs[i : i + 512]
        encoded = interruptible(lambda chunk=chunk: tok.encode_batch([d.text for d in chunk]))  # Ctrl-C works
        for d, ids in zip(chunk, encoded, strict=True):
            ids.append(tok.eot_id)
            writer.write(np.asarray(ids))
            c = _count(per_source, d.source, split)
            c["documents"] += 1
            c["tokens"] += len(ids)


def _write_bins(writer: ShardWriter, split: str, bins: list[Path], eot: int, val_fraction: float,
                per_source: dict) -> None:  # fmt: skip
    """This split's part of each pre-tokenised input into ``writer``, counted under ``bin:NAME``."""
    for b in bins:
        part = _split_bin(b, eot, val_fraction)[split] if split in (TRAIN, VAL) else None
        if part is not None and len(part):
            writer.write(part)
            _count(per_source, f"bin:{b.name}", split)["tokens"] += len(part)


def write_meta(tmp: Path, fp: str, tok: Tokenizer, dtype, splits_meta: dict, **extra) -> dict:
    """tokenizer.json, meta.json (the common keys, then ``extra``) and the verification cache of a
    dataset built in ``tmp``; returns the meta."""
    tok.save(tmp / "tokenizer.json")
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": {"kind": tok.kind, "file": "tokenizer.json", "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
        "dtype": np.dtype(dtype).name,
        "splits": splits_meta,
        **extra,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    # the checksums were computed while writing: record them as verified (the rename into place keeps
    # inodes and modification times), so the first training run need not read the shards again
    groups = [splits_meta] + ([extra["labels"]["splits"]] if "labels" in extra else [])
    entries = {sh["file"]: _identity(tmp / sh["file"], sh["sha256"])
               for group in groups for sp in group.values() for sh in sp["shards"]}  # fmt: skip
    (tmp / VERIFIED).write_text(json.dumps({"version": 1, "files": entries}) + "\n")
    return meta


def summary_table(meta: dict) -> str:
    splits = sorted(meta["splits"])
    head = "| source | " + " | ".join(f"{s} docs | {s} tokens" for s in splits) + " |"
    rows = [head, "|---|" + "---:|---:|" * len(splits)]
    for name, info in meta["sources"].items():
        cells = []
        for s in splits:
            c = info["counts"].get(s, {"documents": 0, "tokens": 0})
            cells.append(f"{c['documents']:,} | {c['tokens']:,}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    docs = {s: sum(i["counts"].get(s, {}).get("documents", 0) for i in meta["sources"].values()) for s in splits}
    rows.append("| total | " + " | ".join(f"{docs[s]:,} | {meta['splits'][s]['tokens']:,}" for s in splits) + " |")
    return "\n".join(rows)


# --------------------------------------------------------------- checking
def _damaged(data_dir: Path) -> str:
    # not "--overwrite": without a readable meta.json the shards are not known to be ours to replace
    return f"the dataset is damaged: prepare it again into a new --out, or after removing {data_dir}"


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _meta_problem(meta) -> str | None:
    """What is wrong with a parsed meta.json, as a phrase; None when it is well formed."""
    if not isinstance(meta, dict):
        return f"not a JSON object (found {type(meta).__name__})"
    for key in ("format_version", "fingerprint", "tokenizer", "dtype", "splits"):
        if key not in meta:
            return f"missing key {key!r}"
    if not _is_count(meta["format_version"]) or meta["format_version"] < 1:
        return f"format_version must be a positive integer, got {meta['format_version']!r}"
    if not isinstance(meta["fingerprint"], str):
        return f"fingerprint must be a string, got {meta['fingerprint']!r}"
    if meta["dtype"] not in DTYPES:
        return f"unknown dtype {meta['dtype']!r} (expected {' or '.join(DTYPES)})"
    problem = _tokenizer_meta_problem(meta["tokenizer"], meta["dtype"]) or _splits_problem(
        meta["splits"], meta["tokenizer"]["file"]
    )
    if problem is None and "labels" in meta:
        return _labels_problem(meta["labels"], meta["splits"], meta["tokenizer"]["file"])
    return problem


def _tokenizer_meta_problem(tok, dtype: str) -> str | None:
    """What is wrong with meta.json's ``tokenizer`` entry (for shards of ``dtype``); None when well formed."""
    if not isinstance(tok, dict):
        return "tokenizer must be an object"
    for key in ("file", "vocab_size", "eot_id"):
        if key not in tok:
            return f"missing key 'tokenizer.{key}'"
    if not isinstance(tok["file"], str) or not _SHARD_NAME.fullmatch(tok["file"]):
        return f"tokenizer.file must be a file name inside the dataset, got {tok['file']!r}"
    if not _is_count(tok["vocab_size"]) or tok["vocab_size"] == 0:
        return f"tokenizer.vocab_size must be a positive integer, got {tok['vocab_size']!r}"
    if not _is_count(tok["eot_id"]) or tok["eot_id"] >= tok["vocab_size"]:
        return f"tokenizer.eot_id must be an id below tokenizer.vocab_size, got {tok['eot_id']!r}"
    if dtype == "uint16" and tok["vocab_size"] > 65536:
        return f"dtype uint16 cannot hold the ids of a {tok['vocab_size']}-entry tokenizer"
    return None


def _splits_problem(splits, tok_file: str) -> str | None:
    """What is wrong with meta.json's ``splits``: each a token count that is the sum of its
    shards', every shard file named once (and not the tokenizer's)."""
    if not isinstance(splits, dict) or not splits:
        return "splits must be a non-empty object"
    names: set[str] = {tok_file}
    for name, split in splits.items():
        where = f"splits.{name}"
        if (
            not isinstance(split, dict)
            or not _is_count(split.get("tokens"))
            or not isinstance(split.get("shards"), list)
        ):
            return f"{where} must be an object with a token count and a shards list"
        for i, sh in enumerate(split["shards"]):
            problem = _shard_problem(f"{where}.shards[{i}]", sh, names)
            if problem is not None:
                return problem
        if sum(sh["tokens"] for sh in split["shards"]) != split["tokens"]:
            return f"{where}.tokens ({split['tokens']}) is not the sum of its shards' tokens"
    return None


def _shard_problem(at: str, sh, names: set[str]) -> str | None:
    """What is wrong with one shard entry; its file joins ``names`` (the files listed so far)."""
    if not isinstance(sh, dict):
        return f"{at} must be an object"
    if not isinstance(sh.get("file"), str) or not _SHARD_NAME.fullmatch(sh["file"]):
        return f"{at}.file must be a file name inside the dataset, got {sh.get('file')!r}"
    if sh["file"] in names:
        return f"{at}.file {sh['file']!r} is listed twice"
    names.add(sh["file"])
    if not _is_count(sh.get("tokens")):
        return f"{at}.tokens must be a token count, got {sh.get('tokens')!r}"
    if not isinstance(sh.get("sha256"), str) or not _SHA256.fullmatch(sh["sha256"]):
        return f"{at}.sha256 must be a SHA-256 hex digest, got {sh.get('sha256')!r}"
    return None


def _labels_problem(labels, splits: dict, tok_file: str) -> str | None:
    """What is wrong with the optional ``labels`` entry (``ponderlm data synthetic``): class names,
    and for every split one uint8 label shard per token shard, as long as it, under its own name."""
    if not isinstance(labels, dict):
        return "labels must be an object"
    classes = labels.get("classes")
    if not (isinstance(classes, list) and 0 < len(classes) <= 256 and all(isinstance(c, str) and c for c in classes)
            and len(set(classes)) == len(classes)):  # fmt: skip
        return "labels.classes must be a list of 1 to 256 distinct class names"
    if labels.get("dtype", "uint8") != "uint8":
        return f"labels.dtype must be uint8, got {labels['dtype']!r}"
    if not isinstance(labels.get("splits"), dict) or set(labels["splits"]) != set(splits):
        return f"labels.splits must be an object with the splits of splits ({', '.join(splits)})"
    names = {tok_file} | {sh["file"] for split in splits.values() for sh in split["shards"]}
    for name, split in labels["splits"].items():
        where = f"labels.splits.{name}"
        token_shards = splits[name]["shards"]
        if not isinstance(split, dict) or not isinstance(split.get("shards"), list):
            return f"{where} must be an object with a shards list"
        if len(split["shards"]) != len(token_shards):
            return f"{where} has {len(split['shards'])} shards for the {len(token_shards)} of splits.{name}"
        for i, (sh, tok) in enumerate(zip(split["shards"], token_shards, strict=True)):
            problem = _shard_problem(f"{where}.shards[{i}]", sh, names)
            if problem is None and sh["tokens"] != tok["tokens"]:
                problem = f"{where}.shards[{i}] has {sh['tokens']} labels for {tok['tokens']} tokens"
            if problem is not None:
                return problem
    return None


def load_meta(data_dir: Path) -> dict:
    """The validated meta.json of a prepared dataset; a missing, unreadable or malformed one is a
    one-line DataError naming the file and the problem."""
    data_dir = Path(data_dir)
    p = data_dir / "meta.json"
    if not p.is_file():
        raise DataError(f"{data_dir} is not a prepared dataset (no meta.json); run `ponderlm data prepare` first")
    try:
        meta = json.loads(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        problem = "not UTF-8 text"
    except (ValueError, RecursionError) as e:
        problem = f"invalid JSON ({e})" if isinstance(e, ValueError) else "invalid JSON (nested too deeply)"
    except OSError as e:
        raise DataError(f"cannot read {p}: {e.strerror or e}") from None
    else:
        problem = _meta_problem(meta)
        if problem is None and meta["format_version"] > FORMAT_VERSION:
            raise DataError(
                f"{p}: format_version {meta['format_version']} was written by a newer ponderlm (this one reads "
                f"{FORMAT_VERSION}); upgrade ponderlm"
            )
    if problem is not None:
        raise DataError(f"{p}: {problem}; {_damaged(data_dir)}")
    return meta


def _identity(path: Path, sha256: str) -> list:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, sha256]


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _read_verified(data_dir: Path) -> dict:
    try:
        info = json.loads((data_dir / VERIFIED).read_text())
    except (OSError, ValueError):
        return {}
    files = info.get("files") if isinstance(info, dict) and info.get("version") == 1 else None
    return files if isinstance(files, dict) else {}


def check_dataset(data_dir: str | Path, *, verify_hashes: bool = True, remember: bool = True) -> dict:
    """Check a prepared dataset before it is used; returns its meta or raises DataError (one line).

    - meta.json is well formed (:func:`load_meta`);
    - every shard exists with the size meta.json implies (the label shards of a dataset made by
      ``ponderlm data synthetic`` too, one byte per token);
    - with ``verify_hashes``, every shard's sha256 matches meta.json. A shard verified before is
      not read again while its (size, mtime_ns, inode) are unchanged: the verified identities are
      kept in ``DATA_DIR/.verified.json``, rewritten atomically only when they change, and not
      kept at all when the directory is not writable. With ``remember=False`` nothing is written
      yet: a command that may still refuse (training checks more before it writes anything) calls
      :func:`remember_verified` once it goes ahead;
    - the dataset's tokenizer file exists, loads, and has the vocabulary size and end-of-text id
      meta.json records (checkpoints carry it: without it a run would write unusable ones).
    """
    data_dir = Path(data_dir)
    meta = load_meta(data_dir)
    problem = _dataset_problem(data_dir, meta, verify_hashes, remember)
    if problem is not None:
        command = "synthetic" if "synthetic" in meta else "prepare"
        raise DataError(
            f"{problem}; rebuild it with `ponderlm data {command} --out {data_dir} --overwrite` and the options it was "
            "made with"
        )
    return meta


_PENDING: dict[str, dict] = {}  # data dir -> shard identities verified by check_dataset(remember=False)


def remember_verified(data_dir: str | Path) -> None:
    """Record the shards :func:`check_dataset` verified with ``remember=False``, if they are still
    exactly the files it hashed (same size, mtime and inode)."""
    data_dir = Path(data_dir)
    identity = _PENDING.pop(str(data_dir.resolve()), None)
    if identity is None or identity == _read_verified(data_dir):
        return
    for name, (size, mtime, ino, _sha) in identity.items():
        try:
            st = (data_dir / name).stat()
        except OSError:
            return
        if [st.st_size, st.st_mtime_ns, st.st_ino] != [size, mtime, ino]:
            return  # changed since it was hashed: check it again next time
    with contextlib.suppress(OwnershipError):
        atomic_write(data_dir / VERIFIED, json.dumps({"version": 1, "files": identity}) + "\n")


def _dataset_problem(data_dir: Path, meta: dict, verify_hashes: bool = True, remember: bool = True) -> str | None:
    """What is wrong with the files of a dataset whose meta.json is valid, as a phrase naming the
    file; None when it is intact. Cheap checks first (sizes, the tokenizer), then checksums; the
    verification cache is written only when everything passed (a failed check changes nothing).
    An unreadable file raises (that is no damage a rebuild fixes)."""
    shards = [sh for split in meta["splits"].values() for sh in split["shards"]]
    label_splits = meta["labels"]["splits"] if "labels" in meta else {}
    labels = [sh for split in label_splits.values() for sh in split["shards"]]
    identity: dict[str, list] = {}
    problem = _shard_size_problem(data_dir, shards, np.dtype(meta["dtype"]).itemsize, identity)
    problem = problem or _shard_size_problem(data_dir, labels, 1, identity)  # uint8 label shards
    problem = problem or _tokenizer_file_problem(data_dir, meta["tokenizer"])
    if problem is None and verify_hashes:
        cached = _read_verified(data_dir)
        problem = _checksum_problem(data_dir, shards + labels, identity, cached)
        if problem is None and identity != cached:
            _remember(data_dir, identity, remember)
    return problem


def _shard_size_problem(data_dir: Path, shards: list[dict], itemsize: int, identity: dict) -> str | None:
    """A shard missing or of another size than meta.json implies; fills ``identity`` (file ->
    [size, mtime_ns, inode, sha256]) for those that pass."""
    for sh in shards:
        p = data_dir / sh["file"]
        try:
            st = p.stat()
        except FileNotFoundError:
            return f"{p} is missing (listed in meta.json)"
        except OSError as e:
            raise DataError(f"cannot read {p}: {e.strerror or e}") from None
        expected = sh["tokens"] * itemsize
        if not p.is_file() or st.st_size != expected:
            return f"{p} has {st.st_size:,} bytes, meta.json says {sh['tokens']:,} tokens ({expected:,} bytes)"
        identity[sh["file"]] = [st.st_size, st.st_mtime_ns, st.st_ino, sh["sha256"]]
    return None


def _tokenizer_file_problem(data_dir: Path, entry: dict) -> str | None:
    """The dataset's tokenizer file missing, unreadable, or not the one meta.json describes."""
    tok_path = data_dir / entry["file"]
    if not tok_path.exists():
        return f"{tok_path} is missing: the dataset cannot be used without the tokenizer it was built with"
    try:
        tok = Tokenizer(read_tokenizer_file(tok_path), "file")
    except DataError as e:
        return str(e) if str(e).startswith(str(tok_path)) else f"{tok_path}: {e}"
    if tok.vocab_size != entry["vocab_size"]:
        return f"{tok_path} has {tok.vocab_size} entries, meta.json records {entry['vocab_size']}"
    if tok.eot_id != entry["eot_id"]:
        return f"{tok_path} has end-of-text id {tok.eot_id}, meta.json records {entry['eot_id']}"
    return None


def _checksum_problem(data_dir: Path, shards: list[dict], identity: dict, cached: dict) -> str | None:
    """A shard whose sha256 is not meta.json's; shards verified before (``cached``) in exactly
    their present state (size, mtime, inode) are not read again."""
    for sh in shards:
        p = data_dir / sh["file"]
        if cached.get(sh["file"]) == identity[sh["file"]]:
            continue  # verified before in exactly this state
        try:
            digest = _file_sha256(p)
        except OSError as e:
            raise DataError(f"cannot read {p}: {e.strerror or e}") from None
        if digest != sh["sha256"]:
            return f"{p} was changed after the dataset was built (checksum mismatch with meta.json)"
    return None


def _remember(data_dir: Path, identity: dict, remember: bool) -> None:
    """Keep newly verified identities in the verification cache: now, or with ``remember=False``
    once :func:`remember_verified` is called."""
    if not remember:
        _PENDING[str(data_dir.resolve())] = identity
    else:
        with contextlib.suppress(OwnershipError):  # not writable: checked in full every time
            atomic_write(data_dir / VERIFIED, json.dumps({"version": 1, "files": identity}) + "\n")


def verify(data_dir: Path) -> dict:
    """Check every shard against meta.json (size and sha256) and the tokenizer; returns meta or
    raises DataError. The same as :func:`check_dataset`."""
    return check_dataset(data_dir, verify_hashes=True)
