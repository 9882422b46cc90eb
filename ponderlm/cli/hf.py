"""transformers interchange: ``ponderlm export`` (a checkpoint as a transformers model directory)
and ``ponderlm convert`` (a transformers Llama or GGUF file into a ponderlm run)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ponderlm.cli.common import int_at_least, needs


def add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a transformers model directory with a model card (AutoModelForCausalLM)",
    )
    p.add_argument("checkpoint", type=Path, help="run or checkpoint directory")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--tau", type=float, default=None, help="pruning threshold stored in the config")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export ponderlm wrote there")
    p.add_argument("--self-contained", action="store_true",
                   help="also write the modeling code (auto_map), so that the export loads with "
                   "trust_remote_code=True where ponderlm is not installed: for sharing")  # fmt: skip
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ponderlm.hf.export import EXPORT
    from ponderlm.model.config import check_tau
    from ponderlm.owned import check_disjoint, check_replaceable

    if args.tau is not None:
        check_tau(args.tau)
    # refused before transformers is imported; export() checks again under the output's lock
    check_disjoint(args.out, [args.checkpoint], "output directory")
    check_replaceable(args.out, EXPORT, overwrite=args.overwrite, choose="output directory",
                      exists_hint="pass --overwrite to replace it or choose another output directory")  # fmt: skip
    needs("transformers", "export", "'ponderlm[hf]'")
    from ponderlm.hf.export import export

    export(args.checkpoint, args.out, overwrite=args.overwrite, tau=args.tau, self_contained=args.self_contained)
    return 0


def add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a transformers Llama (directory or GGUF file) into a ponderlm vanilla run",
        description="The result is a run directory with a step-0 checkpoint and the source tokenizer: "
        "evaluate or generate from it, or continue pretraining with ponderlm train train.init_from=OUT.",
    )
    p.add_argument("--from-hf", dest="src", type=Path, required=True, help="model directory or .gguf file")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --from-hf")
    p.add_argument("--out", type=Path, required=True, help="output run directory")
    p.add_argument("--max-seq-len", type=int_at_least(1), default=None, help="cap the context (default: the model's)")
    p.add_argument("--overwrite", action="store_true", help="replace a run an earlier conversion wrote there")
    p.set_defaults(handler=cmd_convert)


def cmd_convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ponderlm.hf.convert import convert_from_hf

    convert_from_hf(args.src, args.out, gguf_file=args.gguf_file, max_seq_len=args.max_seq_len,
                    overwrite=args.overwrite)  # fmt: skip
    return 0
