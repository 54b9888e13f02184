"""Tensor-parallel modules swapped in for nn.Linear / nn.Embedding (gpt-fast tp.py style).

Column-parallel linears need no module of their own: a plain `layers.Linear` holding its rows of the weight
gives this rank's slice of the output. The modules here are the ones that talk to the other ranks: their
matmuls go through `layers.linear` like every other linear, their collectives are torch's functional ones,
so torch.compile traces them into the graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
import torch.nn.functional as F
from torch import nn

from ..layers import linear


def _waited(t: torch.Tensor) -> torch.Tensor:
    """Eager functional collectives return a lazy tensor; wait here so callers get a plain one."""
    return t.wait() if isinstance(t, fc.AsyncCollectiveTensor) else t


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    return _waited(fc.all_reduce(t, "sum", group))


def all_gather_last(t: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """Concatenate every rank's `t` along its last dimension (rank order)."""
    return _waited(fc.all_gather_single(t.contiguous(), t.dim() - 1, group))


class RowParallelLinear(nn.Linear):
    """Holds this rank's input columns: partial products summed over ranks (the one all-reduce of a
    block), then the bias, added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool, group: dist.ProcessGroup):
        super().__init__(in_features, out_features, bias=bias)
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce(linear(x, self.weight), self.group)
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding: ids elsewhere give zeros here and their vector on
    the rank that holds them; one all-reduce makes the full embedding. `embed_scale` keeps XGLM's
    scaled embedding; `num_embeddings` is the whole vocabulary (what the input checks read)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rows: int, start: int, padding_idx: int | None,
                 embed_scale: float | None, group: dist.ProcessGroup):  # fmt: skip
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.start, self.embed_scale, self.group = start, embed_scale, group
        self.weight = nn.Parameter(torch.empty(rows, embedding_dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        here = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)  # (B, T, C)
        x = all_reduce(x * here[..., None].to(x.dtype), self.group)
        return x * self.embed_scale if self.embed_scale is not None else x


class VocabParallelLMHead(nn.Module):
    """Logits for this rank's vocabulary rows, gathered from every rank along the vocabulary and cut
    to the real vocabulary (the last rank's rows may be zero padding)."""

    def __init__(self, in_features: int, out_features: int, rows: int, group: dist.ProcessGroup):
        super().__init__()
        self.in_features, self.out_features, self.group = in_features, out_features, group
        self.weight = nn.Parameter(torch.empty(rows, in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return all_gather_last(linear(x, self.weight), self.group)[..., : self.out_features]
