"""What the subcommands of the ``ponderlm`` command share: argparse types with one-line errors, the
``--threads`` option and the thread choice it feeds, and small checks of paths and optional
dependencies that end a command with ``error: ...`` (a :class:`~ponderlm.errors.UserError`)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path


def int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer >= lo (and <= hi, when given)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {lo}, got {text[:40]!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be an integer in [{lo}, {hi}], got {text[:40]}")
        return v

    return parse


def finite_number(*, at_least: float | None = None, above: float | None = None, at_most: float | None = None):
    """An argparse type: a finite number within the bounds given (nan and inf are refused)."""
    bounds = [f">= {at_least:g}" if at_least is not None else "", f"> {above:g}" if above is not None else "",
              f"<= {at_most:g}" if at_most is not None else ""]  # fmt: skip
    want = " and ".join(b for b in bounds if b)

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text[:40]!r}") from None
        if not (math.isfinite(v) and (at_least is None or v >= at_least) and (above is None or v > above)
                and (at_most is None or v <= at_most)):  # fmt: skip
            raise argparse.ArgumentTypeError(f"must be a finite number {want}, got {text[:40]}")
        return v

    return parse


def seed_type(text: str) -> int:
    """An argparse type: a seed in [0, 2**63 - 1]."""
    from ponderlm.runs.config import SEED_MAX

    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63 - 1], got {text[:40]}")
    return v


def utf8_text(text: str) -> str:
    """An argparse type: text that is valid UTF-8 (undecodable argv bytes arrive as surrogates)."""
    from ponderlm.errors import utf8_problem

    why = utf8_problem(text)
    if why:
        raise argparse.ArgumentTypeError(why)
    return text


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads N`` on a command that computes (see :mod:`ponderlm.threads` for who decides)."""
    from ponderlm.runs.config import MAX_THREADS

    p.add_argument("--threads", type=int_at_least(1, MAX_THREADS), default=None, metavar="N",
                   help="torch CPU threads (default: the cores free now, from the cores this process may "
                   "use less the CPU other processes use; OMP_NUM_THREADS if set; for train, train.threads "
                   "if set)")  # fmt: skip


def use_threads(args: argparse.Namespace, configured: int = 0, source: str = "train.threads"):
    """Apply the thread count of this command: --threads, else ``configured`` (a config's
    threads, > 0), else OMP_NUM_THREADS, else the free cores. Returns the Choice; the command
    states it (``threads: N (why)``) once its checks have passed and the work starts."""
    from ponderlm import threads

    if args.threads:
        choice = threads.Choice(args.threads, "--threads")
    elif configured:
        choice = threads.Choice(configured, source)
    else:
        choice = threads.pick()
    return threads.use(choice)


def run_subdir(ck: Path, name: str) -> Path:
    """RUN/name for a checkpoint inside RUN/checkpoints/, else CHECKPOINT/name."""
    return ck.parent.parent / name if ck.parent.name == "checkpoints" else ck / name


def default_cache() -> Path:
    return Path.home() / ".cache" / "ponderlm" / "packages"


def checked_cache_dir(given: Path | None) -> Path:
    """--cache-dir (or the default), refused when a file is in its place."""
    from ponderlm.errors import ConfigError

    path = given or default_cache()
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"--cache-dir {path}: {p} is a file, not a directory")
    return path


def read_text_file(path: Path, option: str) -> str:
    """A UTF-8 text file named by an option, with one-line errors for every way it can fail."""
    from ponderlm.errors import DataError, describe_os_error

    if path.is_dir():
        raise DataError(f"{option} {path} is a directory, not a text file")
    if not path.exists():
        raise DataError(f"{option} {path} not found")
    from ponderlm.errors import InputTooLarge
    from ponderlm.limits import MAX_TEXT_BYTES, read_limited

    try:  # bounded: only the beginning of a text is used (a context's worth of tokens)
        text = read_limited(path, MAX_TEXT_BYTES, "text ponderlm shows").decode("utf-8")
        return text.replace("\r\n", "\n").replace("\r", "\n")  # universal newlines, as read_text
    except InputTooLarge as e:
        raise DataError(f"{option} {e}; only the first max_seq_len tokens are used: pass the file's beginning "
                        "(e.g. head -c 1000000 FILE)") from None  # fmt: skip
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        raise DataError(describe_os_error(e, f"reading {path}")) from None


def needs(module: str, what: str, install: str) -> None:
    """A one-line error instead of an ImportError when an optional dependency is missing."""
    import importlib.util

    from ponderlm.errors import ConfigError

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} needs {module}: pip install {install}")
