"""Evaluation: perplexity against inference FLOPs (more to come: zero-shot tasks, Pareto, depth
analysis)."""

from .perplexity import perplexity, score_batch, summarize

__all__ = ["perplexity", "score_batch", "summarize"]
