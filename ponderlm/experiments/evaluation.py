"""Evaluating one run of an experiment: validation loss at each tau (with depth and inference
FLOPs per token), the test splits, zero-shot tasks and PonderLM-3 ablations, all rows of the one
evaluation grid (:func:`ponderlm.eval.evaluate.score_grid`), reshaped into the runner's result;
and the cache of that result in the run directory (``experiment_eval.json``, keyed by the
checkpoint and every evaluation setting), which lets an interrupted experiment reuse it.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from ponderlm.data import TokenShards, eval_windows, load_meta, window_labels
from ponderlm.data.tokenizer import Tokenizer
from ponderlm.eval.ablations import Ablation
from ponderlm.eval.evaluate import SCORING, score_grid
from ponderlm.experiments.config import ExperimentConfig
from ponderlm.loading import load_model
from ponderlm.model.model import PonderLM
from ponderlm.owned import atomic_write
from ponderlm.runs.checkpoint import latest_checkpoint
from ponderlm.runs.config import RunConfig

EVAL_FILE = "experiment_eval.json"  # in each run directory: its evaluation and what it was computed with


def _tau_rows(grid: list[dict], tasks: dict | None, tests: dict) -> list[dict]:
    """The runner's row per tau from the rows of the evaluation grid (:func:`score_grid`): the
    validation loss and its depth and cost (with per-class metrics on a labelled dataset), the
    loss on each test split (``tests``), the zero-shot accuracies when tasks are given."""
    rows, per_tau = [], 1 + len(tests) + len(tasks or ())  # the grid's rows at one tau: val, tests, tasks
    for i in range(0, len(grid), per_tau):
        at = {g["task"]: g for g in grid[i : i + per_tau]}
        row = {"tau": at["val"]["tau"], **_scores(at["val"])}
        if tests:
            row["splits"] = {s: {"loss": at[s]["loss"], "mean_depth": at[s]["mean_depth"], "tokens": at[s]["tokens"]}
                             for s in tests}  # fmt: skip
        if tasks:
            accs = {name: at[name]["acc"] for name in tasks}
            row["zeroshot"] = accs
            row["zeroshot_avg"] = sum(accs.values()) / len(accs)
        rows.append(row)
    return rows


def _scores(row: dict) -> dict:
    """A perplexity row of the grid without its bookkeeping: perplexity()'s numbers."""
    return {k: v for k, v in row.items() if k not in ("tau", "task", "n", "tokens", "seconds")}


def _ablation_rows(model: PonderLM, tok: Tokenizer, val: dict[str, torch.Tensor], taus: list[float],
                   ablations: list[str], labels: dict, log) -> list[dict]:  # fmt: skip
    """Validation loss of a PonderLM-3 model under each ablation: every fixed depth 0..K, and the
    random/entropy re-assignments of the router's depths at every tau."""
    rows = []
    for policy in ablations:
        fixed = [Ablation("fixed", depth=d) for d in range(model.cfg.max_depth + 1)] if policy == "fixed" else []
        for abl in fixed or [Ablation(policy)]:
            grid = score_grid(model, tok, [None] if fixed else taus, val, labels=labels, ablation=abl, log=log,
                              scoring=SCORING, prefix=f"[{abl.label}] ")  # fmt: skip
            rows += [{"policy": policy, "depth": abl.depth, "tau": g["tau"], **_scores(g)} for g in grid]
    return rows


def evaluate_run(
    run_dir: Path,
    data_dir: Path,
    taus: list[float],
    windows: int,
    tasks: dict | None = None,
    ablations: list[str] = (),
    test_splits: list[str] = (),
    ablation_taus: list[float] | None = None,
    log=print,
) -> dict[str, Any]:
    """Validation loss (hard mode) at each tau (one tau for methods without a router), with mean
    depth and inference FLOPs/token, and the loss on each of ``test_splits`` (the same number of
    fixed windows); zero-shot average accuracy when tasks are given; for PonderLM-3 the requested
    ablations (fixed depths 0..K; random/entropy at each of ``ablation_taus``, by default every
    tau), on the validation split. On a
    dataset with token labels (``ponderlm data synthetic``) every row also has the per-class
    ``classes`` and ``difficulty`` of :func:`ponderlm.eval.perplexity.summarize_classes`. Every
    number is a row of the one evaluation grid, :func:`ponderlm.eval.evaluate.score_grid`, which
    logs each row (and the progress of a long one) to ``log``."""
    model, tok, ck = load_model(run_dir)
    cfg = model.cfg
    meta = load_meta(data_dir)
    val = {"val": eval_windows(TokenShards(data_dir, "val"), cfg.max_seq_len, windows)}
    tests = {s: eval_windows(TokenShards(data_dir, s), cfg.max_seq_len, windows) for s in test_splits}
    found = window_labels(data_dir, meta, "val", cfg.max_seq_len, windows)
    labels = {} if found is None else {"val": found}  # the test splits are scored without labels
    grid = score_grid(model, tok, taus if cfg.has_router else taus[:1], val | tests, labels=labels, docs=tasks,
                      scoring=SCORING, log=log)  # fmt: skip
    rows = _tau_rows(grid, tasks, tests)
    abl_taus = list(taus if ablation_taus is None else ablation_taus)
    abl = _ablation_rows(model, tok, val, abl_taus, list(ablations), labels, log) if cfg.has_router else []
    soft = score_grid(model, tok, [None], val, scoring={"mode": "soft"}, log=log, prefix="soft computation: ")[0]
    val = val["val"]
    state = json.loads((ck / "trainer_state.json").read_text())
    train_tokens = int(meta["splits"]["train"]["tokens"])
    return {
        "method": cfg.method,
        "K": cfg.max_depth,
        "router": cfg.has_router,
        "penalty_weight": cfg.penalty_weight if cfg.has_router else None,
        "params": model.num_parameters(),
        "steps": state["step"],
        "tokens": state.get("tokens_seen", 0),
        "epoch_fraction": state.get("tokens_seen", 0) / train_tokens,
        "soft_loss": soft["loss"],
        # what the validation numbers are over: windows of the context, the positions they score, and
        # the size of the split they are the first windows of
        "val_windows": int(val.shape[0]),
        "val_tokens": int(val.shape[0] * (val.shape[1] - 1)),
        "val_split_tokens": int(meta["splits"]["val"]["tokens"]),
        "evals": rows,
        "ablations": abl,
    }


def _eval_key(run_dir: Path, cfg: ExperimentConfig) -> dict[str, Any]:
    """Everything a cached evaluation of ``run_dir`` depends on: its checkpoint and the settings."""
    ck = latest_checkpoint(run_dir)
    return {
        "checkpoint": ck.name if ck else None,
        "manifest_sha": hashlib.sha256((ck / "manifest.json").read_bytes()).hexdigest() if ck else None,
        "taus": list(cfg.taus),
        "eval_windows": cfg.eval_windows,
        "tasks": list(cfg.tasks),
        "task_limit": cfg.task_limit,
        "ablations": list(cfg.ablations),
        "ablation_taus": cfg.ablation_taus,
        "test_splits": list(cfg.test_splits),
        "scoring": SCORING,  # results scored otherwise (before: J=3) are recomputed
    }


def cached_result(run_dir: Path, cfg: ExperimentConfig, key: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The run's saved evaluation under this experiment's settings (``key``: :func:`_eval_key`,
    computed when not given), or None."""
    path = run_dir / EVAL_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text())
        return saved["result"] if saved.get("key") == (key or _eval_key(run_dir, cfg)) else None
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def cached_evaluation(run_dir: Path, cfg: ExperimentConfig, compute) -> dict[str, Any]:
    """The run's evaluation under this experiment's settings, computed once per checkpoint."""
    key = _eval_key(run_dir, cfg)
    found = cached_result(run_dir, cfg, key)
    if found is not None:
        return found
    result = compute()
    atomic_write(run_dir / EVAL_FILE, json.dumps({"key": key, "result": result}, indent=2) + "\n")
    return result


def evaluate_experiment_run(
    run_dir: Path, rc: RunConfig, cfg: ExperimentConfig, tasks: dict | None, log=print
) -> dict[str, Any]:
    """:func:`evaluate_run` of one run of the experiment, through its cache; an evaluation that
    runs says so, logs each score, and every 10 s how far a long one is, with its ETA."""
    settings = (list(cfg.taus), cfg.eval_windows, tasks, cfg.ablations, cfg.test_splits, cfg.ablation_taus)

    def compute() -> dict[str, Any]:
        log(f"evaluating {run_dir.name}: validation loss on {cfg.eval_windows} windows"
            + (f", {len(tasks)} zero-shot task(s)" if tasks else ""))  # fmt: skip
        t0 = time.time()
        result = evaluate_run(run_dir, Path(rc.train.data_dir), *settings, log=log)
        log(f"evaluated {run_dir.name} in {time.time() - t0:.0f} s")
        return result

    return cached_evaluation(run_dir, cfg, compute)
