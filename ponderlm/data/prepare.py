"""``ponderlm data prepare``: documents -> hash split -> tokens -> memmap shards + meta.json.

The corpus is streamed: documents flow from the inputs (:mod:`.sources` for the default corpus,
:mod:`.inputs` for the user's files) through the stable hash split and tokenization (in worker
processes, :mod:`.encode`) into the shards (:mod:`.shards`), and nothing ever holds the corpus.
Peak memory is bounded by the batches in flight (``2 * workers + 1`` of about ``BATCH_CHARS``
characters), one read buffer, the largest single document (or Parquet row group), and for a BPE
trained here its word counts over a sample of at most ``--bpe-sample-mb`` of train-split text. The
output is the same bytes for any number of workers.

A dataset is a directory ponderlm owns (:mod:`ponderlm.owned`). Everything the user can get wrong
up front (settings, sources, inputs, the tokenizer, an output that overlaps an input or is not a
dataset) is checked before the corpus is read; the dataset is then built under a lock on ``--out``
in a hidden, marked sibling and renamed into place, so a crash, a full disk or a Ctrl-C never
leaves a half-written dataset or the previous one damaged, and two processes never build the same
one. The build checkpoints as it goes (:mod:`.shards`): an interrupted one (Ctrl-C, SIGKILL, a full
disk) keeps its finished shards and continues with ``--resume``, giving the same dataset as an
uninterrupted build. A bad document (:mod:`.inputs`) ends the build and removes it, unless
``--skip-bad-documents``. ``--overwrite`` replaces only a dataset ponderlm made, holding only what
it writes. A second run with the same settings finds ``meta.json`` with the same fingerprint (and
the dataset intact) and does nothing.

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
import shutil
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import describe_os_error
from ..owned import (
    DirectoryLocked,
    DirLock,
    OwnershipError,
    atomic_write,
    check_disjoint,
    check_replaceable,
    read_marker,
    replace_dir,
    write_marker,
)
from ..progress import Progress, human_bytes
from .cut import MAX_UNCUT_CHARS, Cutter
from .encode import Encoder
from .inputs import InputFile, Reading, find_inputs, read_input
from .shards import (
    CHECKPOINT_SECONDS,
    JOURNAL,
    ShardWriter,
    finished_shards,
    read_journal,
    roll_back,
    write_journal,
)
from .sources import DEFAULT_SOURCES, SOURCES_BY_NAME, DataError, Document, fetch
from .tokenizer import MAX_BPE_VOCAB, Tokenizer, read_tokenizer_file

FORMAT_VERSION = 1
TRAIN, VAL = "train", "val"
DTYPES = ("uint16", "uint32")
VERIFIED = ".verified.json"  # (file, size, mtime_ns, inode, sha256) of shards whose checksum was verified
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a plain file name inside the dataset
_SHA256 = re.compile(r"[0-9a-f]{64}")
BPE_SAMPLE_MB = 512  # a BPE trained by prepare sees at most this much train-split text
BATCH_CHARS = 1 << 20  # characters of text per batch sent to a worker
BATCH_DOCS = 4096
BIN_CHUNK = 1 << 24  # tokens of a .bin input split at a time
COMPRESSION_GUESS = 4  # text per byte of a .gz/.zst file, to size the BPE sample rate


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass
class PrepareConfig:
    out_dir: Path = Path("data/default")
    cache_dir: Path = Path.home() / ".cache" / "ponderlm" / "packages"
    tokenizer: str = "bpe"  # "bpe" (trained on the train split), "neox", or a tokenizer.json path
    vocab_size: int = 8192  # for "bpe"
    sources: tuple[str, ...] = tuple(s.name for s in DEFAULT_SOURCES)  # default-corpus sources
    inputs: list[Path] = field(default_factory=list)  # user files, directories, globs (see .inputs)
    val_fraction: float = 0.01
    shard_tokens: int = 50_000_000
    overwrite: bool = False
    workers: int = field(default_factory=default_workers)  # tokenizing processes
    text_field: str = "text"  # the field of .jsonl lines / column of .parquet and saved datasets
    skip_bad_documents: bool = False  # skip (and count) documents that cannot be read, instead of refusing
    resume: bool = False  # continue an interrupted build of the same settings
    bpe_sample_mb: int = BPE_SAMPLE_MB
    parallel_min_bytes: int = 16 << 20  # smaller corpora are tokenized in this process (same output)

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
        if not 1 <= self.workers <= 1024:
            raise DataError(f"--workers must be in [1, 1024], got {self.workers}")
        if not self.text_field:
            raise DataError("--text-field must not be empty")
        if not 1 <= self.bpe_sample_mb <= 1 << 20:
            raise DataError(f"--bpe-sample-mb must be in [1, {1 << 20}], got {self.bpe_sample_mb}")
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

    def fingerprint(self, texts: list[InputFile] = (), bins: list[Path] = ()) -> str:
        """The settings that decide the dataset's bytes (not --workers, not --resume). Keys that
        keep their defaults are left out, so datasets built before they existed stay up to date."""
        stats = []
        listed = {f.path.resolve() for f in texts} | {Path(b).resolve() for b in bins}
        for p in sorted(map(Path, self.inputs)):
            if p.exists():
                files = sorted(p.rglob("*")) if p.is_dir() else [p]
            else:  # a glob: the files it matched
                files = sorted(f for f in listed if f.match(str(p)) or str(f).endswith(str(p)))
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
        if self.text_field != "text":
            key["text_field"] = self.text_field
        if self.skip_bad_documents:
            key["skip_bad"] = True
        if self.tokenizer == "bpe" and self.bpe_sample_mb != BPE_SAMPLE_MB:
            key["bpe_sample_mb"] = self.bpe_sample_mb
        if tok_file is not None:  # another tokenizer at the same path is another dataset
            key["tokenizer_sha256"] = hashlib.sha256(tok_file.read_bytes()).hexdigest()
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _digest(doc: Document) -> bytes:
    # a file name that is not UTF-8 hashes as its bytes (surrogateescape); UTF-8 names as before
    return hashlib.sha1(f"{doc.source}\0{doc.doc_id}".encode("utf-8", "surrogateescape")).digest()


def assign_split(doc: Document, val_fraction: float) -> str:
    """Stable hash split: the same document always lands in the same split."""
    if doc.split is not None:
        return doc.split
    h = int.from_bytes(_digest(doc)[:8], "big")
    return VAL if h / 2**64 < val_fraction else TRAIN


def in_bpe_sample(doc: Document, rate: float) -> bool:
    """Whether a document is in the BPE's sample at ``rate`` (a second, independent hash draw)."""
    return rate >= 1.0 or int.from_bytes(_digest(doc)[8:16], "big") / 2**64 < rate


# ------------------------------------------------------------------ the stream of documents
@dataclass(frozen=True)
class Unit:
    """One reader of documents: a default-corpus source or one input file."""

    label: str
    size: int  # bytes on disk, for progress
    compressed: bool
    documents: Callable[[Reading], Iterator[Document]]


def _source_unit(name: str, cfg: PrepareConfig, log, fetched: dict) -> Unit:
    src = SOURCES_BY_NAME[name]
    archive = fetch(src.spec, src.archive, cfg.cache_dir, log)
    fetched[name] = {"spec": src.spec, "archive": archive.name, "license": src.license}

    def documents(reading: Reading) -> Iterator[Document]:
        try:
            yield from src.read(archive)
        except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile, tarfile.TarError) as e:
            raise DataError(f"cannot read {archive} ({type(e).__name__}: {e}); delete it to fetch it again") from None

    return Unit(name, archive.stat().st_size, True, documents)


def _units(cfg: PrepareConfig, texts: list[InputFile], log) -> tuple[list[Unit], dict]:
    fetched: dict = {}
    units = [_source_unit(name, cfg, log, fetched) for name in dict.fromkeys(cfg.sources)]  # named twice: once
    for f in texts:
        units.append(Unit(str(f.path), f.size, f.kind in ("jsonl.gz", "jsonl.zst", "parquet"),
                          lambda reading, f=f: read_input(f, reading)))  # fmt: skip
    return units, fetched


@dataclass
class Batch:
    """What the writer needs besides the tokens: each document's split and source, and where the
    stream stands after the batch (for the checkpoint and the progress line)."""

    docs: list[tuple[str, str]]  # (split, source)
    unit: int  # resume reading at this unit...
    skip: int  # ...after this many of its documents
    done_bytes: int
    skipped: dict[str, int]
    closes: list[bool] = field(default_factory=list)  # per text: it ends its document

    @property
    def resumable(self) -> bool:
        """Whether the batch ends between documents (a checkpoint may be taken after it)."""
        return not self.closes or self.closes[-1]


def _batches(units: list[Unit], reading: Reading, val_fraction: float, start: tuple[int, int],
             skipped_at_start: dict[str, int], cutter: Cutter
             ) -> Iterator[tuple[list[str], list[bool], Batch]]:  # fmt: skip
    """The documents from ``start`` = (unit, documents of it already written) on, in batches. A
    document longer than ``SEGMENT_CHARS`` goes as the pieces ``cutter`` cuts it into (only the last
    one closes it); a batch that ends inside a document is not a place to resume from."""
    done_before = np.cumsum([0] + [u.size for u in units]).tolist()
    first, skip = start
    reading.skipped = dict(skipped_at_start)
    for ui in range(first, len(units)):
        texts: list[str] = []
        closes: list[bool] = []
        docs: list[tuple[str, str]] = []
        chars, n = 0, 0
        for d in units[ui].documents(reading):
            n += 1
            if ui == first and n <= skip:
                if n == skip:  # re-read up to the checkpoint: count what was skipped from there on only
                    reading.skipped = dict(skipped_at_start)
                continue
            spans = cutter.spans(d.text)
            if spans is None:
                reading.bad("too_long", f"{units[ui].label}: document {d.doc_id} ({len(d.text):,} characters) "
                            f"{_uncut_reason(cutter)}", "cut it into shorter documents")  # fmt: skip
                continue
            split = assign_split(d, val_fraction)
            for i, (a, b) in enumerate(spans):
                piece = d.text if len(spans) == 1 else d.text[a:b]
                texts.append(piece)
                closes.append(i == len(spans) - 1)
                docs.append((split, d.source))
                chars += len(piece)
                if chars >= BATCH_CHARS or len(texts) >= BATCH_DOCS:
                    batch = Batch(docs, ui, n, done_before[ui] + reading.position, dict(reading.skipped), closes)
                    yield texts, closes, batch
                    texts, closes, docs, chars = [], [], [], 0
        yield texts, closes, Batch(docs, ui + 1, 0, done_before[ui + 1], dict(reading.skipped), closes)


def _uncut_reason(cutter: Cutter) -> str:
    if cutter.rule is None:
        return (f"is longer than {MAX_UNCUT_CHARS:,} characters, and the tokenizer cannot be cut safely "
                f"({cutter.reason}): tokenized whole it would need ~200 bytes of memory per character")  # fmt: skip
    return (f"has over {MAX_UNCUT_CHARS:,} characters with no place where the tokenizer's pre-tokenization "
            "splits (a space or line break between two characters): tokenized whole it would need ~200 bytes of "
            "memory per character")  # fmt: skip


# ------------------------------------------------------------------ the build
class CorpusBuild:
    """The tokenizing pass of one build in ``tmp``: writers per split, counts per source, the
    checkpoints."""

    def __init__(self, cfg: PrepareConfig, tmp: Path, fp: str, tok: Tokenizer, journal: dict | None,
                 bpe: dict | None) -> None:  # fmt: skip
        self.cfg, self.tmp, self.fp, self.tok, self.bpe = cfg, tmp, fp, tok, bpe  # bpe: how a BPE trained here was
        self.dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)
        self.writers: dict[str, ShardWriter] = {}
        self.per_source: dict = {}
        self.skipped: dict[str, int] = {}
        self.position = (0, 0)
        if journal is not None:
            for split, state in journal["writers"].items():
                self.writer(split).restore(state)
            self.per_source, self.skipped = journal["per_source"], journal["skipped"]
            self.position = (journal["unit"], journal["skip"])
        self.checked_at = time.monotonic()
        self.finished_at_check = self._finished()

    def writer(self, split: str) -> ShardWriter:
        if split not in self.writers:
            self.writers[split] = ShardWriter(self.tmp, split, self.dtype, self.cfg.shard_tokens)
        return self.writers[split]

    def _finished(self) -> int:
        return sum(w.finished for w in self.writers.values())

    def write(self, flat: np.ndarray, lengths: np.ndarray, docs: list[tuple[str, str]], closes: list[bool]) -> int:
        """One batch's tokens into the writers of their splits (runs of one split in one write); a
        text that does not close its document (a piece of a long one) counts its tokens only."""
        ends = np.cumsum(lengths)
        i = 0
        while i < len(docs):
            j = i
            while j + 1 < len(docs) and docs[j + 1][0] == docs[i][0]:
                j += 1
            lo = int(ends[i] - lengths[i])
            self.writer(docs[i][0]).write(flat[lo : int(ends[j])])
            i = j + 1
        for (split, source), n, closing in zip(docs, lengths.tolist(), closes, strict=True):
            c = _count(self.per_source, source, split)
            c["documents"] += closing
            c["tokens"] += n
        return len(flat)

    def maybe_checkpoint(self, unit: int, skip: int, skipped: dict[str, int], *, force: bool = False) -> None:
        """Record where the build stands when a shard was finished since the last checkpoint, or
        every CHECKPOINT_SECONDS."""
        self.position, self.skipped = (unit, skip), skipped
        now = time.monotonic()
        if not (force or self._finished() > self.finished_at_check or now - self.checked_at >= CHECKPOINT_SECONDS):
            return
        for w in self.writers.values():
            w.sync()
        write_journal(self.tmp, {
            "fingerprint": self.fp, "dtype": self.dtype.name, "unit": unit, "skip": skip,
            "writers": {s: w.state() for s, w in self.writers.items()},
            "per_source": self.per_source, "skipped": skipped, "bpe": self.bpe,
        })  # fmt: skip
        self.checked_at, self.finished_at_check = now, self._finished()

    def abandon(self) -> None:
        for w in self.writers.values():
            w.abandon()


def _count(per_source: dict, source: str, split: str) -> dict[str, int]:
    """The (documents, tokens) counter of one source in one split."""
    return per_source.setdefault(source, {}).setdefault(split, {"documents": 0, "tokens": 0})


def _tokenize(b: CorpusBuild, units: list[Unit], bins: list[Path], log) -> None:
    """The tokenizing pass from where ``b`` stands: text units through the encoder, then bins."""
    cfg = b.cfg
    total = sum(u.size for u in units) + sum(p.stat().st_size for p in bins)
    parallel = cfg.workers > 1 and total >= cfg.parallel_min_bytes
    workers = cfg.workers if parallel else 1
    small = "" if parallel or cfg.workers == 1 else f" (under {human_bytes(cfg.parallel_min_bytes)}: in this process)"
    log(f"tokenizing {human_bytes(total)} of input with {workers} worker{'s' * (workers > 1)}{small}")
    progress = Progress("tokenizing: read", total, log)
    reading = Reading(cfg.text_field, cfg.skip_bad_documents)
    docs = sum(c["documents"] for s in b.per_source.values() for c in s.values())
    tokens = sum(c["tokens"] for s in b.per_source.values() for c in s.values())
    if bins:
        b.writer(TRAIN), b.writer(VAL)  # pre-tokenised input always has both splits (possibly empty)
    unit, skip = b.position
    if unit < len(units):
        cutter = Cutter(b.tok.tk)
        with Encoder(b.tok, b.dtype, 1 if not parallel else cfg.workers) as enc:
            batches = _batches(units, reading, cfg.val_fraction, (unit, skip), b.skipped, cutter)
            for flat, lengths, batch in enc.map(batches):
                tokens += b.write(flat, lengths, batch.docs, batch.closes)
                docs += sum(batch.closes)
                progress.update(batch.done_bytes, documents=docs, tokens=tokens)
                if batch.resumable:
                    b.maybe_checkpoint(batch.unit, batch.skip, batch.skipped)
    done = sum(u.size for u in units)
    for bi, path in enumerate(bins):
        ui = len(units) + bi
        for ci, (chunk, is_val) in enumerate(_bin_chunks(path, b.tok.eot_id, cfg.val_fraction)):
            if ui < b.position[0] or (ui == b.position[0] and ci < b.position[1]):
                continue  # written before the interruption (the draws are still made, in order)
            for split, part in ((TRAIN, chunk[~is_val]), (VAL, chunk[is_val])):
                if len(part):
                    b.writer(split).write(part)
                    _count(b.per_source, f"bin:{path.name}", split)["tokens"] += len(part)
            tokens += len(chunk)
            progress.update(done + min(path.stat().st_size, 2 * BIN_CHUNK * (ci + 1)), documents=docs, tokens=tokens)
            b.maybe_checkpoint(ui, ci + 1, b.skipped)
        done += path.stat().st_size
    progress.update(total, documents=docs, tokens=tokens)
    progress.close()


def _bin_chunks(path: Path, eot: int, val_fraction: float) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """A pre-tokenised uint16 file (documents closed by EOT) in chunks of ``BIN_CHUNK`` tokens, each
    with its tokens' validation mask. A document is in validation by a seeded draw per document, in
    file order (stable for a given file name), made when its first token is met: the draws are the
    ones a single pass over the whole file makes, whatever the chunk size."""
    arr = np.memmap(path, dtype=np.uint16, mode="r")
    rng = np.random.default_rng(int.from_bytes(hashlib.sha1(path.name.encode()).digest()[:8], "big"))
    carry = None  # the draw of a document that runs on from the previous chunk
    for start in range(0, len(arr), BIN_CHUNK):
        chunk = np.asarray(arr[start : start + BIN_CHUNK])
        doc_of_token = np.concatenate([[0], np.cumsum(chunk[:-1] == eot)])  # EOT closes its document
        new = rng.random(int(doc_of_token[-1]) + 1 - (carry is not None)) < val_fraction
        draws = new if carry is None else np.concatenate([[carry], new])
        yield chunk, draws[doc_of_token]
        carry = None if chunk[-1] == eot else bool(draws[-1])


def _bpe_sample(units: list[Unit], cfg: PrepareConfig, log, taken: list[int]) -> Iterator[str]:
    """Train-split texts for the BPE: every document while the corpus is smaller than the sample,
    else documents drawn by a hash at the rate that should fill it (``COMPRESSION_GUESS`` for
    compressed inputs), in input order, up to ``bpe_sample_mb`` of text. ``taken`` gets the
    characters used."""
    budget = cfg.bpe_sample_mb << 20
    estimate = sum(u.size * (COMPRESSION_GUESS if u.compressed else 1) for u in units)
    rate = min(1.0, budget / max(estimate, 1))
    reading = Reading(cfg.text_field, cfg.skip_bad_documents)  # its skip counts are the tokenizing pass's to make
    progress = Progress("BPE sample: read", sum(u.size for u in units), log)
    done = 0
    for u in units:
        for d in u.documents(reading):
            if assign_split(d, cfg.val_fraction) == TRAIN and in_bpe_sample(d, rate):
                taken[0] += len(d.text)
                yield d.text
                if taken[0] >= budget:
                    return
            progress.update(done + reading.position, characters=taken[0])
        done += u.size


def _train_bpe(units: list[Unit], cfg: PrepareConfig, log) -> tuple[Tokenizer, dict]:
    log(f"training a byte-level BPE tokenizer ({cfg.vocab_size} entries) on the train split (at most "
        f"{cfg.bpe_sample_mb} MB of its text)")  # fmt: skip
    taken = [0]
    tok = Tokenizer.train_bpe(_bpe_sample(units, cfg, log, taken), cfg.vocab_size)
    if taken[0] == 0:
        raise DataError("no training text to train a BPE tokenizer on")
    log(f"BPE trained on {taken[0]:,} characters of train-split text")
    return tok, {"sample_mb": cfg.bpe_sample_mb, "trained_on_characters": taken[0]}


def _build(cfg: PrepareConfig, tmp: Path, fp: str, texts: list[InputFile], bins: list[Path], tok: Tokenizer | None,
           journal: dict | None, log) -> dict:  # fmt: skip
    """Stream, split and tokenize the corpus into ``tmp`` (a BPE trained on a sample of the train
    split unless ``tok`` is given), continuing from ``journal`` when resuming; writes the shards,
    tokenizer.json and meta.json and returns the meta."""
    log(f"reading documents (package cache: {cfg.cache_dir})" if cfg.sources else "reading documents")
    units, fetched = _units(cfg, texts, log)
    bpe_info = None
    if tok is None and journal is not None:  # "bpe", trained before the interruption
        tok, bpe_info = Tokenizer.load(tmp / "tokenizer.json", "bpe"), journal.get("bpe")
    elif tok is None:
        tok, bpe_info = _train_bpe(units, cfg, log)
        tok.save(tmp / "tokenizer.json")
    _check_bins(bins, tok)  # (again, for neox: a file tokenizer's were checked before the lock)
    b = CorpusBuild(cfg, tmp, fp, tok, journal, bpe_info)
    _tokenize(b, units, bins, log)
    splits_meta = {}
    for split in sorted(b.writers):
        shards = b.writers[split].finish()
        splits_meta[split] = {"tokens": sum(s["tokens"] for s in shards), "shards": shards}
    _check_splits(splits_meta, b.per_source, cfg.val_fraction, log)
    extra: dict[str, Any] = {"val_fraction": cfg.val_fraction}
    extra["sources"] = {name: {**fetched.get(name, {}), "counts": c} for name, c in sorted(b.per_source.items())}
    if cfg.skip_bad_documents:
        extra["skipped"] = b.skipped
        if b.skipped:
            log("skipped documents that could not be read: " + ", ".join(f"{n:,} {k}" for k, n in b.skipped.items()))
    if bpe_info is not None:
        extra["bpe"] = bpe_info
    (tmp / JOURNAL).unlink(missing_ok=True)
    return write_meta(tmp, fp, tok, b.dtype, splits_meta, **extra)


def _check_splits(splits_meta: dict, per_source: dict, val_fraction: float, log) -> None:
    """Training tokens are required; a missing validation split (which ``ponderlm train`` needs) is
    warned about, naming the option that fixes it (a tiny corpus may be meant for something else)."""
    if splits_meta.get(TRAIN, {}).get("tokens", 0) == 0:
        raise DataError("the corpus produced no training tokens")
    if splits_meta.get(VAL, {}).get("tokens", 0) > 0:
        return
    docs = sum(c.get(TRAIN, {}).get("documents", 0) for c in per_source.values())
    why = "--val-fraction is 0" if val_fraction == 0 else (
        f"none of its {docs:,} documents fell in the {val_fraction:g} validation fraction")  # fmt: skip
    log(f"warning: the dataset has no validation split ({why}), which `ponderlm train` needs: prepare it again with a "
        "larger --val-fraction (e.g. --val-fraction 0.1) or more text")  # fmt: skip


def _check_bins(bins: list[Path], tok: Tokenizer) -> None:
    """Pre-tokenised inputs must hold only ids the tokenizer has (checked before anything is
    written; size and emptiness are checked by ``find_inputs``). Read in chunks."""
    if bins and tok.vocab_size > 65536:
        raise DataError(".bin inputs are uint16 token files; they need a tokenizer of at most 65,536 entries")
    for path in bins:
        arr = np.memmap(path, dtype=np.uint16, mode="r")
        top = max(int(arr[i : i + BIN_CHUNK].max()) for i in range(0, len(arr), BIN_CHUNK))
        if top >= tok.vocab_size:
            raise DataError(
                f"{path}: token id {top} is outside the tokenizer's {tok.vocab_size} entries; pass the tokenizer it "
                "was made with (--tokenizer FILE.json)"
            )


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
    texts, bins = find_inputs(inputs, log)
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
    given = [p for p in inputs if p.exists()] + [f.path for f in texts] + bins  # globs: the files they matched
    check_disjoint(out, given + ([Path(cfg.cache_dir)] if uses_cache else []), "--out")
    fp = cfg.fingerprint(texts, bins)

    def tokenizer() -> Tokenizer | None:  # under the lock, before the build: no temporary while downloading
        return Tokenizer.neox(cfg.cache_dir, log) if cfg.tokenizer == "neox" else file_tok

    t0 = time.time()
    meta, built = build_dataset(
        out, fp, cfg.overwrite, lambda tmp, tok, journal: _build(cfg, tmp, fp, texts, bins, tok, journal, log), log,
        before=tokenizer, resume=cfg.resume, resumable=True,
    )  # fmt: skip
    if built:
        log(summary_table(meta))
        log(f"wrote {out} in {time.time() - t0:.0f}s")
    return meta


EXISTS_HINT = "it holds a dataset built with other settings; pass --overwrite to rebuild it or choose another --out"


def build_dataset(out: Path, fp: str, overwrite: bool, build: Callable[..., dict], log,
                  before: Callable[[], Any] = lambda: None, *, resume: bool = False,
                  resumable: bool = False) -> tuple[dict, bool]:  # fmt: skip
    """The protocol every dataset builder follows: under a lock on ``out``, find the dataset with
    fingerprint ``fp`` up to date (and intact) and do nothing, or check that ``out`` may be
    replaced, run ``before()`` (e.g. a download) and then ``build(tmp, what before returned)`` in a
    hidden marked sibling renamed into place. Returns (meta, whether it was built).

    A ``resumable`` build is called ``build(tmp, ready, journal)`` and checkpoints into ``tmp``
    itself: interrupted, it keeps ``tmp`` at its last checkpoint for a later ``resume``."""
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
        tmp = target.with_name(f".{target.name}.tmp")
        journal = _previous_build(tmp, fp, resume if resumable else False, overwrite, log)
        ready = before()
        return _run_build(tmp, target, journal, resumable, lambda: build(tmp, ready, journal) if resumable
                          else build(tmp, ready), log), True  # fmt: skip
    finally:
        lock.release()


def _previous_build(tmp: Path, fp: str, resume: bool, overwrite: bool, log) -> dict | None:
    """What to do with the build directory a killed or interrupted build left: its journal when
    resuming it; refused when it holds checkpointed work and neither --resume nor --overwrite says
    what to do with it; otherwise (nothing checkpointed, or --overwrite) removed."""
    if not tmp.exists():
        if resume:
            log("nothing to resume: building from the start")
        return None
    if read_marker(tmp) is None:
        raise OwnershipError(f"{tmp} exists and was not made by ponderlm; move it away")
    journal = read_journal(tmp)
    if journal is not None:
        same = journal["fingerprint"] == fp
        if same and resume:
            log(f"resuming the interrupted build in {tmp} ({finished_shards(journal)} shards finished)")
            roll_back(tmp, journal)  # a killed build may have written past its checkpoint
            return journal
        if not overwrite:
            hint = "pass --resume to continue it, or --overwrite to start over" if same else (
                "pass --overwrite to discard it and start over")  # fmt: skip
            what = "of this dataset" if same else "with other settings"
            raise DataError(f"an interrupted build {what} is in {tmp} ({finished_shards(journal)} shards finished); "
                            f"{hint}")  # fmt: skip
        log(f"discarding the interrupted build in {tmp} (--overwrite)")
    elif resume:
        log("nothing to resume (the interrupted build had not checkpointed): building from the start")
    shutil.rmtree(tmp)
    return None


def _run_build(tmp: Path, target: Path, journal: dict | None, resumable: bool, build: Callable[[], dict], log) -> dict:
    """Run ``build`` in ``tmp`` and rename it into place. A bad input or any other error removes
    ``tmp``; an interruption or an OSError (a full disk) keeps a resumable build's checkpointed
    shards, cut back to the checkpoint, and says how to continue."""
    try:
        if journal is None:
            tmp.mkdir(parents=True)
            write_marker(tmp, "dataset")
        meta = build()
        replace_dir(tmp, target)
        return meta
    except (KeyboardInterrupt, OSError) as e:
        kept = _keep_checkpoint(tmp) if resumable else 0
        if not kept:
            shutil.rmtree(tmp, ignore_errors=True)
        where = (f"; the {kept} shards finished so far are kept in {tmp}: run the same command with --resume to "
                 "continue") if kept else ""  # fmt: skip
        if isinstance(e, KeyboardInterrupt):
            if kept:
                log(f"interrupted{where}")
            raise
        raise DataError(describe_os_error(e, f"writing {target}") + where) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _keep_checkpoint(tmp: Path) -> int:
    """Cut an interrupted build back to its last checkpoint; the number of finished shards kept
    (0: nothing worth keeping)."""
    with contextlib.suppress(OSError):
        journal = read_journal(tmp)
        if journal is not None:
            roll_back(tmp, journal)
            return max(finished_shards(journal), 1)
    return 0


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
