"""The run directory as a kind of directory ponderlm owns: the entries a run holds, and how a run
made before directories carried a marker is recognised (by its config.yaml, or, for a run written
by ``ponderlm convert``, by checkpoints alone)."""

from __future__ import annotations

from pathlib import Path

import yaml

from ponderlm.limits import MAX_METADATA_BYTES, read_limited
from ponderlm.owned import DirKind


def _made_before_markers(directory: Path) -> bool:
    if (directory / "config.yaml").is_file():
        try:  # bounded; a huge or deeply nested config.yaml is not one of ours
            cfg = yaml.safe_load(read_limited(directory / "config.yaml", MAX_METADATA_BYTES, "config.yaml"))
        except (OSError, ValueError, yaml.YAMLError, RecursionError):
            return False
        return isinstance(cfg, dict) and isinstance(cfg.get("model"), dict) and isinstance(cfg.get("train"), dict)
    cks = directory / "checkpoints"  # a run written by `ponderlm convert`: checkpoints only
    steps = [p for p in cks.iterdir() if not p.name.startswith(".")] if cks.is_dir() else []
    return bool(steps) and all(p.name.startswith("step_") and (p / "manifest.json").is_file() for p in steps)


# the trainer's files; where `ponderlm eval` and `analyze` write by default; an experiment's cached
# evaluation of the run
RUN_FILES = frozenset({"config.yaml", "metrics.jsonl", "checkpoints", "tensorboard", "wandb", "eval", "analysis",
                       "experiment_eval.json"})  # fmt: skip
RUN = DirKind("run", "a run", RUN_FILES, legacy=_made_before_markers)
