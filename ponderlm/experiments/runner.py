"""``ponderlm experiment pareto``: train (or reuse) a grid of runs, evaluate each at several tau,
and plot quality against inference FLOPs per token with the Pareto frontier marked.

The experiment file is described in :mod:`ponderlm.experiments.config`, the report in
:mod:`ponderlm.experiments.report` (tables) and :mod:`ponderlm.experiments.figures` (the plot).
Finished runs (a checkpoint at train.max_steps) are reused, so an interrupted experiment continues
where it stopped (:mod:`ponderlm.experiments.reuse`), and so are their evaluations
(``<run>/experiment_eval.json``, keyed by the checkpoint and every evaluation setting:
:mod:`ponderlm.experiments.evaluation`). With ``--jobs N`` (N > 1) the runs are first trained and
evaluated in up to N worker processes (:mod:`ponderlm.experiments.workers`); the report is then
made in this process from the workers' saved evaluations, as with one job. This module holds the
command itself: checks, the loop over the runs, and the report files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from ponderlm import threads as threads_mod
from ponderlm.data import load_meta
from ponderlm.errors import ConfigError
from ponderlm.eval.tasks import load_tasks
from ponderlm.experiments.config import ExperimentConfig
from ponderlm.experiments.evaluation import evaluate_experiment_run, evaluate_run
from ponderlm.experiments.figures import plot
from ponderlm.experiments.report import collect_points, markdown, pareto_front
from ponderlm.experiments.reuse import (
    EXPERIMENT,
    check_experiment_dir,
    check_reusable,
    finished,
    prepare_run,
    report_files,
    train_run,
)
from ponderlm.experiments.workers import work_in_workers
from ponderlm.owned import DirLock, atomic_write, make_owned_dir

__all__ = [
    "ExperimentConfig",
    "collect_points",
    "evaluate_run",
    "finished",
    "pareto_front",
    "run_experiment",
    "train_run",
]


def check_test_splits(cfg: ExperimentConfig) -> None:
    """Every run's dataset has the experiment's test splits (checked before anything trains)."""
    if not cfg.test_splits:
        return
    for data_dir in sorted({cfg.run_config(r, cfg.run_seeds(r)[0]).train.data_dir for r in cfg.runs}):
        splits = load_meta(Path(data_dir))["splits"]
        lacking = [s for s in cfg.test_splits if s not in splits]
        if lacking:
            raise ConfigError(f"test_splits: {data_dir} has no {', '.join(map(repr, lacking))} split (has: "
                              f"{', '.join(splits)}); remove it from test_splits, or prepare a dataset with "
                              "it")  # fmt: skip


# ------------------------------------------------------------------ the experiment
def run_experiment(
    cfg: ExperimentConfig,
    cache_dir: Path,
    *,
    overwrite: bool = False,
    eval_only: bool = False,
    log=print,
    stem: str = "pareto",
    jobs: int = 1,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train, resume or reuse every run of the experiment, evaluate, and write the report; the
    experiment's out_dir is locked for the whole command. With ``jobs`` > 1 the runs are first
    trained and evaluated in up to ``jobs`` worker processes at once (:func:`work_in_workers`),
    sharing ``threads`` threads (default: the cores this process may use).
    """
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    out = Path(cfg.out_dir)
    with DirLock(out, "out_dir"):
        check_experiment_dir(out, report_files(stem))
        return _run_experiment(cfg, cache_dir, out, overwrite=overwrite, eval_only=eval_only, log=log, stem=stem,
                               jobs=jobs, threads=threads)  # fmt: skip


def _run_experiment(cfg, cache_dir, out: Path, *, overwrite: bool, eval_only: bool, log, stem: str,
                    jobs: int = 1, threads: int | None = None) -> dict[str, Any]:  # fmt: skip
    t0 = time.time()
    for r in cfg.runs:
        for seed in cfg.run_seeds(r):
            check_reusable(cfg.run_config(r, seed), overwrite)
    check_test_splits(cfg)
    make_owned_dir(out, EXPERIMENT)
    if jobs == 1:
        log(threads_mod.describe())
    if jobs > 1:
        work_in_workers(cfg, overwrite=overwrite, eval_only=eval_only, workers=jobs, cache_dir=cache_dir, log=log,
                        threads=threads)  # fmt: skip
        overwrite = False  # every run is trained and evaluated now: the loop below reuses them
    tasks = load_tasks(cfg.tasks, cache_dir, limit=cfg.task_limit, log=log) if cfg.tasks else None
    results, missing = _train_and_evaluate(cfg, tasks, overwrite=overwrite, eval_only=eval_only, log=log)
    if not results:
        raise ConfigError("no finished run to report (--eval-only trains nothing)")
    return _write_report(cfg, out, results, missing, (time.time() - t0) / 60, log, stem)


def _train_and_evaluate(cfg: ExperimentConfig, tasks: dict | None, *, overwrite: bool, eval_only: bool,
                        log) -> tuple[list[dict], list[str]]:  # fmt: skip
    """Every job of the experiment made ready and evaluated: (results, names of runs left out)."""
    results, missing = [], []
    jobs = cfg.jobs()
    for n, (seed, run) in enumerate(jobs, 1):
        rc = cfg.run_config(run, seed)
        run_dir = Path(rc.train.out_dir)
        if not prepare_run(rc, overwrite, eval_only, log, tag=f"[{n}/{len(jobs)}]"):
            missing.append(run_dir.name)
            continue
        r = evaluate_experiment_run(run_dir, rc, cfg, tasks, log)
        results.append({"run": run["name"], "seed": seed, **r})
    return results, missing


def _write_report(cfg: ExperimentConfig, out: Path, results: list[dict], missing: list[str], minutes: float, log,
                  stem: str) -> dict[str, Any]:  # fmt: skip
    """``stem``.md, .json and .png in ``out``; returns the JSON payload."""
    points = collect_points(results)
    md = markdown(f"Pareto experiment `{cfg.name}`", points, minutes, cfg.references)
    if missing:
        md += f"\nNot finished, left out: {', '.join(missing)}.\n"
    payload = {"name": cfg.name, "taus": cfg.taus, "seeds": cfg.seeds, "results": results, "points": points}
    for name, text in ((f"{stem}.md", md), (f"{stem}.json", json.dumps(payload, indent=2) + "\n")):
        atomic_write(out / name, text)
    plot(points, out / f"{stem}.png", f"quality vs inference compute: {cfg.name}")
    log("\n" + md)
    log(f"wrote {out / (stem + '.md')}, {out / (stem + '.json')}, {out / (stem + '.png')} ({minutes:.1f} min)")
    return payload
