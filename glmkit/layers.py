"""Shared primitives: linears, norms, activations, rotary embeddings, attention core and masks.

Blocks (residual order, which norm goes where) stay in each family's file; only the pieces that are
truly the same math live here, each with explicit arguments.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .attn_backends import (
    ATTN_IMPLEMENTATIONS,
    FLASH,
    FlashMask,
    check_attn_implementation,
    flash_attention,
    flex_attention,
)

# Weights at least this large (4 MB of fp32) go to oneDNN. Smaller ones sit in the CPU caches between tokens, where
# MKL's GEMV is as fast or faster and oneDNN costs ~15 us more per call (measured eagerly at 1-2 MB: MKL 31-58 us,
# oneDNN 46-62 us; at 4 MB oneDNN 67-71 us, MKL 90-112 us); in a compiled graph the custom op's dispatch adds ~17 us.
ONEDNN_MIN_WEIGHT = 1 << 20
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


_GEMV_AS_REDUCTION = False  # read while a graph is traced: see `gemv_as_reduction`
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


@contextlib.contextmanager
def gemv_as_reduction(enabled: bool = True) -> Iterator[None]:
    """Within it, graphs traced for inductor compute one-row CPU linears as a multiply-reduce (see `linear`).
    The decode engine holds it around its compiled step when that step's backend is inductor: under any other
    backend the same code would materialise `weight * x`, a temporary the size of the weight."""
    global _GEMV_AS_REDUCTION
    before, _GEMV_AS_REDUCTION = _GEMV_AS_REDUCTION, enabled
    try:
        yield
    finally:
        _GEMV_AS_REDUCTION = before


@torch.library.custom_op("glmkit::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ weight.T + bias on oneDNN's matmul, as an op torch.compile leaves opaque (inductor's own lowering of
    `mkldnn._linear_pointwise` asserts on a weight it has not packed itself). No autograd."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`, on faster CPU kernels for inference (the result differs from `F.linear` by summation order):

    - in a graph compiled by inductor within `gemv_as_reduction` (the decode engine's compiled step), one input row
      (batch-1 decode): `(weight * x).sum(-1)`, which inductor turns into one vectorised pass over the weight. It
      reads at ~96 % of a plain sum's bandwidth where every library GEMV PyTorch calls reads at 40-80 %
      (benchmarks/gemv.py; in bf16 ~1.8x `F.linear`'s speed), and it fuses with the bias and neighbouring ops.
      Products and sum are fp32 and rounded once, as a bf16 / fp16 GEMM's are. From two rows on, oneDNN's GEMM is
      faster, and the weight would be read once per row;
    - weights of 4 MB or more: oneDNN's matmul (the kernel inductor's CPU freezing calls) on the plain weight, no
      copy, no packing. At batch-1 decode it streams the weight at ~1.4-2x the speed of the default MKL GEMV, and
      it is ~1.5x faster at M = 8-128 too. Under freezing, inductor packs F.linear's weight for oneDNN itself.

    Anything else (autograd, autocast, other devices, mixed dtypes, smaller weights or bf16 / fp16 weights outside a
    compiled one-row step, `torch.backends.mkldnn` off) is `F.linear`."""
    if not (x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in _FLOATS and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
            and not torch.is_autocast_enabled("cpu")):  # fmt: skip
        return F.linear(x, weight, bias)
    if torch.compiler.is_compiling():
        if torch._inductor.config.freezing:
            return F.linear(x, weight, bias)
        if _GEMV_AS_REDUCTION and x.numel() == x.shape[-1]:  # fp32 products and sum, rounded once, as a GEMM does
            y = (weight.float() * own_buffer(x).float().unsqueeze(-2)).sum(-1)
            return (y if bias is None else y + bias.float()).to(x.dtype)
    if x.dtype == torch.float32 and weight.numel() >= ONEDNN_MIN_WEIGHT and _ONEDNN and torch.backends.mkldnn.enabled:
        if torch.compiler.is_compiling():
            return onednn_linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # the op alone: ~17 us less
    return F.linear(x, weight, bias)


def own_buffer(x: torch.Tensor) -> torch.Tensor:
    """x, made a buffer of its own in a compiled graph (a no-op where it is one already). Inductor inlines pointwise
    producers into their consumers: a GEMV's input vector that comes out of a norm or an activation would be
    recomputed inside the reduction loop, once per output row (XGLM's GELU: 4 M `erf` per layer and token)."""
    from torch._inductor import inductor_prims  # registers the prim; loaded already whenever inductor compiles

    return inductor_prims.force_stride_order(x, x.stride())


class Linear(nn.Linear):
    """`nn.Linear` computed by `linear` (CPU inference: oneDNN for fp32 weights of 4 MB or more, a multiply-reduce for
    one row in the decode engine's compiled step)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 and cast back before the weight, as the reference does (it matters in bf16)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one fused op: the same math
            return F.rms_norm(x, self.weight.shape, self.weight, self.variance_epsilon)
        normed = F.rms_norm(x.float(), self.weight.shape, None, self.variance_epsilon)
        return self.weight * normed.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_new(x: torch.Tensor) -> torch.Tensor:
    # written out the way the reference does, which is not bit-identical to F.gelu(approximate="tanh")
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": _gelu_new,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": F.relu,
    "relu2": _relu2,
    "relu6": F.relu6,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "leaky_relu": F.leaky_relu,
    "mish": F.mish,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Activation by the name config.json uses; unknown names are an error, not a silent default."""
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}"
        ) from None


# ---- rotary position embedding --------------------------------------------------------------------


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE over the first `dim` channels of each head.

    `scaling` is None or the config's rope_scaling dict ("linear" divides frequencies by the factor,
    "dynamic" raises the base once positions pass `max_position_embeddings` and keeps the largest base
    seen, as the reference does). Holds no weights, so nothing of it is ever saved.
    """

    def __init__(self, dim: int, base: float, max_position_embeddings: int, scaling: dict | None = None):
        super().__init__()
        if dim % 2:
            raise ValueError(f"rotary dimension must be even, got {dim}")
        self.dim, self.base, self.max_positions = dim, base, max_position_embeddings
        self.scaling_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        self.factor = float((scaling or {}).get("factor", 1.0))
        self.cached_len = max_position_embeddings  # dynamic: longest length its base was raised for
        self._inv_freq: torch.Tensor | None = None

    def inv_freq(self, device: torch.device, seq_len: torch.Tensor | None = None) -> torch.Tensor:
        if seq_len is None and self._inv_freq is not None and self._inv_freq.device == device:
            return self._inv_freq  # the same every call but under dynamic scaling: made once
        exponent = (
            torch.arange(0, self.dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / self.dim
        )
        base = self.base
        if seq_len is not None:  # dynamic NTK: computed in float32 tensors, as the reference does
            base = base * ((self.factor * seq_len / self.max_positions) - (self.factor - 1)) ** (
                self.dim / (self.dim - 2)
            )
        inv_freq = 1.0 / (base**exponent)
        inv_freq = inv_freq / self.factor if self.scaling_type == "linear" else inv_freq
        if seq_len is None and not torch.compiler.is_compiling():
            self._inv_freq = inv_freq
        return inv_freq

    def _dynamic_seq_len(self, position_ids: torch.Tensor) -> torch.Tensor | None:
        # This is a host sync, taken only by dynamic scaling whose result depends on the longest position.
        seq_len = int(position_ids.max()) + 1
        if seq_len > self.cached_len:
            self.cached_len = seq_len
        elif seq_len < self.max_positions:
            self.cached_len = self.max_positions
        if self.cached_len <= self.max_positions:
            return None
        return torch.tensor(self.cached_len, device=position_ids.device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (B, T) -> cos, sin of shape (B, T, dim/2) in `dtype` (computed in fp32)."""
        seq_len = self._dynamic_seq_len(position_ids) if self.scaling_type == "dynamic" else None
        inv_freq = self.inv_freq(position_ids.device, seq_len)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, dim/2)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)

    def rotation(self, position_ids: torch.Tensor, dtype: torch.dtype, interleaved: bool, head_dim: int) -> Rotation:
        """The tables `apply_rotary` needs for these positions, made once per forward pass for all layers."""
        return Rotation(*self(position_ids, dtype), interleaved, head_dim)


class Rotation:
    """RoPE tables for one forward pass, over whole heads (B, 1, T, ·): channels past the rotary ones get
    cos 1 / sin 0, which leaves them exactly as they are, so no slicing and re-joining per call.

    interleaved=True pairs channels (0,1), (2,3), … (GLM): in eager fp32 one complex multiply (under
    torch.compile real arithmetic, which inductor fuses: complex ops fall back to ATen calls). False pairs i
    with i + dim/2 (Llama, Persimmon): x * [cos, cos] + [x2, x1] * [-sin, sin]. Mixing the two up gives
    fluent garbage, not an error.
    """

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool, head_dim: int):
        cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, dim/2)
        self.half, self.interleaved = cos.shape[-1], interleaved
        rest = head_dim - 2 * self.half
        if interleaved:
            pad = head_dim // 2 - self.half
            cos, sin = F.pad(cos, (0, pad), value=1.0), F.pad(sin, (0, pad), value=0.0)  # (B, 1, T, D/2)
            if cos.dtype == torch.float32 and not torch.compiler.is_compiling():
                self.cis = torch.complex(cos, sin)
            else:  # no complex bf16 / fp16 math: the pairs are rotated in the model's dtype, as the reference
                self.cis, self.cos, self.sin = None, cos, sin
        else:
            self.cos = F.pad(torch.cat((cos, cos), dim=-1), (0, rest), value=1.0)  # (B, 1, T, D)
            self.sin = F.pad(torch.cat((-sin, sin), dim=-1), (0, rest), value=0.0)


def apply_rotary(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """Rotate the first 2 * rot.half channels of each head of x (B, H, T, D); the rest pass through."""
    if not rot.interleaved:  # [x1, x2, rest] * [cos, cos, 1] + [x2, x1, rest] * [-sin, sin, 0]
        h = rot.half
        swapped = torch.cat((x[..., h : 2 * h], x[..., :h], x[..., 2 * h :]), dim=-1)
        return x * rot.cos + swapped * rot.sin
    pairs = x.unflatten(-1, (x.shape[-1] // 2, 2))  # (B, H, T, D/2, 2)
    if rot.cis is not None:  # (x1 + i x2) (cos + i sin)
        return torch.view_as_real(torch.view_as_complex(pairs) * rot.cis).flatten(-2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    return torch.stack((x1 * rot.cos - x2 * rot.sin, x2 * rot.cos + x1 * rot.sin), dim=-1).flatten(-2)


# ---- attention ------------------------------------------------------------------------------------


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    query_positions: torch.Tensor,
    kv_len: int,
    batch_size: int,
    causal: bool = True,
) -> torch.Tensor:
    """Boolean mask (B, 1, T, S), True where a query may attend.

    attention_mask: (B, S') of 1/0 over the tokens seen so far (cache + new), or None for all valid.
    query_positions: (T,) index of each new token in the key sequence. Rows with nothing to attend
    (a query that is itself padding) are opened fully so no NaN leaks out of softmax.
    """
    keys = torch.arange(kv_len, device=query_positions.device)
    if causal:
        mask = keys[None, :] <= query_positions[:, None]  # (T, S)
    else:
        mask = torch.ones(len(query_positions), kv_len, dtype=torch.bool, device=keys.device)
    mask = mask[None, None].expand(batch_size, 1, -1, -1)
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size:
            raise ValueError(
                f"attention_mask must have shape (batch, seq_len) = ({batch_size}, {kv_len}), "
                f"got {tuple(attention_mask.shape)}"
            )
        valid = attention_mask.to(device=keys.device, dtype=torch.bool)[:, :kv_len]
        if valid.shape[1] < kv_len:  # keys past the mask are future cache slots: causality hides them
            valid = F.pad(valid, (0, kv_len - valid.shape[1]), value=True)
        mask = open_empty_rows(mask & valid[:, None, None, :])
    return mask


def open_empty_rows(mask: torch.Tensor) -> torch.Tensor:
    """A query with nothing to attend (padding) attends everything instead: no NaN out of softmax, and its
    output is meaningless but never read."""
    return mask | ~mask.any(dim=-1, keepdim=True)


def packed_documents(position_ids: torch.Tensor) -> torch.Tensor | None:
    """Document index of each token (B, T) when position_ids restart at 0 inside a row (packed sequences),
    else None. A document starts at column 0 and wherever a position is 0 (one host sync per call)."""
    starts = position_ids == 0
    if not bool(starts[:, 1:].any()):
        return None
    starts[:, 0] = True
    return starts.cumsum(-1)


def restrict_to_documents(mask: torch.Tensor, documents: torch.Tensor) -> torch.Tensor:
    """mask (B, 1, T, S) of a pass with no past (query t is key slot t) -> the same mask with attention
    across documents (B | 1, T) removed; key slots past T (unwritten static-cache slots) see no document."""
    S, T = mask.shape[-1], documents.shape[1]
    key_documents = F.pad(documents, (0, S - T), value=-1)  # (B | 1, S)
    return open_empty_rows(mask & (documents[:, None, :, None] == key_documents[:, None, None, :]))  # (B, 1, T, S)


_is_compiling = getattr(torch.compiler, "is_compiling", None) or torch._dynamo.is_compiling  # torch < 2.3


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    *,
    scale: float,
    dropout_p: float = 0.0,
    impl: str = "sdpa",
    head_mask: torch.Tensor | None = None,
    return_weights: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention with grouped K/V heads, without repeating K/V in memory.

    q: (B, H, T, D); k, v: (B, Hkv, S, D) with H a multiple of Hkv; mask: bool (B, 1, T, S) or None, or
    for flash_attention_2 the pass's FlashMask. The G = H/Hkv query heads sharing a K/V head are folded
    into the query length, so every K/V head is read once. Returns the output (B, T, H*D) and, when asked
    (eager only: any other impl computes that call eagerly), weights (B, H, T, S). impl "flex_attention"
    and "flash_attention_2" run in attn_backends (flex without dropout; flash where it has a FlashMask or
    no mask, sdpa under a dense mask, i.e. XGLM's cross-attention to padded encoder states).
    """
    if impl not in ATTN_IMPLEMENTATIONS:
        check_attn_implementation(impl)
    if (return_weights or head_mask is not None) and impl != "eager":
        if return_weights:
            warnings.warn(f"{impl} cannot return attention weights; computing this call eagerly", stacklevel=3)
        impl = "eager"
    if isinstance(mask, FlashMask):
        if impl == FLASH:
            return flash_attention(q, k, v, mask, scale, dropout_p), None
        mask = mask.dense
    if impl == FLASH and mask is None:
        return flash_attention(q, k, v, None, scale, dropout_p), None
    if impl == "flex_attention" and dropout_p == 0.0:
        return flex_attention(q, k, v, mask, scale), None
    if impl != "eager":  # flex with dropout (it has none), flash under a dense mask (cross-attention): sdpa
        impl = "sdpa"
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = H // Hkv
    q = q.reshape(B, Hkv, G * T, D)  # heads h = j*G + g share K/V head j
    if mask is not None and G > 1:
        mask = mask[:, :, None].expand(B, mask.shape[1], G, T, S).reshape(B, mask.shape[1], G * T, S)
    weights = None
    if impl == "sdpa" and T == 1 and G > 1 and _is_compiling():
        # a compiled grouped-query decode step: G folded query rows make two real matmuls and inductor fuses
        # mask + softmax, ~half the CPU sdpa kernel's time; with G == 1 inductor would unroll the matmuls
        impl = "eager"
    if impl == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    else:
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale  # (B, Hkv, G*T, S)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        # weights kept as (B, H, T, S), the tensor returned: the matmul below reads a view of it, so a caller's
        # retain_grad() on the returned weights gets their gradient
        weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype).view(B, H, T, S)
        weights = F.dropout(weights, p=dropout_p, training=dropout_p > 0)
        if head_mask is not None:  # (H,) or (B, H, ...) broadcastable to (B, H, T, S)
            weights = weights * head_mask
        out = torch.matmul(weights.view(B, Hkv, G * T, S), v)
    out = out.view(B, H, T, D).transpose(1, 2).reshape(B, T, H * D)
    return out, weights
