"""Corpus building, synthetic labelled datasets, tokenizers and token-shard loading."""

import os

if not os.environ.get("PONDERLM_TOKENIZER_WORKER"):  # see ponderlm/__init__.py
    from ponderlm.data.batches import TokenShards, TrainBatches, eval_windows
    from ponderlm.data.dataset import check_dataset, load_meta, remember_verified, verify
    from ponderlm.data.prepare import PrepareConfig, prepare
    from ponderlm.data.sources import DEFAULT_SOURCES, Document
    from ponderlm.data.synthetic import (
        LabelShards,
        SyntheticConfig,
        generate_documents,
        load_labels,
        synthesize,
        window_labels,
    )
    from ponderlm.data.tokenizer import Tokenizer
    from ponderlm.errors import DataError

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
