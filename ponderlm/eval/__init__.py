"""Scoring a model: perplexity and zero-shot tasks next to inference FLOPs and realised depth
(``ponderlm eval``: :mod:`.run`), the lm-eval adapter, inference-time ablations and the per-token
depth analysis. Multi-run experiments built on these are in :mod:`ponderlm.experiments`."""

from .perplexity import perplexity, score_batch, summarize

__all__ = ["perplexity", "score_batch", "summarize"]
