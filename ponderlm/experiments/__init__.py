"""Multi-run experiments: train (or reuse) a grid of runs and report quality against inference
compute (``ponderlm experiment pareto``, ``ponderlm quickstart``). Scoring itself is in
:mod:`ponderlm.eval`; training in :mod:`ponderlm.train`."""

from .config import ExperimentConfig
from .pareto import run_experiment

__all__ = ["ExperimentConfig", "run_experiment"]
