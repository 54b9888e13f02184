"""The attention kernels besides sdpa / eager: torch's flex_attention and the flash_attn package.

`layers.attention` dispatches here. Both take the boolean mask the model built (causal, padding, packed
documents); flash-attention cannot read a dense mask, so for it the mask is turned once per forward pass
into a `FlashMask`: plain causal, or the real tokens of every sequence packed for the varlen kernel.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flex_attention", "flash_attention_2")
FLASH = "flash_attention_2"
FLASH_DEVICE_TYPES = ("cuda",)  # where the flash_attn kernels run, and in which dtypes
FLASH_DTYPES = (torch.float16, torch.bfloat16)


class AttentionBackendError(ValueError):
    """An attention implementation that is unknown, or that cannot run here (package, device, dtype)."""


def check_attn_implementation(name: object) -> str:
    """Raise AttentionBackendError unless `name` is known and can run on this machine (at load time, not in
    forward): flash_attention_2 needs the flash_attn package and a CUDA device."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise AttentionBackendError(f'Specified `attn_implementation="{name}"` is not supported: attn_implementation '
                                    f"must be one of {', '.join(map(repr, ATTN_IMPLEMENTATIONS))}")  # fmt: skip
    if name == FLASH:
        if importlib.util.find_spec("flash_attn") is None:
            raise AttentionBackendError("attn_implementation='flash_attention_2' needs the flash_attn package, which "
                                        "is not installed (pip install flash-attn); or use 'sdpa'")  # fmt: skip
        if not torch.cuda.is_available():
            raise AttentionBackendError("attn_implementation='flash_attention_2' needs a CUDA GPU and none is "
                                        "available; use 'sdpa' or 'flex_attention'")  # fmt: skip
    if name == "flex_attention" and importlib.util.find_spec("torch.nn.attention.flex_attention") is None:
        raise AttentionBackendError(f"attn_implementation='flex_attention' needs torch >= 2.5 "
                                    f"(this is {torch.__version__})")  # fmt: skip
    return name


# ---- flex_attention -------------------------------------------------------------------------------


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   scale: float) -> torch.Tensor:  # fmt: skip
    """q (B, H, T, D), k/v (B, Hkv, S, D), bool mask (B, 1, T, S) or None -> (B, T, H*D).

    The mask is read inside the kernel (a score_mod), so one function serves causal, padded and packed rows.
    Eager flex_attention materialises the scores (on CPU ~5x sdpa's time); on CUDA it is compiled here, and
    inside the compiled decode step it is part of the compiled graph.
    """
    from torch.nn.attention.flex_attention import flex_attention as kernel

    B, H, T, D = q.shape
    score_mod = None
    if mask is not None:
        mask = mask.expand(B, 1, T, k.shape[2])

        def score_mod(score, b, h, q_idx, kv_idx):
            return torch.where(mask[b, 0, q_idx, kv_idx], score, -float("inf"))

    if q.device.type == "cuda" and not torch.compiler.is_compiling():
        kernel = _compiled_flex()  # eager flex on GPU would materialise the scores
    out = kernel(q, k, v, score_mod=score_mod, scale=scale, enable_gqa=k.shape[1] != H)  # (B, H, T, D)
    return out.transpose(1, 2).reshape(B, T, H * D)


# ---- flash_attn -----------------------------------------------------------------------------------


@dataclass
class FlashMask:
    """One forward pass's mask for flash-attention, made once for every layer.

    q_index None: every query and key is a real token of one sequence per row, so plain causal attention
    (bottom-right aligned when keys outnumber queries) is exact. Otherwise the real queries / keys, flat
    indices into (B*T) / (B*S), grouped into sequences (a row, or a packed document) by cu_q / cu_k.
    `dense` is the boolean mask, for a call that computes eagerly (attention weights asked).
    """

    dense: torch.Tensor
    q_index: torch.Tensor | None = None
    k_index: torch.Tensor | None = None
    cu_q: torch.Tensor | None = None
    cu_k: torch.Tensor | None = None
    max_q: int = 0
    max_k: int = 0


def flash_mask(dense: torch.Tensor | None, real_queries: torch.Tensor | None, real_keys: torch.Tensor | None,
               documents: torch.Tensor | None = None) -> FlashMask | None:  # fmt: skip
    """The FlashMask of a pass: dense (B, 1, T, S) or None (every key visible); real_queries (B, T) and
    real_keys (B, S) true for real tokens (None: all real); documents (B | 1, T) of a packed pass with no
    past (key slot t is query t). Unpadding costs a few host syncs per forward pass (not per layer)."""
    if dense is None:
        return None
    if real_queries is None and real_keys is None and documents is None:
        return FlashMask(dense)
    B, _, T, S = dense.shape
    device = dense.device
    real_queries = torch.ones(B, T, dtype=torch.bool, device=device) if real_queries is None else real_queries.bool()
    real_keys = torch.ones(B, S, dtype=torch.bool, device=device) if real_keys is None else real_keys.bool()
    seq_q = torch.arange(B, device=device)[:, None] * (S + 1)  # sequence id: the row, or (row, document)
    seq_k = seq_q
    if documents is not None:
        documents = documents.expand(B, T)
        seq_q, seq_k = seq_q + documents, seq_k + F.pad(documents, (0, S - T))
    q_index, k_index = real_queries.flatten().nonzero()[:, 0], real_keys.flatten().nonzero()[:, 0]
    n = B * (S + 1)
    count_q = torch.bincount(seq_q.expand(B, T).flatten()[q_index], minlength=n)
    count_k = torch.bincount(seq_k.expand(B, S).flatten()[k_index], minlength=n)
    used = (count_q + count_k) > 0  # ids are sorted along the flat order, so counts follow the indices
    count_q, count_k = count_q[used], count_k[used]
    cu_q = F.pad(count_q.cumsum(0), (1, 0)).to(torch.int32)
    cu_k = F.pad(count_k.cumsum(0), (1, 0)).to(torch.int32)
    longest_q, longest_k = (int(c.max()) if c.numel() else 0 for c in (count_q, count_k))
    return FlashMask(dense, q_index, k_index, cu_q, cu_k, longest_q, longest_k)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: FlashMask | None, scale: float,
                    dropout_p: float = 0.0) -> torch.Tensor:  # fmt: skip
    """q (B, H, T, D), k/v (B, Hkv, S, D) through the flash_attn kernels -> (B, T, H*D); padding queries
    give zeros. mask None: every key visible (a one-token decode step, unmasked cross-attention)."""
    if q.device.type not in FLASH_DEVICE_TYPES:
        raise AttentionBackendError(f"attn_implementation='flash_attention_2' runs on CUDA tensors, these are on "
                                    f"{q.device.type}: move the model with .to('cuda') or use 'sdpa'")  # fmt: skip
    if q.dtype not in FLASH_DTYPES:
        raise AttentionBackendError(f"attn_implementation='flash_attention_2' needs float16 or bfloat16, the model "
                                    f"runs in {q.dtype}: load it with dtype=torch.bfloat16")  # fmt: skip
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, T|S, H|Hkv, D)
    if mask is None or mask.q_index is None:
        out = flash_attn_func(q, k, v, dropout_p, softmax_scale=scale, causal=mask is not None)
        return out.reshape(B, T, H * D)
    if mask.max_q == 0:  # a chunk of padding only (a long left-padded prompt): nothing to attend from
        return q.new_zeros(B, T, H * D)
    packed = flash_attn_varlen_func(
        q.reshape(B * T, H, D)[mask.q_index], k.reshape(B * S, Hkv, D)[mask.k_index],
        v.reshape(B * S, Hkv, D)[mask.k_index], mask.cu_q, mask.cu_k, mask.max_q, mask.max_k, dropout_p,
        softmax_scale=scale, causal=True,
    )  # fmt: skip
    out = packed.new_zeros(B * T, H, D)
    out[mask.q_index] = packed
    return out.view(B, T, H * D)
