"""Bounds on what a user controls: sizes in a config or a checkpoint, metadata files, texts.

Every place that reads something a user or client controls keeps its memory and time bounded by
the input's size, and refuses in one line where that bound would be exceeded:

- a model config whose weights (or, in training, weights, gradients, AdamW state and one
  micro-batch's activations) need more memory than this machine or device has available is refused
  *before* anything is allocated, naming the config keys (:func:`check_model_fits`,
  :func:`check_training_fits`); the estimates are lower bounds, so a refusal is never a guess;
- ponderlm's small JSON/YAML files (``model_config.json``, ``manifest.json``, ``trainer_state.json``,
  ``config.yaml``, an export's ``config.json``) are read only up to :data:`MAX_METADATA_BYTES`, and
  a ``tokenizer.json`` up to :data:`MAX_TOKENIZER_BYTES` (:func:`read_limited`); JSON nested too
  deeply for the parser is refused, not a RecursionError (:func:`parse_json`);
- a prompt or a text to analyze is tokenized only as far as the model can use it
  (:func:`encode_prefix`): a 50 MB text costs its characters, not gigabytes of tokenizer output.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import UserError

if TYPE_CHECKING:
    from .config import ModelConfig

# ponderlm's metadata files are a few KB (a model_config.json with notes in `extra` perhaps a few
# hundred); 16 MiB is far above any of them and far below what would strain memory.
MAX_METADATA_BYTES = 16 << 20
# The largest tokenizer.json of a published model we know is Gemma 3's (33 MB, 262k entries);
# a BPE of data.tokenizer.MAX_BPE_VOCAB (2**20) entries is about 4x that. Parsing costs about 10x
# the file's size in memory.
MAX_TOKENIZER_BYTES = 256 << 20
# A text given to analyze (--file): it shows the first max_seq_len tokens; 64 MiB is 16x a context of
# a million tokens at 4 bytes a token.
MAX_TEXT_BYTES = 64 << 20
# A text is tokenized in growing prefixes of at least this many characters per token needed
ENCODE_CHARS_PER_TOKEN = 8
# ... and tokens within this many of a prefix's end are not trusted (the cut may split a word)
ENCODE_MARGIN = 64


class InputTooLarge(UserError, ValueError):
    """An input is larger than ponderlm reads, or needs more memory than there is."""


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.3g} PB"  # pragma: no cover


# ------------------------------------------------------------------ files
def read_limited(path: str | Path, limit: int, what: str) -> bytes:
    """The bytes of ``path``, refusing (InputTooLarge) a file larger than ``limit``: the size is
    checked before reading, and at most ``limit + 1`` bytes are ever read (a file that grows in
    between is refused too). OSError propagates."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if size > limit or len(data) > limit:
        raise InputTooLarge(
            f"{path} is {human_bytes(max(size, len(data)))}, larger than any {what} "
            f"(ponderlm reads at most {human_bytes(limit)})"
        )
    return data


def parse_json(text: str | bytes) -> Any:
    """json.loads, with JSON nested too deeply for the parser a ValueError (not a RecursionError)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json_limited(path: str | Path, what: str, limit: int = MAX_METADATA_BYTES) -> Any:
    """A small JSON file of ponderlm's: size bounded (InputTooLarge), then parsed (ValueError for
    invalid or too deeply nested JSON, UnicodeDecodeError for bytes that are not UTF-8)."""
    return parse_json(read_limited(path, limit, what).decode("utf-8"))


# ------------------------------------------------------------------ memory
def _meminfo() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


# (directory, limit file, usage file, page-cache key of memory.stat) of cgroup v2, then v1
CGROUPS = (
    ("/sys/fs/cgroup", "memory.max", "memory.current", "file"),
    ("/sys/fs/cgroup/memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_cache"),
)


def _cgroup_room() -> int | None:
    """Bytes this process's memory cgroup still allows (v2 or v1), or None without a limit. The
    cgroup's page cache counts as room (the kernel drops it before it refuses memory), so a
    refusal never comes from files read earlier."""
    for d, limit_name, usage_name, cache_key in CGROUPS:
        try:
            limit = Path(d, limit_name).read_text().strip()
            usage = int(Path(d, usage_name).read_text().strip())
            stat = dict(line.split()[:2] for line in Path(d, "memory.stat").read_text().splitlines() if " " in line)
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:  # "max", or v1's "no limit" of about 2**63
            cache = int(stat.get(cache_key, 0)) if str(stat.get(cache_key, "0")).isdigit() else 0
            return max(int(limit) - usage + cache, 0)
    return None


def available_memory(device: Any = "cpu") -> tuple[int, str] | None:
    """(bytes that can still be allocated, how that was found) on ``device``, or None when unknown.

    CPU: MemAvailable plus free swap (/proc/meminfo), or less where this process's cgroup allows
    less; without /proc, the physical memory (os.sysconf). CUDA: the device's free memory."""
    dev = str(device)
    if dev.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(dev))
        return free, f"free on {dev}"
    info = _meminfo()
    if "MemAvailable" in info:
        room, how = info["MemAvailable"] + info.get("SwapFree", 0), "available on this machine"
    else:
        try:
            room, how = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "on this machine"
        except (ValueError, OSError, AttributeError):
            return None
    cg = _cgroup_room()
    if cg is not None and cg < room:
        room, how = cg, "left to this process's memory cgroup"
    return room, how


def parameter_count(cfg: ModelConfig) -> int:
    """The number of parameters of ``PonderLM(cfg)``, from the config alone (nothing is built):
    embedding, head (unless tied), per block q/k/v/o, SwiGLU and two norms, the final norm, a
    router and pause embeddings. ``tests/test_limits.py`` checks it equals the built model's."""
    D, V, L, hd = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.head_dim
    attn = D * cfg.n_heads * hd * 2 + D * cfg.kv_heads * hd * 2
    block = attn + 3 * D * cfg.d_ff + 2 * D
    n = V * D * (1 if cfg.tie_embeddings else 2) + L * block + D
    if cfg.has_router:
        S = cfg.max_ponder_steps + 1
        if cfg.router == "mlp":
            n += D * cfg.router_width + cfg.router_width + cfg.router_width * S + S
        else:
            n += D * S + S
    if cfg.learned_slots:
        n += cfg.max_ponder_steps * D
    return n


def model_bytes(cfg: ModelConfig) -> int:
    """A lower bound of the memory a PonderLM of ``cfg`` takes: fp32 weights plus the float64 RoPE
    tables (cos and sin, max_seq_len x head_dim each) it builds on first use."""
    return 4 * parameter_count(cfg) + 16 * cfg.max_seq_len * cfg.head_dim


SIZE_KEYS = ("vocab_size", "d_model", "n_layers", "d_ff", "max_seq_len", "max_ponder_steps")


def _keys(cfg: ModelConfig, prefix: str) -> str:
    return ", ".join(f"{prefix}{k}={getattr(cfg, k)}" for k in SIZE_KEYS)


def check_model_fits(cfg: ModelConfig, what: str, prefix: str = "model.", device: Any = "cpu") -> None:
    """Refuse (InputTooLarge) a model config whose weights alone need more memory than ``device``
    has available, before anything is allocated. ``what`` says whose config it is."""
    need = model_bytes(cfg)
    room = available_memory(device)
    if room is not None and need > room[0]:
        raise InputTooLarge(
            f"{what} needs at least {human_bytes(need)} of memory for its weights "
            f"({parameter_count(cfg):,} parameters; {_keys(cfg, prefix)}), more than the "
            f"{human_bytes(room[0])} {room[1]}"
        )


def training_bytes(cfg: ModelConfig, micro_batch: int, seq_len: int, world: int, act_bytes: int) -> dict[str, int]:
    """Lower bounds of what one training process holds: the model (:func:`model_bytes`); gradients
    and AdamW's two moments (fp32, 12 bytes a parameter, sharded over ``world`` processes at best);
    and the activations backward needs of one micro-batch: the logits, and in every block, for every
    slot of every pass backward goes through, the block's input, the attention's output and the
    SwiGLU's gate and up projections (far from all it keeps: a lower bound)."""
    params = parameter_count(cfg)
    schedule = cfg.pass_schedule(min(cfg.jacobi_train_iters))  # slots per token of each pass
    n = cfg.jacobi_grad_passes if cfg.uses_jacobi else 0
    slots = sum(schedule[-n:] if n else schedule)
    per_slot = cfg.n_layers * (2 * cfg.d_model + 2 * cfg.d_ff)
    acts = micro_batch * seq_len * (cfg.vocab_size + slots * per_slot) * act_bytes
    return {"model": model_bytes(cfg), "optimizer": math.ceil(12 * params / max(world, 1)), "activations": acts}


def check_training_fits(cfg: ModelConfig, micro_batch: int, seq_len: int, world: int, device: Any,
                        act_bytes: int) -> None:  # fmt: skip
    """Refuse (InputTooLarge) a training config that cannot fit in ``device``'s available memory,
    naming the keys that decide it, before the model or a batch is allocated."""
    parts = training_bytes(cfg, micro_batch, seq_len, world, act_bytes)
    need = sum(parts.values())
    room = available_memory(device)
    if room is None or need <= room[0]:
        return
    raise InputTooLarge(
        f"training this config needs at least {human_bytes(need)} of memory (weights {human_bytes(parts['model'])}, "
        f"gradients and AdamW state {human_bytes(parts['optimizer'])}, activations of a micro-batch of "
        f"{micro_batch} x {seq_len} tokens {human_bytes(parts['activations'])}; {_keys(cfg, 'model.')}, "
        f"train.batch_size, train.micro_batch_size, train.seq_len), more than the {human_bytes(room[0])} "
        f"{room[1]}; choose smaller sizes"
    )


# ------------------------------------------------------------------ texts
def encode_prefix(encode, text: str, need: int) -> tuple[list[int], bool]:
    """Token ids of ``text`` with ``encode``, computed only as far as ``need`` tokens require.

    Returns (ids, complete). When complete, ``ids`` are the whole text's. Otherwise the text has
    more than ``need`` tokens and ``ids`` are its first ``need``: growing prefixes of the text are
    encoded (from ``need`` x 8 characters, doubling) until one yields ``need`` + 64 tokens, and the
    last 64, near the cut, are dropped. For a tokenizer that splits text into words before merging
    (byte-level BPE: ours, GPT-NeoX, SmolLM2, Llama 3) only the word the cut splits can differ, so
    the ids kept are exactly the whole text's; for one that merges across the whole text
    (SentencePiece-style) a cut could in principle reach further back, which tests/test_limits.py
    did not see happen 64 tokens away. Memory and time follow ``need``, not the text's length (the
    text itself excepted)."""
    n = max(need * ENCODE_CHARS_PER_TOKEN, 4096)
    while n < len(text):
        ids = encode(text[:n])
        if len(ids) >= need + ENCODE_MARGIN:
            return ids[:need], False
        n *= 2
    return encode(text), True
