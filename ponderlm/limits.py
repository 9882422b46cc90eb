"""Bounds on what a user controls: sizes in a config or a checkpoint, metadata files, texts.

Every place that reads something a user or client controls keeps its memory and time bounded by
the input's size, and refuses in one line where that bound would be exceeded:

- a model config whose memory needs exceed what :func:`available_memory` reports is refused before
  anything is allocated (:mod:`ponderlm.model.size` computes the needs);
- ponderlm's small JSON/YAML files (``model_config.json``, ``manifest.json``, ``trainer_state.json``,
  ``config.yaml``, an export's ``config.json``) are read only up to :data:`MAX_METADATA_BYTES`, and
  a ``tokenizer.json`` up to :data:`MAX_TOKENIZER_BYTES` (:func:`read_limited`); JSON nested too
  deeply for the parser is refused, not a RecursionError (:func:`parse_json`);
- a prompt or a text to analyze is tokenized only as far as the model can use it
  (:func:`encode_prefix`): a 50 MB text costs its characters, not gigabytes of tokenizer output.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ponderlm.errors import InputTooLarge

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
