"""The text field of one very long ``.jsonl`` line, read from its bytes.

``json.loads(line.decode())[field]`` holds the text twice while the line is parsed (the decoded
line and the parsed value; 2 or 4 bytes a character for text that is not Latin-1): 460 MB for a
120 MB line of mostly-ASCII text with a few non-Latin letters. :func:`field_bytes` finds the
field's string literal in the raw bytes, unescapes it into a ``bytearray`` of UTF-8 (never longer
than the literal) and parses the rest of the line, with the literal replaced by ``""``, with
``json.loads``; the caller then decodes the bytearray once. Alive at most: the raw line and the
unescaped value, then the value and its ``str``.

The result is exactly what ``json.loads`` gives: runs of escapes are unescaped by ``json.loads``
itself, and anything this path does not handle (a top level that is not an object, no such field, a
value that is not a string, a key with escapes that does not decode, an escaped lone surrogate)
returns None, so that the caller parses the line the ordinary way and reports it as it always did.

:func:`stream_field` does the same on a line read a block at a time (a file that can seek: an
uncompressed ``.jsonl``): the structure scan above, the value's literal unescaped as it arrives (no
run of escapes unescaped in two parts that ``json.loads`` would read differently, no UTF-8 character
decoded in two parts) into the value's ``str``, the rest of the line kept (bounded) and checked with
``json.loads``. Alive at most: the value as ``str``, one block, the rest of the line. Anything it
does not handle (the cases above, a duplicate of the field, other fields over its bound) returns
None; the caller seeks back and reads the line the ordinary way. The literal is decoded as strict UTF-8
and unescaped by ``json.loads`` a block at a time (:class:`Literal`), never across a place where an
escape or a surrogate pair would be read differently.

:func:`scan_field` checks such a line in full keeping nothing of its value but its length, where it
lies, and places to read it again from; :func:`read_value` then reads any stretch of it again from
the file (:mod:`.longtext`): a line of any length costs one block of memory.
"""

from __future__ import annotations

import bisect
import codecs
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

# in a string literal: a run of plain bytes, or a run of escapes (JSON's own set; \uXXXX strictly hex)
_PLAIN = re.compile(rb'[^"\\\x00-\x1f]+')
_ESCAPES = re.compile(rb'(?:\\(?:u[0-9a-fA-F]{4}|["\\/bfnrt]))+')
_STRUCTURE = re.compile(rb'["{}\[\],]')
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_BLOCK = 1 << 20


def utf8_error(data: bytes) -> int | None:
    """The offset of the first byte of ``data`` that is not UTF-8 (what ``data.decode()`` reports as
    ``e.start``), or None; checked a megabyte at a time, so no copy of ``data`` is made."""
    view = memoryview(data)
    i = 0
    while i < len(data):
        final = i + _BLOCK >= len(data)
        try:  # not final: a character cut by the block's end is left to the next block
            _, used = codecs.utf_8_decode(view[i : i + _BLOCK], "strict", final)
        except UnicodeDecodeError as e:
            return i + e.start
        i += used
        if final:
            break
    return None


def _string_end(line: bytes, quote: int) -> int:
    """The end of the string literal that starts at ``line[quote]`` (a ``"``); ValueError if none."""
    j = quote + 1
    while True:
        k = line.find(b'"', j)
        if k < 0:
            raise ValueError("unterminated string")
        backslashes = 0
        while line[k - 1 - backslashes] == 0x5C:
            backslashes += 1
        if backslashes % 2 == 0:
            return k + 1
        j = k + 1


def _field_literal(line: bytes, field: str, start: int) -> tuple[int, int] | None:
    """(start, end) of the string literal that is the value of the top-level key ``field`` (the last
    one, as ``json.loads`` keeps the last of duplicate keys). Only right for valid JSON: the caller
    validates the line around it."""
    depth, expect_key, is_field, found = 0, False, False, None
    pos = start
    while m := _STRUCTURE.search(line, pos):
        c, pos = line[m.start()], m.end()
        if depth == 0 and c != ord("{"):
            return None  # not an object
        if c == ord('"'):
            end = _string_end(line, m.start())
            if depth == 1 and expect_key:
                try:
                    is_field = json.loads(line[m.start() : end].decode()) == field
                except (ValueError, RecursionError):
                    return None
                expect_key = False
                if is_field:
                    found = None  # a later duplicate replaces an earlier value
            elif depth == 1 and is_field:
                found = (m.start(), end)
            pos = end
        elif c in b"{[":
            depth += 1
            expect_key = depth == 1
        elif c in b"}]":
            depth -= 1
            is_field = is_field and depth > 1
            if depth == 0:
                break
        elif c == ord(",") and depth == 1:
            expect_key, is_field = True, False
    return found


def _unescape(line: bytes, a: int, b: int) -> bytearray | None:
    """The UTF-8 bytes of the string literal ``line[a:b]`` (quotes included), unescaped; ValueError
    if it is not a valid literal, None for an escaped lone surrogate."""
    out = bytearray(b - a)  # unescaping never lengthens
    n = 0
    view = memoryview(line)
    pos, end = a + 1, b - 1
    while pos < end:
        if m := _PLAIN.match(line, pos, end):
            piece = view[pos : m.end()]
        elif m := _ESCAPES.match(line, pos, end):
            text = json.loads(b'"' + line[pos : m.end()] + b'"')
            if _LONE_SURROGATE.search(text):
                return None
            piece = text.encode()
        else:
            raise ValueError(f"invalid string literal at byte {pos}")  # a control character, a bad escape
        out[n : n + len(piece)] = piece
        n += len(piece)
        pos = m.end()
    del out[n:]
    return out


def field_bytes(line: bytes, field: str, start: int = 0) -> bytearray | None:
    """The UTF-8 bytes of ``json.loads(line[start:].decode())[field]``, for a ``line`` that is UTF-8
    (see :func:`utf8_error`). ValueError: the line is not valid JSON. None: not an object with a
    string ``field``, or a value this path does not handle; parse the line the ordinary way."""
    span = _field_literal(line, field, start)
    if span is None:
        return None
    a, b = span
    value = _unescape(line, a, b)
    if value is None:
        return None
    rest = json.loads((line[start:a] + b'""' + line[b:]).decode())  # the line around it is valid JSON
    if not (isinstance(rest, dict) and rest.get(field) == ""):
        return None  # cannot happen for valid JSON; the ordinary path decides
    return value


# ------------------------------------------------------------------ the line read a block at a time
_HIGH_ESCAPE = re.compile(r"\\u[dD][89abAB][0-9a-fA-F]{2}")


class _Unhandled(Exception):
    """Not the plain case (or not valid): the caller reads the line again the ordinary way."""


def _closing_quote(s: str) -> int:
    """The index of the first ``"`` of ``s`` not escaped (``s`` starts between two tokens of a
    string literal's body), or -1."""
    j = s.find('"')
    while j >= 0:
        k = j
        while k > 0 and s[k - 1] == "\\":
            k -= 1
        if (j - k) % 2 == 0:
            return j
        j = s.find('"', j + 1)
    return -1


def _escape_starts(s: str, i: int) -> bool:
    """Whether the backslash ``s[i]`` starts an escape (``s`` starts between two tokens)."""
    k = i
    while k > 0 and s[k - 1] == "\\":
        k -= 1
    return (i - k) % 2 == 0


def _safe_cut(s: str) -> int:
    """Where a literal's body read so far (``s``, no closing quote) may be unescaped up to: before
    its last escape when that is within the last 12 characters (it may be cut, or be a high
    surrogate whose low half follows), and before a high surrogate escape just before that. A run of
    escapes unescaped in parts is then read exactly as ``json.loads`` reads the whole run."""
    n = len(s)
    j = s.rfind("\\", max(0, n - 12))
    if j < 0 or not _escape_starts(s, j):
        return n  # no escape near the end, or the last backslash closes a \\\\ pair
    if j >= 6 and _HIGH_ESCAPE.fullmatch(s, j - 6, j) and _escape_starts(s, j - 6):
        return j - 6
    return j


class Literal:
    """The value of a JSON string literal, from the bytes of its body (after the opening quote) fed a
    block at a time: each block decoded as strict UTF-8 (a character cut by the block's end waits
    for the next), then unescaped with ``json.loads`` up to a place no escape or surrogate pair runs
    across (:func:`_safe_cut`). Equal, piece by piece, to ``json.loads`` of the whole literal;
    ``_Unhandled`` (or ValueError) where that refuses it or gives a lone surrogate.

    ``at`` is the number of bytes fed before the first character not yet given out: a new
    ``Literal`` fed the body from there gives the rest of the value (a place to read it again from)."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._carry = ""
        self.fed = 0
        self.closed = False
        self.after = b""  # once closed: the bytes fed after the closing quote

    @property
    def at(self) -> int:
        return self.fed - len(self._decoder.getstate()[0]) - len(self._carry.encode())

    def feed(self, raw: bytes) -> str:
        """The value's characters in ``raw`` (b"": the body ended without a closing quote)."""
        if self.closed:
            raise _Unhandled
        self.fed += len(raw)
        s = self._carry + self._decoder.decode(raw, not raw)
        q = _closing_quote(s)
        if q >= 0:
            body, self._carry, self.closed = s[:q], "", True
            self.after = s[q + 1 :].encode() + self._decoder.getstate()[0]
        elif not raw:
            raise _Unhandled  # unterminated
        else:
            k = _safe_cut(s)
            body, self._carry = (s, "") if k == len(s) else (s[:k], s[k:])
        if not body:
            return ""
        value = json.loads(f'"{body}"')  # a control character, a bad escape: ValueError
        if "\\u" in body and _LONE_SURROGATE.search(value):
            raise _Unhandled
        return value


def _stream_literal(data: bytes, more, body_at: int) -> tuple[str, bytes]:
    """The value of the string literal whose body starts ``data`` and goes on in ``more()``, and the
    bytes after its closing quote. Holds the value as ``str`` and one block of bytes at a time."""
    lit = Literal()
    text = lit.feed(data) if data else ""
    while not lit.closed:
        text += lit.feed(more())  # grows in place (the only reference)
    return text, lit.after


class _Line:
    """The rest of a line, ``readline(block)`` at a time (b"" once it has ended)."""

    def __init__(self, head: bytes, readline, block: int, max_line: int) -> None:
        self.readline, self.block, self.max_line = readline, block, max_line
        self.size, self.ended = len(head), not head or head.endswith(b"\n")

    def more(self) -> bytes:
        if self.ended:
            return b""
        chunk = self.readline(self.block)
        self.size += len(chunk)
        self.ended = not chunk or chunk.endswith(b"\n")
        if self.size - chunk.endswith(b"\n") > self.max_line:
            raise _Unhandled  # too long (its newline not counted): the ordinary path refuses it unread
        return chunk


class _Object:
    """Where :func:`_field_literal`'s scan is in a top-level object, one structural byte at a time."""

    def __init__(self) -> None:
        self.depth, self.expect_key, self.is_field, self.closed = 0, False, False, False

    def at_value(self) -> bool:
        return self.depth == 1 and self.is_field and not self.expect_key

    def see(self, c: int) -> None:
        if self.depth == 0 and c != ord("{"):
            raise _Unhandled  # not an object
        if c in b"{[":
            self.depth += 1
            self.expect_key = self.depth == 1
        elif c in b"}]":
            self.depth -= 1
            self.is_field = self.is_field and self.depth > 1
            self.closed = self.depth == 0
        elif c == ord(",") and self.depth == 1:
            self.expect_key, self.is_field = True, False

    def string(self, literal: bytes, field: str, have_value: bool) -> None:
        if self.depth == 0:
            raise _Unhandled
        if self.depth == 1 and self.expect_key:
            self.is_field = json.loads(literal.decode()) == field
            if self.is_field and have_value:
                raise _Unhandled  # a second value for the field
            self.expect_key = False


def _read_string_end(rest: bytearray, quote: int) -> int | None:
    try:
        return _string_end(rest, quote)
    except ValueError:
        return None  # not in the bytes read so far


def _stream_field(head: bytes, readline, field: str, start: int, block: int, max_line: int, rest_limit: int,
                  literal=_stream_literal):  # fmt: skip
    line, obj = _Line(head, readline, block, max_line), _Object()
    rest = bytearray(head[start:])  # the line without the value's literal ("" in its place)
    text, pos = None, 0
    while True:
        m = None if obj.closed else _STRUCTURE.search(rest, pos)
        if m is not None and rest[m.start()] == ord('"'):
            q = m.start()
            if obj.at_value():  # the value: streamed out, not kept
                if text is not None:
                    raise _Unhandled
                data = bytes(rest[q + 1 :])
                del rest[q:]
                rest += b'""'
                pos = len(rest)
                text, after = literal(data, line.more, start + q + 1)
                rest += after
                continue
            end = _read_string_end(rest, q)
            if end is not None:
                obj.string(rest[q:end], field, text is not None)
                pos = end
                continue
            m = None  # the string goes on past the bytes read so far
        if m is None:
            chunk = line.more()
            if not chunk:
                break
            rest += chunk
            if len(rest) > rest_limit:
                raise _Unhandled
            continue
        obj.see(rest[m.start()])
        pos = m.end()
    if text is None:
        raise _Unhandled
    rec = json.loads(rest.decode())  # the line around the value is valid JSON, an object
    if not (isinstance(rec, dict) and rec.get(field) == ""):
        raise _Unhandled
    return text, line.size


def stream_field(head: bytes, readline, field: str, start: int = 0, *, block: int = _BLOCK,
                 max_line: int = 1 << 29, rest_limit: int = _BLOCK) -> tuple[str, int] | None:  # fmt: skip
    """``json.loads(line[start:].decode())[field]`` and ``len(line)``, for the line that starts with
    ``head`` and goes on in ``readline(block)`` (to its newline), read a block at a time: neither
    the line nor the value's bytes are held, only the value as ``str``, the rest of the line (up to
    ``rest_limit`` bytes) and one block. None when the line is not that plain case (not UTF-8, not
    valid JSON, not an object with one string ``field``, a lone surrogate escape, over ``max_line``
    bytes, other fields over ``rest_limit``): the caller reads the line again the ordinary way,
    which reports it as it always did."""
    try:
        return _stream_field(head, readline, field, start, block, max_line, rest_limit)
    except (_Unhandled, ValueError, RecursionError):
        return None


@dataclass
class Scan:
    """Where a line's text field lies, found by :func:`scan_field` without holding it."""

    size: int  # the line's length in bytes
    body_at: int  # the offset in the line of the value's literal's body (after its opening quote)
    length: int  # characters of the value
    stripped: tuple[int, int]  # the value's characters without the whitespace at its ends (a, b)
    index: list[tuple[int, int]]  # (characters before, offset in the body): where it may be read again from


def _scan_literal(data: bytes, more, body_at: int) -> tuple[Scan, bytes]:
    lit = Literal()
    n, first, last = 0, None, 0
    index = [(0, 0)]
    while not lit.closed:
        value = lit.feed(data if data else more())
        data = b""
        if value:
            lead = len(value) - len(value.lstrip())
            if lead < len(value):
                first = n + lead if first is None else first
                last = n + len(value.rstrip())
            n += len(value)
        if not lit.closed and index[-1][0] < n:
            index.append((n, lit.at))
    stripped = (first, last) if first is not None else (0, 0)
    return Scan(0, body_at, n, stripped, index), lit.after


def scan_field(head: bytes, readline, field: str, start: int = 0, *, block: int | None = None,
               max_line: int = 1 << 29, rest_limit: int = _BLOCK) -> Scan | None:  # fmt: skip
    """:func:`stream_field` that keeps nothing of the value: the line is checked in full (exactly
    where ``stream_field`` gives a value) and the value's place in it recorded, to be read again
    with :func:`read_value`. None where ``stream_field`` gives None."""
    block = block or _BLOCK  # (read when called: tests make it small)
    try:
        scan, size = _stream_field(head, readline, field, start, block, max_line, rest_limit, _scan_literal)
    except (_Unhandled, ValueError, RecursionError):
        return None
    scan.size = size
    return scan


def read_value(read_at, scan: Scan, a: int = 0, b: int | None = None, block: int | None = None) -> Iterator[str]:
    """Characters ``a`` to ``b`` of the value :func:`scan_field` found, in pieces of about a block,
    read again from the line with ``read_at(offset in the line, n)`` (bytes)."""
    b = scan.length if b is None else b
    block = block or _BLOCK
    if a >= b:
        return
    n, at = scan.index[bisect.bisect_right(scan.index, (a, 1 << 62)) - 1]
    lit = Literal()
    at += scan.body_at
    while n < b and not lit.closed:
        raw = read_at(at, min(block, scan.size - at))  # never past the line's end
        at += len(raw)
        try:
            value = lit.feed(raw)
        except (_Unhandled, ValueError) as e:  # read before: the file changed since
            raise ValueError("the input changed while it was read") from e
        lo, hi = max(a - n, 0), min(b - n, len(value))
        if hi > lo:
            yield value if hi - lo == len(value) else value[lo:hi]
        n += len(value)
