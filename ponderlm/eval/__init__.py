"""Scoring a model: perplexity and zero-shot tasks next to inference FLOPs and realised depth
(``ponderlm eval``: :mod:`.evaluate`, whose :func:`~.evaluate.score_grid` is the one grid of tau x
perplexity set x task every caller scores through), the lm-eval adapter, inference-time ablations
and the per-token depth analysis (:mod:`.analyze`, its pages drawn by :mod:`.depth_render`);
:mod:`.meter` reports a long scoring step's progress and ETA.
Multi-run experiments built on these are in :mod:`ponderlm.experiments`."""

from ponderlm.eval.perplexity import perplexity, score_batch, summarize

__all__ = ["perplexity", "score_batch", "summarize"]
