"""KV cache: preallocated per-layer buffers written at positions.

With `max_length` known up front (generation knows it) the buffers are allocated once and never move.
Without it they grow geometrically, so a long unknown-length run still costs O(log n) reallocations
rather than a `torch.cat` per token.
"""

from __future__ import annotations

import torch

_GROWTH_QUANTUM = 256


class KVCache:
    """Keys/values for every layer, shape (B, Hkv, capacity, D), filled left to right."""

    def __init__(self, max_length: int | None = None):
        self.max_length = max_length
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Number of positions already written (for layer 0 unless given)."""
        return self.lengths[layer_idx] if layer_idx < len(self.lengths) else 0

    def __len__(self) -> int:
        return len(self.keys)

    def _allocate(self, layer_idx: int, like: torch.Tensor, needed: int) -> None:
        B, Hkv, _, D = like.shape
        if self.max_length is not None:
            if needed > self.max_length:
                raise ValueError(f"KV cache holds {self.max_length} positions, {needed} requested")
            capacity = self.max_length
        else:
            old = self.keys[layer_idx].shape[2] if layer_idx < len(self.keys) else 0
            capacity = max(needed, 2 * old)
            capacity = -(-capacity // _GROWTH_QUANTUM) * _GROWTH_QUANTUM
        k = like.new_zeros(B, Hkv, capacity, D)
        v = like.new_zeros(B, Hkv, capacity, D)
        if layer_idx < len(self.keys):
            n = self.lengths[layer_idx]
            k[:, :, :n] = self.keys[layer_idx][:, :, :n]
            v[:, :, :n] = self.values[layer_idx][:, :, :n]
            self.keys[layer_idx], self.values[layer_idx] = k, v
        else:
            self.keys.append(k)
            self.values.append(v)
            self.lengths.append(0)

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append k, v (B, Hkv, T, D) for one layer; return that layer's keys/values so far (views)."""
        if layer_idx > len(self.keys):
            raise ValueError(f"layer {layer_idx} written before layer {len(self.keys)}")
        start = self.get_seq_length(layer_idx)
        end = start + k.shape[2]
        if layer_idx == len(self.keys) or end > self.keys[layer_idx].shape[2]:
            self._allocate(layer_idx, k, end)
        self.keys[layer_idx][:, :, start:end] = k
        self.values[layer_idx][:, :, start:end] = v
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def crop(self, length: int) -> None:
        """Forget every position from `length` on (e.g. to reuse a shared prompt prefix)."""
        self.lengths = [min(n, length) for n in self.lengths]

    def reorder(self, index: torch.Tensor) -> None:
        """Select/reorder batch rows (beam search, repeated returns)."""
        self.keys = [k.index_select(0, index.to(k.device)) for k in self.keys]
        self.values = [v.index_select(0, index.to(v.device)) for v in self.values]

    def to_legacy(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """The old tuple-of-(k, v) format, copies trimmed to the written length."""
        return tuple(
            (k[:, :, :n].clone(), v[:, :, :n].clone())
            for k, v, n in zip(self.keys, self.values, self.lengths)
        )

    @classmethod
    def from_legacy(cls, past: tuple | list) -> KVCache:
        cache = cls()
        for layer_idx, (k, v) in enumerate(past):
            cache.update(layer_idx, k, v)
        return cache


class StaticKVCache(KVCache):
    """Fixed-capacity buffers for the fast decode path (DESIGN rule 5): static shapes, no host sync.

    The caller binds the positions a forward pass writes (`bind(cache_position)`, a (T,) tensor); `update`
    then copies k/v there in place and returns the *whole* buffers, so every decode step sees the same
    shapes. Slots not yet written are hidden by the causal mask (key index > query position). While bound,
    `get_seq_length()` reports capacity - T so that a decoder's key length comes out as the capacity.
    `bind(..., length=n)` returns only the first n slots instead (a prefill chunk ending at n).
    """

    def __init__(self, capacity: int):
        super().__init__(max_length=capacity)
        self.position: torch.Tensor | None = None
        self.length = capacity

    def bind(self, cache_position: torch.Tensor | None, length: int | None = None) -> None:
        """Positions (T,) the next forward pass writes; None returns to the plain growing behaviour."""
        self.position = cache_position
        self.length = self.max_length if length is None else length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self.position is None:
            return super().get_seq_length(layer_idx)
        return self.length - self.position.shape[0]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position is None:
            return super().update(layer_idx, k, v)
        if layer_idx == len(self.keys):
            self._allocate(layer_idx, k, self.max_length)
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.index_copy_(2, self.position, k)  # (B, Hkv, S, D) written at positions
        values.index_copy_(2, self.position, v)
        if self.length == self.max_length:
            return keys, values
        return keys[:, :, : self.length], values[:, :, : self.length]

    def mark_static(self) -> None:
        """Tell torch.compile the buffers never move (CUDA graphs then update them in place)."""
        for t in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(t)


def as_cache(past_key_values: object, use_cache: bool) -> KVCache | None:
    """Accept our cache, the legacy tuple format, or None (a fresh cache when use_cache)."""
    if past_key_values is None:
        return KVCache() if use_cache else None
    if isinstance(past_key_values, KVCache):
        return past_key_values
    if isinstance(past_key_values, (tuple, list)):
        return KVCache.from_legacy(past_key_values)
    raise TypeError(
        f"past_key_values must be a glmkit KVCache or a tuple of (key, value) pairs, got "
        f"{type(past_key_values).__name__}"
    )
