"""Token shards as they are written, and the journal that lets an interrupted build resume.

:class:`ShardWriter` appends token arrays to ``{split}_{i:03d}.bin`` files of at most
``shard_tokens`` tokens, hashing as it writes. Its :meth:`~ShardWriter.state` (the finished shards
with their sha256, and the open shard's length) is what a checkpoint records;
:meth:`~ShardWriter.restore` cuts the open shard back to that length and re-reads it to rebuild
the running hash.

A resumable build keeps ``build.json`` in its hidden build directory: the fingerprint of the
settings, where in the input stream the build stood, and every writer's state at that moment. It
is written (atomically, after the shards were flushed to disk) between batches, whenever a shard
has been finished since the last one and at least every ``CHECKPOINT_SECONDS``. On resume,
everything written after the last checkpoint is cut away and the build continues from there.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np

from ponderlm.errors import DataError

JOURNAL = "build.json"
JOURNAL_VERSION = 1
CHECKPOINT_SECONDS = 60.0
_SHARD_FILE = re.compile(r".+_\d{3,}\.bin")


class ShardWriter:
    """Appends token arrays to ``{split}_{i:03d}.bin`` files of at most ``shard_tokens``."""

    def __init__(self, root: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.root, self.split, self.dtype, self.limit = root, split, np.dtype(dtype), shard_tokens
        self.shards: list[dict] = []
        self._f = None
        self._n = 0
        self._hash = hashlib.sha256()

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._f = open(self.root / name, "wb")  # noqa: SIM115 -- closed in _close
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0})
        self._n = 0

    def _close(self) -> None:
        if self._f is not None:
            self._f.close()
            self.shards[-1]["tokens"] = self._n
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._f = None

    def write(self, tokens: np.ndarray) -> None:
        tokens = tokens.astype(self.dtype, copy=False)
        while len(tokens):
            if self._f is None or self._n >= self.limit:
                self._close()
                self._open()
            take = tokens[: self.limit - self._n]
            b = take.tobytes()
            self._f.write(b)
            self._hash.update(b)
            self._n += len(take)
            tokens = tokens[len(take) :]

    def finish(self) -> list[dict]:
        self._close()
        return self.shards

    @property
    def finished(self) -> int:
        """Shards closed so far."""
        return len(self.shards) - (self._f is not None)

    def sync(self) -> None:
        """Flush the open shard to disk (before a checkpoint records its length)."""
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())

    def state(self) -> dict:
        done = self.shards[: self.finished]
        current = {"file": self.shards[-1]["file"], "tokens": self._n} if self._f is not None else None
        return {"shards": [dict(s) for s in done], "open": current}

    def restore(self, state: dict) -> None:
        """Continue from a checkpointed ``state``: finished shards as they were, the open one cut
        back to its recorded length. A file that no longer matches is a DataError."""
        itemsize = self.dtype.itemsize
        for sh in state["shards"]:
            p = self.root / sh["file"]
            if not p.is_file() or p.stat().st_size != sh["tokens"] * itemsize:
                raise DataError(f"cannot resume: {p} is not the shard the interrupted build finished")
        self.shards = [dict(s) for s in state["shards"]]
        current = state["open"]
        if current is None:
            return
        p = self.root / current["file"]
        size = current["tokens"] * itemsize
        if not p.is_file() or p.stat().st_size < size:
            raise DataError(f"cannot resume: {p} is shorter than the interrupted build recorded")
        self._f = open(p, "r+b")  # noqa: SIM115 -- closed in _close
        self._f.truncate(size)
        self._hash = hashlib.sha256()
        while chunk := self._f.read(1 << 22):
            self._hash.update(chunk)
        self._f.seek(size)
        self.shards.append({"file": current["file"], "tokens": 0})
        self._n = current["tokens"]

    def abandon(self) -> None:
        """Close the open shard without finishing it (an interrupted build)."""
        if self._f is not None:
            self._f.close()
            self._f = None


def read_journal(build_dir: Path) -> dict | None:
    """The checkpoint of an interrupted build, or None when there is none (or it is unreadable:
    a build killed before its first checkpoint has nothing to resume)."""
    try:
        journal = json.loads((build_dir / JOURNAL).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(journal, dict) and journal.get("version") == JOURNAL_VERSION and "fingerprint" in journal
    return journal if ok else None


def write_journal(build_dir: Path, journal: dict) -> None:
    tmp = build_dir / f".{JOURNAL}.tmp"
    tmp.write_text(json.dumps({"version": JOURNAL_VERSION, **journal}) + "\n")
    os.replace(tmp, build_dir / JOURNAL)


def finished_shards(journal: dict) -> int:
    return sum(len(w["shards"]) for w in journal["writers"].values())


def roll_back(build_dir: Path, journal: dict | None) -> None:
    """Cut a build directory back to its last checkpoint: open shards truncated to their recorded
    length, shard files made after it removed. (Everything in the directory is ours: it is the
    hidden, marked build directory.)"""
    keep: dict[str, int] = {}
    itemsize = np.dtype(journal["dtype"]).itemsize if journal else 1
    for w in (journal or {}).get("writers", {}).values():
        keep.update({sh["file"]: sh["tokens"] * itemsize for sh in w["shards"]})
        if w["open"] is not None:
            keep[w["open"]["file"]] = w["open"]["tokens"] * itemsize
    for p in build_dir.iterdir():
        if not _SHARD_FILE.fullmatch(p.name):
            continue
        if p.name not in keep:
            p.unlink()
        elif p.stat().st_size > keep[p.name]:
            os.truncate(p, keep[p.name])
