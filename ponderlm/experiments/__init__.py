"""Multi-run experiments: train (or reuse) a grid of runs and report quality against inference
compute (``ponderlm experiment pareto``, ``ponderlm quickstart``), or train one of its runs
(``ponderlm experiment train``, e.g. under torchrun). Scoring itself is in
:mod:`ponderlm.eval`; training in :mod:`ponderlm.train`."""

from .config import ExperimentConfig
from .pareto import run_experiment, train_run

__all__ = ["ExperimentConfig", "run_experiment", "train_run"]
