"""ponderlm.data.jsonline: the text field of a long .jsonl line read from its bytes must be exactly
what json.loads gives, and a line that is not valid JSON must be refused (ValueError) or handed back
to the ordinary path (None), never read as something else."""

from __future__ import annotations

import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ponderlm.data.jsonline import field_bytes, stream_field, utf8_error

INVALID, NO_FIELD = object(), object()


def expected(line: bytes, field: str):
    try:
        rec = json.loads(line.decode())
    except (ValueError, RecursionError):
        return INVALID
    if isinstance(rec, dict) and isinstance(rec.get(field), str):
        return rec[field]
    return NO_FIELD


def got(line: bytes, field: str):
    try:
        value = field_bytes(line, field)
    except (ValueError, RecursionError):
        return INVALID
    return None if value is None else value.decode()


BLOCKS = (1, 2, 3, 5, 7, 64)


def streamed(line: bytes, field: str, block: int, head: int = 4, **limits):
    """stream_field on ``line`` read from a file ``block`` bytes at a time after ``head`` bytes."""
    f = io.BytesIO(line)
    return stream_field(f.readline(head), f.readline, field, block=block, **limits)


def check_streamed(line: bytes, field: str = "text") -> int:
    """Read a block at a time, for every block size: json.loads's value and the line's length, or
    None (the ordinary path then reads it) only where it has no plain string value."""
    want = expected(line, field)
    for block in BLOCKS:
        have = streamed(line, field, block)
        if have is None:
            assert (
                want is NO_FIELD
                or want is INVALID
                or any(0xD800 <= ord(c) <= 0xDFFF for c in want)
                or (line.count(json.dumps(field).encode()) > 1)
            )
        else:
            assert isinstance(want, str) and have == (want, len(line)), block
    return len(BLOCKS)


def check(line: bytes, field: str = "text") -> None:
    """Refused only when json.loads refuses it; a value only json.loads's value; handed back (None)
    only when there is no string field, the line is invalid, or the value holds a lone surrogate."""
    want, have = expected(line, field), got(line, field)
    if have is None:
        assert want is NO_FIELD or want is INVALID or any(0xD800 <= ord(c) <= 0xDFFF for c in want)
    else:
        assert have is want if have is INVALID else have == want


_chars = st.one_of(
    st.characters(codec="utf-8"),  # no lone surrogates (json.dumps would write them as \\udXXX)
    st.sampled_from(['"', "\\", "/", "\n", "\t", "\b", "\f", "\r", "\x00", "\x1f", "\u2028", "😀", "é", "数"]),
)
_text = st.text(_chars, max_size=60)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_text, inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    before=st.dictionaries(_text, _json, max_size=3),
    after=st.dictionaries(_text, _json, max_size=3),
    value=_text,
    ascii_only=st.booleans(),
    indent=st.sampled_from([None, 0, 2]),
)
def test_same_value_as_json_loads(before, after, value, ascii_only, indent):
    rec = {**before, "text": value, **{k: v for k, v in after.items() if k != "text"}}
    line = json.dumps(rec, ensure_ascii=ascii_only, indent=indent).replace("\n", " ").encode() + b"\n"
    assert got(line, "text") == value
    check(line)
    for block in BLOCKS:
        assert streamed(line, "text", block) == (value, len(line))


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(codec="utf-8"), max_size=40), st.data())
def test_escapes_written_by_hand(value, data):
    """Escapes json.dumps never writes: \\/, upper-case hex, every character as \\uXXXX (pairs)."""
    parts = []
    for c in value:
        style = data.draw(st.sampled_from(["raw", "u", "U"]))
        if c in '"\\' or ord(c) < 0x20 or style != "raw":
            units = c.encode("utf-16-be")
            hexes = [units[i : i + 2].hex() for i in range(0, len(units), 2)]
            parts += ["\\u" + (h.upper() if style == "U" else h) for h in hexes]
        else:
            parts.append(c)
    line = ('{"a": [1, {"text": "no"}], "text": "' + "".join(parts) + '\\/", "z": {"text": 2}}').encode()
    assert got(line, "text") == value + "/"
    for block in BLOCKS:  # surrogate pairs and escapes cut by every block boundary
        assert streamed(line, "text", block) == (value + "/", len(line))


@pytest.mark.parametrize(
    "line",
    [
        rb'{"text": "a\x01b"}',  # a raw control character
        rb'{"text": "a\qb"}',  # not an escape
        rb'{"text": "\u12g4"}',
        rb'{"text": "\u 123"}',
        rb'{"text": "abc}',  # unterminated
        rb'{"text": "abc", }',
        rb'{"text": "abc" "x": 1}',
        rb'{"text": "abc"} x',
        rb'{"x": [1, 2}, "text": "abc"}',
        rb'{"x": tru, "text": "abc"}',
        rb'{"text": "abc"',
        rb'{text: "abc"}',
        b'{"text": "abc", "x": "\\xff"}',
        b'{"text": "\\ud800"}',  # a lone surrogate: valid JSON, left to json.loads
        b'{"text": "\\ud83d\\u0041"}',
        b'{"text": "\\udc00\\ud83d"}',
        b'{"text": "ok", "text": 3}',  # the last duplicate wins: not a string
        b'{"text": 3, "text": "ok"}',
        b'{"te\\u0078t": "escaped key"}',
        b'["text", "abc"]',
        b'"text"',
        b'{"a": {"text": "nested only"}}',
        b'{"a": "}", "b": "\\\\", "text": "x\\\\\\"y"}',
        b'  {"text"  :  "spaces"  }  \r\n',
        b"{}",
        b'{"text": "' + b"[" * 50 + b'"}',
        b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b', "text": "deep"}',
    ],
)
def test_edge_cases_and_invalid_lines(line):
    check(line)
    assert check_streamed(line) == len(BLOCKS)  # every block size was compared with json.loads


def test_streamed_hands_back_what_it_does_not_read():
    """None (read again the ordinary way): invalid lines, lone surrogates, duplicate fields, lines
    over max_line, other fields over rest_limit, a line that ends inside the value."""
    assert streamed(rb'{"text": "a\qb"}', "text", 3) is None
    assert streamed(b'{"text": "\\ud800"}', "text", 3) is None
    assert streamed(rb'{"text": "\\ud800"}', "text", 3) == ("\\ud800", 19)  # an escaped backslash
    assert streamed(b'{"text": "x", "text": "y"}', "text", 3) is None
    assert streamed(b'{"text": "abc"} x', "text", 3) is None
    assert streamed(b'{"text": "abc\n', "text", 3) is None
    assert streamed(b'{"text": "abc"}\n', "text", 3, max_line=100) == ("abc", 16)
    assert streamed(b'{"text": "abc"}\n', "text", 3, max_line=15) == ("abc", 16)  # the newline not counted
    assert streamed(b'{"text": "abc"}\n', "text", 3, max_line=14) is None
    assert streamed(b'{"text": "abc"}', "text", 3, max_line=14) is None
    assert streamed(b'{"a": "0123456789", "text": "abc"}\n', "text", 3, rest_limit=64)[0] == "abc"
    assert streamed(b'{"a": "0123456789", "text": "abc"}\n', "text", 3, rest_limit=16) is None
    assert streamed('{"text": "caf\u00e9"}'.encode(), "text", 3) == ("caf\u00e9", 17)
    assert streamed(b'{"text": "caf\xe9"}', "text", 3) is None  # not UTF-8
    line = b'{"text": "' + "\u00e9\u6570\U0001f600 ab".encode() * 100 + b'"}\n'
    assert streamed(line, "text", 7, head=11) == ("\u00e9\u6570\U0001f600 ab" * 100, len(line))


def test_a_bad_line_is_refused_or_handed_back():
    assert got(rb'{"text": "a\qb"}', "text") is INVALID
    assert got(rb'{"text": "abc", }', "text") is INVALID
    assert got(b'{"text": "\\ud800"}', "text") is None
    assert got(b'{"other": "x"}', "text") is None


@pytest.mark.parametrize("data", [b"", b"abc", "é数😀".encode() * 3, b"ab\xffc", b"\xe6\x95", "数".encode() + b"\x80"])
def test_utf8_error_matches_decode(data):
    try:
        data.decode()
        want = None
    except UnicodeDecodeError as e:
        want = e.start
    assert utf8_error(data) == want


def test_utf8_error_across_blocks(monkeypatch):
    import ponderlm.data.jsonline as jl

    monkeypatch.setattr(jl, "_BLOCK", 5)
    text = ("a数😀é" * 7).encode()
    assert utf8_error(text) is None
    for cut in range(1, len(text)):
        bad = text[:cut] + b"\xff" + text[cut:]
        with pytest.raises(UnicodeDecodeError) as e:
            bad.decode()
        assert utf8_error(bad) == e.value.start
