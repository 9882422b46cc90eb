"""The life of a dataset directory while it is built, for every builder (``prepare``,
``synthetic``): a lock on ``--out``, an up-to-date dataset found and left alone, a hidden marked
temporary sibling built in (checkpointed, kept for ``--resume`` when interrupted) and renamed into
place, and its ``meta.json`` written with the verification cache.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ponderlm.data.dataset import DATASET, FORMAT_VERSION, TRAIN, VERIFIED, _dataset_problem, _identity, load_meta
from ponderlm.data.shards import finished_shards, read_journal, roll_back
from ponderlm.data.tokenizer import Tokenizer
from ponderlm.errors import DataError, DirectoryLocked, OwnershipError, describe_os_error
from ponderlm.owned import (
    DirLock,
    check_replaceable,
    read_marker,
    replace_dir,
    write_marker,
)


def _target(out: Path) -> Path:
    """The real directory ``--out`` names (".", "..", a symlink): the lock, the hidden temporary
    and the rename are beside it, whichever way it is spelled."""
    target = out.resolve()
    if target.parent == target:
        raise DataError(f"--out {out} is the root directory; choose a directory for the dataset")
    return target


def _looks_like_dataset(out: Path) -> bool:
    """A marked dataset, or an unmarked directory whose meta.json has a dataset's keys (made
    before markers existed): its metadata is then checked strictly."""
    marker = read_marker(out)
    if marker is not None:
        return marker["kind"] == DATASET.name
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {"format_version", "fingerprint", "splits"} <= set(meta)


def _same_settings(out: Path, fp: str) -> dict | None:
    """The (validated) meta of the dataset in ``out`` when it was built with these settings."""
    if not (out / "meta.json").is_file() or not _looks_like_dataset(out):
        return None
    meta = load_meta(out)
    return meta if meta["fingerprint"] == fp else None


def _log_up_to_date(out: Path, meta: dict, log) -> dict:
    log(f"{out}: up to date ({meta['splits'].get(TRAIN, {}).get('tokens', 0):,} train tokens); nothing to do")
    return meta


EXISTS_HINT = "it holds a dataset built with other settings; pass --overwrite to rebuild it or choose another --out"


def build_dataset(out: Path, fp: str, overwrite: bool, build: Callable[..., dict], log,
                  before: Callable[[], Any] = lambda: None, *, resume: bool = False,
                  resumable: bool = False) -> tuple[dict, bool]:  # fmt: skip
    """The protocol every dataset builder follows: under a lock on ``out``, find the dataset with
    fingerprint ``fp`` up to date (and intact) and do nothing, or check that ``out`` may be
    replaced, run ``before()`` (e.g. a download) and then ``build(tmp, what before returned)`` in a
    hidden marked sibling renamed into place. Returns (meta, whether it was built).

    A ``resumable`` build is called ``build(tmp, ready, journal)`` and checkpoints into ``tmp``
    itself: interrupted, it keeps ``tmp`` at its last checkpoint for a later ``resume``."""
    target = _target(out)
    lock = DirLock(target, "--out")
    try:
        lock.acquire()
    except DirectoryLocked:
        raise
    except OwnershipError:  # a read-only location: an intact up-to-date dataset there is still fine
        meta = _same_settings(out, fp)
        if meta is not None and _dataset_problem(out, meta) is None:
            return _log_up_to_date(out, meta, log), False
        raise
    try:
        meta = _same_settings(out, fp)
        if meta is not None:
            problem = _dataset_problem(out, meta)
            if problem is None:
                return _log_up_to_date(out, meta, log), False
            if not overwrite:
                raise DataError(f"{out} holds this dataset, damaged: {problem}; pass --overwrite to rebuild it")
            log(f"{out} is damaged ({problem}); rebuilding it")
        check_replaceable(out, DATASET, overwrite=overwrite, choose="--out", exists_hint=EXISTS_HINT)
        if os.path.ismount(target):
            raise DataError(
                f"--out {out} is a mount point, which cannot be replaced by a rename; choose a directory in it"
            )
        tmp = target.with_name(f".{target.name}.tmp")
        journal = _previous_build(tmp, fp, resume if resumable else False, overwrite, log)
        ready = before()
        return _run_build(tmp, target, journal, resumable, lambda: build(tmp, ready, journal) if resumable
                          else build(tmp, ready), log), True  # fmt: skip
    finally:
        lock.release()


def _previous_build(tmp: Path, fp: str, resume: bool, overwrite: bool, log) -> dict | None:
    """What to do with the build directory a killed or interrupted build left: its journal when
    resuming it; refused when it holds checkpointed work and neither --resume nor --overwrite says
    what to do with it; otherwise (nothing checkpointed, or --overwrite) removed."""
    if not tmp.exists():
        if resume:
            log("nothing to resume: building from the start")
        return None
    if read_marker(tmp) is None:
        raise OwnershipError(f"{tmp} exists and was not made by ponderlm; move it away")
    journal = read_journal(tmp)
    if journal is not None:
        same = journal["fingerprint"] == fp
        if same and resume:
            log(f"resuming the interrupted build in {tmp} ({finished_shards(journal)} shards finished)")
            roll_back(tmp, journal)  # a killed build may have written past its checkpoint
            return journal
        if not overwrite:
            hint = "pass --resume to continue it, or --overwrite to start over" if same else (
                "pass --overwrite to discard it and start over")  # fmt: skip
            what = "of this dataset" if same else "with other settings"
            raise DataError(f"an interrupted build {what} is in {tmp} ({finished_shards(journal)} shards finished); "
                            f"{hint}")  # fmt: skip
        log(f"discarding the interrupted build in {tmp} (--overwrite)")
    elif resume:
        log("nothing to resume (the interrupted build had not checkpointed): building from the start")
    shutil.rmtree(tmp)
    return None


def _run_build(tmp: Path, target: Path, journal: dict | None, resumable: bool, build: Callable[[], dict], log) -> dict:
    """Run ``build`` in ``tmp`` and rename it into place. A bad input or any other error removes
    ``tmp``; an interruption or an OSError (a full disk) keeps a resumable build's checkpointed
    shards, cut back to the checkpoint, and says how to continue."""
    try:
        if journal is None:
            tmp.mkdir(parents=True)
            write_marker(tmp, DATASET)
        meta = build()
        replace_dir(tmp, target)
        return meta
    except (KeyboardInterrupt, OSError) as e:
        kept = _keep_checkpoint(tmp) if resumable else 0
        if not kept:
            shutil.rmtree(tmp, ignore_errors=True)
        where = (f"; the {kept} shards finished so far are kept in {tmp}: run the same command with --resume to "
                 "continue") if kept else ""  # fmt: skip
        if isinstance(e, KeyboardInterrupt):
            if kept:
                log(f"interrupted{where}")
            raise
        raise DataError(describe_os_error(e, f"writing {target}") + where) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _keep_checkpoint(tmp: Path) -> int:
    """Cut an interrupted build back to its last checkpoint; the number of finished shards kept
    (0: nothing worth keeping)."""
    with contextlib.suppress(OSError):
        journal = read_journal(tmp)
        if journal is not None:
            roll_back(tmp, journal)
            return max(finished_shards(journal), 1)
    return 0


def write_meta(tmp: Path, fp: str, tok: Tokenizer, dtype, splits_meta: dict, **extra) -> dict:
    """tokenizer.json, meta.json (the common keys, then ``extra``) and the verification cache of a
    dataset built in ``tmp``; returns the meta."""
    tok.save(tmp / "tokenizer.json")
    meta = {
        "format_version": FORMAT_VERSION,
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer": {"kind": tok.kind, "file": "tokenizer.json", "vocab_size": tok.vocab_size, "eot_id": tok.eot_id},
        "dtype": np.dtype(dtype).name,
        "splits": splits_meta,
        **extra,
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    # the checksums were computed while writing: record them as verified (the rename into place keeps
    # inodes and modification times), so the first training run need not read the shards again
    groups = [splits_meta] + ([extra["labels"]["splits"]] if "labels" in extra else [])
    entries = {sh["file"]: _identity(tmp / sh["file"], sh["sha256"])
               for group in groups for sp in group.values() for sh in sp["shards"]}  # fmt: skip
    (tmp / VERIFIED).write_text(json.dumps({"version": 1, "files": entries}) + "\n")
    return meta
