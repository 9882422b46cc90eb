"""``ponderlm experiment pareto``: train (or reuse) a grid of runs, evaluate each at several tau,
and plot quality against inference FLOPs per token with the Pareto frontier marked.

The experiment file is described in :mod:`ponderlm.experiments.config`, the report in
:mod:`ponderlm.experiments.report`. Finished runs (a checkpoint at train.max_steps) are reused, so
an interrupted experiment continues where it stopped, and so are their evaluations
(``<run>/experiment_eval.json``, keyed by the checkpoint and every evaluation setting).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import latest_checkpoint, list_checkpoints
from ..config import ConfigError, RunConfig, load_run_config
from ..data import TokenShards, eval_windows, load_meta, window_labels
from ..data.tokenizer import Tokenizer
from ..eval.ablations import Ablation
from ..eval.perplexity import perplexity
from ..eval.tasks import load_tasks
from ..eval.zeroshot import score_task
from ..loading import load_model
from ..model import CONVERGED, PonderLM
from ..owned import DirLock, OwnershipError, atomic_write, is_empty_dir, is_kind, make_owned_dir, read_marker
from ..train import resolve_model_config, train
from .config import ExperimentConfig
from .report import collect_points, markdown, pareto_front, plot

__all__ = ["ExperimentConfig", "collect_points", "evaluate_run", "pareto_front", "run_experiment"]


# ------------------------------------------------------------------ runs
def finished(run_dir: Path, steps: int) -> bool:
    ck = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    return ck is not None and json.loads((ck / "trainer_state.json").read_text())["step"] >= steps


# how every run is scored: hard pruning, Jacobi passes until the latents settle (generate's prefill rule)
SCORING = {"mode": "hard", **CONVERGED}

# train.* fields that do not change what a run learns: a finished run is reused whatever they say
BOOKKEEPING = {"out_dir", "progress", "log_interval", "eval_interval", "eval_windows", "eval_tau", "ckpt_interval",
               "keep_last", "tensorboard", "wandb", "wandb_project", "device", "threads", "dist_timeout_s", "compile",
               "dist", "verify_data"}  # fmt: skip


def config_differences(run_dir: Path, requested: RunConfig) -> list[str]:
    """How the run in ``run_dir`` (its saved, resolved config.yaml) differs from the ``requested``
    one once the dataset has resolved it as the trainer would; [] when it is the same run."""
    want = RunConfig(model=requested.model.replace(), train=requested.train)
    meta = load_meta(Path(requested.train.data_dir))
    resolve_model_config(want, set(), int(meta["tokenizer"]["vocab_size"]))
    have, _ = load_run_config(run_dir / "config.yaml")
    diffs = []
    for section in ("model", "train"):
        a, b = getattr(have, section).__dict__, getattr(want, section).__dict__
        for k in a:
            if a[k] != b[k] and not (section == "train" and k in BOOKKEEPING):
                diffs.append(f"{section}.{k}: {a[k]!r} -> {b[k]!r}")
    return diffs


def check_experiment_dir(out: Path, names: set[str]) -> None:
    """An experiment writes run directories and its report files into out_dir; refuse a directory
    that holds anything else unless ponderlm made it for an experiment."""
    if not out.exists() or is_empty_dir(out):
        return
    if not out.is_dir():
        raise OwnershipError(f"experiment out_dir {out} is a file; choose a directory")
    marker = read_marker(out)
    if marker is not None:
        if marker["kind"] != "experiment":
            raise OwnershipError(f"experiment out_dir {out} is a ponderlm {marker['kind']}; choose another out_dir")
        return
    for p in out.iterdir():  # made before markers existed: runs and reports only
        if p.name.startswith(".") or p.name in names or (p.is_dir() and is_kind(p, "run")):
            continue
        raise OwnershipError(
            f"experiment out_dir {out} holds {p.name}, which ponderlm did not write; choose another out_dir"
        )


def check_reusable(rc: RunConfig, overwrite: bool) -> None:
    """Refuse to report a run trained with another config than the one the experiment asks for
    (checked for every run before anything is written); --overwrite retrains it instead."""
    run_dir = Path(rc.train.out_dir)
    if overwrite or not (run_dir / "config.yaml").is_file():
        return
    diffs = config_differences(run_dir, rc)
    if diffs:
        raise ConfigError(
            f"{run_dir} was trained with another config ({'; '.join(diffs[:3])}); pass --overwrite to retrain "
            "it, or give the run another name"
        )


def _prepare_run(rc: RunConfig, overwrite: bool, eval_only: bool, log, tag: str) -> bool:
    """Make the run of ``rc`` ready to report: reuse it when finished with the same config,
    resume it when unfinished, (re)train it when absent or --overwrite. A run trained with another
    config is refused. Returns False when --eval-only leaves it out."""
    run_dir = Path(rc.train.out_dir)
    exists = run_dir.is_dir() and not is_empty_dir(run_dir)
    if exists and not overwrite and finished(run_dir, rc.train.max_steps):
        log(f"\n== {tag} {run_dir.name}: finished run found, reusing it")
        return True
    if eval_only:
        log(f"\n== {tag} {run_dir.name}: not finished, left out (--eval-only)")
        return False
    resume = exists and not overwrite and bool(list_checkpoints(run_dir))
    log(f"\n== {tag} {'resuming' if resume else 'training'} {run_dir.name} ({rc.model.method})")
    train(rc, set(), resume=resume, overwrite=overwrite and exists, log=log)
    return True


# ------------------------------------------------------------------ evaluation
def _tau_rows(model: PonderLM, tok: Tokenizer, val: torch.Tensor, taus: list[float], tasks: dict | None,
              labelled: dict) -> list[dict]:  # fmt: skip
    """Validation loss (hard mode) at each tau, with the zero-shot accuracies when tasks are given
    (and the per-class metrics on a labelled dataset: ``labelled`` holds labels and classes)."""
    rows = []
    for tau in taus:
        r = perplexity(model, val, tau=tau, batch_size=16, **labelled, **SCORING)
        row = {"tau": tau, **r}
        if tasks:
            accs = {name: score_task(model, tok, docs, tau=tau, jacobi=CONVERGED)["acc"]
                    for name, docs in tasks.items()}  # fmt: skip
            row["zeroshot"] = accs
            row["zeroshot_avg"] = sum(accs.values()) / len(accs)
        rows.append(row)
    return rows


def _ablation_rows(model: PonderLM, val: torch.Tensor, taus: list[float], ablations: list[str],
                   labelled: dict) -> list[dict]:  # fmt: skip
    """Validation loss of a PonderLM-3 model under each ablation: every fixed depth 0..K, and the
    random/entropy re-assignments of the router's depths at every tau."""
    rows = []
    for policy in ablations:
        if policy == "fixed":
            for d in range(model.cfg.max_depth + 1):
                r = perplexity(model, val, batch_size=16, ablation=Ablation("fixed", depth=d), **labelled, **SCORING)
                rows.append({"policy": "fixed", "depth": d, "tau": None, **r})
        else:
            for tau in taus:
                r = perplexity(model, val, tau=tau, batch_size=16, ablation=Ablation(policy), **labelled, **SCORING)
                rows.append({"policy": policy, "depth": None, "tau": tau, **r})
    return rows


def evaluate_run(
    run_dir: Path,
    data_dir: Path,
    taus: list[float],
    windows: int,
    tasks: dict | None = None,
    ablations: list[str] = (),
) -> dict[str, Any]:
    """Validation loss (hard mode) at each tau (one tau for methods without a router), with mean
    depth and inference FLOPs/token; zero-shot average accuracy when tasks are given; for
    PonderLM-3 the requested ablations (fixed depths 0..K; random/entropy at every tau). On a
    dataset with token labels (``ponderlm data synthetic``) every row also has the per-class
    ``classes`` and ``difficulty`` of :func:`ponderlm.eval.perplexity.summarize_classes`."""
    model, tok, ck = load_model(run_dir)
    cfg = model.cfg
    val = eval_windows(TokenShards(data_dir, "val"), cfg.max_seq_len, windows)
    found = window_labels(data_dir, load_meta(data_dir), "val", cfg.max_seq_len, windows)
    labelled = {} if found is None else {"classes": found[0], "labels": found[1]}
    rows = _tau_rows(model, tok, val, taus if cfg.has_router else taus[:1], tasks, labelled)
    abl = _ablation_rows(model, val, taus, list(ablations), labelled) if cfg.has_router else []
    soft = perplexity(model, val, mode="soft", batch_size=16)
    state = json.loads((ck / "trainer_state.json").read_text())
    return {
        "method": cfg.method,
        "K": cfg.max_depth,
        "router": cfg.has_router,
        "penalty_weight": cfg.penalty_weight if cfg.has_router else None,
        "params": model.num_parameters(),
        "steps": state["step"],
        "tokens": state.get("tokens_seen", 0),
        "soft_loss": soft["loss"],
        "evals": rows,
        "ablations": abl,
    }


def cached_evaluation(run_dir: Path, cfg: ExperimentConfig, compute) -> dict[str, Any]:
    """The run's evaluation under this experiment's settings, computed once per checkpoint."""
    ck = latest_checkpoint(run_dir)
    key = {
        "checkpoint": ck.name if ck else None,
        "manifest_sha": hashlib.sha256((ck / "manifest.json").read_bytes()).hexdigest() if ck else None,
        "taus": list(cfg.taus),
        "eval_windows": cfg.eval_windows,
        "tasks": list(cfg.tasks),
        "task_limit": cfg.task_limit,
        "ablations": list(cfg.ablations),
        "scoring": SCORING,  # results scored otherwise (before: J=3) are recomputed
    }
    path = run_dir / "experiment_eval.json"
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
            if saved.get("key") == key:
                return saved["result"]
        except (json.JSONDecodeError, KeyError):
            pass
    result = compute()
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=2) + "\n")
    tmp.replace(path)
    return result


# ------------------------------------------------------------------ the experiment
def run_experiment(
    cfg: ExperimentConfig,
    cache_dir: Path,
    *,
    overwrite: bool = False,
    eval_only: bool = False,
    log=print,
    stem: str = "pareto",
) -> dict[str, Any]:
    """Train, resume or reuse every run of the experiment, evaluate, and write the report; the
    experiment's out_dir is locked for the whole command."""

    out = Path(cfg.out_dir)
    with DirLock(out, "out_dir"):
        check_experiment_dir(out, {f"{stem}.{ext}" for ext in ("md", "json", "png")})
        return _run_experiment(cfg, cache_dir, out, overwrite=overwrite, eval_only=eval_only, log=log, stem=stem)


def _run_experiment(cfg, cache_dir, out: Path, *, overwrite: bool, eval_only: bool, log, stem: str) -> dict[str, Any]:
    t0 = time.time()
    for r in cfg.runs:
        for seed in cfg.run_seeds(r):
            check_reusable(cfg.run_config(r, seed), overwrite)
    make_owned_dir(out, "experiment")
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
        if not _prepare_run(rc, overwrite, eval_only, log, tag=f"[{n}/{len(jobs)}]"):
            missing.append(run_dir.name)
            continue
        r = cached_evaluation(
            run_dir,
            cfg,
            lambda rc=rc, run_dir=run_dir: evaluate_run(
                run_dir, Path(rc.train.data_dir), list(cfg.taus), cfg.eval_windows, tasks, cfg.ablations
            ),
        )
        results.append({"run": run["name"], "seed": seed, **r})
    return results, missing


def _write_report(cfg: ExperimentConfig, out: Path, results: list[dict], missing: list[str], minutes: float, log,
                  stem: str) -> dict[str, Any]:  # fmt: skip
    """``stem``.md, .json and .png in ``out``; returns the JSON payload."""
    points = collect_points(results)
    md = markdown(f"Pareto experiment `{cfg.name}`", points, minutes)
    if missing:
        md += f"\nNot finished, left out: {', '.join(missing)}.\n"
    payload = {"name": cfg.name, "taus": cfg.taus, "seeds": cfg.seeds, "results": results, "points": points}
    for name, text in ((f"{stem}.md", md), (f"{stem}.json", json.dumps(payload, indent=2) + "\n")):
        atomic_write(out / name, text)
    plot(points, out / f"{stem}.png", f"quality vs inference compute: {cfg.name}")
    log("\n" + md)
    log(f"wrote {out / (stem + '.md')}, {out / (stem + '.json')}, {out / (stem + '.png')} ({minutes:.1f} min)")
    return payload
