"""Multi-run experiments: train (or reuse) a grid of runs and report quality against inference
compute (``ponderlm experiment pareto``, ``ponderlm quickstart``), or train one of its runs
(``ponderlm experiment train``, e.g. under torchrun). Scoring itself is in
:mod:`ponderlm.eval`; training in :mod:`ponderlm.training.trainer`."""

from ponderlm.experiments.config import ExperimentConfig
from ponderlm.experiments.reuse import train_run
from ponderlm.experiments.runner import run_experiment

__all__ = ["ExperimentConfig", "run_experiment", "train_run"]
