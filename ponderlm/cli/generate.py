"""``ponderlm generate``: stream text from a checkpoint, optionally showing each token's realised
ponder depth (ANSI colours on a terminal, ``[d]`` markers otherwise), one prompt or a loop.
:func:`add_generate` declares the command line, :func:`cmd_generate` checks it and calls :func:`main`."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from ponderlm import threads
from ponderlm.cli.common import add_threads, finite_number, int_at_least, seed_type, use_threads, utf8_text
from ponderlm.errors import DataError, UserError, utf8_problem
from ponderlm.limits import encode_prefix

# depth 0 .. 3+ : plain, green, yellow, red (bold)
COLOURS = ("", "\033[32m", "\033[33m", "\033[1;31m")
RESET = "\033[0m"


@dataclass
class Settings:
    max_new_tokens: int = 64
    tau: float | None = None
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    show_depth: bool = False
    colour: bool = False
    prefill: str = "auto"  # the prompt computation (generate's `prefill`); `ponderlm serve` walks short prompts: exact


class TextStream:
    """Prints decoded text as tokens arrive; holds back an incomplete UTF-8 sequence. The token that
    ended generation (``stop_id``: the model's end of turn or end of text) is not printed."""

    def __init__(
        self, decode: Callable[[list[int]], str], out: TextIO, settings: Settings, stop_id: int | None = None
    ) -> None:
        self.decode, self.out, self.s, self.stop_id = decode, out, settings, stop_id
        self.ids: list[int] = []
        self.shown = ""
        self.pending_depths: list[int] = []

    def __call__(self, token: torch.Tensor, depth: torch.Tensor) -> None:
        if int(token[0]) == self.stop_id:
            return
        self.ids.append(int(token[0]))
        self.pending_depths.append(int(depth[0]))
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return
        new, self.shown = text[len(self.shown) :], text
        d = max(self.pending_depths)
        self.pending_depths = []
        if self.s.show_depth and new:
            if self.s.colour:
                c = COLOURS[min(d, len(COLOURS) - 1)]
                new = f"{c}{new}{RESET}" if c else new
            else:
                new = f"{new}[{d}]"
        self.out.write(new)
        self.out.flush()


def generate_text(model, tok, prompt: str, settings: Settings, out: TextIO, echo: bool = False) -> dict:
    """Stream one completion of ``prompt`` to ``out`` (after the prompt itself with ``echo``, once the
    prompt is known to fit); returns tokens and depth statistics."""
    if not prompt:
        raise DataError("the prompt is empty")
    why = utf8_problem(prompt)
    if why:
        raise DataError(f"the prompt is {why}")
    ctx = model.cfg.max_seq_len
    ids, complete = encode_prefix(tok.encode, prompt, ctx)  # a prompt of megabytes is tokenized only this far
    if not ids:
        raise DataError("the prompt encodes to no tokens")
    if not complete or len(ids) + settings.max_new_tokens > ctx:
        many = f"{len(ids)} tokens" if complete else f"more than {ctx} tokens"
        raise DataError(
            f"prompt ({many}) + --max-new-tokens ({settings.max_new_tokens}) exceeds the model's "
            f"context of {ctx} tokens; shorten the prompt or ask for fewer tokens"
        )
    if echo:
        out.write(prompt)
        out.flush()
    device = next(model.parameters()).device
    stream = TextStream(tok.decode, out, settings, tok.eos_id)
    res = model.generate(
        torch.tensor([ids], device=device),
        settings.max_new_tokens,
        tau=settings.tau,
        temperature=settings.temperature,
        top_k=settings.top_k,
        top_p=settings.top_p,
        seed=settings.seed,
        eos_token_id=tok.eos_id,  # the model's end of turn (a converted chat model's), else end of text
        prefill=settings.prefill,
        on_token=stream,
    )
    out.write("\n")
    depth = res.depth[0].tolist()
    return {"tokens": len(depth), "mean_depth": sum(depth) / max(len(depth), 1), "max_depth": model.cfg.max_depth}


def main(
    checkpoint, prompt: str | None, settings: Settings, interactive: bool, device: str | torch.device = "cpu"
) -> int:
    from ponderlm.loading import load_model  # here: every `ponderlm` command imports this module to parse

    model, tok, _ = load_model(checkpoint, device)
    out = sys.stdout
    if settings.show_depth:
        K = model.cfg.max_depth
        legend = " ".join(
            (f"{COLOURS[min(d, 3)]}depth {d}{RESET}" if settings.colour else f"[{d}]=depth {d}") for d in range(K + 1)
        )
        print(f"({model.cfg.method}, tau {settings.tau if settings.tau is not None else model.cfg.tau:g}; {legend})")

    said = []  # the threads are stated once, on the first completion's line (stdout is the completion)

    def one(p: str) -> None:
        st = generate_text(model, tok, p, settings, out, echo=True)
        line = f"-- {st['tokens']} tokens, mean depth {st['mean_depth']:.2f} of {st['max_depth']}"
        if not said:
            line += f"; {threads.describe()}"
            said.append(True)
        print(line, file=sys.stderr)

    if prompt is not None:
        one(prompt)
    if interactive:
        if hasattr(sys.stdin, "reconfigure"):
            # a line that is not valid UTF-8 is reported as a bad prompt, not a UnicodeDecodeError
            sys.stdin.reconfigure(errors="surrogateescape")
        while True:
            try:
                line = input("> ")
            except EOFError:
                print()
                break
            if line.strip() in ("", "exit", "quit"):
                break
            try:
                one(line)
            except UserError as e:  # a bad prompt is not the end of the session
                print(f"error: {e}", file=sys.stderr)
    return 0


def add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion from a checkpoint or export, with ponder depths")
    p.add_argument("--checkpoint", type=Path, required=True, help="run, checkpoint or exported directory")
    p.add_argument("--prompt", type=utf8_text, default=None)
    p.add_argument("--interactive", action="store_true", help="then read prompts until EOF or an empty line")
    p.add_argument("--max-new-tokens", type=int_at_least(1), default=64)
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--temperature", type=finite_number(at_least=0), default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int_at_least(1), default=None)
    p.add_argument("--top-p", type=finite_number(above=0, at_most=1), default=None)
    p.add_argument("--seed", type=seed_type, default=None)
    p.add_argument("--prefill", choices=("auto", "exact", "converged", "parallel"), default="auto",
                   help="how the prompt is computed: auto (converged Jacobi for latent-thought models, one "
                        "parallel pass otherwise), exact (the recurrence, slot by slot: what `ponderlm serve` "
                        "computes for prompts up to --walk-max tokens)")  # fmt: skip
    p.add_argument("--show-depth", action="store_true", help="colour (terminal) or [d] markers per token")
    p.add_argument("--no-colour", action="store_true", help="plain [d] markers even on a terminal")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    add_threads(p)
    p.set_defaults(handler=cmd_generate)


def cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ponderlm.device import resolve_device
    from ponderlm.errors import ConfigError
    from ponderlm.model.config import check_tau

    if args.prompt is None and not args.interactive:
        raise ConfigError("give --prompt TEXT, --interactive, or both")
    if args.interactive and sys.stdin is None:  # started with stdin closed (`<&-`)
        raise ConfigError("--interactive reads prompts from standard input, which is closed")
    if args.tau is not None:
        check_tau(args.tau)
    device = resolve_device(args.device)
    use_threads(args)
    settings = Settings(
        max_new_tokens=args.max_new_tokens, tau=args.tau, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, show_depth=args.show_depth, prefill=args.prefill,
        colour=sys.stdout.isatty() and not args.no_colour and not os.environ.get("NO_COLOR"),
    )  # fmt: skip
    return main(args.checkpoint, args.prompt, settings, args.interactive, device)
