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
None; the caller seeks back and reads the line the ordinary way.
"""

from __future__ import annotations

import codecs
import json
import re

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
_HIGH_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}")


class _Unhandled(Exception):
    """Not the plain case (or not valid): the caller reads the line again the ordinary way."""


def _unescape_some(data: bytes) -> tuple[bytes, int, bool]:
    """Unescape the start of a string literal's body (``data`` begins after the opening quote, more
    may follow): (UTF-8 bytes, bytes of ``data`` used, whether the closing quote was reached; it is
    counted as used). An escape cut by the end of ``data``, and a ``\\uD800``-``\\uDBFF`` that ends a
    run there (its low half may follow), are left unused, so no run is unescaped in two parts that
    ``json.loads`` would read differently from the whole run."""
    out = bytearray()
    pos, n = 0, len(data)
    while pos < n:
        if m := _PLAIN.match(data, pos):
            out += data[pos : m.end()]
            pos = m.end()
        elif m := _ESCAPES.match(data, pos):
            end = m.end()
            at_end = end == n or (data[end] == 0x5C and n - end < 6)
            if at_end and end - pos >= 6 and _HIGH_SURROGATE.fullmatch(data, end - 6, end):
                end -= 6
            if end > pos:
                text = json.loads(b'"' + data[pos:end] + b'"')
                if _LONE_SURROGATE.search(text):
                    raise _Unhandled
                out += text.encode()
            pos = end
            if end < m.end():
                break
        elif data[pos] == 0x22:
            return bytes(out), pos + 1, True
        elif data[pos] == 0x5C and n - pos < 6:
            break  # an escape cut by the end of data
        else:
            raise _Unhandled  # a control character, a bad escape: the ordinary path refuses it
    return bytes(out), pos, False


def _stream_literal(data: bytes, more) -> tuple[str, bytes]:
    """The value of the string literal whose body starts ``data`` and goes on in ``more()``, and the
    bytes after its closing quote. Holds the value as ``str`` and one block of bytes at a time."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    text = ""
    while True:
        out, used, closed = _unescape_some(data)
        text += decoder.decode(out)  # grows in place (the only reference)
        if closed:
            text += decoder.decode(b"", True)
            return text, data[used:]
        chunk = more()
        if not chunk:
            raise _Unhandled  # the line ended inside the value
        data = data[used:] + chunk


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


def _stream_field(head: bytes, readline, field: str, start: int, block: int, max_line: int, rest_limit: int):
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
                text, after = _stream_literal(data, line.more)
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
