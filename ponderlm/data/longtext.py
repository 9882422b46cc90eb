"""Documents too long to hold as one ``str``, read again from their input as often as needed.

A ``.jsonl`` line over ``inputs.STREAM_LINE`` bytes is first checked in full without keeping its
text (:func:`.jsonline.scan_field`); its text field is then a :class:`Text`: its length and its
characters, read again from the file a block at a time (:class:`ValueText`). Everything downstream
gives exactly what it gives for the text held whole, from a window of it:

- :func:`long_documents`: the :class:`~.sources.Document`\\ s of :func:`~.sources.split_long`: the
  paragraphs (``re.split(r"\\n\\s*\\n", text.strip())``) joined into pieces of ``MAX_DOC_CHARS``. A
  paragraph over ``LONG_CHARS`` characters (a text without blank lines) is not held: the document
  it ends is a :class:`LongDocument`, whose text is the held paragraphs and the place of the long one.
- :func:`cut_places`: :meth:`.cut.Cutter.places` (where the tokenizer may be cut, or None when a
  stretch has no safe place: known before any piece is sent); :func:`split_at`: the pieces.
- :func:`trainer_texts`: the texts the BPE trainer sees (:func:`.tokenizer.trainer_pieces`).

Memory: a window of about ``MAX_UNCUT_CHARS`` + ``LONG_CHARS`` characters and one read block,
whatever the document's length. assign_split and the BPE sample's draw hash the source and the
document id only: they need no text.
"""

from __future__ import annotations

import itertools
import re
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ponderlm.data.cut import ADDED_TOKEN_MARGIN, Cutter
from ponderlm.data.jsonline import Scan, read_value
from ponderlm.data.sources import MAX_DOC_CHARS, Document

LONG_CHARS = 1 << 20  # a paragraph or trainer piece longer than this is read again, not held
_BREAK = re.compile(r"\n\s*\n")
_LEADING_RUN = re.compile(r"\S*")
_TRAILING_RUN = re.compile(r"\S+\Z")


class Text(ABC):
    """Characters read again from their input: ``length`` and ``chunks(a, b)`` (characters ``a`` to
    ``b`` in pieces of about a read block, in order). Its kinds: :class:`ValueText` (a long line's
    text field), :class:`Joined` (paragraphs of one, joined as split_long joins them) and
    :class:`Slice` (a stretch of another)."""

    length: int

    @abstractmethod
    def chunks(self, a: int = 0, b: int | None = None) -> Iterator[str]: ...

    def read(self, a: int = 0, b: int | None = None) -> str:
        """Characters ``a`` to ``b`` as one ``str`` (for short stretches)."""
        return "".join(self.chunks(a, b))


class ValueText(Text):
    """The text field of a long ``.jsonl`` line that :func:`.jsonline.scan_field` found at ``line_at``
    of ``file`` (a file object of its own, or a temporary copy of the line; closed with this object)."""

    def __init__(self, file, line_at: int, scan: Scan) -> None:
        self.file, self.line_at, self.scan, self.length = file, line_at, scan, scan.length
        weakref.finalize(self, file.close)

    def _read_at(self, offset: int, n: int) -> bytes:
        self.file.seek(self.line_at + offset)  # every read seeks: several readers may take turns
        return self.file.read(n)

    def chunks(self, a: int = 0, b: int | None = None) -> Iterator[str]:
        return read_value(self._read_at, self.scan, a, self.length if b is None else b)


class Joined(Text):
    """``"\\n\\n".join(parts)`` where a part is a ``str`` or the characters ``(a, b)`` of ``base``."""

    def __init__(self, base: Text, parts: list[str | tuple[int, int]]) -> None:
        self.base, self.parts = base, parts
        sizes = [len(p) if isinstance(p, str) else p[1] - p[0] for p in parts]
        self.length = sum(sizes) + 2 * (len(parts) - 1)
        self._starts = list(itertools.accumulate([s + 2 for s in sizes], initial=0))

    def chunks(self, a: int = 0, b: int | None = None) -> Iterator[str]:
        b = self.length if b is None else b
        for i, part in enumerate(self.parts):
            at = self._starts[i]
            whole = part if isinstance(part, str) else None
            size = len(part) if whole is not None else part[1] - part[0]
            sep = "\n\n" if i < len(self.parts) - 1 else ""
            lo, hi = max(a - at, 0), min(b - at, size)
            if hi > lo:
                if whole is not None:
                    yield whole[lo:hi]
                else:
                    yield from self.base.chunks(part[0] + lo, part[0] + hi)
            lo, hi = max(a - at - size, 0), min(b - at - size, len(sep))
            if hi > lo:
                yield sep[lo:hi]


class Slice(Text):
    """Characters ``a`` to ``b`` of ``base``."""

    def __init__(self, base: Text, a: int, b: int) -> None:
        self.base, self.a, self.length = base, a, b - a

    def chunks(self, a: int = 0, b: int | None = None) -> Iterator[str]:
        b = self.length if b is None else b
        return self.base.chunks(self.a + a, self.a + min(b, self.length))


@dataclass(frozen=True)
class LongDocument:
    """A document whose text is a :class:`Text` (see :class:`~.sources.Document`)."""

    source: str
    doc_id: str
    text: Text
    split: str | None = None


def length(text: str | Text) -> int:
    return len(text) if isinstance(text, str) else text.length


# ------------------------------------------------------------------ split_long, streamed
def long_documents(source: str, doc_id: str, text: Text, stripped: tuple[int, int],
                   max_chars: int = MAX_DOC_CHARS) -> Iterator[Document | LongDocument]:  # fmt: skip
    """The documents ``split_long(source, doc_id, text)`` gives, ``stripped`` being where
    ``text.strip()`` lies: a :class:`LongDocument` for one that holds a paragraph over ``LONG_CHARS``."""
    lo, hi = stripped
    if hi - lo <= max_chars:
        if hi > lo:
            yield Document(source, doc_id, text.read(lo, hi))
        return
    parts: list[str | tuple[int, int]] = []
    size, n = 0, 0
    for para in paragraphs(text, lo, hi):
        parts.append(para)
        size += (len(para) if isinstance(para, str) else para[1] - para[0]) + 2
        if size >= max_chars:
            yield _document(source, f"{doc_id}#{n}", text, parts)
            parts, size, n = [], 0, n + 1
    if parts:
        yield _document(source, f"{doc_id}#{n}", text, parts)


def _document(source: str, doc_id: str, text: Text, parts: list) -> Document | LongDocument:
    if all(isinstance(p, str) for p in parts):
        return Document(source, doc_id, "\n\n".join(parts))
    return LongDocument(source, doc_id, Joined(text, parts))


def paragraphs(text: Text, lo: int, hi: int, hold: int | None = None) -> Iterator[str | tuple[int, int]]:
    """The paragraphs of ``text[lo:hi]`` (which starts and ends with non-space) as
    ``re.split(r"\\n\\s*\\n", ...)`` gives them: a ``str``, or ``(a, b)`` for one longer than ``hold``
    characters. A break is final once non-space text follows it in the buffer."""
    hold = LONG_CHARS if hold is None else hold
    buf, base, start = "", lo, 0  # buf is text[base:base + len(buf)]; the paragraph starts at buf[start]
    long_at = None  # where the paragraph starts when it is too long to hold (only its end is looked for)
    for chunk in text.chunks(lo, hi):
        buf += chunk
        tail = len(buf.rstrip())  # the whitespace at the end may still grow into a break
        for m in _BREAK.finditer(buf, start, tail):
            yield buf[start : m.start()] if long_at is None else (long_at, base + m.start())
            start, long_at = m.end(), None
        if long_at is None and tail - start > hold:
            long_at = base + start
        drop = tail if long_at is not None else start
        buf, base, start = buf[drop:], base + drop, start - drop if long_at is None else 0
    yield buf if long_at is None else (long_at, base + len(buf))


# ------------------------------------------------------------------ cutting for the tokenizer
class _Window:
    """``text`` read in order into ``buf`` (``text[base:base + len(buf)]``)."""

    def __init__(self, text: Text) -> None:
        self.chunks, self.buf, self.base, self.ended = text.chunks(), "", 0, False

    def fill(self, upto: int) -> None:
        while not self.ended and self.base + len(self.buf) < upto:
            chunk = next(self.chunks, None)
            if chunk is None:
                self.ended = True
            else:
                self.buf += chunk

    def drop(self, before: int, slack: int) -> None:
        """Forget the characters before ``before`` (once over ``slack`` of them: each drop copies)."""
        if before - self.base > slack:
            self.buf, self.base = self.buf[before - self.base :], before


def cut_places(cutter: Cutter, text: Text) -> list[int] | None:
    """``cutter.places(text)`` from a window of ``text``: every position the Cutter looks at lies in
    ``start - 1 - ADDED_TOKEN_MARGIN .. start + max_uncut + 2 + ADDED_TOKEN_MARGIN`` of the piece
    that starts at ``start``, and the window holds that or reaches the end of ``text``."""
    n = text.length
    if n <= cutter.segment:
        return []
    if cutter.rule is None:
        return [] if n <= cutter.max_uncut else None
    win = _Window(text)
    reach = cutter.segment + cutter.max_uncut + 3 + ADDED_TOKEN_MARGIN
    cuts: list[int] = []
    start = 0
    while n - start > cutter.segment:
        win.drop(start - ADDED_TOKEN_MARGIN - 1, cutter.max_uncut)
        win.fill(start + reach)
        s, off = win.buf, win.base
        target = start + cutter.segment
        p = cutter._place_before(s, start - off, target - off)
        if p is None:
            p = cutter._place_after(s, target - off, min(n - 1, start + cutter.max_uncut) - off)
        if p is None:
            if n - start > cutter.max_uncut:
                return None
            break
        start = p + off
        cuts.append(start)
    return cuts


def split_at(text: Text, cuts: Iterable[int], hold: int | None = None) -> Iterator[str | Text]:
    """``text`` cut before each of ``cuts`` (ascending), read once in order: each piece a ``str``,
    or a :class:`Slice` where it is longer than ``hold`` characters (None: always a ``str``)."""
    places = iter(cuts)
    upcoming = next(places, None)

    def find(chunk: str, pos: int) -> list[int]:
        nonlocal upcoming
        found = []
        while upcoming is not None and upcoming < pos + len(chunk):
            found.append(upcoming)
            upcoming = next(places, None)
        return found

    return _cut(text, find, hold)


def _cut(text: Text, find: Callable[[str, int], list[int]], hold: int | None) -> Iterator[str | Text]:
    """``text`` cut before the places ``find(chunk, pos)`` finds in each chunk (ascending, at or after
    ``pos`` and before the chunk's end), read once in order; the last piece always (even if empty)."""
    start, held, size = 0, [], 0  # the piece from start; held: its text while it has at most hold
    pos = 0
    for chunk in text.chunks():
        i = 0
        for c in find(chunk, pos):
            if c - pos > i:
                held.append(chunk[i : c - pos])
            size += c - pos - i
            yield "".join(held) if hold is None or size <= hold else Slice(text, start, c)
            start, held, size, i = c, [], 0, c - pos
        if i < len(chunk):
            size += len(chunk) - i
            if hold is None or size <= hold:
                held.append(chunk[i:] if i else chunk)
            else:
                held = []
        pos += len(chunk)
    yield "".join(held) if hold is None or size <= hold else Slice(text, start, pos)


def trainer_texts(text: Text, max_run: int) -> Iterator[str | Text]:
    """``trainer_pieces([text])``: ``text`` cut every ``max_run`` characters of each whitespace-free
    run longer than ``max_run``; a piece over ``LONG_CHARS`` characters as a :class:`Slice`."""
    long_run = re.compile(rf"\S{{{max_run + 1},}}")  # (whole runs only: words are not looked at one by one)
    run_at, last = None, 0  # where the run that reached the end of the previous chunk started; the last cut

    def cuts(s: int, e: int) -> range:
        """The cuts of the run from ``s`` found up to ``e`` (after those made, if it went on)."""
        nonlocal last
        first = s + max_run
        if last >= first:
            first = last + max_run
        found = range(first, e, max_run)  # before ``e``: before the run's end, wherever it ends
        if found:
            last = found[-1]
        return found

    def find(chunk: str, pos: int) -> list[int]:
        nonlocal run_at
        found: list[int] = []
        i = 0
        if run_at is not None:  # the run goes on at the start of this chunk
            i = _LEADING_RUN.match(chunk).end()
            found += cuts(run_at, pos + i)
            if i == len(chunk):
                return found
            run_at = None
        for m in long_run.finditer(chunk, i):
            found += cuts(pos + m.start(), pos + m.end())
        tail = _TRAILING_RUN.search(chunk, i)
        if tail is not None and tail.start() < tail.end():
            run_at = pos + tail.start()
        return found

    return _cut(text, find, LONG_CHARS)
