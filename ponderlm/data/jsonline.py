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
