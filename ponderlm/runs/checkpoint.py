"""Checkpoints: a directory per step, written atomically, verified on load.

Layout of ``RUN/checkpoints/step_00001000/``::

    model.safetensors    weights (safetensors only: no pickle for weights)
    optimizer.pt         optimizer state (tensors and numbers; loaded with weights_only=True)
    trainer_state.json   step, tokens seen, data seed...
    config.yaml          the resolved RunConfig
    model_config.json    the ModelConfig alone
    tokenizer.json       the tokenizer of the data it was trained on
    tokenizer_config.json  a converted model's chat template and special tokens (only when it has them)
    manifest.json        sha256 of every file above, written last

The directory is assembled under a hidden temporary name and renamed into place, so a crash
leaves either a complete checkpoint or an ignorable temporary; loading checks the manifest, and
``latest_checkpoint`` skips (with a warning) any checkpoint that does not verify.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ponderlm.errors import (
    CheckpointError,
    CheckpointWriteError,
    ConfigError,
    InputTooLarge,
    describe_os_error,
)
from ponderlm.limits import read_json_limited
from ponderlm.model.config import ModelConfig
from ponderlm.model.size import check_model_fits
from ponderlm.owned import as_umask_allows
from ponderlm.runs.config import RunConfig, save_run_config

PREFIX = "step_"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors refuses shared storage: tied weights are saved once (the head is re-tied on load)."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel() and k == "lm_head.weight":
            continue
        seen[ptr] = k
        out[k] = v.detach().contiguous().cpu()
    save_file(out, str(path))
    as_umask_allows(path)  # safetensors writes 0600; the run's other files follow the umask


def fault_point(name: str, step: int) -> None:
    """Fault injection for the crash tests: ``PONDERLM_FAULT=name:step`` SIGKILLs this process here."""
    if os.environ.get("PONDERLM_FAULT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete what a killed writer left behind: half-built (``.step_*.tmp``) or half-deleted
    (``.step_*.del``) checkpoint directories, both hidden from ``list_checkpoints``."""
    root = Path(run_dir) / "checkpoints"
    stale = sorted([*root.glob(f".{PREFIX}*.tmp"), *root.glob(f".{PREFIX}*.del")]) if root.is_dir() else []
    for p in stale:
        shutil.rmtree(p, ignore_errors=True)
    return stale


def _discard(ck: Path) -> None:
    """Delete a checkpoint directory without ever exposing a half-deleted one: hide it with an
    atomic rename first, then remove it (a kill in between leaves only a hidden ``.del``)."""
    hidden = ck.with_name(f".{ck.name}.del")
    if hidden.exists():
        shutil.rmtree(hidden)
    ck.rename(hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    optim_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    run_cfg: RunConfig,
    tokenizer_file: Path | None,
    keep_last: int,
    tokenizer_config: Path | None = None,
) -> Path:
    """Write checkpoint ``step`` of a run (see the module docstring); ``tokenizer_config``: a
    ``tokenizer_config.json`` (chat template, special tokens) copied beside ``tokenizer.json``."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"{PREFIX}{step:08d}"
    tmp = root / f".{final.name}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_weights(model_state, tmp / "model.safetensors")
        fault_point("checkpoint", step)  # tests: die half-way through writing
        if optim_state is not None:
            with open(tmp / "optimizer.pt", "wb") as f:  # through Python's file: a full disk surfaces as OSError
                torch.save(optim_state, f)
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        save_run_config(run_cfg, tmp / "config.yaml")
        run_cfg.model.save(tmp / "model_config.json")
        if tokenizer_file is not None and Path(tokenizer_file).is_file():
            shutil.copyfile(tokenizer_file, tmp / "tokenizer.json")
        if tokenizer_config is not None and Path(tokenizer_config).is_file():
            shutil.copyfile(tokenizer_config, tmp / "tokenizer_config.json")
        files = sorted(p.name for p in tmp.iterdir())
        manifest = {"step": step, "files": {name: _sha256(tmp / name) for name in files}}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    except BaseException as e:  # a full disk must not leave a temporary filling it, nor touch older checkpoints
        shutil.rmtree(tmp, ignore_errors=True)
        err = _as_os_error(e)
        if err is None:
            raise
        raise CheckpointWriteError(describe_os_error(err, f"writing checkpoint {final}")) from None
    if final.exists():
        _discard(final)
    tmp.rename(final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        _discard(old)
    return final


def _as_os_error(e: BaseException) -> OSError | None:
    """The OSError behind a failed write: Python's own, or the one safetensors and torch.save report
    in their own exception types ("No space left on device (os error 28)")."""
    seen = e
    while seen is not None:  # torch.save reports the OSError of its file object as the context of its own error
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    text = str(e)
    for code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS):
        if f"os error {code})" in text or os.strerror(code) in text:
            return OSError(code, os.strerror(code))
    return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Checkpoint directories of a run (complete or not), oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def verify_checkpoint(path: Path) -> dict:
    """Check the manifest; returns it or raises CheckpointError."""
    path = Path(path)
    mf = path / "manifest.json"
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not mf.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no manifest.json)")
    try:  # bounded: a manifest is a few hundred bytes; a huge or deeply nested one is refused unparsed
        manifest = read_json_limited(mf, "manifest.json")
        files = manifest["files"]
        if not (isinstance(files, dict) and all(isinstance(v, str) for v in files.values())):
            raise TypeError
    except InputTooLarge as e:
        raise CheckpointError(f"{path}: unreadable manifest.json ({e})") from None
    except (ValueError, KeyError, TypeError, OSError):  # invalid JSON, not UTF-8, not {"files": {name: sha}}
        raise CheckpointError(f"{path}: unreadable manifest.json") from None
    for name, digest in files.items():
        p = path / name
        if not p.is_file():
            raise CheckpointError(f"{path}: {name} is missing")
        if _sha256(p) != digest:
            raise CheckpointError(f"{path}: {name} is corrupt (checksum mismatch)")
    return manifest


def newest_verified(run_dir: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies (or None), and why each newer one did not."""
    problems = []
    for p in reversed(list_checkpoints(run_dir)):
        try:
            verify_checkpoint(p)
            return p, problems
        except CheckpointError as e:
            problems.append(str(e))
    return None, problems


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint that verifies; incomplete or corrupt ones are skipped with a warning."""
    ck, problems = newest_verified(run_dir)
    for e in problems:
        warnings.warn(f"skipping {e}", stacklevel=2)
    return ck


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory (its latest checkpoint) or a checkpoint directory -> checkpoint directory."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint or run directory")
    if (p / "manifest.json").is_file() or (p / "model.safetensors").is_file():
        return p
    if (p / "checkpoints").is_dir():
        ck, problems = newest_verified(p)
        if ck is None:  # one line, naming what is wrong with the newest checkpoint
            why = f" (newest: {problems[0]})" if problems else ""
            raise CheckpointError(f"{p}: no complete checkpoint in this run{why}")
        for e in problems:
            warnings.warn(f"skipping {e}", stacklevel=2)
        return ck
    raise CheckpointError(
        f"{p}: not a ponderlm checkpoint or run directory (no manifest.json, model.safetensors or checkpoints/)"
    )


def load_checkpoint(path: str | Path, *, with_optimizer: bool = True) -> dict[str, Any]:
    """Verify and load a checkpoint directory (CPU tensors)."""
    path = Path(path)
    verify_checkpoint(path)
    try:  # a value of the wrong type (a string for a size) fails validation with TypeError
        model_cfg = ModelConfig.load(path / "model_config.json")
    except (ConfigError, ValueError, TypeError, OSError) as e:
        raise CheckpointError(f"{path}: invalid model_config.json ({str(e)[:300]})") from None
    # sizes a hand-edited or foreign config declares are refused before anything is allocated
    check_model_fits(model_cfg, f"{path}: the model of model_config.json", prefix="")
    try:
        state = load_file(str(path / "model.safetensors"))
    except Exception as e:  # safetensors raises its own error types for truncated/foreign files
        raise CheckpointError(f"{path}: model.safetensors is not a readable safetensors file ({e})") from None
    out: dict[str, Any] = {
        "path": path,
        "model_config": model_cfg,
        "model_state": state,
        "trainer_state": _trainer_state(path),
        "optim_state": None,
    }
    if with_optimizer and (path / "optimizer.pt").is_file():
        try:  # weights_only: tensors and plain containers only, never arbitrary pickled objects
            out["optim_state"] = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"{path}: refusing optimizer.pt, not a plain tensor file ({first[:200]})") from None
    return out


def _trainer_state(path: Path) -> dict[str, Any]:
    try:
        state = read_json_limited(path / "trainer_state.json", "trainer_state.json")
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):  # InputTooLarge is a ValueError
        raise CheckpointError(f"{path}: trainer_state.json is missing or has no step") from None
    return state


def load_model_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load weights saved by save_weights (re-tying a tied head) with a strict key and shape check."""
    own = model.state_dict()
    wrong = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if k in own and v.shape != own[k].shape]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(
            f"checkpoint does not fit the model: {k} has shape {got}, the model config needs {want}"
            + (f" ({len(wrong) - 1} more tensors differ)" if len(wrong) > 1 else "")
        )
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.cfg.tie_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
