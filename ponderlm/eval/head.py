"""The output head applied only where a scorer needs it, a bounded number of rows at a time.

A forward with ``with_logits=False`` returns the hidden states the head maps to logits
(``out.hidden``, (B, T, D)); a scorer picks the positions it scores and passes their hidden
states here. Over a 49,152-token vocabulary, (B, T, V) float32 logits of a batch of 16 windows of
512 tokens are 1.6 GB, and a log-softmax doubles that; the rows scored are often a small part of
them (a zero-shot continuation) and, where they are not, this holds at most ``max_elements``
logits at once.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

MAX_ELEMENTS = 1 << 24  # logits held at once: 64 MB in float32


def head_chunks(model, hidden: Tensor, max_elements: int | None = None) -> Iterator[tuple[int, int, Tensor]]:
    """Yields (start, end, logits) over the rows of ``hidden`` (N, D): ``model.lm_head`` of rows
    start:end, in at least float32, with (end - start) * vocab <= max_elements (default
    :data:`MAX_ELEMENTS`; at least one row)."""
    V = model.lm_head.out_features
    step = max(1, (MAX_ELEMENTS if max_elements is None else max_elements) // V)
    for s in range(0, hidden.shape[0], step):
        logits = model.lm_head(hidden[s : s + step])
        yield s, s + logits.shape[0], logits.to(torch.promote_types(logits.dtype, torch.float32))
