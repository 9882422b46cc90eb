"""The ``ponderlm`` command: :func:`build_parser` and :func:`main`, which parses, dispatches and
turns every failure into its exit status.

The subcommands live in a module per verb group: :mod:`~ponderlm.cli.data` (``data prepare``,
``data synthetic``), :mod:`~ponderlm.cli.train` (``train``, ``quickstart``, ``experiment``,
``demo``), :mod:`~ponderlm.cli.eval` (``eval``, ``analyze``, ``lm-eval-tasks``, ``lm-eval``),
:mod:`~ponderlm.cli.hf` (``export``, ``convert``), :mod:`~ponderlm.cli.generate` and
:mod:`~ponderlm.cli.serve`. In each, ``add_X(sub)`` declares a verb's arguments and registers
``cmd_X(args, parser)`` as its handler, which :func:`main` calls; the work itself is done in the
library. What they share (argument types, ``--threads``) is in :mod:`~ponderlm.cli.common`.

User mistakes (bad config keys or values, bad arguments, missing data, unusable checkpoints) end
with a one-line ``error: ...`` on stderr and exit status 2, never a traceback; a run the trainer
stops ends with status 3, Ctrl-C with 130. A closed standard output (``ponderlm generate ... |
head``) ends the command quietly with status 141, as the Unix tools that die of SIGPIPE do.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from ponderlm.cli.data import add_data
from ponderlm.cli.eval import add_analyze, add_eval, add_lm_eval
from ponderlm.cli.generate import add_generate
from ponderlm.cli.hf import add_convert, add_export
from ponderlm.cli.serve import add_serve
from ponderlm.cli.train import add_demo, add_experiment, add_quickstart, add_train, cmd_train

__all__ = ["build_parser", "main"]

EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool killed by a closed pipe


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's one-line errors (``error: ...``, exit 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


# the subcommands, in the order `ponderlm --help` lists them
SUBCOMMANDS = (add_data, add_train, add_quickstart, add_eval, add_lm_eval, add_experiment, add_analyze,
               add_export, add_convert, add_generate, add_serve, add_demo)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ponderlm", description="Adaptive-pondering language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with ``train``'s key=value overrides taken wherever they stand: argparse
    takes positionals only before the first flag that follows them (``ponderlm train --config C
    --resume train.max_steps=2`` would be refused), so the ones left over join the overrides, in
    command-line order after those it did take."""
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "handler", None) is cmd_train:
        overrides = [e for e in extra if "=" in e and not e.startswith("-")]
        args.overrides = list(args.overrides) + overrides
        extra = [e for e in extra if e not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    from ponderlm.errors import TrainingStopped, UserError, shown

    parser = build_parser()
    args = _parse(parser, argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach logs as they happen
    try:
        return args.handler(args, parser)
    except UserError as e:
        # a path that is not UTF-8 (caf\xe9.jsonl) holds surrogates: shown as its bytes' escapes
        print(f"error: {shown(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _closed_pipe()
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _closed_pipe() -> int:
    """The reader of our output went away (``| head``): end quietly, as Unix tools do. Standard
    output is pointed at /dev/null so the interpreter's final flush does not complain again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # stdout is not a file (tests capture it)
        pass
    return EXIT_PIPE


if __name__ == "__main__":
    sys.exit(main())
