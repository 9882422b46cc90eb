"""Corpus building, synthetic labelled datasets, tokenizers and token-shard loading."""

import os

if not os.environ.get("PONDERLM_TOKENIZER_WORKER"):  # see ponderlm/__init__.py
    from .loader import TokenShards, TrainBatches, eval_windows
    from .prepare import PrepareConfig, check_dataset, load_meta, prepare, remember_verified, verify
    from .sources import DEFAULT_SOURCES, DataError, Document
    from .synthetic import (
        LabelShards,
        SyntheticConfig,
        generate_documents,
        load_labels,
        synthesize,
        window_labels,
    )
    from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_SOURCES",
    "DataError",
    "Document",
    "LabelShards",
    "PrepareConfig",
    "SyntheticConfig",
    "TokenShards",
    "Tokenizer",
    "TrainBatches",
    "check_dataset",
    "eval_windows",
    "generate_documents",
    "load_labels",
    "load_meta",
    "prepare",
    "remember_verified",
    "synthesize",
    "verify",
    "window_labels",
]
