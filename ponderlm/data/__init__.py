"""Corpus building, tokenizers and token-shard loading."""

from .loader import TokenShards, TrainBatches, eval_windows
from .prepare import PrepareConfig, load_meta, prepare, verify
from .sources import DEFAULT_SOURCES, DataError, Document
from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_SOURCES",
    "DataError",
    "Document",
    "PrepareConfig",
    "TokenShards",
    "Tokenizer",
    "TrainBatches",
    "eval_windows",
    "load_meta",
    "prepare",
    "verify",
]
