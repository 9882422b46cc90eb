"""Cutting a long document into pieces that tokenize to exactly the document's tokens.

Hugging Face tokenizers need about 150-200 bytes of memory per character of the text they are
given (the normalized string's alignments, the pre-tokens, the ``Encoding``), so a 120 MB document
tokenized whole took 18 GB. :class:`Cutter` cuts a long text into pieces of about
``SEGMENT_CHARS`` characters, only where the tokenizer's pre-tokenization splits anyway, so that
the ids of the pieces, concatenated, are the ids of the whole text. Whether such a place exists is
decided from the tokenizer's own description (its ``tokenizer.json``), not by trial:

- **where**: before a single space (or newline) whose neighbours are both "solid" characters
  (a letter, digit, punctuation or symbol that the tokenizer's normalizer maps to non-space
  text). Every pre-tokenizer below starts a new pre-token there, and matches no earlier text
  when it does: the GPT-2 regex of ``ByteLevel`` (no look-behind; no alternative runs from a
  solid character over whitespace; a single whitespace character before a solid one starts the
  next match), ``Metaspace`` (splits before each space, only for a space: a newline is not
  replaced), ``Whitespace``, ``WhitespaceSplit`` and ``BertPreTokenizer`` (whitespace always
  separates). A ``Sequence`` may follow its first member with any of the pre-tokenizers that
  only split the pieces they are given further (each piece is then the same piece in the whole
  text and in a cut one).
- **normalizers**: only those that map each character on its own (NFC/NFD/NFKC/NFKD: a space or
  newline never composes with a neighbour; Lowercase, StripAccents, Nmt, BertNormalizer), so the
  normalized whole is the normalized pieces end to end. ``Strip``, ``Prepend``, ``Replace`` and
  ``Precompiled`` act on a string's ends or on runs of characters: no cut.
- **added tokens**: a place is refused when an added token that contains whitespace, or that
  strips whitespace beside it (``lstrip``/``rstrip``), occurs near it.
- The ``add_prefix_space`` of ``ByteLevel`` (and ``Metaspace``'s prepended ``▁``) is only added
  to a piece that does not start with a space: cuts are then made before a space only.

Anything else (no pre-tokenizer, ``Split`` with its own regex first, other normalizers) has no
known safe place: such a tokenizer tokenizes documents of up to ``MAX_UNCUT_CHARS`` whole, as
before, and refuses a longer one (a bad document: ``--skip-bad-documents`` skips it). So does any
tokenizer for a stretch longer than ``MAX_UNCUT_CHARS`` without a safe place (a megabyte of text
without a space or newline).
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from dataclasses import dataclass

SEGMENT_CHARS = 1 << 16  # a long document is tokenized in pieces of about this many characters
MAX_UNCUT_CHARS = 1 << 20  # the longest stretch tokenized in one piece (~200 MB of tokenizer memory)
_CHAR_WISE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase", "StripAccents", "Nmt", "BertNormalizer"}
_SPLITS_AT_WHITESPACE = {"Whitespace", "WhitespaceSplit", "BertPreTokenizer"}
_SPLITS_FURTHER = {"ByteLevel", "Digits", "Punctuation", "Split", "Whitespace", "WhitespaceSplit", "BertPreTokenizer"}
ADDED_TOKEN_MARGIN = 64  # characters around a place searched for a whitespace-bearing added token


@dataclass(frozen=True)
class Rule:
    """Where a tokenizer may be cut: before one of ``cut_chars`` between two solid characters."""

    cut_chars: str  # " " or " \n"
    never_beside: str = ""  # characters that may not be a neighbour (Metaspace's replacement)


def _normalizer_problem(spec) -> str | None:
    if spec is None:
        return None
    kind = spec.get("type")
    if kind == "Sequence":
        return next((p for p in map(_normalizer_problem, spec.get("normalizers", [])) if p), None)
    return None if kind in _CHAR_WISE_NORMALIZERS else f"its normalizer {kind}"


def _first_rule(spec) -> tuple[Rule | None, str | None]:
    kind = spec.get("type")
    if kind == "ByteLevel":
        if not spec.get("use_regex", True):
            return None, "its ByteLevel pre-tokenizer without its regex"
        return Rule(" " if spec.get("add_prefix_space", False) else " \n"), None
    if kind == "Metaspace":
        if not spec.get("split", True):
            return None, "its Metaspace pre-tokenizer that does not split"
        return Rule(" ", spec.get("replacement", "\u2581")), None
    if kind in _SPLITS_AT_WHITESPACE:
        return Rule(" \n"), None
    return None, f"its pre-tokenizer {kind}"


def cut_rule(config: dict) -> tuple[Rule | None, str]:
    """The rule for a tokenizer's JSON description, or None and the reason there is none."""
    problem = _normalizer_problem(config.get("normalizer"))
    if problem:
        return None, problem
    pre = config.get("pre_tokenizer")
    if pre is None:
        return None, "it has no pre-tokenizer"
    members = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if not members:
        return None, "it has an empty pre-tokenizer sequence"
    rule, problem = _first_rule(members[0])
    if rule is None:
        return None, problem or "its pre-tokenizer"
    for later in members[1:]:
        if later.get("type") not in _SPLITS_FURTHER:
            return None, f"its pre-tokenizer {later.get('type')} after {members[0].get('type')}"
    return rule, ""


def _fold(s: str) -> str:
    return unicodedata.normalize("NFKC", s).casefold()


class Cutter:
    """``places(text)``: where to cut ``text`` into pieces that tokenize as the whole does."""

    def __init__(self, tk, segment: int = SEGMENT_CHARS, max_uncut: int = MAX_UNCUT_CHARS) -> None:
        config = json.loads(tk.to_str())
        self.rule, self.reason = cut_rule(config)
        self.segment, self.max_uncut = segment, max_uncut
        self._normalizer = tk.normalizer
        self._added = sorted(
            {
                _fold(t["content"])
                for t in config.get("added_tokens", [])
                if t.get("lstrip") or t.get("rstrip") or any(c.isspace() for c in t["content"])
            }
        )
        self._solid: dict[str, bool] = {}
        if self.rule is not None:
            cut = re.escape(self.rule.cut_chars)
            self._candidate = re.compile(rf"(?<=\S)[{cut}](?=\S)")
            self._cut_ok = {c: self._normalized(c) == c for c in self.rule.cut_chars}

    def _normalized(self, s: str) -> str:
        return s if self._normalizer is None else self._normalizer.normalize_str(s)

    def _is_solid(self, c: str) -> bool:
        ok = self._solid.get(c)
        if ok is None:
            n = self._normalized(c)
            ok = (
                unicodedata.category(c)[0] in "LNPS"
                and c not in self.rule.never_beside
                and bool(n)
                and not any(ch.isspace() for ch in n)
                and not any(ch in self.rule.never_beside for ch in n)
            )
            self._solid[c] = ok
        return ok

    def _safe(self, text: str, p: int) -> bool:
        """Whether ``text`` may be cut before ``p`` (a candidate: one cut character between
        non-space characters)."""
        if not (self._cut_ok[text[p]] and self._is_solid(text[p - 1]) and self._is_solid(text[p + 1])):
            return False
        if self._added:
            near = _fold(text[max(0, p - ADDED_TOKEN_MARGIN) : p + ADDED_TOKEN_MARGIN])
            if any(t in near for t in self._added):
                return False
        return True

    def _place_before(self, text: str, lo: int, hi: int) -> int | None:
        """The last safe place in (lo, hi), looking back from hi a little at a time."""
        step = 4096
        end = hi
        while end > lo + 1:
            start = max(lo + 1, end - step)
            for m in reversed(list(self._candidate.finditer(text, start, min(end + 2, len(text))))):
                if m.start() < end and self._safe(text, m.start()):
                    return m.start()
            end, step = start, step * 2
        return None

    def _place_after(self, text: str, lo: int, hi: int) -> int | None:
        for m in self._candidate.finditer(text, lo, min(hi + 2, len(text))):
            if m.start() < hi and self._safe(text, m.start()):
                return m.start()
        return None

    def places(self, text: str) -> list[int] | None:
        """Ascending positions to cut ``text`` before (empty: tokenize it whole), or None when a
        stretch longer than ``max_uncut`` has no safe place."""
        if len(text) <= self.segment:
            return []
        if self.rule is None:
            return [] if len(text) <= self.max_uncut else None
        cuts: list[int] = []
        start = 0
        while len(text) - start > self.segment:
            target = start + self.segment
            p = self._place_before(text, start, target)
            if p is None:
                p = self._place_after(text, target, min(len(text) - 1, start + self.max_uncut))
            if p is None:
                if len(text) - start > self.max_uncut:
                    return None
                break
            cuts.append(p)
            start = p
        return cuts

    def pieces(self, text: str) -> list[str] | None:
        """``text`` cut at :meth:`places` (None where it has none and is too long)."""
        spans = self.spans(text)
        return None if spans is None else [text[a:b] for a, b in spans]

    def spans(self, text: str) -> list[tuple[int, int]] | None:
        """The (start, end) of each piece (sliced one at a time by the caller: a list of all the
        pieces would be a second copy of the document)."""
        cuts = self.places(text)
        return None if cuts is None else list(itertools.pairwise([0, *cuts, len(text)]))
