"""Quantizing while loading: the meta model gets quantized modules, and the checkpoint is read through a
reader that hands over each linear's weight already quantized (read, quantized, the float copy dropped),
so the full-precision model never exists. Checkpoints saved quantized pass through unchanged."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .linear import Int4Linear, Int8Embedding, Int8Linear, check_cpu, pack_nibbles, quantize_int4, quantize_int8
from .quantize import QUANTIZED_MODULES, QuantSpec, quantize_

_BLOCK_ROWS = 256  # output rows read and quantized at a time


def prepare_loading(model: nn.Module, reader: Any, spec: QuantSpec, device: torch.device) -> QuantizingReader:
    """Swap quantized modules into the meta-device `model` and return the reader to load it from."""
    if spec.method == "int4":
        check_cpu(device, "int4")
    quantize_(model, spec)
    return QuantizingReader(reader, model)


class QuantizingReader:
    """The WeightReader interface over `inner`, presenting each quantized module's tensors (weight and
    scales) as the model expects them. A float weight is quantized when it is read; its scales are kept
    until the loader asks for them (right after, in state-dict order). int4 weights come in the saved
    (nibble) layout, which Int4Linear's state-dict hook turns into the kernel's."""

    def __init__(self, inner: Any, model: nn.Module):
        self.inner, self.directory, self.files = inner, inner.directory, inner.files
        mapping, _ = model._checkpoint_name_map(inner.keys())  # ours -> theirs
        self._modules: dict[str, nn.Module] = {}  # checkpoint weight name -> quantized module
        self._derived: dict[str, tuple[str, str]] = {}  # checkpoint name of a scale -> (weight name, buffer)
        self._on_read: set[str] = set()  # float weights quantized as they are read
        for name, module in model.named_modules():
            theirs = mapping.get(f"{name}.weight")
            if not isinstance(module, QUANTIZED_MODULES) or theirs is None:
                continue
            self._modules[theirs] = module
            dtype = inner.dtype(theirs)
            if dtype is not None and dtype.is_floating_point:  # full precision: the scales are ours to make
                buffer = "scales_and_zeros" if isinstance(module, Int4Linear) else "scales"
                self._derived[theirs.removesuffix("weight") + buffer] = (theirs, buffer)
                self._on_read.add(theirs)
        self._pending: dict[str, torch.Tensor] = {}

    def keys(self) -> list[str]:
        return [*self.inner.keys(), *self._derived]

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self._derived:
            weight, buffer = self._derived[name]
            return tuple(getattr(self._modules[weight], buffer).shape)
        if name in self._on_read:
            return tuple(self._modules[name].weight.shape)
        return self.inner.shape(name)

    def dtype(self, name: str) -> torch.dtype | None:
        if name in self._on_read:
            return self._modules[name].weight.dtype
        return None if name in self._derived else self.inner.dtype(name)

    def floating_dtype(self) -> torch.dtype | None:
        return self.inner.floating_dtype()

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name in self._derived:
            weight, buffer = self._derived[name]
            if name not in self._pending:  # asked before its weight: quantize now
                self.get(weight, dtype)
            return self._pending.pop(name)
        if name in self._on_read:
            return self._quantize(name, dtype)
        return self.inner.get(name, dtype=dtype)

    def _quantize(self, name: str, dtype: torch.dtype | None) -> torch.Tensor:
        """Quantize the float weight `name` a block of rows at a time (both methods quantize each output row
        on its own): only one block is ever held in float, and every block is the same size, so the
        allocator reuses one hole instead of fragmenting the heap with whole-weight temporaries."""
        module = self._modules[name]
        is_int4 = isinstance(module, Int4Linear)
        rows = self.inner.shape(name)[0]
        step = _BLOCK_ROWS if hasattr(self.inner, "get_slice") else rows  # readers without slices: whole
        q = scales = None
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            if step == rows:  # as a plain load would give it
                block = self.inner.get(name, dtype=dtype)
            else:
                block = self.inner.get_slice(name, 0, start, stop, dtype=dtype)
            if is_int4:
                q_block, s_block = quantize_int4(block, module.group_size, block.dtype)
                q_block = pack_nibbles(q_block)
            else:
                assert isinstance(module, (Int8Linear, Int8Embedding))
                q_block, s_block = quantize_int8(block, block.dtype)
            row_dim = 1 if is_int4 else 0  # scales: (groups, N, 2) or (N,)
            if q is None:
                q = q_block.new_empty(rows, q_block.shape[1])
                scales = s_block.new_empty(s_block.shape[:row_dim] + (rows,) + s_block.shape[row_dim + 1 :])
            q[start:stop] = q_block
            scales.narrow(row_dim, start, stop - start).copy_(s_block)
            del block, q_block, s_block  # before the next block is read
        self._pending[name.removesuffix("weight") + ("scales_and_zeros" if is_int4 else "scales")] = scales
        return q
