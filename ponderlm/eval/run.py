"""``ponderlm eval``: perplexity and zero-shot tasks of a checkpoint at one or more tau, every
quality number next to inference FLOPs per token and mean realised depth."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
import yaml

from .. import owned
from ..checkpoint import CheckpointError, load_checkpoint, load_model_weights, resolve_checkpoint
from ..config import ConfigError, check_tau
from ..data import DataError, TokenShards, eval_windows, load_meta
from ..data.tokenizer import Tokenizer
from ..device import resolve_device
from ..errors import describe_os_error
from ..model import PonderLM
from .perplexity import perplexity
from .tasks import TASKS, load_tasks
from .zeroshot import score_task

PPL_SETS = ("val", "ptb_test")
OUT_HINT = "pass --overwrite to replace it or choose another --out"


def is_hf_export(path: str | Path) -> bool:
    """A directory written by ``ponderlm export`` / ``save_pretrained`` (config.json of model_type ponderlm)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("model_type") == "ponderlm"
    except (json.JSONDecodeError, OSError, AttributeError):
        return False


def load_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[PonderLM, Tokenizer, Path]:
    """A trainer run/checkpoint directory or a transformers export -> (model, tokenizer, directory).
    ``device`` is a torch.device or a name for :func:`ponderlm.device.resolve_device`."""
    device = resolve_device(device) if isinstance(device, str) else device
    if is_hf_export(checkpoint):
        from ..convert import _first_line, _quiet_transformers
        from ..hf import PonderLMForCausalLM

        path = Path(checkpoint)
        try:
            with _quiet_transformers():  # no progress bar or load report around a one-line error
                model = PonderLMForCausalLM.from_pretrained(path).model
        except Exception as e:  # transformers and safetensors raise their own types for damaged files
            raise CheckpointError(f"{path}: not a readable ponderlm export ({_first_line(e)})") from None
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path}: no tokenizer.json in this export")
        return model.to(device).eval(), Tokenizer.load(path / "tokenizer.json"), path
    ck_dir = resolve_checkpoint(checkpoint)
    ck = load_checkpoint(ck_dir, with_optimizer=False)
    model = PonderLM(ck["model_config"])
    load_model_weights(model, ck["model_state"])
    tok_file = ck_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise CheckpointError(f"{ck_dir}: no tokenizer.json saved with this checkpoint")
    return model.to(device).eval(), Tokenizer.load(tok_file), ck_dir


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def checkpoint_dataset(ck_dir: Path, data_dir: Path | None) -> tuple[Path, dict]:
    """The dataset to evaluate a checkpoint on (default: the one it was trained on, from its
    config.yaml), checked to share the checkpoint's tokenizer. Returns (data_dir, meta)."""
    if data_dir is None:
        run_cfg = yaml.safe_load((ck_dir / "config.yaml").read_text()) if (ck_dir / "config.yaml").is_file() else {}
        found = (run_cfg or {}).get("train", {}).get("data_dir")
        if not found:
            raise DataError(f"{ck_dir}: no train.data_dir in config.yaml; pass the dataset directory")
        data_dir = Path(found)
    meta = load_meta(data_dir)
    if _sha(Path(data_dir) / meta["tokenizer"]["file"]) != _sha(ck_dir / "tokenizer.json"):
        raise DataError(f"{data_dir} was tokenized with another tokenizer than {ck_dir}")
    return Path(data_dir), meta


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
    ppl_windows: int = 256,
    batch_size: int = 16,
    device: str = "cpu",
    log=print,
    ablation=None,
) -> dict:
    """Hard-mode scores of a checkpoint per tau; ``ablation`` (PonderLM-3, perplexity sets only)
    replaces the router's depths (:mod:`ponderlm.eval.ablations`)."""
    if not tasks:
        raise ConfigError(f"no task to evaluate; choose from {', '.join(PPL_SETS + TASKS)}")
    _check_task_names(list(tasks))
    if not taus:
        raise ConfigError("no tau to evaluate at")
    for t in taus:
        check_tau(t)
    for name, value in (("batch_size", batch_size), ("ppl_windows", ppl_windows), ("limit", limit)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    model, tok, ck_dir = load_model(checkpoint, device)
    cfg = model.cfg
    if not cfg.has_router:  # nothing to prune: one tau is the model
        taus = taus[:1]
    ppl_sets = [t for t in tasks if t in PPL_SETS]
    zs = [t for t in tasks if t not in PPL_SETS]
    windows = {}
    if ppl_sets:
        data_dir, meta = checkpoint_dataset(ck_dir, data_dir)
        for s in ppl_sets:
            if s in meta["splits"]:
                windows[s] = eval_windows(TokenShards(data_dir, s), cfg.max_seq_len, ppl_windows)
            else:
                log(f"note: {data_dir} has no {s!r} split; skipped")
    if ablation is not None:
        if not cfg.has_router:
            raise DataError(f"--ablation needs a PonderLM-3 checkpoint; {ck_dir} is method={cfg.method}")
        if zs:
            raise DataError(f"ablations apply to the perplexity sets ({', '.join(PPL_SETS)}), not to {', '.join(zs)}")
        if ablation.policy == "fixed" and not 0 <= ablation.depth <= cfg.max_depth:
            raise DataError(f"fixed depth must lie in [0, {cfg.max_depth}] for this checkpoint, got {ablation.depth}")
        if ablation.policy == "fixed":
            taus = taus[:1]  # the router's threshold plays no part
    docs = load_tasks(zs, cache_dir, limit=limit, log=log) if zs else {}
    results = {"checkpoint": str(ck_dir), "method": cfg.method, "K": cfg.max_depth, "taus": taus, "rows": []}
    if ablation is not None:
        results["ablation"] = ablation.label
    for tau in taus:
        for s, w in windows.items():
            t0 = time.time()
            r = perplexity(model, w, mode="hard", tau=tau, batch_size=batch_size, ablation=ablation)
            results["rows"].append({"tau": tau, "task": s, "n": len(w), **r, "seconds": time.time() - t0})
            log(f"tau={tau:g} {s}: loss {r['loss']:.4f} ppl {r['ppl']:.2f} depth {r['mean_depth']:.2f}")
        for name, ds in docs.items():
            t0 = time.time()
            r = score_task(model, tok, ds, tau=tau, batch_size=batch_size)
            results["rows"].append({"tau": tau, "task": name, **r, "seconds": time.time() - t0})
            log(f"tau={tau:g} {name}: acc {r['acc']:.4f} depth {r['mean_depth']:.2f} ({len(ds)} docs)")
    return results


def markdown(results: dict) -> str:
    lines = [
        f"# Evaluation of `{results['checkpoint']}`",
        "",
        f"method {results['method']}, K={results['K']}; hard-pruned inference computation at each tau.",
        "",
        *(
            [f"Ablation: **{results['ablation']}** depths instead of the router's.", ""]
            if "ablation" in results
            else []
        ),
        "| tau | task | n | metric | value | acc_norm | mean depth | MFLOPs/token |",
        "|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    for r in results["rows"]:
        if "ppl" in r and r["task"] != "lambada":
            metric, value, norm = "ppl", f"{r['ppl']:.2f}", ""
        elif r["task"] == "lambada":
            metric, value, norm = "acc / ppl", f"{r['acc']:.4f} / {r['ppl']:.1f}", ""
        else:
            metric, value = "acc", f"{r['acc']:.4f}"
            norm = f"{r['acc_norm']:.4f}" if "acc_norm" in r else ""
        lines.append(
            f"| {r['tau']:g} | {r['task']} | {int(r['n'])} | {metric} | {value} | {norm} | {r['mean_depth']:.2f} | "
            f"{r['flops_per_token'] / 1e6:.3f} |"
        )
    zs = [r for r in results["rows"] if "acc" in r and r["task"] != "lambada"]
    if zs:
        lines += ["", "Zero-shot average accuracy per tau (tasks above, LAMBADA excluded):", ""]
        for tau in results["taus"]:
            accs = [r["acc"] for r in zs if r["tau"] == tau]
            if accs:
                lines.append(f"- tau {tau:g}: {sum(accs) / len(accs):.4f} over {len(accs)} tasks")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ result directories
def check_results_dir(out: Path, kind: str, overwrite: bool) -> bool:
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
        raise owned.OwnershipError(f"cannot create {out}: {probe} is a file, not a directory; choose another --out")
    try:  # an unnamed temporary file (O_TMPFILE): nothing is left behind, even if we are killed
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as e:
        raise owned.OwnershipError(describe_os_error(e, f"writing {out}") + "; choose another --out") from None
    return replace


def write_result_files(out: Path, kind: str, files: dict[str, str | bytes]) -> list[Path]:
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
        raise owned.OwnershipError(describe_os_error(e, f"writing {out}")) from None
    return [out / name for name in files]


def write_results(results: dict, out: Path, overwrite: bool) -> tuple[Path, Path]:
    """Write eval.json and eval.md into ``out`` (see :func:`check_results_dir`; hold
    :class:`ponderlm.owned.DirLock` on ``out``)."""
    out = Path(out)
    check_results_dir(out, "eval", overwrite)
    jp, mp = write_result_files(out, "eval", {"eval.json": json.dumps(results, indent=2) + "\n",
                                              "eval.md": markdown(results)})  # fmt: skip
    return jp, mp
