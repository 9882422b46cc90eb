"""The user's own corpus for ``ponderlm data prepare --input``: finding the files, and reading
them as a stream of documents without ever holding a file in memory.

Formats (by file name):

| name | a document is | read with |
|---|---|---|
| ``*.txt`` | the whole file (long ones cut at paragraphs) | Python, 1 MB at a time |
| ``*.jsonl``, ``*.jsonl.gz``, ``*.jsonl.zst`` | the text field of each line | Python (gzip), ``zstandard`` |
| ``*.parquet`` | the text column of each row | ``pyarrow``, one row group at a time |
| a ``datasets`` ``save_to_disk`` directory | the text column of each row | ``pyarrow`` (Arrow streams) |
| ``*.bin`` | uint16 ids, documents closed by end-of-text | ``numpy.memmap`` (in :mod:`.prepare`) |

Directories are searched recursively for the text formats; a path with ``*``, ``?`` or ``[`` that
does not exist as written is a glob (``**`` recursive). A document's id is its file's name with the
line or row number (``notes.jsonl:41``), never its path: the hash split then does not move documents
when a corpus is moved. Memory per reader is bounded by one read buffer and the largest single
document: a ``.jsonl`` line or Arrow/Parquet cell over ``MAX_LINE`` bytes is a bad document (``too_long``),
Parquet is read ``PARQUET_BATCH_ROWS`` rows at a time, and a line over ``LONG_LINE`` bytes has its text field
read from its bytes (:mod:`.jsonline`), not decoded and parsed whole. In an uncompressed ``.jsonl`` such a line
is checked a block at a time and its text read again from the file when needed, never held whole
(:mod:`.longtext`); a ``.jsonl.gz``/``.zst`` line over ``SPILL_LINE`` bytes is copied to a temporary file
(``TMPDIR``) and read from there the same way.

A document that cannot be read (bytes that are not UTF-8, a line that is not JSON, a missing or
null text field, a corrupt stretch of a compressed file or Parquet row group) ends the build with
one line naming the file and the line, byte or row group; with ``--skip-bad-documents`` it is
skipped and counted by kind instead (meta.json ``skipped``). A corrupt compressed stream cannot be
resynchronised: the rest of that file is skipped, from the last whole read of ``STREAM_CHUNK``
decompressed bytes before the damage (counted as one ``corrupt_stream``).
"""

from __future__ import annotations

import codecs
import glob
import gzip
import importlib
import io
import json
import re
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ponderlm.data.jsonline import field_bytes, scan_field, utf8_error
from ponderlm.data.longtext import ValueText, long_documents
from ponderlm.data.sources import MAX_DOC_CHARS, Document, split_long
from ponderlm.errors import DataError, describe_os_error, shown

TEXT_KINDS = {".jsonl.gz": "jsonl.gz", ".jsonl.zst": "jsonl.zst", ".jsonl": "jsonl", ".txt": "txt",
              ".parquet": "parquet"}  # fmt: skip
HF_STATE = "state.json"  # a Dataset saved with save_to_disk: state.json + dataset_info.json + *.arrow
HF_DICT = "dataset_dict.json"  # a DatasetDict: one such directory per split
READ_CHUNK = 1 << 20  # bytes read at a time from a .txt file
STREAM_CHUNK = 1 << 16  # decompressed bytes read at a time from a .gz/.zst file
WHOLE_TXT = 64 << 20  # .txt files up to this size are read whole (exactly as before streaming)
MAX_PARAGRAPH = 64 << 20  # characters: a longer paragraph (no blank line) is cut there
LONG_LINE = 1 << 20  # bytes: a longer .jsonl line has its text field read from the bytes (jsonline.py)
SPILL_LINE = 8 << 20  # bytes: a longer .jsonl.gz/.zst line is copied to a temporary file and read from there
MAX_LINE = 1 << 29  # bytes: a longer .jsonl line is a bad document (too_long), skipped unread
PARQUET_BATCH_ROWS = 256  # rows of a Parquet row group read (of an Arrow batch converted) at a time


@dataclass(frozen=True)
class InputFile:
    """One file of the user's corpus: what it is, how big (for progress), and the name its
    document ids start with."""

    path: Path
    kind: str  # txt, jsonl, jsonl.gz, jsonl.zst, parquet, arrow
    size: int
    name: str


def text_kind(path: Path) -> str | None:
    """The text format of a file name, or None (``.bin`` and anything else)."""
    name = path.name.lower()
    return next((kind for suffix, kind in TEXT_KINDS.items() if name.endswith(suffix)), None)


def need(module: str):
    """Import an optional dependency, or a one-line DataError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(
            f"reading this input needs the {module.split('.')[0]} package: pip install 'ponderlm[data]'"
        ) from None


def _is_glob(text: str) -> bool:
    return any(c in text for c in "*?[")


def _expand(p: Path) -> list[Path]:
    """A path as given, or the sorted matches of a glob (a path that does not exist as written)."""
    if p.exists() or not _is_glob(str(p)):
        if not p.exists():
            raise DataError(f"input not found: {p}")
        return [p]
    found = sorted(Path(m) for m in glob.glob(str(p), recursive=True))
    if not found:
        raise DataError(f"no files match {p}")
    return found


def _hf_dataset(d: Path) -> list[InputFile]:
    """The Arrow files of a Dataset saved with ``save_to_disk`` (listed in its state.json)."""
    try:
        state = json.loads((d / HF_STATE).read_text(encoding="utf-8"))
        names = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        raise DataError(f"{d / HF_STATE} is not the state.json of a dataset saved with save_to_disk") from None
    files = []
    for n in names:
        f = d / n
        if not f.is_file() or Path(n).name != n:
            raise DataError(f"{d}: {n}, listed in {HF_STATE}, is missing")
        files.append(InputFile(f, "arrow", f.stat().st_size, f"{d.name}/{n}"))
    return files


def _in_directory(d: Path) -> list[InputFile]:
    if (d / HF_DICT).is_file():
        splits = sorted(p.name for p in d.iterdir() if (p / HF_STATE).is_file())
        raise DataError(
            f"{d} holds a DatasetDict (splits: {', '.join(splits) or 'none'}); pass one split's directory, e.g. "
            f"{d / (splits[0] if splits else 'train')}"
        )
    if (d / HF_STATE).is_file():
        return _hf_dataset(d)
    try:
        found = sorted(f for f in d.rglob("*") if text_kind(f) and f.is_file())
    except OSError as e:
        raise DataError(describe_os_error(e, f"listing {d}")) from None
    if not found:
        raise DataError(
            f"input directory {d} holds no .txt, .jsonl(.gz/.zst) or .parquet files (give .bin files one by one)"
        )
    return [_text_input(f) for f in found]


def _text_input(p: Path) -> InputFile:
    size = p.stat().st_size
    if size == 0:
        raise DataError(f"{p} is empty")
    return InputFile(p, text_kind(p), size, p.name)


def find_inputs(paths: list[Path], log=None) -> tuple[list[InputFile], list[Path]]:
    """The user's inputs, checked before anything is read or written: (text inputs, .bin files).

    A file given twice (the same path, two globs or a directory that match it, a symbolic or hard
    link to it: the same device and inode) is read once, and ``log`` says so: a duplicate would
    weigh its text twice."""
    texts: list[InputFile] = []
    bins: list[Path] = []
    for given in map(Path, paths):
        for p in _expand(given):
            if p.is_dir():
                texts += _in_directory(p)
            elif not p.is_file():
                raise DataError(f"input {p} is not a regular file")
            elif p.suffix == ".bin":
                bins.append(_checked_bin(p))
            elif text_kind(p) is None:
                raise DataError(
                    f"unsupported input {p}: expected .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet, .bin, a directory "
                    "or a dataset saved with save_to_disk"
                )
            else:
                texts.append(_text_input(p))
    seen: dict[tuple[int, int], Path] = {}
    twice: list[tuple[Path, Path]] = []

    def first_time(p: Path) -> bool:
        st = p.stat()  # the file itself (device, inode): ten times faster than resolve() on many files
        r = (st.st_dev, st.st_ino)
        if r in seen:
            twice.append((p, seen[r]))
            return False
        seen[r] = p
        return True

    texts = [f for f in texts if first_time(f.path)]
    bins = [b for b in bins if first_time(b)]
    if twice and log is not None:
        more = f" (and {len(twice) - 1} more)" if len(twice) > 1 else ""
        p, kept = twice[0]
        same = "given more than once" if p == kept else f"the same file as {shown(kept)}"
        log(f"input {shown(p)} is {same}: each file is read once{more}")
    return texts, bins


def _checked_bin(p: Path) -> Path:
    size = p.stat().st_size
    if size == 0:
        raise DataError(f"{p} is empty")
    if size % 2:
        raise DataError(f"{p} has an odd number of bytes ({size:,}); a .bin input holds uint16 token ids, 2 bytes each")
    return p


# ------------------------------------------------------------------ reading
@dataclass
class Reading:
    """What the readers of one build share: the text field, the policy for bad documents, what was
    skipped (kind -> count), and how far into the current file they are (bytes, for progress)."""

    text_field: str = "text"
    skip_bad: bool = False
    skipped: dict[str, int] = field(default_factory=dict)
    position: int = 0  # bytes of the current input file consumed (compressed bytes for .gz/.zst)

    def bad(self, kind: str, message: str, fix: str = "fix the input") -> None:
        """A document that cannot be read: refused (one line) or, with --skip-bad-documents, counted."""
        if not self.skip_bad:
            raise DataError(f"{message}; {fix}, or pass --skip-bad-documents to skip and count such documents")
        self.skipped[kind] = self.skipped.get(kind, 0) + 1


def read_input(f: InputFile, reading: Reading) -> Iterator[Document]:
    """The documents of one input file, in file order."""
    reading.position = 0
    if f.kind == "txt":
        yield from _read_txt(f, reading)
    elif f.kind == "parquet":
        yield from _read_parquet(f, reading)
    elif f.kind == "arrow":
        yield from _read_arrow(f, reading)
    else:
        yield from _read_jsonl(f, reading)
    reading.position = f.size


def _open_raw(f: InputFile):
    try:
        return open(f.path, "rb")
    except OSError as e:
        raise DataError(describe_os_error(e, f"reading {f.path}")) from None


def _read_txt(f: InputFile, reading: Reading) -> Iterator[Document]:
    """One document per file, cut at paragraphs: small files exactly as :func:`split_long` cuts
    the whole text; bigger ones streamed through :func:`paragraph_pieces` (the same pieces)."""
    with _open_raw(f) as raw:
        if f.size <= WHOLE_TXT:
            data = raw.read()
            reading.position = len(data)
            try:
                text = data.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError as e:
                reading.bad("non_utf8", f"{f.path} is not UTF-8 text (byte {e.start})", "convert it first")
                return
            yield from split_long("user", f.name, text)
            return
        pieces = paragraph_pieces(_decoded_chunks(f, raw, reading))
        for n, piece in enumerate(pieces):
            yield Document("user", f"{f.name}#{n}", piece)


def _decoded_chunks(f: InputFile, raw, reading: Reading) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    first = True
    while True:
        chunk = raw.read(READ_CHUNK)
        try:
            text = decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as e:
            reading.bad(
                "non_utf8", f"{f.path} is not UTF-8 text (byte {reading.position + e.start})", "convert it first"
            )
            return  # skipped: the rest of the file (counted once)
        reading.position += len(chunk)
        if first:
            text, first = text.removeprefix("\ufeff"), False
        if text:
            yield text
        if not chunk:
            return


_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def paragraphs(chunks: Iterator[str]) -> Iterator[str]:
    """The paragraphs ``re.split(r"\\n\\s*\\n", text.strip())`` gives, from the text in pieces.

    A break is final once non-space text follows it inside the buffer; the text from the last final
    break on is carried to the next chunk. A paragraph longer than ``MAX_PARAGRAPH`` characters is
    cut there (no text without a blank line may hold the memory)."""
    buf, started = "", False
    for chunk in chunks:
        if not started:
            chunk = chunk.lstrip()
            started = bool(chunk)
        buf += chunk
        tail = len(buf.rstrip())  # the whitespace at the end may still grow
        start = 0
        for m in _PARAGRAPH_BREAK.finditer(buf, 0, tail):
            yield buf[start : m.start()]
            start = m.end()
        buf = buf[start:]
        while len(buf) > MAX_PARAGRAPH:
            yield buf[:MAX_PARAGRAPH]
            buf = buf[MAX_PARAGRAPH:]
    buf = buf.rstrip()
    if started:
        yield from _PARAGRAPH_BREAK.split(buf)


def paragraph_pieces(chunks: Iterator[str], max_chars: int = MAX_DOC_CHARS) -> Iterator[str]:
    """Paragraphs joined into pieces of about ``max_chars``, as :func:`split_long` joins them for a
    text longer than ``max_chars``."""
    piece: list[str] = []
    size = 0
    for para in paragraphs(chunks):
        piece.append(para)
        size += len(para) + 2
        if size >= max_chars:
            yield "\n\n".join(piece)
            piece, size = [], 0
    if piece:
        yield "\n\n".join(piece)


_STREAM_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)


def _binary_lines(f: InputFile, raw):
    """The decompressed byte stream of a .jsonl(.gz/.zst) file and the errors that mean it is corrupt."""
    if f.kind == "jsonl.gz":
        return io.BufferedReader(gzip.GzipFile(fileobj=raw), STREAM_CHUNK), _STREAM_ERRORS
    if f.kind == "jsonl.zst":
        zstd = need("zstandard")
        reader = zstd.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        return io.BufferedReader(reader, STREAM_CHUNK), (*_STREAM_ERRORS, zstd.ZstdError)
    return raw, ()


def _read_jsonl(f: InputFile, reading: Reading) -> Iterator[Document]:
    with _open_raw(f) as raw:
        stream, corrupt = _binary_lines(f, raw)
        offset, n = 0, -1  # decompressed bytes before the line; its index
        while True:
            try:
                if f.kind == "jsonl":
                    reopen = lambda: open(f.path, "rb")  # noqa: E731, SIM115 -- owned (closed) by the ValueText
                    line, size, text = _next_plain_line(stream, reading.text_field, n < 0, reopen)
                else:
                    line, size, text = _next_packed_line(stream, reading.text_field, n < 0)
            except corrupt as e:
                where = (
                    f"near byte {raw.tell():,} of the compressed file" if f.kind != "jsonl" else f"at byte {offset:,}"
                )
                reading.bad("corrupt_stream", f"{f.path}: corrupt {f.kind} data {where} ({type(e).__name__}: {e})")
                return
            if size == 0:
                return
            n += 1
            reading.position = raw.tell()
            start, offset = offset, offset + size
            if text is not None:  # a long line, checked in full: its text read again from the file
                yield from long_documents("user", f"{f.name}:{n}", text, text.scan.stripped)
                text = None
                continue
            if line is None:
                reading.bad("too_long", f"{f.path}:{n + 1} is longer than {MAX_LINE:,} bytes ({size:,} bytes)",
                            "cut it into shorter documents")  # fmt: skip
                continue
            held = [line]  # handed over: the raw line is freed once decoded (a long line is not held thrice)
            del line
            doc = _jsonl_document(f, held, n, start, reading)
            if doc is not None:
                yield from split_long("user", f"{f.name}:{n}", doc)


def _next_line(stream) -> tuple[bytes | None, int]:
    """The next line of ``stream`` and its length in bytes (0: the end). A line longer than
    ``MAX_LINE`` is None: read past a megabyte at a time, never held (it could exhaust the memory)."""
    line = stream.readline(MAX_LINE + 1)
    if len(line) <= MAX_LINE or line.endswith(b"\n"):
        return line, len(line)
    size = len(line)
    del line
    while (more := stream.readline(READ_CHUNK)) and not more.endswith(b"\n"):
        size += len(more)
    return None, size + len(more)


def _next_plain_line(stream, field: str, first: bool, reopen) -> tuple[bytes | None, int, ValueText | None]:
    """:func:`_next_line` for an uncompressed ``.jsonl`` (a file that can seek); a line over
    ``LONG_LINE`` bytes is checked a block at a time (:func:`scan_field`: never held) and its text
    field is read again from ``reopen()`` (a file of its own) when needed. Where that does not apply,
    the line is read again the ordinary way."""
    limit = min(LONG_LINE, MAX_LINE)
    head = stream.readline(limit + 1)
    if len(head) <= limit or head.endswith(b"\n"):
        return head, len(head), None
    at = stream.tell() - len(head)
    if LONG_LINE < MAX_LINE:  # (else it is too long: read past the ordinary way)
        bom = first and head.startswith(codecs.BOM_UTF8)
        scan = scan_field(head, stream.readline, field, 3 if bom else 0, max_line=MAX_LINE)
        if scan is not None:
            return None, scan.size, ValueText(reopen(), at, scan)
    del head
    stream.seek(at)
    return (*_next_line(stream), None)


def _next_packed_line(stream, field: str, first: bool) -> tuple[bytes | None, int, ValueText | None]:
    """:func:`_next_line` for a ``.jsonl.gz``/``.zst``: a line over ``SPILL_LINE`` bytes is copied to a
    temporary file (it cannot be read again from the stream) and read from there as from an
    uncompressed ``.jsonl``; one over ``MAX_LINE`` is read past (None), as :func:`_next_line` does."""
    head = stream.readline(SPILL_LINE + 1)
    if len(head) <= SPILL_LINE or head.endswith(b"\n"):  # the whole line
        return (head if len(head) - head.endswith(b"\n") <= MAX_LINE else None), len(head), None
    spill = tempfile.TemporaryFile()  # noqa: SIM115 -- handed to the ValueText, closed with it
    try:
        size, chunk = 0, head
        while chunk:
            size += len(chunk)
            if size - chunk.endswith(b"\n") > MAX_LINE:  # too long: read past, as _next_line does
                while not chunk.endswith(b"\n") and (chunk := stream.readline(READ_CHUNK)):
                    size += len(chunk)
                spill.close()
                return None, size, None
            spill.write(chunk)
            if chunk.endswith(b"\n"):
                break
            chunk = stream.readline(READ_CHUNK)
        spill.seek(0)
        line, size, text = _next_plain_line(spill, field, first, lambda: spill)
    except BaseException:
        spill.close()
        raise
    if text is None:
        spill.close()
    return line, size, text


def _jsonl_document(f: InputFile, held: list[bytes], n: int, start: int, reading: Reading) -> str | None:
    """The text of the one line in ``held`` (None: blank, or bad and skipped)."""
    line = held.pop()
    if line.isspace():
        return None
    if len(line) > LONG_LINE:  # read from the bytes: json.loads would hold the text twice more
        bad = utf8_error(line)
        if bad is not None:
            reading.bad(
                "non_utf8", f"{f.path}:{n + 1} is not UTF-8 text (byte {start + bad:,} of the file)", "convert it first"
            )
            return None
        try:
            value = field_bytes(line, reading.text_field, 3 if n == 0 and line.startswith(codecs.BOM_UTF8) else 0)
        except (ValueError, RecursionError):
            reading.bad("invalid_json", f"{f.path}:{n + 1}: not valid JSON")
            return None
        if value is not None:
            del line
            return value.decode("utf-8")
    try:
        text = line.decode("utf-8")
        del line
    except UnicodeDecodeError as e:
        reading.bad(
            "non_utf8", f"{f.path}:{n + 1} is not UTF-8 text (byte {start + e.start:,} of the file)", "convert it first"
        )
        return None
    if n == 0:
        text = text.removeprefix("\ufeff")
    try:
        rec = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nesting deeper than Python's stack
        reading.bad("invalid_json", f"{f.path}:{n + 1}: not valid JSON")
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get(reading.text_field), str):
        reading.bad(
            "missing_field",
            f'{f.path}:{n + 1}: each line needs a JSON object with a string "{reading.text_field}" field',
        )
        return None
    text = rec[reading.text_field]
    if _LONE_SURROGATE.search(text):  # "\ud800": valid JSON, but not Unicode text (a tokenizer refuses it)
        reading.bad("non_utf8", f"{f.path}:{n + 1}: the text holds a lone surrogate escape (\\ud800-\\udfff)")
        return None
    return text


def _column_texts(f: InputFile, column, first_row: int, reading: Reading) -> Iterator[tuple[int, str]]:
    """(row, text) of an Arrow string column; nulls, undecodable values and values over ``MAX_LINE``
    bytes (never converted) are bad documents."""
    sizes = need("pyarrow.compute").binary_length(column).to_pylist()
    values = column.to_pylist() if max(filter(None, sizes), default=0) <= MAX_LINE else None
    for i, size in enumerate(sizes):
        if size is None:
            reading.bad("missing_field", f"{f.path}: row {first_row + i} has no {reading.text_field!r} (null)")
        elif size > MAX_LINE:
            reading.bad("too_long", f"{f.path}: row {first_row + i} is longer than {MAX_LINE:,} bytes ({size:,} "
                                    "bytes)", "cut it into shorter documents")  # fmt: skip
        else:
            yield first_row + i, values[i] if values is not None else column[i].as_py()


def _check_column(f: InputFile, schema, reading: Reading) -> None:
    pa = need("pyarrow")
    if reading.text_field not in schema.names:
        raise DataError(
            f"{f.path} has no column {reading.text_field!r} (columns: {', '.join(schema.names)}); name the text "
            "column with --text-field"
        )
    typ = schema.field(reading.text_field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise DataError(f"{f.path}: column {reading.text_field!r} holds {typ}, not text; name the text column with "
                        "--text-field")  # fmt: skip


def _read_parquet(f: InputFile, reading: Reading) -> Iterator[Document]:
    pa, pq = need("pyarrow"), need("pyarrow.parquet")
    try:
        pf = pq.ParquetFile(f.path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{f.path} is not a readable Parquet file ({str(e).splitlines()[0][:200]})") from None
    _check_column(f, pf.schema_arrow, reading)
    row = 0
    for rg in range(pf.num_row_groups):
        rows = pf.metadata.row_group(rg).num_rows
        done = row  # read a batch of rows at a time: one row group may hold gigabytes of text
        batches = pf.iter_batches(PARQUET_BATCH_ROWS, [rg], [reading.text_field])
        while True:
            try:
                batch = next(batches, None)
                texts = [] if batch is None else list(_column_texts(f, batch.column(0), done, reading))
            except (pa.ArrowException, OSError, UnicodeDecodeError) as e:
                msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
                reading.bad("corrupt_row_group", f"{f.path}: row group {rg} (rows {row:,}-{row + rows - 1:,}) cannot "
                                                 f"be read ({msg})")  # fmt: skip
                break  # the rest of the row group is skipped
            if batch is None:
                break
            done += batch.num_rows
            reading.position = int(f.size * (rg + (done - row) / rows) / pf.num_row_groups)
            for r, text in texts:
                yield from split_long("user", f"{f.name}:{r}", text)
        row += rows
        reading.position = f.size * (rg + 1) // pf.num_row_groups


def _read_arrow(f: InputFile, reading: Reading) -> Iterator[Document]:
    pa = need("pyarrow")
    try:
        source = pa.OSFile(str(f.path))  # plain reads: a memory map would count the whole file in RSS
        batches = pa.ipc.open_stream(source)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{f.path} is not a readable Arrow stream file ({str(e).splitlines()[0][:200]})") from None
    with source:
        _check_column(f, batches.schema, reading)
        row = 0
        while True:
            try:
                batch = batches.read_next_batch()
            except StopIteration:
                return
            except (pa.ArrowException, OSError) as e:
                reading.bad("corrupt_stream", f"{f.path}: corrupt Arrow data after row {row:,} ({e})")
                return
            reading.position = source.tell()
            for lo in range(0, batch.num_rows, PARQUET_BATCH_ROWS):  # a few rows at a time into Python strings
                part, first = batch.slice(lo, PARQUET_BATCH_ROWS), row + lo
                try:
                    texts = list(_column_texts(f, part.column(reading.text_field), first, reading))
                except UnicodeDecodeError as e:
                    reading.bad("non_utf8", f"{f.path}: rows {first:,}-{first + part.num_rows - 1:,} hold text that "
                                            f"is not UTF-8 ({e.reason})")  # fmt: skip
                    texts = []
                for r, text in texts:
                    yield from split_long("user", f"{f.name}:{r}", text)
            row += batch.num_rows
