"""Weight-only quantized linears and embeddings on ATen's own CPU kernels.

Batch-1 decode reads every weight once per token, so fewer bytes per weight is the only way past the
memory-bandwidth roofline. The matmuls are torch's maintained kernels (`_weight_int8pack_mm`,
`_weight_int4pack_mm_for_cpu`), fastest with bf16 activations; nothing here is a hand-written kernel.

int8: symmetric per output channel, w ≈ q * scale (q in -128..127).
int4: asymmetric per group of `group_size` input features, w ≈ (q - 8) * scale + zero (q in 0..15), the
layout the int4 kernel takes. In memory the int4 weight is in the kernel's packed layout; in a state dict
(what is saved) it is the portable one: uint8 (N, K/2), even input feature in the low nibble.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

INT4_GROUP_SIZES = (32, 64, 128, 256)
_INT4_N_MULTIPLE = 16  # the CPU int4 packing works on blocks of 16 output features
_ROWS = 256  # output rows quantized at a time
_INNER_K_TILES = 8  # the CPU packing ignores it; the argument is kept for the CUDA op's signature


# ---- quantize / dequantize (plain tensor math; the modules below hold the results) --------------------


def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), scales (N,) in scale_dtype). q is rounded against the stored
    (rounded) scale, so dequantizing with what is kept is the closest it can be."""
    largest = torch.maximum(weight.amax(dim=1).float(), -weight.amin(dim=1).float())  # |w| max, no |w| copy
    scales = (largest / 127).clamp(min=1e-12).to(scale_dtype)
    q = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    for start in range(0, weight.shape[0], _ROWS):  # row blocks: the float scratch stays small
        rows = slice(start, start + _ROWS)
        q[rows] = (weight[rows].float() / scales[rows].float()[:, None]).round_().clamp_(-128, 127)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return q.float() * scales.float()[:, None]


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int4 values as uint8 (N, K) in 0..15, scales_and_zeros (K/group, N, 2)).
    Asymmetric per group (min/max), zero = min + 8 * scale as the kernel expects."""
    N, K = weight.shape
    w = weight.reshape(N, K // group_size, group_size)  # (N, G, g)
    low, high = w.amin(dim=2).float(), w.amax(dim=2).float()  # (N, G)
    scales = ((high - low) / 15).clamp(min=1e-6).to(scale_dtype)
    zeros = (low + 8 * scales.float()).to(scale_dtype)
    q = torch.empty(N, K // group_size, group_size, dtype=torch.uint8, device=weight.device)
    for start in range(0, N, _ROWS):  # row blocks: the float scratch stays small
        rows = slice(start, start + _ROWS)
        block = w[rows].float() - zeros[rows].float()[..., None]
        q[rows] = block.div_(scales[rows].float()[..., None]).add_(8).round_().clamp_(0, 15)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
    return q.reshape(N, K), scales_and_zeros


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """uint8 values (N, K) in 0..15 and (K/group, N, 2) -> float (N, K)."""
    scales = scales_and_zeros[..., 0].float().t().repeat_interleave(group_size, dim=1)  # (N, K)
    zeros = scales_and_zeros[..., 1].float().t().repeat_interleave(group_size, dim=1)
    return (q.float() - 8) * scales + zeros


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K) in 0..15 -> uint8 (N, K/2), even feature in the low nibble (the saved layout)."""
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K/2) -> uint8 (N, K) in 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(1)


def to_kernel_layout(q: torch.Tensor) -> torch.Tensor:
    """uint8 values (N, K) -> the CPU int4 kernel's packed uint8 (N, K/2). The packing is row-block local,
    so it runs on blocks of rows: the int32 copy the op wants stays small."""
    out = torch.empty(q.shape[0], q.shape[1] // 2, dtype=torch.uint8)
    for start in range(0, q.shape[0], _ROWS):
        block = q[start : start + _ROWS].to(torch.int32)
        out[start : start + _ROWS] = torch.ops.aten._convert_weight_to_int4pack_for_cpu(block, _INNER_K_TILES)
    return out


def nibbles_to_kernel_layout(packed: torch.Tensor) -> torch.Tensor:
    """The saved layout (N, K/2) -> the kernel's, a block of rows at a time (small scratch)."""
    out = torch.empty_like(packed)
    for start in range(0, packed.shape[0], _ROWS):
        rows = slice(start, start + _ROWS)
        out[rows] = to_kernel_layout(unpack_nibbles(packed[rows]))
    return out


def from_kernel_layout(packed: torch.Tensor, in_features: int, group_size: int, chunk: int = 1024) -> torch.Tensor:
    """The kernel's packed weight -> uint8 values (N, K), read back through the kernel itself (an identity
    matrix times the weight, with scale 1 and zero 8): exact, and independent of how the layout is blocked."""
    N = packed.shape[0]
    ones = torch.ones(in_features // group_size, N, 2)
    ones[..., 1] = 8.0
    rows = []
    for start in range(0, in_features, chunk):  # (chunk, K) slices of the identity bound the scratch memory
        eye = torch.eye(in_features)[start : start + chunk]
        rows.append(torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, group_size, ones))  # (chunk, N)
    return torch.cat(rows).t().round().to(torch.uint8).contiguous()


# ---- modules ------------------------------------------------------------------------------------------
_KERNEL_ALIGNMENT = 64  # bytes: what torch's CPU allocator gives every fresh tensor


def _align_kernel_buffers(module: nn.Module, _incompatible: object = None) -> None:
    """Copy a packed weight that does not start on a 64-byte boundary (safetensors hands out integer tensors
    as views at any offset). `_weight_int8pack_mm` with bf16 activations and more than one row crashes the
    process (SIGSEGV, torch 2.13 on AMX CPUs) on a weight that is only 8-byte aligned."""
    weight = module.weight
    if weight.device.type == "cpu" and weight.data_ptr() % _KERNEL_ALIGNMENT:
        module.weight = weight.clone()


class Int8Linear(nn.Module):
    """`nn.Linear` with an int8 per-channel weight: y = (x @ q.T) * scales + bias on `_weight_int8pack_mm`.
    Buffers `weight` (N, K) int8 and `scales` (N,) in the model's dtype (so `.to(dtype)` moves them)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None
        self.register_load_state_dict_post_hook(_align_kernel_buffers)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        w = linear.weight.detach()
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, w.dtype, "meta")
        module.weight, module.scales = quantize_int8(w, w.dtype)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scales = self.scales if self.scales.dtype == x.dtype else self.scales.to(x.dtype)
        if x.device.type == "cpu":
            y = torch._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight, scales)
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:  # no int8 kernel assumed here: dequantize (correct, not faster)
            y = F.linear(x, self.weight.to(x.dtype) * scales[:, None])
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """`nn.Linear` with a group-wise int4 weight on `_weight_int4pack_mm_for_cpu` (CPU only: the packed
    layout is the CPU kernel's). Buffers `weight` (N, K/2) uint8 and `scales_and_zeros` (K/group, N, 2)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group_size: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):  # fmt: skip
        super().__init__()
        check_int4_shape(in_features, out_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        groups = in_features // group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales_and_zeros", torch.empty(groups, out_features, 2, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False) if bias else None
        self.register_load_state_dict_post_hook(_align_kernel_buffers)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        w = linear.weight.detach()
        check_cpu(w.device, "int4")
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, group_size, w.dtype, "meta")
        q, module.scales_and_zeros = quantize_int4(w, group_size, w.dtype)
        module.weight = to_kernel_layout(q)
        if linear.bias is not None:
            module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def int4_values(self) -> torch.Tensor:
        """uint8 (N, K) in 0..15, unpacked from the kernel's layout."""
        return from_kernel_layout(self.weight, self.in_features, self.group_size)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int4(self.int4_values(), self.scales_and_zeros, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sz = self.scales_and_zeros
        sz = sz if sz.dtype == x.dtype else sz.to(x.dtype)
        x2 = x.reshape(-1, self.in_features)  # (B*T, K): the kernel takes 2-D input
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size, sz)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    # the state dict carries the portable nibble layout; memory holds the kernel's
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.weight.device.type != "meta":
            destination[prefix + "weight"] = pack_nibbles(self.int4_values())

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        key = prefix + "weight"
        if key in state_dict and state_dict[key].device.type == "cpu":
            state_dict[key] = nibbles_to_kernel_layout(state_dict[key])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")  # fmt: skip


class Int8Embedding(nn.Module):
    """`nn.Embedding` with an int8 table quantized per row: a looked-up row times its scale."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):  # fmt: skip
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.register_buffer("weight", torch.empty(num_embeddings, embedding_dim, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.empty(num_embeddings, dtype=dtype, device=device))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        w = embedding.weight.detach()
        module = cls(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx, w.dtype, "meta")
        module.weight, module.scales = quantize_int8(w, w.dtype)
        return module

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8(self.weight, self.scales)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.weight)  # (..., C) int8
        return rows.to(self.scales.dtype) * self.scales[ids][..., None]


def check_int4_shape(in_features: int, out_features: int, group_size: int, name: str = "linear") -> None:
    """Raise ValueError naming the module when the int4 kernel cannot take this shape."""
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {INT4_GROUP_SIZES}, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"int4 group_size {group_size} does not divide the {in_features} input features of {name}")
    if out_features % _INT4_N_MULTIPLE:
        raise ValueError(f"int4 needs output features divisible by {_INT4_N_MULTIPLE}; {name} has {out_features}")


def check_cpu(device: torch.device, method: str) -> None:
    if device.type not in ("cpu", "meta"):
        raise ValueError(f"{method} weight-only quantization runs on CPU kernels; the weights are on {device}")
