"""Directories ponderlm owns, and the one rule for writing and replacing them.

Every directory a command creates (a dataset, a run, an export, an evaluation or analysis
output, an experiment) gets a marker file, ``.ponderlm``, written atomically when the directory
is made. A command replaces or deletes a directory only when it is *ours*: it carries the marker
of the right kind (or, for directories made before markers existed, its own metadata verifies),
and every entry in it is one the tool writes there. Anything else - a project folder that happens
to hold a ``config.yaml``, a dataset directory with the user's notes in it, the input texts of the
command itself - is refused with a one-line error, ``--overwrite`` or not.

Every command that writes a directory holds an advisory lock on it for as long as it writes
(:class:`DirLock`: ``fcntl.flock`` on a hidden sibling ``.NAME.lock``). A second process on the
same directory gets a one-line error naming the holder; a killed holder's lock is released by the
kernel, so a stale lock file never blocks anyone.

Built directories (datasets, exports, converted models) are assembled in a hidden sibling
(``.NAME.tmp``) and renamed into place (:func:`building`); a full disk or a crash leaves the
previous directory untouched and no temporary behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ponderlm.errors import DirectoryLocked, OwnershipError, describe_os_error

MARKER = ".ponderlm"
MARKER_VERSION = 1
TEMP_SUFFIXES = (".tmp", ".lock", ".old", ".del")


@dataclass(frozen=True)
class DirKind:
    """A kind of directory ponderlm writes, declared by the module that writes it (a dataset by
    :mod:`ponderlm.data.dataset`, a run by :mod:`ponderlm.training.rundir`, ...): its name in the
    marker, how messages name it, and the entries it may hold besides the marker and the hidden
    temporaries of those entries."""

    name: str  # written into the marker: "dataset", "run", ...
    noun: str  # in messages, with its article: "a dataset"
    files: frozenset[str] = frozenset()  # entries it may hold
    pattern: str | None = None  # more entries, by glob (an lm-eval task directory's ponderlm_*.yaml)
    listed: Callable[[Path], set[str]] | None = None  # more entries its own metadata lists (shards)
    legacy: Callable[[Path], bool] | None = None  # verifies an unmarked one, made before markers

    def __post_init__(self) -> None:
        _KINDS[self.name] = self

    def owns(self, directory: Path) -> Callable[[str], bool]:
        """Whether an entry name of ``directory`` is one ponderlm writes in a directory of this kind."""
        known = set(self.files) | (self.listed(directory) if self.listed else set())

        def ours(name: str) -> bool:
            if name in known or name in (MARKER, f"{MARKER}.tmp"):
                return True
            if self.pattern and fnmatch.fnmatchcase(name, self.pattern):
                return True
            # a hidden temporary of one of our own entries: .NAME.tmp / .lock / .old / .del
            return name.startswith(".") and any(name.endswith(s) and name[1 : -len(s)] in known for s in TEMP_SUFFIXES)

        return ours


_KINDS: dict[str, DirKind] = {}  # every kind declared in this process, by name (for messages)


def read_small_json(path: Path) -> Any:
    """A metadata file's JSON, read bounded, or None when it is missing, too large or not JSON
    (such a file is not one of ours either way)."""
    from ponderlm.limits import read_json_limited

    try:
        return read_json_limited(path, path.name)
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ markers
def write_marker(directory: Path, kind: DirKind) -> None:
    """Mark ``directory`` as made by ponderlm for ``kind`` (atomic: temp file, then rename)."""
    from ponderlm._version import __version__

    info = {"kind": kind.name, "noun": kind.noun, "version": MARKER_VERSION, "ponderlm": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    tmp = Path(directory) / f"{MARKER}.tmp"
    tmp.write_text(json.dumps(info) + "\n")
    tmp.replace(Path(directory) / MARKER)


def read_marker(directory: Path) -> dict | None:
    """The marker of ``directory``, or None when it has none (or an unreadable one)."""
    try:
        info = json.loads((Path(directory) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and isinstance(info.get("kind"), str) else None


def make_owned_dir(directory: Path, kind: DirKind) -> None:
    """Create ``directory`` (and its parents) and mark it; an existing one is only marked."""
    directory.mkdir(parents=True, exist_ok=True)
    if read_marker(directory) is None:
        write_marker(directory, kind)


# ------------------------------------------------------------- recognition
def foreign_entries(directory: Path, kind: DirKind) -> list[str]:
    """Entries of ``directory`` that ponderlm does not write in a directory of this kind."""
    ours = kind.owns(directory)
    return sorted(p.name for p in directory.iterdir() if not ours(p.name))


def is_kind(directory: Path, kind: DirKind) -> bool:
    """Whether ``directory`` is a ponderlm ``kind`` (by its marker, or by its own metadata when it
    predates markers), whatever else the user has put in it."""
    marker = read_marker(directory)
    if marker is not None:
        return marker["kind"] == kind.name
    return kind.legacy is not None and kind.legacy(directory)


def _noun(marker: dict) -> str:
    """How a marked directory's kind is named: as its marker says (markers since the kinds were
    declared by their writers), as this process declares it, or by the kind's bare name."""
    noun = marker.get("noun")
    if isinstance(noun, str) and " " in noun:
        return noun
    known = _KINDS.get(marker["kind"])
    return known.noun if known else f"a {marker['kind']}"


def why_not_ours(directory: Path, kind: DirKind) -> str | None:
    """None when ``directory`` is a ponderlm ``kind`` directory holding only what ponderlm put
    there; otherwise the reason, as a phrase ("holds notes.txt", ...)."""
    marker = read_marker(directory)
    if marker is not None and marker["kind"] != kind.name:
        return f"is a ponderlm {_noun(marker).split(' ', 1)[1]}, not {kind.noun}"
    if marker is None and not (kind.legacy is not None and kind.legacy(directory)):
        return f"is not {kind.noun} made by ponderlm"
    foreign = foreign_entries(directory, kind)
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        return f"holds files ponderlm did not write ({shown})"
    return None


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def check_replaceable(path: Path, kind: DirKind, *, overwrite: bool, exists_hint: str, choose: str) -> bool:
    """Decide what may happen to an output ``path`` of a command that writes a ``kind``.

    Returns True when ``path`` holds something that will be replaced (an existing ponderlm
    ``kind`` and ``overwrite``), False when there is nothing in the way (absent or empty). Raises
    OwnershipError when ``path`` is a file, is not ours (whatever ``overwrite`` says), or is ours
    but ``overwrite`` was not given (``exists_hint`` then says what to pass). ``choose`` names the
    option that picks another output ("--out", "train.out_dir").
    """
    if path.exists() and not path.is_dir():
        raise OwnershipError(f"{path} is a file, not a directory; choose another {choose}")
    if not path.exists() or is_empty_dir(path):
        return False
    why = why_not_ours(path, kind)
    if why is not None:
        raise OwnershipError(f"{path} {why}; ponderlm replaces only what it made: choose another {choose}")
    if not overwrite:
        raise OwnershipError(f"{path} exists; {exists_hint}")
    return True


def check_disjoint(out: Path, inputs: list[Path], what: str) -> None:
    """Refuse an output directory that is, contains or lies inside one of the command's inputs."""
    o = Path(out).resolve()
    for p in inputs:
        i = Path(p).resolve()
        if o == i or i.is_relative_to(o) or o.is_relative_to(i):
            rel = "is" if o == i else ("contains" if i.is_relative_to(o) else "lies inside")
            raise OwnershipError(f"{what} {out} {rel} the input {p}; write the output somewhere else")


# -------------------------------------------------------------- replacing
def _hide_and_remove(path: Path) -> None:
    """Delete a directory without ever exposing a half-deleted one: rename it to a hidden sibling
    first, then remove that."""
    hidden = path.with_name(f".{path.name}.del")
    if hidden.exists():
        shutil.rmtree(hidden)
    path.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def remove_owned(path: Path, kind: DirKind) -> None:
    """Delete a directory that is verifiably ours (OwnershipError otherwise)."""
    why = why_not_ours(path, kind)
    if why is not None:
        raise OwnershipError(f"{path} {why}; not deleting it")
    _hide_and_remove(path)


def replace_dir(built: Path, dest: Path) -> None:
    """Move a finished build into place; an existing ``dest`` (checked as ours by the caller) is
    renamed away first and removed only after the new one is in place."""
    if not dest.exists():
        built.rename(dest)
        return
    old = dest.with_name(f".{dest.name}.old")
    if old.exists():
        shutil.rmtree(old)
    dest.rename(old)
    built.rename(dest)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def building(dest: Path, kind: DirKind) -> Iterator[Path]:
    """Yield a hidden, marked sibling of ``dest`` to build into; on success it replaces ``dest``
    (check replaceability first), on any failure it is removed and ``dest`` is untouched. An
    OSError (disk full, read-only file system) becomes a one-line OwnershipError."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    if tmp.exists():  # left by a killed build of ours (we hold dest's lock)
        if read_marker(tmp) is None:
            raise OwnershipError(f"{tmp} exists and was not made by ponderlm; move it away")
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        write_marker(tmp, kind)
        yield tmp
        replace_dir(tmp, dest)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OwnershipError(describe_os_error(e, f"writing {dest}")) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """This process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def as_umask_allows(root: Path) -> None:
    """Give every file under ``root`` the mode a plain ``open`` would (0o666 less the umask).
    safetensors writes its files with mode 0600 (through a private temporary), so weights would
    be the one file of a run or an export that the user's group cannot read."""
    mode = 0o666 & ~current_umask()
    for p in [root, *Path(root).rglob("*")] if Path(root).is_dir() else [Path(root)]:
        if p.is_file() and not p.is_symlink() and (p.stat().st_mode & 0o777) != mode:
            p.chmod(mode)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a file through a hidden temporary and a rename; OSError becomes a one-line error and
    leaves neither a temporary nor a half-written file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OwnershipError(describe_os_error(e, f"writing {path}")) from None


# ------------------------------------------------------------------ locks
def _holder(lock_file: Path) -> str:
    info = read_small_json(lock_file)
    if not isinstance(info, dict):
        return "another ponderlm process"
    parts = [f"pid {info.get('pid')}"]
    if info.get("host") and info.get("host") != socket.gethostname():
        parts[0] += f" on {info['host']}"
    if info.get("command"):
        parts.append(f"`{info['command']}`")
    if info.get("since"):
        parts.append(f"since {info['since']}")
    return "another ponderlm process (" + ", ".join(parts) + ")"


class DirLock:
    """An advisory lock on a directory (which need not exist yet), held while a command writes it.

    The lock is ``flock`` on the hidden sibling ``.NAME.lock``, which also records the holder
    (pid, host, command line, start time) for the error message of a second process. It is
    released and its file removed on exit; if the holder is killed the kernel releases it, and
    the next process takes over the stale file. Parent directories the lock had to create are
    removed again on release when they are still empty, so a command that fails leaves nothing.
    """

    def __init__(self, directory: Path, choose: str = "output directory") -> None:
        self.dir = Path(os.path.abspath(directory))
        self.file = self.dir.parent / f".{self.dir.name}.lock"
        self.choose = choose
        self._fd: int | None = None
        self._made: list[Path] = []

    def _make_parents(self) -> None:
        missing = []
        p = self.dir.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        if not p.is_dir():
            raise OwnershipError(f"cannot create {self.dir}: {p} is a file, not a directory")
        for q in reversed(missing):
            q.mkdir()
            self._made.append(q)

    def acquire(self) -> DirLock:
        try:
            self._make_parents()
            while True:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    self._release_parents()
                    raise DirectoryLocked(
                        f"{self.dir} is in use by {_holder(self.file)}; wait for it to finish or choose another "
                        f"{self.choose}"
                    ) from None
                # the holder before us may have removed the file after we opened it: lock the live one
                try:
                    same = os.stat(self.file).st_ino == os.fstat(fd).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command_line(),
                    "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip
            os.ftruncate(fd, 0)
            os.write(fd, (json.dumps(info) + "\n").encode())
            self._fd = fd
        except OSError as e:
            self._release_parents()
            raise OwnershipError(describe_os_error(e, f"locking {self.dir}")) from None
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.file)  # while still locked: a waiter then sees another inode and retries
        os.close(self._fd)
        self._fd = None
        self._release_parents()

    def _release_parents(self) -> None:
        for q in reversed(self._made):
            with contextlib.suppress(OSError):
                q.rmdir()  # only if still empty: never removes anything else
        self._made = []

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _command_line() -> str:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "ponderlm")):
        argv[0] = "ponderlm"
    line = " ".join(argv)
    return line if len(line) <= 200 else line[:197] + "..."
