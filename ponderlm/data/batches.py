"""Reading prepared token shards: deterministic random windows for training, fixed windows for
validation.

The batch of optimizer step s is a pure function of (seed, s): every rank draws the same global
batch and reads only its own slice, so a resumed run sees exactly the data an uninterrupted one
would, and N processes see the same global batch as one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ponderlm.data.dataset import load_meta
from ponderlm.errors import DataError


def map_shards(data_dir: Path, shards: list[dict], dtype, what: str) -> tuple[list[np.ndarray], np.ndarray]:
    """Memory-map the shard files meta.json lists ({file, tokens}); returns (arrays, sizes).
    A missing or truncated file is a DataError counting the ``what`` (tokens, labels) expected."""
    dtype = np.dtype(dtype)
    arrays = []
    for sh in shards:
        p = data_dir / sh["file"]
        if not p.is_file() or p.stat().st_size != sh["tokens"] * dtype.itemsize:
            raise DataError(f"{p}: missing or truncated (expected {sh['tokens']} {what})")
        # numpy cannot map an empty file; an empty shard (a hand-made meta.json) simply holds nothing
        arrays.append(np.memmap(p, dtype=dtype, mode="r") if sh["tokens"] else np.zeros(0, dtype))
    return arrays, np.array([len(a) for a in arrays], dtype=np.int64)


class TokenShards:
    """The memmapped shards of one split: its token ids or, with ``labels``, the per-token class ids
    of a labelled dataset (``ponderlm data synthetic``), addressed alike; ``classes`` names them."""

    def __init__(self, data_dir: str | Path, split: str, labels: bool = False) -> None:
        self.data_dir = Path(data_dir)
        meta = load_meta(self.data_dir)  # validated: label shards line up with the token shards
        if labels and "labels" not in meta:
            raise DataError(f"{data_dir} has no token labels; make a labelled dataset with `ponderlm data synthetic`")
        if split not in meta["splits"]:
            hint = "; prepare it again with a larger --val-fraction (e.g. 0.1) or more text" if split == "val" else ""
            raise DataError(f"{data_dir} has no {split!r} split (has: {', '.join(meta['splits'])}){hint}")
        self.meta = meta
        if labels:
            self.classes: list[str] = list(meta["labels"]["classes"])
            entries, dtype, what = meta["labels"]["splits"][split]["shards"], np.uint8, "labels"
        else:
            entries, dtype, what = meta["splits"][split]["shards"], meta["dtype"], "tokens"
        self.arrays, self.sizes = map_shards(self.data_dir, entries, dtype, what)

    @property
    def n_tokens(self) -> int:
        return int(self.sizes.sum())

    def window(self, shard: int, start: int, length: int) -> np.ndarray:
        return np.asarray(self.arrays[shard][start : start + length], dtype=np.int64)


class TrainBatches:
    """Random (seq_len + 1)-token windows; the global batch of step s depends only on (seed, s)."""

    def __init__(self, shards: TokenShards, seq_len: int, seed: int) -> None:
        self.shards, self.seq_len, self.seed = shards, seq_len, seed
        usable = shards.sizes - (seq_len + 1)
        if (usable < 0).all():
            raise DataError(
                f"the training split of {shards.data_dir} ({shards.n_tokens:,} tokens) is too small for seq_len "
                f"{seq_len} (a shard needs at least {seq_len + 1}); lower train.seq_len or prepare more text"
            )
        self.usable = np.maximum(usable, -1) + 1  # window starts per shard
        self.p = self.usable / self.usable.sum()

    def starts(self, step: int, batch_size: int) -> list[tuple[int, int]]:
        rng = np.random.default_rng([self.seed, step])
        shard = rng.choice(len(self.usable), size=batch_size, p=self.p)
        start = (rng.random(batch_size) * self.usable[shard]).astype(np.int64)
        return list(zip(shard.tolist(), start.tolist(), strict=True))

    def batch(
        self, step: int, batch_size: int, lo: int = 0, hi: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows [lo, hi) of the global batch of ``step``: (x, y), each (hi - lo, seq_len)."""
        picks = self.starts(step, batch_size)[lo:hi]
        w = np.stack([self.shards.window(s, i, self.seq_len + 1) for s, i in picks])
        t = torch.from_numpy(w)
        return t[:, :-1], t[:, 1:]


def window_starts(sizes, seq_len: int, max_windows: int) -> list[tuple[int, int]]:
    """(shard, start) of the evaluation windows: consecutive non-overlapping (seq_len + 1)-token
    windows from the start of each shard, up to max_windows (the same tokens every time)."""
    out = []
    for k, size in enumerate(sizes):
        for start in range(0, int(size) - seq_len, seq_len + 1):
            if len(out) >= max_windows:
                return out
            out.append((k, start))
    return out


def eval_windows(shards: TokenShards, seq_len: int, max_windows: int) -> torch.Tensor:
    """The validation windows (:func:`window_starts`) of ``shards``. Returns (N, seq_len + 1)."""
    out = [shards.window(k, start, seq_len + 1) for k, start in window_starts(shards.sizes, seq_len, max_windows)]
    if not out:
        raise DataError(f"the validation split ({shards.n_tokens:,} tokens) is too small for seq_len {seq_len}")
    return torch.from_numpy(np.stack(out))
