"""Tensor-parallel plans: which weights each rank holds, the module swaps that make a model use them,
the reader that reads only those slices, and the gather that turns shards back into one checkpoint.

Attention is split by heads (column-parallel q/k/v, row-parallel output projection) and the MLP by its
hidden units (column-parallel up/gate, row-parallel down): one all-reduce per attention block and one
per MLP. Key/value heads are replicated when there are fewer of them than ranks: each rank keeps the
one its query heads read. Embedding and lm_head are split by vocabulary rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..layers import Linear
from .layers import RowParallelLinear, VocabParallelEmbedding, VocabParallelLMHead

Ranges = tuple[tuple[int, int], ...]  # index ranges of the whole tensor, concatenated along one dim


class TensorParallelError(ValueError):
    """A model, checkpoint or launch that tensor parallelism cannot serve as asked."""


@dataclass(frozen=True)
class Shard:
    """How a parameter is split: rank r holds `per_rank[r]` of dimension `dim` of the whole tensor, whose
    size along it is `full` (ranges past it are zero padding, as in the last vocabulary shard)."""

    dim: int
    full: int
    per_rank: tuple[Ranges, ...]


def even_split(n: int, world: int, what: str) -> Callable[[int], tuple[int, int]]:
    """rank -> its (start, stop) of n units split evenly over world ranks."""
    if n % world:
        raise TensorParallelError(f"{what} ({n}) is not divisible by the tensor-parallel size ({world})")
    per = n // world
    return lambda r: (r * per, (r + 1) * per)


def head_split(heads: int, kv_heads: int, world: int) -> tuple[Callable, Callable]:
    """rank -> its query heads and its key/value heads. With fewer kv heads than ranks each rank keeps
    the single kv head its query heads share (GLM-4-9B's 2 kv heads at TP 4 or 8)."""
    q = even_split(heads, world, "num_attention_heads")
    if kv_heads % world == 0:
        return q, even_split(kv_heads, world, "num_key_value_heads")
    if world % kv_heads == 0:
        group = heads // kv_heads
        return q, lambda r: (q(r)[0] // group, q(r)[0] // group + 1)
    raise TensorParallelError(f"num_key_value_heads ({kv_heads}) neither divides nor is a multiple of the "
                              f"tensor-parallel size ({world})")  # fmt: skip


def scaled(span: tuple[int, int], unit: int, offset: int = 0) -> tuple[int, int]:
    return offset + span[0] * unit, offset + span[1] * unit


class Planner:
    """Swaps a meta-device model's modules for their shards and records each sharded parameter."""

    def __init__(self, model: nn.Module, group: dist.ProcessGroup):
        self.model, self.group = model, group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.names = {module: name for name, module in model.named_modules()}
        self.shards: dict[str, Shard] = {}

    def _record(self, parent: nn.Module, child: str, param: str, dim: int, full: int,
                ranges: Callable[[int], Ranges]) -> int:  # fmt: skip
        prefix = self.names[parent]
        name = f"{prefix}.{child}.{param}" if prefix else f"{child}.{param}"
        self.shards[name] = Shard(dim, full, tuple(ranges(r) for r in range(self.world)))
        return sum(b - a for a, b in ranges(self.rank))

    def column(self, parent: nn.Module, child: str, ranges: Callable[[int], Ranges]) -> None:
        """Output rows `ranges` of a linear (and of its bias): this rank's slice of the output."""
        old = getattr(parent, child)
        rows = self._record(parent, child, "weight", 0, old.out_features, ranges)
        if old.bias is not None:
            self._record(parent, child, "bias", 0, old.out_features, ranges)
        with torch.device("meta"):
            setattr(parent, child, Linear(old.in_features, rows, bias=old.bias is not None))

    def row(self, parent: nn.Module, child: str, ranges: Callable[[int], Ranges]) -> None:
        """Input columns `ranges` of a linear: partial outputs summed over ranks, the bias whole."""
        old = getattr(parent, child)
        cols = self._record(parent, child, "weight", 1, old.in_features, ranges)
        with torch.device("meta"):
            setattr(parent, child, RowParallelLinear(cols, old.out_features, old.bias is not None, self.group))

    def vocabulary(self) -> None:
        """Embedding and lm_head by vocabulary rows, ceil(V / world) per rank."""
        base = self.model.base_model
        emb = base.embed_tokens
        V, rows = emb.num_embeddings, math.ceil(emb.num_embeddings / self.world)
        ranges = lambda r: ((r * rows, (r + 1) * rows),)
        self._record(base, "embed_tokens", "weight", 0, V, ranges)
        with torch.device("meta"):
            base.embed_tokens = VocabParallelEmbedding(V, emb.embedding_dim, rows, self.rank * rows, emb.padding_idx,
                                                       getattr(emb, "embed_scale", None), self.group)  # fmt: skip
        head = getattr(self.model, "lm_head", None)
        if head is not None:
            self._record(self.model, "lm_head", "weight", 0, V, ranges)
            with torch.device("meta"):
                self.model.lm_head = VocabParallelLMHead(head.in_features, V, rows, self.group)
            self.model.tie_weights()


def _plan_glm(p: Planner, layer: nn.Module, config: Any) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    q, kv = head_split(config.num_attention_heads, config.num_key_value_heads, p.world)
    inner = config.intermediate_size
    f = even_split(inner, p.world, "intermediate_size")
    D = attn.head_dim
    p.column(attn, "q_proj", lambda r: (scaled(q(r), D),))
    p.column(attn, "k_proj", lambda r: (scaled(kv(r), D),))
    p.column(attn, "v_proj", lambda r: (scaled(kv(r), D),))
    p.row(attn, "o_proj", lambda r: (scaled(q(r), D),))
    attn.num_heads, attn.num_kv_heads = q(p.rank)[1] - q(p.rank)[0], kv(p.rank)[1] - kv(p.rank)[0]
    p.column(mlp, "gate_up_proj", lambda r: (f(r), scaled(f(r), 1, inner)))  # [gate rows; up rows]
    p.row(mlp, "down_proj", lambda r: (f(r),))


def _plan_persimmon(p: Planner, layer: nn.Module, config: Any) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    h = even_split(config.num_attention_heads, p.world, "num_attention_heads")
    f = even_split(config.intermediate_size, p.world, "intermediate_size")
    D = attn.head_dim
    p.column(attn, "query_key_value", lambda r: (scaled(h(r), 3 * D),))  # rows laid out per head (H, 3, D)
    p.row(attn, "dense", lambda r: (scaled(h(r), D),))
    attn.num_heads = h(p.rank)[1] - h(p.rank)[0]
    p.column(mlp, "dense_h_to_4h", lambda r: (f(r),))
    p.row(mlp, "dense_4h_to_h", lambda r: (f(r),))


def _plan_xglm(p: Planner, layer: nn.Module, config: Any) -> None:
    h = even_split(config.attention_heads, p.world, "attention_heads")
    f = even_split(config.ffn_dim, p.world, "ffn_dim")
    D = layer.self_attn.head_dim
    for attn in (layer.self_attn, getattr(layer, "encoder_attn", None)):
        if attn is None:
            continue
        for child in ("q_proj", "k_proj", "v_proj"):
            p.column(attn, child, lambda r: (scaled(h(r), D),))
        p.row(attn, "out_proj", lambda r: (scaled(h(r), D),))
        attn.num_heads = h(p.rank)[1] - h(p.rank)[0]
    p.column(layer, "fc1", lambda r: (f(r),))
    p.row(layer, "fc2", lambda r: (f(r),))


LAYER_PLANS = {"glm": _plan_glm, "persimmon": _plan_persimmon, "xglm": _plan_xglm}


def shard_model(model: nn.Module, group: dist.ProcessGroup) -> dict[str, Shard]:
    """Swap a meta-device model's modules for this rank's shards; returns the sharded parameters by name.
    A layer's plan checks every split before its first swap, so a model that cannot be split is left whole."""
    plan = LAYER_PLANS.get(model.config.model_type)
    if plan is None:
        raise TensorParallelError(f"no tensor-parallel plan for model_type {model.config.model_type!r} "
                                  f"(glmkit has plans for {', '.join(sorted(LAYER_PLANS))})")  # fmt: skip
    planner = Planner(model, group)
    for layer in model.base_model.layers:
        plan(planner, layer, model.config)
    planner.vocabulary()
    model.tp_group, model.tp_shards = group, planner.shards
    return planner.shards
