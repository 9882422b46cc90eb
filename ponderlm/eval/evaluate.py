"""``ponderlm eval``: perplexity and zero-shot tasks of a checkpoint at one or more tau, every
quality number next to inference FLOPs per token and mean realised depth."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ponderlm import owned, threads
from ponderlm.data import TokenShards, eval_windows, window_labels
from ponderlm.data.tokenizer import Tokenizer
from ponderlm.errors import ConfigError, DataError, OwnershipError, describe_os_error
from ponderlm.eval.ablations import Ablation
from ponderlm.eval.meter import Meter
from ponderlm.eval.perplexity import perplexity
from ponderlm.eval.tasks import TASKS, load_tasks
from ponderlm.eval.zeroshot import score_task
from ponderlm.loading import checkpoint_dataset, load_model
from ponderlm.model.config import ModelConfig, check_tau
from ponderlm.model.model import CONVERGED, PonderLM


def _eval_before_markers(directory: Path) -> bool:
    res = owned.read_small_json(directory / "eval.json")
    return isinstance(res, dict) and {"checkpoint", "rows"} <= set(res)


EVAL = owned.DirKind("eval", "an evaluation output", frozenset({"eval.json", "eval.md"}), legacy=_eval_before_markers)

PPL_SETS = ("val", "ptb_test")
# the default computation: hard pruning, Jacobi passes until the latents settle (generate's prefill rule)
SCORING = {"mode": "hard", **CONVERGED}
OUT_HINT = "pass --overwrite to replace it or choose another --out"


def parse_tasks(text: str) -> list[str]:
    """``--tasks`` (comma-separated) -> task names, each once; an empty list or an unknown name is an error."""
    names = list(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not names:
        raise ConfigError(f"--tasks names no task; choose from {', '.join(PPL_SETS + TASKS)}")
    _check_task_names(names)
    return names


def _check_task_names(names: list[str]) -> None:
    unknown = [t for t in names if t not in PPL_SETS + TASKS]
    if unknown:
        raise DataError(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(PPL_SETS + TASKS)}")


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    tasks: list[str],
    taus: list[float],
    cache_dir: Path,
    data_dir: Path | None = None,
    limit: int | None = None,
    ppl_windows: int = 64,
    batch_size: int = 16,
    device: str = "cpu",
    log=print,
    ablation: Ablation | None = None,
    mode: str = "hard",
    jacobi_iters: int | None = None,
    jacobi_tol: float | None = None,
) -> dict:
    """Scores of a checkpoint per tau in the inference computation ``mode``: "hard" (parallel,
    pruned: J = ``jacobi_iters`` passes, default the model's; with ``jacobi_tol`` J is a cap and
    the passes stop when the latents settle) or "exact" (the recurrence ``generate`` runs).
    ``ablation`` (PonderLM-3, perplexity sets, hard mode) replaces the router's depths
    (:mod:`ponderlm.eval.ablations`). The arguments are checked before the model is loaded; the
    data before anything is scored."""
    _check_options(tasks, taus, batch_size=batch_size, ppl_windows=ppl_windows, limit=limit, jacobi_iters=jacobi_iters)
    scoring = _check_scoring(mode, jacobi_iters, jacobi_tol, ablation)
    model, tok, ck_dir = load_model(checkpoint, device)
    cfg = model.cfg
    iters = scoring.get("jacobi_iters")
    if cfg.uses_jacobi and iters is not None and iters > cfg.max_jacobi_iters:  # once a list of 10**12 passes
        raise ConfigError(f"--jacobi-iters must be at most max_seq_len x (K+1) = {cfg.max_jacobi_iters} for this "
                          f"model (the passes reach the recurrence within one per slot), got {iters}")  # fmt: skip
    zs = [t for t in tasks if t not in PPL_SETS]
    windows, labels = _perplexity_windows(ck_dir, data_dir, [t for t in tasks if t in PPL_SETS], cfg.max_seq_len,
                                          ppl_windows, log)  # fmt: skip
    taus = _resolve_taus(cfg, ck_dir, taus, ablation, zs)
    docs = load_tasks(zs, cache_dir, limit=limit, log=log) if zs else {}
    log(threads.describe())
    results = {"checkpoint": str(ck_dir), "method": cfg.method, "K": cfg.max_depth, "taus": taus, "rows": [],
               "scoring": {"mode": mode, "jacobi_iters": scoring.get("jacobi_iters"),
                           "jacobi_tol": scoring.get("jacobi_tol")}}  # fmt: skip
    if ablation is not None:
        results["ablation"] = ablation.label
    results["rows"] = score_grid(model, tok, taus, windows, labels=labels, docs=docs, batch_size=batch_size,
                                 scoring=scoring, ablation=ablation, log=log)  # fmt: skip
    return results


def _check_scoring(mode: str, jacobi_iters: int | None, jacobi_tol: float | None, ablation) -> dict:
    """The model arguments of the scoring computation; ConfigError for a combination that is not one."""
    if mode not in ("hard", "exact"):
        raise ConfigError(f"--mode must be hard or exact, got {mode!r}")
    if mode == "exact" and (jacobi_iters is not None or jacobi_tol is not None):
        raise ConfigError("--jacobi-iters and --jacobi-tol apply to --mode hard (exact has no Jacobi passes)")
    if mode == "exact" and ablation is not None:
        raise ConfigError("ablations run in --mode hard")
    if jacobi_tol is not None and not jacobi_tol > 0:
        raise ConfigError(f"--jacobi-tol must be > 0, got {jacobi_tol}")
    if mode == "exact":
        return {"mode": "exact"}
    if jacobi_iters is None and jacobi_tol is None:  # the default: the computation generate's prefill runs
        return dict(SCORING)
    if jacobi_tol is not None and jacobi_iters is None:
        jacobi_iters = CONVERGED["jacobi_iters"]
    return {"mode": "hard", "jacobi_iters": jacobi_iters, "jacobi_tol": jacobi_tol}


def _check_options(tasks: list[str], taus: list[float], **counts: int | None) -> None:
    """Tasks, thresholds and counts (each an integer >= 1, or None) that can be evaluated at all."""
    if not tasks:
        raise ConfigError(f"no task to evaluate; choose from {', '.join(PPL_SETS + TASKS)}")
    _check_task_names(list(tasks))
    if not taus:
        raise ConfigError("no tau to evaluate at")
    for t in taus:
        check_tau(t)
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")


def _perplexity_windows(ck_dir: Path, data_dir: Path | None, sets: list[str], seq_len: int, n: int,
                        log) -> tuple[dict[str, torch.Tensor], dict[str, tuple[list[str], torch.Tensor]]]:  # fmt: skip
    """The first ``n`` windows of each perplexity set in the checkpoint's dataset (or ``data_dir``):
    set -> (n, seq_len + 1) token ids. A set the dataset lacks is skipped with a note. Second, for
    a dataset with token labels (``ponderlm data synthetic``): set -> (class names, the windows'
    (n, seq_len + 1) class ids)."""
    windows, labels = {}, {}
    if sets:
        data_dir, meta = checkpoint_dataset(ck_dir, data_dir)
        for s in sets:
            if s not in meta["splits"]:
                log(f"note: {data_dir} has no {s!r} split; skipped")
                continue
            windows[s] = eval_windows(TokenShards(data_dir, s), seq_len, n)
            if (lab := window_labels(data_dir, meta, s, seq_len, n)) is not None:
                labels[s] = lab
    return windows, labels


def _resolve_taus(cfg: ModelConfig, ck_dir: Path, taus: list[float], ablation: Ablation | None,
                  zero_shot: list[str]) -> list[float]:  # fmt: skip
    """The thresholds that give different results: one for a model without a router (nothing to
    prune) or a fixed-depth ablation (the router plays no part). Checks the ablation fits."""
    if not cfg.has_router:
        taus = taus[:1]
    if ablation is None:
        return taus
    if not cfg.has_router:
        raise DataError(f"--ablation needs a PonderLM-3 checkpoint; {ck_dir} is method={cfg.method}")
    if zero_shot:
        raise DataError(
            f"ablations apply to the perplexity sets ({', '.join(PPL_SETS)}), not to {', '.join(zero_shot)}"
        )
    if ablation.policy == "fixed" and not 0 <= ablation.depth <= cfg.max_depth:
        raise DataError(f"fixed depth must lie in [0, {cfg.max_depth}] for this checkpoint, got {ablation.depth}")
    return taus[:1] if ablation.policy == "fixed" else taus


def score_grid(model: PonderLM, tok: Tokenizer, taus: list[float | None], windows: dict[str, torch.Tensor], *,
               labels: dict | None = None, docs: dict | None = None, batch_size: int = 16,
               scoring: dict | None = None, ablation: Ablation | None = None, log=print,
               prefix: str = "") -> list[dict]:  # fmt: skip
    """The evaluation grid (``ponderlm eval``'s, and the experiment runner's): at each tau, each
    perplexity set (``windows``: set -> (N, L+1) token ids; per class too where ``labels`` has the
    set: set -> (class names, (N, L+1) class ids), see :func:`_perplexity_windows`), then each
    zero-shot task (``docs``: task -> documents), in the computation ``scoring`` (``mode`` and
    hard mode's ``jacobi_iters`` / ``jacobi_tol``; default: :data:`SCORING`) with the depths of
    ``ablation`` if given. A tau of None scores without one (soft mode, a fixed-depth ablation).

    One row per (tau, set or task): ``{"tau", "task", "n", "tokens", <perplexity() keys>,
    "seconds"}`` for a set (``n`` windows, ``tokens`` scored positions), ``{"tau", "task",
    <score_task() keys>, "seconds"}`` for a task. Each row is logged as one line, ``prefix`` first;
    a step longer than 10 s reports its progress (:class:`~ponderlm.eval.meter.Meter`)."""
    scoring = dict(SCORING if scoring is None else scoring)
    labels, docs = labels or {}, docs or {}
    rows = []
    for tau in taus:
        at = prefix + ("" if tau is None else f"tau={tau:g} ")
        for s, w in windows.items():
            t0 = time.time()
            classes, lab = labels.get(s, (None, None))
            with Meter(f"{at}{s}: scoring {len(w)} windows", "windows", log, total=len(w)) as meter:
                r = perplexity(model, w, tau=tau, batch_size=batch_size, ablation=ablation, labels=lab,
                               classes=classes, progress=meter, **scoring)  # fmt: skip
            tokens = len(w) * (w.shape[1] - 1)  # scored tokens: every position of a window predicts the next
            rows.append({"tau": tau, "task": s, "n": len(w), "tokens": tokens, **r, "seconds": time.time() - t0})
            log(f"{at}{s}: loss {r['loss']:.4f} ppl {r['ppl']:.2f} depth {r['mean_depth']:.2f} "
                f"({len(w)} windows, {tokens:,} tokens)")  # fmt: skip
            if lab is not None:
                log(f"{at}{s}: {_difficulty_phrase(r['difficulty'])}")
        for name, ds in docs.items():
            t0 = time.time()
            jacobi = {k: v for k, v in scoring.items() if k != "mode" and v is not None}
            with Meter(f"{at}{name}: scoring {len(ds)} docs", "tokens", log) as meter:
                r = score_task(model, tok, ds, tau=tau, batch_size=batch_size, mode=scoring["mode"], jacobi=jacobi,
                               progress=meter)  # fmt: skip
            rows.append({"tau": tau, "task": name, **r, "seconds": time.time() - t0})
            log(f"{at}{name}: acc {r['acc']:.4f} depth {r['mean_depth']:.2f} ({len(ds)} docs)")
    return rows


def _num(v: float | None, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def _difficulty_phrase(d: dict) -> str:
    """One line: does depth follow the difficulty of the answers (:func:`~.perplexity.difficulty`)?"""
    m = d["mean_depth"]
    return (
        f"Spearman(depth, d) over {d['answer_tokens']:,} answer tokens {_num(d['spearman_depth_d'])}; "
        f"mean depth on answer {_num(m['answer'], '.2f')}, free {_num(m['free'], '.2f')}, "
        f"syntax {_num(m['syntax'], '.2f')} tokens"
    )


def _class_lines(rows: list[dict]) -> list[str]:
    """The per-class table of the perplexity rows that have one (labelled datasets)."""
    rows = [r for r in rows if "classes" in r]
    if not rows:
        return []
    lines = [
        "",
        "Per class of the target token (the loss, accuracy and depth at position t belong to token t+1, the token "
        "predicted there):",
        "",
        "| tau | task | class | tokens | loss | acc | mean depth | depth histogram |",
        "|---:|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        for name, c in r["classes"].items():
            hist = " / ".join(f"{h:.2f}" for h in c["depth_hist"]) if c.get("depth_hist") else ""
            lines.append(
                f"| {r['tau']:g} | {r['task']} | {name} | {c['tokens']} | {_num(c['loss'], '.4f')} | "
                f"{_num(c['acc'], '.4f')} | {_num(c['mean_depth'], '.2f')} | {hist} |"
            )
    lines += ["", *(f"- tau {r['tau']:g} {r['task']}: {_difficulty_phrase(r['difficulty'])}" for r in rows)]
    return lines


def _scoring_phrase(scoring: dict | None) -> str:
    """Which computation the numbers are, in words (results written before this was recorded: hard, J=3)."""
    if not scoring or scoring["mode"] == "hard":
        J = (scoring or {}).get("jacobi_iters") or 3
        tol = (scoring or {}).get("jacobi_tol")
        if tol:  # the rule of generate's default prefill: the recurrence, to that tolerance
            return f"hard-pruned parallel computation until the latents move < {tol:g} (at most {J} refinements)"
        return f"hard-pruned parallel computation (J={J} refinements)"
    return "exact recurrence (what `generate` runs)"


def markdown(results: dict) -> str:
    lines = [
        f"# Evaluation of `{results['checkpoint']}`",
        "",
        f"method {results['method']}, K={results['K']}; {_scoring_phrase(results.get('scoring'))} at each tau.",
        "",
        *(
            [f"Ablation: **{results['ablation']}** depths instead of the router's.", ""]
            if "ablation" in results
            else []
        ),
        "`n` is the windows of a perplexity set or the documents of a zero-shot task; `tokens` the positions scored.",
        "",
        "| tau | task | n | tokens | metric | value | acc_norm | mean depth | MFLOPs/token |",
        "|---:|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        if "ppl" in r and r["task"] != "lambada":
            metric, value, norm = "ppl", f"{r['ppl']:.2f}", ""
        elif r["task"] == "lambada":
            metric, value, norm = "acc / ppl", f"{r['acc']:.4f} / {r['ppl']:.1f}", ""
        else:
            metric, value = "acc", f"{r['acc']:.4f}"
            norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else ""
        tokens = f"{int(r['tokens']):,}" if "tokens" in r else ""
        lines.append(
            f"| {r['tau']:g} | {r['task']} | {int(r['n'])} | {tokens} | {metric} | {value} | {norm} | "
            f"{r['mean_depth']:.2f} | {r['flops_per_token'] / 1e6:.3f} |"
        )
    zs = [r for r in results["rows"] if "acc" in r and r["task"] != "lambada"]
    if zs:
        lines += ["", "Zero-shot average accuracy per tau (tasks above, LAMBADA excluded):", ""]
        for tau in results["taus"]:
            accs = [r["acc"] for r in zs if r["tau"] == tau]
            if accs:
                lines.append(f"- tau {tau:g}: {sum(accs) / len(accs):.4f} over {len(accs)} tasks")
    lines += _class_lines(results["rows"])
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ result directories
def check_results_dir(out: Path, kind: owned.DirKind, overwrite: bool) -> bool:
    """Refuse, before a long computation, an output directory its results could not go to.

    ``out`` must be absent, empty, or a ponderlm ``kind`` directory (``eval``, ``analysis``) holding
    only what ponderlm wrote, replaced only with ``overwrite`` (:func:`ponderlm.owned.check_replaceable`);
    it must not lie under a file, and it (or the directory it will be made in) must be writable: a
    read-only file system is reported now, not after the evaluation. Returns True when earlier
    results will be replaced. Call it holding :class:`ponderlm.owned.DirLock` on ``out``.
    """
    out = Path(out)
    replace = owned.check_replaceable(out, kind, overwrite=overwrite, exists_hint=OUT_HINT, choose="--out")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OwnershipError(f"cannot create {out}: {probe} is a file, not a directory; choose another --out")
    try:  # an unnamed temporary file (O_TMPFILE): nothing is left behind, even if we are killed
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise OwnershipError(describe_os_error(e, f"writing {out}") + "; choose another --out") from None
    return replace


def write_result_files(out: Path, kind: owned.DirKind, files: dict[str, str | bytes]) -> list[Path]:
    """Write result files into ``out`` (made and marked as a ponderlm ``kind`` directory when
    missing), each through a hidden temporary; the temporaries are renamed into place only once
    all are written, so a full disk leaves the earlier results (or no directory) and no temporary.
    Check ``out`` with :func:`check_results_dir` first."""
    out = Path(out)
    top = None  # the outermost directory made here: removed again if writing fails
    p = out
    while not p.exists() and p != p.parent:
        top, p = p, p.parent
    temps = [out / f".{name}.tmp" for name in files]
    try:
        owned.make_owned_dir(out, kind)
        for tmp, data in zip(temps, files.values(), strict=True):
            tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
        for tmp, name in zip(temps, files, strict=True):
            tmp.replace(out / name)
    except OSError as e:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
        if top is not None:
            shutil.rmtree(top, ignore_errors=True)
        raise OwnershipError(describe_os_error(e, f"writing {out}")) from None
    return [out / name for name in files]


def write_results(results: dict, out: Path, overwrite: bool) -> tuple[Path, Path]:
    """Write eval.json and eval.md into ``out`` (see :func:`check_results_dir`; hold
    :class:`ponderlm.owned.DirLock` on ``out``)."""
    out = Path(out)
    check_results_dir(out, EVAL, overwrite)
    jp, mp = write_result_files(out, EVAL, {"eval.json": json.dumps(results, indent=2) + "\n",
                                              "eval.md": markdown(results)})  # fmt: skip
    return jp, mp
