"""Training verbs: ``ponderlm train``, ``quickstart``, ``experiment pareto`` / ``experiment train``
and ``demo``."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ponderlm.cli.common import add_threads, default_cache, int_at_least, seed_type, use_threads


def add_train(sub) -> None:
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
    add_threads(p)
    p.set_defaults(handler=cmd_train)


def cmd_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ponderlm.runs.config import load_run_config
    from ponderlm.training.trainer import train

    extra = [f"train.init_from={args.init_from}"] if args.init_from else []
    cfg, explicit = load_run_config(args.config, list(args.overrides) + list(args.set_) + extra)
    if args.threads:  # --threads wins over train.threads: the trainer applies train.threads
        cfg.train.threads = args.threads
    use_threads(args, cfg.train.threads)
    result = train(cfg, explicit, resume=args.resume, overwrite=args.overwrite)
    val = result["val"]
    if val and os.environ.get("RANK", "0") == "0":
        print(f"final: step {result['step']}, val loss {val['loss']:.4f}, ppl {val['ppl']:.2f} ({result['val_size']})")
    return 0


def add_quickstart(sub) -> None:
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
    add_threads(p)
    p.set_defaults(handler=cmd_quickstart)


def cmd_quickstart(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ponderlm.experiments.quickstart import quickstart

    use_threads(args)
    return quickstart(
        out=args.out,
        data=args.data,
        cache_dir=args.cache_dir or default_cache(),
        smoke=args.smoke,
        overwrite=args.overwrite,
    )


def add_experiment(sub) -> None:
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
        type=int_at_least(1),
        default=1,
        metavar="N",
        help="train and evaluate up to N runs at once, each in its own process with 1/N of the threads "
        "(--threads, or the free cores) (logs in OUT_DIR/.logs/; default 1: one run after the other, in this process)",
    )
    add_threads(par)
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
    add_threads(one)
    one.set_defaults(handler=cmd_experiment_train)


def cmd_experiment(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ponderlm.experiments import ExperimentConfig, run_experiment

    cfg = ExperimentConfig.load(args.config)
    choice = use_threads(args)
    run_experiment(cfg, args.cache_dir or default_cache(), overwrite=args.overwrite, eval_only=args.eval_only,
                   jobs=args.jobs, threads=choice.n)  # fmt: skip
    return 0


def cmd_experiment_train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ponderlm.experiments import ExperimentConfig, train_run

    cfg = ExperimentConfig.load(args.config)
    use_threads(args)
    train_run(cfg, args.run, args.seed, overwrite=args.overwrite)
    return 0


def add_demo(sub) -> None:
    p = sub.add_parser("demo", help="a 2-minute CPU tour of the three methods on stdlib docstrings")
    p.add_argument("--steps", type=int_at_least(1), default=300, help="training steps per method")
    p.add_argument("--seed", type=seed_type, default=0)
    add_threads(p)
    p.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ponderlm.experiments.demo import main as demo_main

    print(use_threads(args).line())
    return demo_main(args.steps, args.seed)
