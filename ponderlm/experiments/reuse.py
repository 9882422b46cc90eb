"""The runs of an experiment on disk: whether a run is finished, how its saved config differs from
the one the experiment asks for, and what to do with it (reuse it when finished with the same config,
resume it when unfinished, train it when absent or under ``--overwrite``; refuse one trained with
another config); the experiment's out_dir; and ``ponderlm experiment train`` (:func:`train_run`),
one run trained exactly as ``experiment pareto`` would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ponderlm.data import load_meta
from ponderlm.errors import ConfigError, OwnershipError
from ponderlm.experiments.config import ExperimentConfig
from ponderlm.owned import DirKind, is_empty_dir, is_kind, make_owned_dir, read_marker
from ponderlm.runs.checkpoint import latest_checkpoint
from ponderlm.runs.config import RunConfig, load_run_config
from ponderlm.runs.directory import RUN
from ponderlm.training.rundir import resolve_model_config
from ponderlm.training.trainer import train

EXPERIMENT = DirKind("experiment", "an experiment")  # runs and reports; never replaced as a whole


def finished(run_dir: Path, steps: int) -> bool:
    ck = latest_checkpoint(run_dir) if run_dir.is_dir() else None
    return ck is not None and json.loads((ck / "trainer_state.json").read_text())["step"] >= steps


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


def report_files(stem: str) -> set[str]:
    """The files an experiment's report writes into its out_dir."""
    return {f"{stem}.{ext}" for ext in ("md", "json", "png")}


def check_experiment_dir(out: Path, names: set[str]) -> None:
    """An experiment writes run directories and its report files into out_dir; refuse a directory
    that holds anything else unless ponderlm made it for an experiment."""
    if not out.exists() or is_empty_dir(out):
        return
    if not out.is_dir():
        raise OwnershipError(f"experiment out_dir {out} is a file; choose a directory")
    marker = read_marker(out)
    if marker is not None:
        if marker["kind"] != EXPERIMENT.name:
            raise OwnershipError(f"experiment out_dir {out} is a ponderlm {marker['kind']}; choose another out_dir")
        return
    for p in out.iterdir():  # made before markers existed: runs and reports only
        if p.name.startswith(".") or p.name in names or (p.is_dir() and is_kind(p, RUN)):
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


def prepare_run(rc: RunConfig, overwrite: bool, eval_only: bool, log, tag: str) -> bool:
    """Make the run of ``rc`` ready to report: reuse it when finished with the same config,
    resume it when unfinished, (re)train it when absent or --overwrite. A run trained with another
    config is refused. Returns False when --eval-only leaves it out."""
    run_dir = Path(rc.train.out_dir)
    reuse, resume, replace = decide(rc, overwrite)
    if reuse:
        log(f"\n== {tag} {run_dir.name}: finished run found, reusing it")
        return True
    if eval_only:
        log(f"\n== {tag} {run_dir.name}: not finished, left out (--eval-only)")
        return False
    log(f"\n== {tag} {'resuming' if resume else 'training'} {run_dir.name} ({rc.model.method})")
    train(rc, set(), resume=resume, overwrite=replace, log=log)
    return True


def decide(rc: RunConfig, overwrite: bool) -> tuple[bool, bool, bool]:
    """What to do with the run of ``rc``: (reuse it, as it is finished; resume it, as it was
    started, with or without a checkpoint yet; replace it, under --overwrite). Neither reuse nor
    resume: train it from scratch."""
    run_dir = Path(rc.train.out_dir)
    exists = run_dir.is_dir() and not is_empty_dir(run_dir)
    if exists and not overwrite and finished(run_dir, rc.train.max_steps):
        return True, False, False
    return False, exists and not overwrite, overwrite and exists


def train_run(cfg: ExperimentConfig, name: str, seed: int | None = None, *, overwrite: bool = False,
              log=print) -> Path:  # fmt: skip
    """Train (or resume, or find finished) one run of the experiment exactly as ``experiment
    pareto`` would, into its place in out_dir: ``ponderlm experiment train``, the command to launch
    under torchrun for runs too large for one process. ``seed`` defaults to the run's first."""
    runs = {r["name"]: r for r in cfg.runs}
    if name not in runs:
        raise ConfigError(f"experiment {cfg.name!r} has no run {name!r} (runs: {', '.join(runs)})")
    seeds = cfg.run_seeds(runs[name])
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise ConfigError(f"run {name!r} of experiment {cfg.name!r} is trained with seeds {seeds}, not {seed}")
    rc = cfg.run_config(runs[name], seed)
    run_dir = Path(rc.train.out_dir)
    check_reusable(rc, overwrite)
    reuse, resume, replace = decide(rc, overwrite)
    if reuse:
        log(f"{run_dir} is finished (step {rc.train.max_steps}); nothing to train")
        return run_dir
    if int(os.environ.get("RANK", "0")) == 0:  # one process of a torchrun job makes the experiment directory
        out = Path(cfg.out_dir)
        check_experiment_dir(out, report_files("pareto"))
        make_owned_dir(out, EXPERIMENT)
    train(rc, set(), resume=resume, overwrite=replace, log=log)
    return run_dir
