"""KV cache with a different number of slots per batch row.

Row b holds ``lengths[b]`` committed slots (token slots and the latent slots that were actually
computed), stored contiguously from index 0. A forward step writes L new slots per row, of which
only the first ``n_new[b]`` are real; the rest land beyond the row's length, are never visible
to a real query, and are overwritten by the next step. Pruned or padded slots therefore never
become cache entries, and ``lengths`` counts exactly the computed slots.

Every slot also carries its additive key bias (``log w`` of PonderLM-3; 0 for token slots), shared
by all layers, so decoding applies the same per-key bias as training.

Usage per forward step::

    cache.begin(n_new, L, key_bias)   # before the layers
    ... each layer calls cache.update(layer_idx, k, v) ...
    cache.end()                       # commit: lengths += n_new
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    def __init__(
        self,
        n_layers: int,
        batch: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        capacity: int = 64,
    ) -> None:
        self.n_layers, self.batch = n_layers, batch
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self.device, self.dtype = torch.device(device), dtype
        self._step: tuple[Tensor, Tensor, int, Tensor | None] | None = None
        self._empty_storage(batch, capacity)

    def _empty_storage(self, batch: int, capacity: int) -> None:
        """Fresh zero storage for ``batch`` rows of ``capacity`` slots, all of them empty. Rows live
        in storage with room for up to ``row_capacity``; k, v, bias are views of the first ``batch``."""
        shape = (batch, self.n_kv_heads, capacity, self.head_dim)
        self._k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.n_layers)]
        self._v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in range(self.n_layers)]
        self._bias = torch.zeros(batch, capacity, device=self.device, dtype=self.dtype)  # (rows, cap)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=self.device)  # (B,)
        self.next_pos: Tensor | None = None  # (B,) position of each row's next token (transformers wrapper)
        self._set_batch(batch)

    @property
    def capacity(self) -> int:
        return self._bias.shape[1]

    @property
    def row_capacity(self) -> int:
        return self._bias.shape[0]

    def num_entries(self) -> Tensor:
        """Committed slots per row, (B,)."""
        return self.lengths.clone()

    def _make_room(self, rows: int, slots: int) -> None:
        """Storage for at least ``rows`` rows of ``slots`` slots; an axis that grows at least doubles."""
        grow_rows, grow_slots = rows > self.row_capacity, slots > self.capacity
        if grow_rows or grow_slots:
            self._resize(max(slots, 2 * self.capacity) if grow_slots else self.capacity,
                         max(rows, 2 * self.row_capacity) if grow_rows else None)  # fmt: skip

    def _resize(self, new: int, rows: int | None = None) -> None:
        """Pad the slot axis with zeros up to ``new`` entries and the row axis up to ``rows`` (never
        below the current capacities)."""
        cap, n = self.capacity, self.row_capacity
        new, rows = max(new, cap), max(rows or 0, n)
        if (new, rows) == (cap, n):
            return

        def grow(t: Tensor, slot_dim: int) -> Tensor:
            shape = list(t.shape)
            shape[0], shape[slot_dim] = rows, new
            out = t.new_zeros(shape)
            out[:n].narrow(slot_dim, 0, cap).copy_(t)
            return out

        self._k = [grow(t, 2) for t in self._k]
        self._v = [grow(t, 2) for t in self._v]
        self._bias = grow(self._bias, 1)
        self._set_batch(self.batch)

    # ---------------------------------------------------- rows joining and leaving (continuous batching)
    # Rows live in storage with room for more (grown by doubling); a row that joins is copied in after
    # the others, one that leaves has its place taken by a later row. Both cost the rows that move,
    # not the batch; the storage stays for the rows that join next, and goes when the batch empties.
    def keep_rows(self, idx: Tensor) -> None:
        """Keep only rows ``idx`` (n,), in that order; the others' entries are released (their
        storage is reused by rows that join later; all of it is freed when none is kept).

        Only rows whose place changes are copied, so an order that keeps most rows where they are
        (a leaving row's place taken by a row from the end) moves few."""
        self._check_idle("keep_rows")
        n = int(idx.numel())
        if n == 0:
            self._empty_storage(0, 0)
            return
        dst = torch.arange(n, device=self.device)
        moved = idx != dst
        if bool(moved.any()):
            src, to = idx[moved], dst[moved]
            used = int(self.lengths[src].max())
            for t in (*self._k, *self._v):
                t[to, :, :used] = t[src, :, :used]  # the right side is gathered first: overlaps are safe
            self._bias[to, :used] = self._bias[src, :used]
        self.lengths = self.lengths[idx].clone()
        self.next_pos = self.next_pos[idx].clone() if self.next_pos is not None else None
        self._set_batch(n)

    def append_rows(self, other: KVCache) -> None:
        """Add the rows of ``other`` (e.g. a just-prefilled prompt) after this cache's rows."""
        self._check_idle("append_rows")
        other._check_idle("append_rows")
        if (other.n_layers, other.n_kv_heads, other.head_dim, other.dtype) != (
            self.n_layers, self.n_kv_heads, self.head_dim, self.dtype,
        ):  # fmt: skip
            raise ValueError("append_rows: the caches differ in layers, heads, head size or dtype")
        B, m = self.batch, other.batch
        used = int(other.lengths.max()) if m else 0
        self._make_room(B + m, used)
        for t, o in zip((*self._k, *self._v), (*other.k, *other.v), strict=True):
            t[B : B + m, :, :used] = o[:, :, :used]
        self._bias[B : B + m, :used] = other.bias[:, :used]
        both = self.next_pos is not None and other.next_pos is not None  # positions kept only if every row has one
        self.next_pos = torch.cat([self.next_pos, other.next_pos]) if both else None
        self.lengths = torch.cat([self.lengths, other.lengths])
        self._set_batch(B + m)

    def append_empty(self, m: int) -> None:
        """Add ``m`` rows holding nothing yet (prompts that will walk through the recurrence);
        their next position is 0."""
        self._check_idle("append_empty")
        B = self.batch
        self._make_room(B + m, 0)
        zeros = torch.zeros(m, dtype=torch.long, device=self.device)
        self.next_pos = torch.cat([self.next_pos, zeros]) if self.next_pos is not None else None
        self.lengths = torch.cat([self.lengths, zeros])
        self._set_batch(B + m)

    def _set_batch(self, batch: int) -> None:
        self.batch = batch
        self.k = [t[:batch] for t in self._k]  # (B, Hkv, cap, hd) views
        self.v = [t[:batch] for t in self._v]
        self.bias = self._bias[:batch]  # (B, cap)
        self._rows = torch.arange(batch, device=self.device).unsqueeze(1)  # (B, 1)

    def _check_idle(self, what: str) -> None:
        if self._step is not None:
            raise RuntimeError(f"KVCache.{what} called between begin() and end()")

    def begin(self, n_new: Tensor, L: int, key_bias: Tensor | None) -> None:
        """Prepare a step that adds up to L slots per row; n_new (B,) of them are real.

        key_bias: (B, L) additive bias of the new keys, or None for zeros.
        """
        if self._step is not None:
            raise RuntimeError("KVCache.begin called twice without end()")
        start = self.lengths
        used = int(start.max()) + L
        self._make_room(self.batch, used)
        write = start.unsqueeze(1) + torch.arange(L, device=self.device)  # (B, L)
        kb = key_bias.to(self.dtype) if key_bias is not None else self.bias.new_zeros(self.batch, L)
        self.bias[self._rows, write] = kb
        mask = None
        if bool((start > 0).any()):
            # query i of row b sees keys j <= start_b + i (its committed prefix, earlier new slots
            # and itself), each with its own bias; later entries are masked out.
            j = torch.arange(used, device=self.device)
            i = torch.arange(L, device=self.device)
            allowed = j.view(1, 1, used) <= (start.view(-1, 1, 1) + i.view(1, L, 1))  # (B, L, used)
            bias = self.bias[:, :used].unsqueeze(1).expand(-1, L, -1)
            mask = bias.masked_fill(~allowed, float("-inf")).unsqueeze(1)  # (B, 1, L, used)
        self._step = (write, n_new.to(self.lengths.dtype), used, mask)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor] | None:
        """Store the new keys/values of a layer; k, v (B, Hkv, L, hd).

        Returns None when the cache held nothing before this step (the caller runs plain causal
        attention over the new slots), else (keys, values, mask) covering the used prefix.
        """
        if self._step is None:
            raise RuntimeError("KVCache.update called outside begin()/end()")
        write, _, used, mask = self._step
        self.k[layer][self._rows, :, write] = k.transpose(1, 2).to(self.dtype)
        self.v[layer][self._rows, :, write] = v.transpose(1, 2).to(self.dtype)
        if mask is None:
            return None
        return self.k[layer][:, :, :used], self.v[layer][:, :, :used], mask

    def end(self) -> None:
        if self._step is None:
            raise RuntimeError("KVCache.end called without begin()")
        self.lengths = self.lengths + self._step[1]
        self._step = None


class RoundCaches:
    """One :class:`KVCache` per round of a round method (loop, ponderlm1).

    Round r of token t attends to round r of tokens <= t only, so each round keeps its own keys
    and values; a token adds one entry per round.
    """

    def __init__(self, caches: list[KVCache]) -> None:
        self.rounds = caches
        self.next_pos: Tensor | None = None  # (B,) position of each row's next token (transformers wrapper)

    def __getitem__(self, r: int) -> KVCache:
        return self.rounds[r]

    def __len__(self) -> int:
        return len(self.rounds)

    @property
    def k(self) -> list[Tensor]:
        return [t for c in self.rounds for t in c.k]

    def num_entries(self) -> Tensor:
        """Committed entries per row over all rounds, (B,)."""
        return sum(c.num_entries() for c in self.rounds)
