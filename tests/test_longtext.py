"""ponderlm.data.longtext: a document read again from its input, a window at a time, must give
exactly what the same text held as one str gives: split_long's documents, the Cutter's places, the
BPE trainer's pieces."""

from __future__ import annotations

import itertools
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cut import random_text, trained_bpe
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from ponderlm.data import longtext
from ponderlm.data.cut import Cutter
from ponderlm.data.longtext import LongDocument, Text, cut_places, long_documents, split_at, trainer_texts
from ponderlm.data.sources import split_long
from ponderlm.data.tokenizer import bounded_pieces, trainer_pieces


class StrText(Text):
    """A str served ``chunk`` characters at a time (as a file would be read)."""

    def __init__(self, s: str, chunk: int) -> None:
        self.s, self.chunk, self.length = s, chunk, len(s)

    def chunks(self, a=0, b=None):
        b = self.length if b is None else b
        for i in range(a, b, self.chunk):
            yield self.s[i : min(i + self.chunk, b)]


def stripped(s: str) -> tuple[int, int]:
    t = s.strip()
    return (s.index(t), s.index(t) + len(t)) if t else (0, 0)


def texts_of(docs) -> list[tuple[str, str]]:
    return [(d.doc_id, d.text.read() if isinstance(d, LongDocument) else d.text) for d in docs]


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet="ab \n\t\u3000", max_size=300), max_chars=st.integers(3, 40),
       chunk=st.integers(1, 17), hold=st.integers(1, 30))  # fmt: skip
def test_long_documents_are_split_longs_documents(text, max_chars, chunk, hold):
    longtext_hold = longtext.LONG_CHARS
    longtext.LONG_CHARS = hold
    try:
        docs = list(long_documents("s", "x", StrText(text, chunk), stripped(text), max_chars))
    finally:
        longtext.LONG_CHARS = longtext_hold
    assert texts_of(docs) == [(d.doc_id, d.text) for d in split_long("s", "x", text, max_chars)]
    for d in docs:  # a paragraph over the bound is not held: its document is read again
        if not isinstance(d, LongDocument) and len(text.strip()) > max_chars:
            assert all(len(p.rstrip()) <= hold + chunk for p in re.split(r"\n\s*\n", d.text))


def test_a_paragraph_without_blank_lines_is_never_held(monkeypatch):
    monkeypatch.setattr(longtext, "LONG_CHARS", 10_000)
    text = "word " * 50_000  # one paragraph of 250,000 characters
    docs = list(long_documents("s", "x", StrText(text, 1000), stripped(text)))
    assert len(docs) == 1 and isinstance(docs[0], LongDocument) and docs[0].text.read() == text.strip()


CUTTERS = {"bpe": lambda: trained_bpe(), "none": lambda: HFTokenizer(models.BPE())}


@pytest.mark.parametrize("kind", CUTTERS)
@pytest.mark.parametrize("seed", range(6))
def test_cut_places_are_the_cutters_places(kind, seed):
    """Random texts (runs of 50-400 letters without a place, whitespace runs, added tokens) against a
    small segment and bound: the same places, the same refusals (None)."""
    tk = CUTTERS[kind]()
    rng = random.Random(seed)
    refused = 0
    for _ in range(30):
        segment = rng.choice([5, 40, 97])
        cutter = Cutter(tk, segment=segment, max_uncut=rng.choice([segment + 1, 300, 1000]))
        text = random_text(rng, rng.randint(10, 6000))
        if rng.random() < 0.3:
            text += "x" * rng.randint(100, 1200) + " word" * rng.randint(0, 50)
        want = cutter.places(text)
        refused += want is None
        for chunk in (1, 7, 300, 10**6):
            assert cut_places(cutter, StrText(text, chunk)) == want
            if want is not None:
                bounds = [0, *want, len(text)]
                pieces = list(split_at(StrText(text, chunk), want))
                assert pieces == [text[a:b] for a, b in itertools.pairwise(bounds)]
    assert refused > 0 or kind == "bpe"


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab \n", max_size=400), max_run=st.integers(1, 9), chunk=st.integers(1, 23),
       hold=st.integers(1, 50))  # fmt: skip
def test_trainer_texts_are_the_trainers_pieces(text, max_run, chunk, hold):
    saved = longtext.LONG_CHARS
    longtext.LONG_CHARS = hold
    try:
        got = list(trainer_texts(StrText(text, chunk), max_run))
    finally:
        longtext.LONG_CHARS = saved
    assert [p if isinstance(p, str) else p.read() for p in got] == list(trainer_pieces([text], max_run))
    assert all(isinstance(p, str) or p.length > hold for p in got)


def test_the_bpe_trainer_sees_the_same_pieces_of_a_text_read_again():
    rng = random.Random(3)
    text = random_text(rng, 200_000) + "x" * 3000 + random_text(rng, 5000)  # a stretch without a place
    cutter = Cutter(trained_bpe(), segment=500, max_uncut=2000)
    want = list(bounded_pieces(trainer_pieces([text], 256), cutter))
    saved = longtext.LONG_CHARS
    longtext.LONG_CHARS = 700
    try:
        got = list(bounded_pieces(trainer_pieces([StrText(text, 333)], 256), cutter))
    finally:
        longtext.LONG_CHARS = saved
    assert got == want
