"""``ponderlm data prepare``: documents -> hash split -> tokens -> memmap shards + meta.json.

The corpus is streamed: documents flow from the inputs (:mod:`.sources` for the default corpus,
:mod:`.inputs` for the user's files) through the stable hash split and tokenization (in worker
processes, :mod:`.encode`) into the shards (:mod:`.shards`), and nothing ever holds the corpus.
Peak memory is bounded by the batches in flight (``2 * workers + 1`` of about ``BATCH_CHARS``
characters), one read buffer, the largest single document (or Parquet row group; not a long ``.jsonl``
line, whose text is read again from the file a window at a time: :mod:`.longtext`), and for a BPE
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

The directory's life while it is built (lock, temporary, rename, checkpoints kept) is :mod:`.build`;
reading and checking a built dataset is :mod:`.dataset`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tarfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ponderlm.data.build import build_dataset, write_meta
from ponderlm.data.cut import MAX_UNCUT_CHARS, Cutter
from ponderlm.data.dataset import FORMAT_VERSION, TRAIN, VAL, summary_table
from ponderlm.data.encode import Encoder
from ponderlm.data.inputs import InputFile, Reading, find_inputs, read_input
from ponderlm.data.longtext import LongDocument, Text, cut_places, length, split_at
from ponderlm.data.shards import CHECKPOINT_SECONDS, JOURNAL, ShardWriter, write_journal
from ponderlm.data.sources import DEFAULT_SOURCES, SOURCES_BY_NAME, Document, fetch
from ponderlm.data.tokenizer import MAX_BPE_VOCAB, Tokenizer
from ponderlm.errors import DataError
from ponderlm.owned import check_disjoint
from ponderlm.progress import Progress, human_bytes

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
    documents: Callable[[Reading], Iterator[Document | LongDocument]]


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
            count, pieces = _pieces(d, cutter)
            if pieces is None:
                reading.bad("too_long", f"{units[ui].label}: document {d.doc_id} ({length(d.text):,} characters) "
                            f"{_uncut_reason(cutter)}", "cut it into shorter documents")  # fmt: skip
                continue
            split = assign_split(d, val_fraction)
            for i, piece in enumerate(pieces):
                texts.append(piece)
                closes.append(i == count - 1)
                docs.append((split, d.source))
                chars += len(piece)
                if chars >= BATCH_CHARS or len(texts) >= BATCH_DOCS:
                    batch = Batch(docs, ui, n, done_before[ui] + reading.position, dict(reading.skipped), closes)
                    yield texts, closes, batch
                    texts, closes, docs, chars = [], [], [], 0
        yield texts, closes, Batch(docs, ui + 1, 0, done_before[ui + 1], dict(reading.skipped), closes)


def _pieces(d: Document | LongDocument, cutter: Cutter) -> tuple[int, Iterator[str] | None]:
    """How many pieces ``cutter`` cuts a document into, and the pieces (None: it cannot be cut); a
    long document's places are all found (or refused) before its first piece is read."""
    if isinstance(d, LongDocument):
        cuts = cut_places(cutter, d.text)
        return (0, None) if cuts is None else (len(cuts) + 1, split_at(d.text, cuts))
    spans = cutter.spans(d.text)
    if spans is None:
        return 0, None
    return len(spans), (d.text if len(spans) == 1 else d.text[a:b] for a, b in spans)


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


def _bpe_sample(units: list[Unit], cfg: PrepareConfig, log, taken: list[int]) -> Iterator[str | Text]:
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
                taken[0] += length(d.text)  # a LongDocument's text goes as a Text, read again by the trainer
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
