"""An experiment file (``configs/experiments/*.yaml``): a grid of training runs sharing one base
config, and how to evaluate them::

    name: cpu
    out_dir: runs/pareto_cpu
    base:            # a RunConfig shared by every run (model: ..., train: ...)
      model: {d_model: 64, ...}
      train: {data_dir: data/default, max_steps: 800, ...}
    runs:            # each: a name, dotted overrides of base, optionally its own seeds
      - {name: vanilla, set: [model.method=vanilla], seeds: [0, 1]}
      - {name: p3-l0.05, set: [model.method=ponderlm3, model.penalty_weight=0.05]}
    taus: [1.0e-4, 0.05, 0.2]   # PonderLM-3 runs are evaluated at each; others once
    seeds: [0]                  # every run is trained once per seed (unless it lists its own)
    eval_windows: 128           # validation windows for perplexity
    test_splits: [ptb_test]     # more held-out splits of the dataset, scored like val (optional)
    tasks: []                   # zero-shot tasks for an average accuracy (optional)
    task_limit: null
    ablations: []               # on PonderLM-3 runs: fixed, random, entropy (eval.ablations)
    ablation_taus: [0.05]       # the taus of the random/entropy ablations (default: every tau)
    references: [vanilla, p2-k3]  # runs every configuration is compared with (default: vanilla)

In ``set``, ``{run:NAME}`` stands for the directory of the run NAME (listed earlier) trained with
the same seed: ``train.init_from={run:base}`` makes every seed continue from its own base run.

A run trained with the first seed lives in ``out_dir/<name>``, other seeds in
``out_dir/<name>-s<seed>``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ponderlm.errors import ConfigError
from ponderlm.eval.ablations import ABLATIONS
from ponderlm.model.config import check_tau
from ponderlm.runs.config import RunConfig, load_run_config, read_yaml_mapping

PLACEHOLDER = re.compile(r"\{run:([^}]*)\}")  # in a run's overrides: another run's directory, same seed
# the type of each key an experiment file may give (checked before the dataclass is built)
SHAPES = {"name": str, "out_dir": str, "base": dict, "runs": list, "taus": list, "seeds": list, "tasks": list,
          "ablations": list, "eval_windows": int, "test_splits": list,
          "ablation_taus": list, "references": list}  # fmt: skip
NULLABLE = {"ablation_taus", "references"}  # keys whose null means their default


@dataclass
class ExperimentConfig:
    name: str
    out_dir: str
    base: dict[str, Any]
    runs: list[dict[str, Any]]
    taus: list[float] = field(default_factory=lambda: [1e-4])
    seeds: list[int] = field(default_factory=lambda: [0])
    eval_windows: int = 128
    tasks: list[str] = field(default_factory=list)
    task_limit: int | None = None
    ablations: list[str] = field(default_factory=list)
    test_splits: list[str] = field(default_factory=list)
    ablation_taus: list[float] | None = None  # None: every tau
    references: list[str] | None = None  # the report's comparisons; None: the run named vanilla, if any

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        p = Path(path)
        raw = read_yaml_mapping(p, "experiment")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(f"{p}: unknown experiment key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        missing = [k for k in ("name", "out_dir", "base", "runs") if k not in raw]
        if missing:
            raise ConfigError(f"{p}: missing {', '.join(missing)}")
        for key, kind in SHAPES.items():
            if key in raw and not isinstance(raw[key], kind) and not (key in NULLABLE and raw[key] is None):
                raise ConfigError(f"{p}: {key} must be a {kind.__name__}, got {type(raw[key]).__name__}")
        if not all(isinstance(r, dict) for r in raw["runs"]):
            raise ConfigError(f"{p}: every entry of runs must be a mapping (name, set, seeds)")
        cfg = cls(**raw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for t in [*self.taus, *(self.ablation_taus or [])]:
            check_tau(t)
        bad = sorted(set(self.ablations) - set(ABLATIONS))
        if bad:
            raise ConfigError(f"unknown ablation(s) {', '.join(bad)}; known: {', '.join(ABLATIONS)}")
        if not self.seeds:
            raise ConfigError("seeds must list at least one seed")
        for s in self.test_splits:
            if not isinstance(s, str) or s in ("", "train", "val") or self.test_splits.count(s) > 1:
                raise ConfigError(f"test_splits must name other held-out splits than train and val, once each; "
                                  f"got {s!r}")  # fmt: skip
        names = [r.get("name") for r in self.runs]
        if not self.runs or any(not isinstance(n, str) or not n for n in names):
            raise ConfigError("every experiment run needs a non-empty name")
        if len(set(names)) != len(names):
            raise ConfigError(f"duplicate run names in the experiment: {names}")
        for r in self.runs:
            self._validate_run(r)
        unknown = [r for r in self.references or [] if r not in names]
        if unknown:
            raise ConfigError(f"references name no run of the experiment: {', '.join(map(str, unknown))}")

    def _validate_run(self, run: dict[str, Any]) -> None:
        sets = run.get("set", [])
        if not isinstance(sets, list) or not all(isinstance(x, str) for x in sets):
            raise ConfigError(f"run {run['name']!r}: set must be a list of key=value strings")
        seeds = self.run_seeds(run)
        if not seeds or not all(isinstance(x, int) for x in seeds):
            raise ConfigError(f"run {run['name']!r}: seeds must be a non-empty list of integers")
        self.run_config(run, seeds[0])  # fail early on bad overrides

    def run_seeds(self, run: dict[str, Any]) -> list[int]:
        return list(run.get("seeds", self.seeds))

    def run_dir(self, name: str, seed: int) -> Path:
        """Where run ``name`` trained with ``seed`` lives."""
        return Path(self.out_dir) / (name if seed == self.seeds[0] else f"{name}-s{seed}")

    def _placeholders(self, run: dict[str, Any], value: str, seed: int) -> str:
        """``{run:NAME}`` in an override: the directory of the earlier run NAME trained with the same
        seed (e.g. ``train.init_from={run:base}``: every seed continues its own base run)."""
        names = [r["name"] for r in self.runs]
        for ref in PLACEHOLDER.findall(value):
            if ref not in names or names.index(ref) >= names.index(run["name"]):
                raise ConfigError(f"run {run['name']!r}: {{run:{ref}}} must name a run listed before it")
            other = self.runs[names.index(ref)]
            if seed not in self.run_seeds(other):
                raise ConfigError(f"run {run['name']!r}: {{run:{ref}}} is not trained with seed {seed}")
            value = value.replace(f"{{run:{ref}}}", str(self.run_dir(ref, seed)))
        return value

    def run_config(self, run: dict[str, Any], seed: int) -> RunConfig:
        unknown = sorted(set(run) - {"name", "set", "seeds"})
        if unknown:
            raise ConfigError(f"run {run.get('name')!r}: unknown key(s) {', '.join(unknown)} (use name, set, seeds)")
        sets = [self._placeholders(run, v, seed) for v in run.get("set", [])]
        overrides = [*sets, f"train.out_dir={self.run_dir(run['name'], seed)}", f"train.seed={seed}"]
        cfg, _ = load_run_config(self.base, overrides)
        return cfg

    def jobs(self) -> list[tuple[int, dict[str, Any]]]:
        """(seed, run) to train, the first seed of every run first."""
        seeds = dict.fromkeys(s for r in self.runs for s in self.run_seeds(r))
        return [(seed, run) for seed in seeds for run in self.runs if seed in self.run_seeds(run)]
