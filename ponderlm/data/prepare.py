"""``ponderlm data prepare``: documents -> hash split -> tokens -> memmap shards + meta.json.

The output directory is built in a temporary sibling and renamed into place, so a crash never
leaves a half-written dataset; a second run with the same settings finds ``meta.json`` with the
same fingerprint and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .sources import DEFAULT_SOURCES, SOURCES_BY_NAME, DataError, Document, fetch, read_user_text
from .tokenizer import Tokenizer

FORMAT_VERSION = 1
TRAIN, VAL = "train", "val"


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

    def fingerprint(self) -> str:
        stats = []
        for p in sorted(self.inputs):
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            stats += [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files if f.is_file()]
        key = dict(
            v=FORMAT_VERSION,
            tokenizer=self.tokenizer,
            vocab=self.vocab_size if self.tokenizer == "bpe" else None,
            sources=[SOURCES_BY_NAME[s].spec for s in self.sources],
            inputs=stats,
            val=self.val_fraction,
            shard=self.shard_tokens,
        )
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


def _collect(cfg: PrepareConfig, log) -> tuple[list[Document], list[Path], dict]:
    docs: list[Document] = []
    fetched = {}
    for name in cfg.sources:
        if name not in SOURCES_BY_NAME:
            raise DataError(f"unknown source {name!r}; choose from {', '.join(SOURCES_BY_NAME)}")
        src = SOURCES_BY_NAME[name]
        archive = fetch(src.spec, src.archive, cfg.cache_dir, log)
        got = list(src.read(archive))
        fetched[name] = {"spec": src.spec, "archive": archive.name, "license": src.license}
        log(f"  {name:12s} {src.spec:32s} {len(got):6d} documents")
        docs += got
    bins = []
    text_inputs = []
    for p in cfg.inputs:
        if p.suffix == ".bin":
            if not p.is_file():
                raise DataError(f"input not found: {p}")
            bins.append(p)
        else:
            text_inputs.append(p)
    if text_inputs:
        user = list(read_user_text(text_inputs))
        log(f"  {'user':12s} {len(text_inputs)} path(s){'':20s} {len(user):6d} documents")
        docs += user
    return docs, bins, fetched


def _check_bin(path: Path, vocab_size: int) -> None:
    """A pre-tokenised input must be non-empty and hold only ids the tokenizer has (checked before
    anything is written)."""
    arr = np.memmap(path, dtype=np.uint16, mode="r") if path.stat().st_size >= 2 else np.zeros(0, np.uint16)
    if arr.size == 0:
        raise DataError(f"{path} is empty")
    top = int(arr.max())
    if top >= vocab_size:
        raise DataError(
            f"{path}: token id {top} is outside the tokenizer's {vocab_size} entries; pass the tokenizer it was "
            "made with (--tokenizer FILE.json)"
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


def prepare(cfg: PrepareConfig, log=print) -> dict:
    """Build (or find up to date) the dataset in cfg.out_dir; returns its meta dict."""
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.shard_tokens < 1024:
        raise DataError(f"shard_tokens must be >= 1024, got {cfg.shard_tokens}")
    out = Path(cfg.out_dir)
    fp = cfg.fingerprint()
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp:
            log(f"{out}: up to date ({meta['splits'][TRAIN]['tokens']:,} train tokens); nothing to do")
            return meta
        if not cfg.overwrite:
            raise DataError(f"{out} holds a dataset built with other settings; pass --overwrite to rebuild")
    elif out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise DataError(f"{out} exists and is not a ponderlm dataset; choose another --out or pass --overwrite")

    t0 = time.time()
    log(f"collecting documents (package cache: {cfg.cache_dir})")
    docs, bins, fetched = _collect(cfg, log)
    by_split: dict[str, list[Document]] = {}
    for d in docs:
        by_split.setdefault(assign_split(d, cfg.val_fraction), []).append(d)

    if cfg.tokenizer == "bpe":
        train_texts = [d.text for d in by_split.get(TRAIN, [])]
        if not train_texts:
            raise DataError("no training text to train a BPE tokenizer on")
        log(f"training a byte-level BPE tokenizer ({cfg.vocab_size} entries) on the train split")
        tok = Tokenizer.train_bpe(train_texts, cfg.vocab_size)
    elif cfg.tokenizer == "neox":
        tok = Tokenizer.neox(cfg.cache_dir, log)
    else:
        tok = Tokenizer.load(cfg.tokenizer)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    if bins and dtype != np.uint16:
        raise DataError(".bin inputs are uint16 token files; they need a tokenizer of at most 65,536 entries")
    for b in bins:
        _check_bin(b, tok.vocab_size)

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    splits_meta, per_source = {}, {}
    for split in sorted(set(by_split) | ({TRAIN, VAL} if bins else set())):
        writer = ShardWriter(tmp, split, dtype, cfg.shard_tokens)
        split_docs = by_split.get(split, [])
        for i in range(0, len(split_docs), 512):
            chunk = split_docs[i : i + 512]
            for d, ids in zip(chunk, tok.encode_batch([d.text for d in chunk]), strict=True):
                ids.append(tok.eot_id)
                writer.write(np.asarray(ids))
                s = per_source.setdefault(d.source, {})
                s.setdefault(split, {"documents": 0, "tokens": 0})
                s[split]["documents"] += 1
                s[split]["tokens"] += len(ids)
        for b in bins:
            part = _split_bin(b, tok.eot_id, cfg.val_fraction)[split] if split in (TRAIN, VAL) else None
            if part is not None and len(part):
                writer.write(part)
                s = per_source.setdefault(f"bin:{b.name}", {}).setdefault(split, {"documents": 0, "tokens": 0})
                s["tokens"] += len(part)
        shards = writer.finish()
        splits_meta[split] = {"tokens": sum(s["tokens"] for s in shards), "shards": shards}
    if splits_meta.get(TRAIN, {}).get("tokens", 0) == 0:
        shutil.rmtree(tmp)
        raise DataError("the corpus produced no training tokens")
    tok.save(tmp / "tokenizer.json")
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": {"kind": tok.kind, "file": "tokenizer.json", "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
        "dtype": np.dtype(dtype).name,
        "val_fraction": cfg.val_fraction,
        "splits": splits_meta,
        "sources": {name: {**fetched.get(name, {}), "counts": c} for name, c in sorted(per_source.items())},
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log(summary_table(meta))
    log(f"wrote {out} in {time.time() - t0:.0f}s")
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


def verify(data_dir: Path) -> dict:
    """Check every shard against meta.json (size and sha256); returns meta or raises DataError."""
    meta = load_meta(data_dir)
    for split in meta["splits"].values():
        for sh in split["shards"]:
            p = data_dir / sh["file"]
            h = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            if h != sh["sha256"]:
                raise DataError(f"{p}: missing or corrupt (checksum mismatch)")
    return meta


def load_meta(data_dir: Path) -> dict:
    p = Path(data_dir) / "meta.json"
    if not p.is_file():
        raise DataError(f"{data_dir} is not a prepared dataset (no meta.json); run `ponderlm data prepare` first")
    return json.loads(p.read_text())
