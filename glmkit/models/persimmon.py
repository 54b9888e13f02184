"""Persimmon (adept/persimmon-8b-base / -chat, Hugging Face "persimmon" layout).

Pre-LayerNorm decoder with biases everywhere: a fused `query_key_value` projection laid out per head
(H, 3, D), per-head q/k LayerNorm, partial *half-split* RoPE (channel i pairs with i + rotary_dim/2 over
the first head_dim * partial_rotary_factor channels, theta 25000) and a relu² MLP.

Adept's original release (model_optim_rng.pt + adept_vocab.model) is read by models/adept.py.

Use bfloat16 (or float32) for this family: the relu² activations overflow float16's range in the
released checkpoints, which turns logits into inf/NaN. `dtype="auto"` follows the checkpoint's dtype.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..cache import Cache
from ..config import ConfigError, PretrainedConfig
from ..heads import ForCausalLM, ForSequenceClassification, ForTokenClassification
from ..layers import Linear, RotaryEmbedding, Rotation, apply_rotary, attention, get_activation
from ..modeling import DecoderModel, run_layers


class PersimmonConfig(PretrainedConfig):
    """Defaults are the reference PersimmonConfig's (a persimmon-8b shape). rope_theta,
    partial_rotary_factor and rope_scaling may also come inside a v5 `rope_parameters` block.
    Prefer bfloat16 weights: float16 overflows in this family."""

    model_type = "persimmon"
    uses_rope = True

    def __init__(
        self,
        vocab_size: int = 262144,
        hidden_size: int = 4096,
        intermediate_size: int = 16384,
        num_hidden_layers: int = 36,
        num_attention_heads: int = 64,
        hidden_act: str = "relu2",
        max_position_embeddings: int = 16384,
        initializer_range: float = 0.02,
        layer_norm_eps: float = 1e-5,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 25000.0,
        rope_scaling: dict | None = None,
        qk_layernorm: bool = True,
        hidden_dropout: float = 0.0,
        attention_dropout: float = 0.0,
        partial_rotary_factor: float = 0.5,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 1,
        eos_token_id: int | list[int] | None = 2,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.layer_norm_eps = layer_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = dict(rope_scaling) if rope_scaling is not None else None
        self.qk_layernorm = qk_layernorm
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.partial_rotary_factor = partial_rotary_factor
        if self.rope_scaling is not None and "type" in self.rope_scaling:  # the reference's BC spelling
            self.rope_scaling["rope_type"] = self.rope_scaling["type"]
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        get_activation(self.hidden_act)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})"
            )
        head_dim = self.hidden_size // self.num_attention_heads
        # the reference's RoPE would read a head_dim key, its attention would not: refuse a mismatch
        if getattr(self, "head_dim", head_dim) != head_dim:
            raise ConfigError(f"head_dim must equal hidden_size / num_attention_heads = {head_dim}")
        if rotary_dim(self) % 2:
            raise ConfigError("head_dim * partial_rotary_factor must be even")


def rotary_dim(config: PersimmonConfig) -> int:
    """Channels of each head that RoPE rotates: the first head_dim * partial_rotary_factor."""
    return int(config.hidden_size // config.num_attention_heads * config.partial_rotary_factor)


def split_qkv(fused: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split the output of the fused `query_key_value` projection into q, k, v, each (B, T, H, D).

    The checkpoint stores the 3*C output rows per head — head 0's q, k, v, then head 1's — not as
    three C-row blocks, so the split is a view over (H, 3, D); the weight itself is never re-laid out.
    """
    B, T, C3 = fused.shape
    q, k, v = fused.view(B, T, num_heads, 3, C3 // (3 * num_heads)).unbind(dim=3)  # (B, T, H, D) each
    return q, k, v


class PersimmonMLP(nn.Module):
    def __init__(self, config: PersimmonConfig):
        super().__init__()
        self.dense_h_to_4h = Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = Linear(config.intermediate_size, config.hidden_size)
        self.act = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class PersimmonAttention(nn.Module):
    def __init__(self, config: PersimmonConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.num_heads
        C = config.hidden_size
        self.query_key_value = Linear(C, 3 * C)
        self.dense = Linear(C, C)
        self.qk_layernorm = config.qk_layernorm
        if self.qk_layernorm:  # one LayerNorm shared by all heads, over each head's D channels
            self.q_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(self.head_dim, eps=config.layer_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rot: Rotation,
        mask: torch.Tensor | None,
        cache: Cache | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = split_qkv(self.query_key_value(x), self.num_heads)  # (B, T, H, D) each
        if self.qk_layernorm:
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        q, k = apply_rotary(q, rot), apply_rotary(k, rot)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out, weights = attention(
            q, k, v, mask,
            scale=self.head_dim**-0.5,
            dropout_p=self.config.attention_dropout if self.training else 0.0,
            impl=self.config._attn_implementation,
            return_weights=output_attentions,
        )  # fmt: skip
        return self.dense(out), weights


class PersimmonDecoderLayer(nn.Module):
    def __init__(self, config: PersimmonConfig, layer_idx: int):
        super().__init__()
        self.self_attn = PersimmonAttention(config, layer_idx)
        self.mlp = PersimmonMLP(config)
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout)  # the reference drops the MLP branch only

    def forward(
        self,
        x: torch.Tensor,
        rot: Rotation,
        mask: torch.Tensor | None,
        cache: Cache | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn, weights = self.self_attn(self.input_layernorm(x), rot, mask, cache, output_attentions)
        x = x + attn
        x = x + self.dropout(self.mlp(self.post_attention_layernorm(x)))
        return x, weights


class PersimmonModel(DecoderModel):
    """The decoder stack without a head: returns last_hidden_state (after the final LayerNorm)."""

    config_class = PersimmonConfig

    def __init__(self, config: PersimmonConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(PersimmonDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            dim=rotary_dim(config),
            base=config.rope_theta,
            max_position_embeddings=config.max_position_embeddings,
            scaling=config.rope_scaling,
        )
        self.gradient_checkpointing = False
        self.post_init()

    def core(self, x, positions, mask, cache, trace=None):
        """(B, T, C) embeddings at positions (B, T) -> (B, T, C) after the final LayerNorm."""
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        rot = self.rotary_emb.rotation(positions, x.dtype, False, head_dim)  # (B, 1, T, ...) tables
        return self.final_layernorm(run_layers(self.layers, x, (rot, mask, cache), trace))


class PersimmonForCausalLM(ForCausalLM):
    config_class = PersimmonConfig
    base_model_class = PersimmonModel


class PersimmonForSequenceClassification(ForSequenceClassification):
    config_class = PersimmonConfig
    base_model_class = PersimmonModel


class PersimmonForTokenClassification(ForTokenClassification):
    config_class = PersimmonConfig
    base_model_class = PersimmonModel
