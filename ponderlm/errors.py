"""The one base class of every user-facing error.

The command line turns a :class:`UserError` into one line, ``error: <message>``, and exit status 2;
anything else is a bug and keeps its traceback. Each module raises its own subclass (config,
data, checkpoint, ownership) so library callers can tell them apart.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem the user can fix (bad input, a path in the way, a full disk): one clear line."""


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class DataError(UserError, RuntimeError):
    """A user-facing data problem (missing package, bad input file...): one clear line."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not match the request."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, read-only file system); nothing of it was left behind."""


class InputTooLarge(UserError, ValueError):
    """An input is larger than ponderlm reads, or needs more memory than there is."""


class OwnershipError(UserError):
    """A directory is in the way: not ours to replace, locked by another process, or unwritable."""


class DirectoryLocked(OwnershipError):
    """Another ponderlm process holds the directory's lock."""


class EngineError(UserError):
    """The engine process could not start (its message is the reason) or died."""


class TrainingStopped(RuntimeError):
    """Training cannot continue (e.g. too many non-finite steps in a row); checkpoints are intact."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def describe_os_error(e: OSError, doing: str) -> str:
    """One line for an OSError met while ``doing`` something, naming a full disk as such."""
    if e.errno in NO_SPACE:
        return f"disk full while {doing} (no space left on device)"
    if e.errno == errno.EFBIG:
        return f"file size limit exceeded while {doing}"
    if e.errno == errno.EROFS:
        return f"read-only file system while {doing}"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied while {doing}"
    return f"{e.strerror or e} while {doing}"


def shown(text: object) -> str:
    """Text for a message: a path or value that is not UTF-8 (``caf\\xe9.jsonl``, which reaches Python
    with surrogates) with its bytes escaped, so printing it cannot fail."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def utf8_problem(text: str) -> str | None:
    """Why ``text`` is not valid UTF-8, or None. Bytes that do not decode reach Python from argv
    (and from stdin in the interactive loop) as lone surrogates, which no tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}, a lone surrogate,"
        return f"not valid UTF-8 text ({what} at character {e.start})"
    return None
