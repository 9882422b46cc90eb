"""The ``ponderlm`` command."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ponderlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo",
        help="train tiny vanilla / PonderLM-2 / PonderLM-3 models on CPU (about 2 minutes) and "
        "compare loss, depth and inference FLOPs",
    )
    demo.add_argument("--steps", type=int, default=300, help="training steps per method")
    demo.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "demo":
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        from .demo import main as demo_main

        return demo_main(args.steps, args.seed)
    return 2


if __name__ == "__main__":
    sys.exit(main())
