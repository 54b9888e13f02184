"""KV caches that own their positions, per row (DESIGN rule 5).

A `KVCache` holds per-layer K/V buffers (B, Hkv, S, D) and the state of every row: how many slots it has
written (`lengths`), which of them hold real tokens rather than padding (`valid`) and the rotary position
its next real token takes (`next_position`). A forward pass first calls `begin(B, T, ...)`, which claims
the next T slots of each row and returns the attention mask and positions that follow from that state;
each layer then calls `update(layer_idx, k, v)`. Rows may stand at different lengths (a server batch whose
rows are at different points of their generation): writes are then per row.

`static=True` preallocates `capacity` slots and returns the whole buffers from `update` (fixed shapes,
unwritten slots masked out) and keeps its state in tensors only, so one compiled graph serves every step;
otherwise `update` returns the slots written so far, which is what eager attention wants.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from .layers import open_empty_rows
from .reference_api import CacheAPIMixin, legacy_from_foreign_cache

_GROWTH_QUANTUM = 256


@runtime_checkable
class Cache(Protocol):
    """What a model core needs from a cache: `begin` once per forward pass, `update` once per layer."""

    def begin(self, batch_size: int, T: int, device: torch.device,
              token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]: ...  # fmt: skip

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def get_seq_length(self, layer_idx: int = 0) -> int: ...


class KVCache(CacheAPIMixin):
    """Keys/values for every layer plus per-row write state.

    capacity: slots per row allocated up front (generation knows it); None grows geometrically, so a
    run of unknown length costs O(log n) reallocations rather than a `torch.cat` per token.
    """

    def __init__(self, capacity: int | None = None, static: bool = False):
        if static and capacity is None:
            raise ValueError("a static KVCache needs a capacity")
        self.capacity, self.static = capacity, static
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: torch.Tensor | None = None  # (B,) slots written per row
        self.next_position: torch.Tensor | None = None  # (B,) rotary position of each row's next real token
        self.valid: torch.Tensor | None = None  # (B, S) the slot holds a real token
        self.seen = 0  # host copy of max(lengths) (a static cache keeps none)
        self.uniform = not static  # every row has written the same number of slots: writes are slices
        self.all_valid = True  # no padding written yet: a one-token query then needs no mask
        self._slots: torch.Tensor | None = None  # (B, T) where it writes

    # ---- state ------------------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Slots written so far (the longest row's; a host sync for a static cache)."""
        if self.static:
            return 0 if self.lengths is None else int(self.lengths.max())
        return self.seen

    def __len__(self) -> int:
        return len(self.keys)

    def _allocated(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def _ensure_room(self, B: int, needed: int, device: torch.device) -> None:
        if self.lengths is None:
            self.lengths = torch.zeros(B, dtype=torch.long, device=device)
            self.next_position = torch.zeros(B, dtype=torch.long, device=device)
        elif self.lengths.shape[0] != B:
            raise ValueError(f"this cache holds {self.lengths.shape[0]} rows; the input has {B}")
        have = self._allocated()
        if needed <= have:
            return
        if self.capacity is not None:
            if needed > self.capacity:
                raise ValueError(f"KV cache holds {self.capacity} positions, {needed} requested")
            size = self.capacity
        else:
            size = -(-max(needed, 2 * have) // _GROWTH_QUANTUM) * _GROWTH_QUANTUM
        valid = torch.zeros(B, size, dtype=torch.bool, device=device)
        if self.valid is not None:
            valid[:, :have] = self.valid
        self.valid = valid
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            self.keys[i], self.values[i] = _grown(k, size), _grown(v, size)

    def reserve(self, T: int) -> None:
        """Room for T more slots in every row, allocated now (a compiled step then never grows the cache, which
        would take it down another path: a recompile)."""
        self._ensure_room(self.lengths.shape[0], self.seen + T, self.lengths.device)

    # ---- a forward pass ---------------------------------------------------------------------------
    def begin(self, batch_size: int, T: int, device: torch.device,
              token_mask: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:  # fmt: skip
        """Claim the next T slots of every row for a forward pass.

        token_mask: (B, T) true for real tokens, false for padding (None: all real). Returns the boolean
        attention mask (B, 1, T, K) over the keys `update` will return (None when every key is visible to
        a single query) and each new token's rotary position (B, T) (padding gets position 1, as the
        reference's generate gives it).
        """
        if not self.static:
            self._ensure_room(batch_size, self.seen + T, device)
        elif self.valid is None:
            self._ensure_room(batch_size, self.capacity, device)
        if token_mask is None and self.all_valid and self.uniform:  # the common case, in few small ops
            positions = torch.arange(self.seen, self.seen + T, device=device).expand(batch_size, T)
            self.valid[:, self.seen : self.seen + T] = True
            self.lengths, self.next_position = self.lengths + T, self.next_position + T
            self.seen += T
            self._slots = None  # made by _mask if a mask is needed
            return self.attention_mask(T), positions
        arange = torch.arange(T, device=device)
        self._slots = self.lengths[:, None] + arange  # (B, T)
        if token_mask is None:
            real, counted = None, arange + 1
            positions = self.next_position[:, None] + arange
        else:
            real = token_mask.to(device=device, dtype=torch.bool)
            counted = real.long().cumsum(-1)
            positions = (self.next_position[:, None] + counted - 1).masked_fill(~real, 1)
            self.all_valid = False
        if self.static:  # tensors only, updated in place (CUDA graphs keep their addresses)
            rows = torch.arange(batch_size, device=device)[:, None]
            self.valid.index_put_((rows, self._slots), real if real is not None else torch.ones_like(self._slots) > 0)
            self.lengths.add_(T)
            self.next_position.add_(counted[..., -1])
            return self.attention_mask(T), positions
        if self.uniform:
            self.valid[:, self.seen : self.seen + T] = True if real is None else real
        else:
            self.valid[torch.arange(batch_size, device=device)[:, None], self._slots] = True if real is None else real
        self.lengths = self.lengths + T
        self.next_position = self.next_position + counted[..., -1]
        self.seen += T
        return self.attention_mask(T), positions

    def set_valid(self, attention_mask: torch.Tensor) -> None:
        """The reference's semantics for a mask over all keys so far (B, >= seen): it may re-mark earlier
        slots, and the next real token's position counts the real ones (as generate's positions do). Rows must
        be aligned (every row the same length), as they are for the reference's caches."""
        if not self.uniform:
            raise ValueError("an attention_mask over all keys needs a cache whose rows have equal lengths")
        n = min(self.seen, attention_mask.shape[1])
        mask = attention_mask[:, :n].to(device=self.valid.device, dtype=torch.bool)
        self.valid[:, :n] = mask
        self.next_position = mask.sum(-1)
        if not bool(mask.all()):
            self.all_valid = False

    def attention_mask(self, T: int) -> torch.Tensor | None:
        """The mask (B, 1, T, K) of the current forward pass (after `begin` / `set_valid`)."""
        K = self.valid.shape[1] if self.static else self.seen
        if T == 1 and self.all_valid and self.uniform:
            return None  # one query per row over exactly the keys written: all visible
        if self._slots is None:
            self._slots = (self.seen - T + torch.arange(T, device=self.valid.device)).expand(self.valid.shape[0], T)
        keys = torch.arange(K, device=self.valid.device)
        return open_empty_rows(self.valid[:, None, None, :K] & (keys <= self._slots[:, None, :, None]))  # (B,1,T,K)

    def real_tokens(self, T: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Which query slots (B, T) of the current pass and which key slots (B, K) hold real tokens, or
        (None, None) when all do: flash-attention packs the real ones instead of reading a mask."""
        if self.all_valid and self.uniform:
            return None, None
        K = self.valid.shape[1] if self.static else self.seen
        slots = self._slots
        if slots is None:
            slots = (self.seen - T + torch.arange(T, device=self.valid.device)).expand(self.valid.shape[0], T)
        return self.valid.gather(1, slots), self.valid[:, :K]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, Hkv, T, D) of one layer where `begin` said; return that layer's keys/values."""
        if self.valid is None:
            raise RuntimeError("KVCache.update before begin(): a forward pass calls begin() first")
        if layer_idx == len(self.keys):
            B, Hkv, _, D = k.shape
            self.keys.append(k.new_zeros(B, Hkv, self._allocated(), D))
            self.values.append(v.new_zeros(B, Hkv, self._allocated(), D))
        elif layer_idx > len(self.keys):
            raise ValueError(f"layer {layer_idx} written before layer {len(self.keys)}")
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.uniform:
            T = k.shape[2]
            start = self.seen - T  # begin() has counted this forward's T slots already
            keys[:, :, start : self.seen] = k
            values[:, :, start : self.seen] = v
            return keys[:, :, : self.seen], values[:, :, : self.seen]
        rows = torch.arange(k.shape[0], device=k.device)[:, None]
        slots = self._slots.to(k.device)  # the row state lives on the first device; this layer may not
        keys[rows, :, slots] = k.transpose(1, 2)  # (B, T, Hkv, D) into (B, Hkv, S, D) at each row's slots
        values[rows, :, slots] = v.transpose(1, 2)
        if self.static:
            return keys, values
        return keys[:, :, : self.seen], values[:, :, : self.seen]

    def mark_static(self) -> None:
        """Tell torch.compile the buffers never move (CUDA graphs then update them in place)."""
        for t in (*self.keys, *self.values, self.valid, self.lengths, self.next_position):
            torch._dynamo.mark_static_address(t)

    # ---- whole-cache operations -------------------------------------------------------------------
    def rewind(self, n: int) -> None:
        """Forget the last n slots of every row (speculative tokens that were not kept). The rows must be
        aligned and the forgotten slots real tokens, as they are in speculative decoding."""
        if n <= 0:
            return
        if not self.uniform or n > self.seen:
            raise ValueError(f"cannot rewind {n} slots of a cache holding {self.seen} (aligned rows only)")
        self.seen -= n
        self.valid[:, self.seen : self.seen + n] = False
        self.lengths = self.lengths - n
        self.next_position = self.next_position - n

    def keep_last(self, index: torch.Tensor) -> None:
        """Row i's last written slot becomes row index[i]'s (contrastive search: the candidate rows of a prompt
        share every earlier slot, so keeping the chosen candidate copies one slot, not whole rows)."""
        if self.static or not self.uniform:
            raise ValueError("keep_last needs a plain cache with aligned rows")
        last = self.seen - 1
        for t in (*self.keys, *self.values):  # (B, Hkv, S, D), each layer on its own device
            t[:, :, last] = t[index.to(t.device), :, last]

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder batch rows (beam search, repeated returns)."""
        if self.lengths is None:
            return
        index = index.to(self.lengths.device)
        self.keys = [k.index_select(0, index.to(k.device)) for k in self.keys]  # each layer on its own device
        self.values = [v.index_select(0, index.to(v.device)) for v in self.values]
        self.lengths = self.lengths.index_select(0, index)
        self.next_position = self.next_position.index_select(0, index)
        self.valid = self.valid.index_select(0, index)

    def clone(self) -> KVCache:
        """An independent, non-static copy holding the written slots only (e.g. a prompt's KV kept for reuse)."""
        if self.lengths is None:
            raise ValueError("clone needs a written cache")
        seen = self.get_seq_length()
        out = type(self)()
        n = max(seen, 1)
        out.keys = [k[:, :, :n].clone() for k in self.keys]
        out.values = [v[:, :, :n].clone() for v in self.values]
        out.valid = self.valid[:, :n].clone()
        out.lengths, out.next_position = self.lengths.clone(), self.next_position.clone()
        out.seen, out.all_valid = seen, self.all_valid
        out.uniform = self.uniform or bool((self.lengths == seen).all())  # a static cache's rows may be aligned
        return out

    def split(self, keep: list[int]) -> list[KVCache]:
        """One cache per row, row i holding its first keep[i] slots (right-padded prompts prefilled together,
        each then on its own: the padding after a row's real tokens is dropped)."""
        if self.lengths is None or len(keep) != self.lengths.shape[0]:
            raise ValueError(f"split needs a written cache and one length per row ({len(keep)} given)")
        rows = []
        for i, n in enumerate(keep):
            row = type(self)()
            row.keys = [k[i : i + 1, :, :n].clone() for k in self.keys]
            row.values = [v[i : i + 1, :, :n].clone() for v in self.values]
            row.valid = self.valid[i : i + 1, :n].clone()
            row.lengths = self.lengths.new_full((1,), n)
            row.next_position = self.next_position[i : i + 1].clone()
            row.seen, row.all_valid = n, bool(row.valid.all())
            rows.append(row)
        return rows

    @classmethod
    def stack(cls, caches: list[KVCache]) -> KVCache:
        """One batch from caches of single rows or batches (what a server does when rows join): every row
        keeps its own length, positions and padding; later writes go to each row's own next slot."""
        if not caches or any(c.static or c.lengths is None for c in caches):
            raise ValueError("stack needs written, non-static caches")
        size = max(c._allocated() for c in caches)
        out = cls()
        out.keys = [torch.cat([_grown(c.keys[i], size) for c in caches]) for i in range(len(caches[0].keys))]
        out.values = [torch.cat([_grown(c.values[i], size) for c in caches]) for i in range(len(caches[0].values))]
        out.valid = torch.cat([torch.nn.functional.pad(c.valid, (0, size - c._allocated())) for c in caches])
        out.lengths = torch.cat([c.lengths for c in caches])
        out.next_position = torch.cat([c.next_position for c in caches])
        out.seen = max(c.seen for c in caches)
        out.uniform = all(c.uniform and c.seen == out.seen for c in caches)
        out.all_valid = out.uniform and all(c.all_valid for c in caches)
        return out

    def to_legacy(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The old tuple-of-(k, v) format, copies trimmed to the written length."""
        n = self.get_seq_length()
        return tuple((k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in zip(self.keys, self.values))

    @classmethod
    def from_legacy(cls, past: tuple | list) -> KVCache:
        cache = cls()
        if past:
            k0 = past[0][0]
            cache.begin(k0.shape[0], k0.shape[2], k0.device)
            for layer_idx, layer in enumerate(past):
                cache.update(layer_idx, layer[0], layer[1])
        return cache


def _grown(t: torch.Tensor, size: int) -> torch.Tensor:
    if t.shape[2] == size:
        return t
    new = t.new_zeros(t.shape[0], t.shape[1], size, t.shape[3])
    new[:, :, : t.shape[2]] = t
    return new


def as_cache(past_key_values: object, use_cache: bool, cache_class: type[KVCache] = KVCache) -> KVCache | None:
    """Accept our cache, the legacy tuple format, a transformers-style cache object, or None (a fresh cache
    when use_cache)."""
    if past_key_values is None:
        return cache_class() if use_cache else None
    if isinstance(past_key_values, KVCache):
        return past_key_values
    if isinstance(past_key_values, (tuple, list)):
        return cache_class.from_legacy(past_key_values)
    foreign = legacy_from_foreign_cache(past_key_values)
    if foreign is not None:  # e.g. transformers' DynamicCache: continued in a glmkit cache (the one returned)
        return cache_class.from_legacy(foreign)
    raise TypeError(
        f"past_key_values must be a glmkit KVCache, a tuple of (key, value) pairs or a transformers-style cache, "
        f"got {type(past_key_values).__name__}"
    )
