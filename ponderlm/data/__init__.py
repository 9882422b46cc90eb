"""Corpus building, tokenizers and token-shard loading."""

from .loader import TokenShards, TrainBatches, eval_windows
from .prepare import PrepareConfig, check_dataset, load_meta, prepare, remember_verified, verify
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
    "check_dataset",
    "eval_windows",
    "load_meta",
    "prepare",
    "remember_verified",
    "verify",
]
