"""XGLM (facebook/xglm-*, Hugging Face "xglm" layout).

Pre-LN decoder (fairseq style): LayerNorm before self-attention, optional cross-attention and the
fc1/fc2 MLP; biased projections; sinusoidal positions computed on the fly (never stored) and added to
token embeddings scaled by sqrt(d_model); lm_head tied to the embedding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..cache import Cache, KVCache
from ..config import ConfigError, PretrainedConfig
from ..heads import ForCausalLM
from ..layers import Linear, attention, build_attention_mask, get_activation
from ..modeling import DecoderModel, PreTrainedModel, run_layers
from ..outputs import BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithCrossAttentions

# The reference adds a fixed offset of 2 to every position id (fairseq's padding_idx + 1 for pad id 1,
# which every published checkpoint uses) and zeroes the table row at padding_idx.
POSITION_OFFSET = 2


def _alias(name: str) -> property:
    return property(
        lambda self: getattr(self, name),
        lambda self, value: setattr(self, name, value),
        doc=f"Alias of `{name}` (the reference's attribute_map); never written to config.json.",
    )


class XGLMConfig(PretrainedConfig):
    """Defaults are the reference XGLMConfig's (an xglm-564M shape). `hidden_size`, `num_hidden_layers`
    and `num_attention_heads` are aliases of d_model, num_layers and attention_heads, as in the reference."""

    model_type = "xglm"
    hidden_size = _alias("d_model")
    num_hidden_layers = _alias("num_layers")
    num_attention_heads = _alias("attention_heads")

    def __init__(
        self,
        vocab_size: int = 256008,
        max_position_embeddings: int = 2048,
        d_model: int = 1024,
        ffn_dim: int = 4096,
        num_layers: int = 24,
        attention_heads: int = 16,
        activation_function: str = "gelu",
        dropout: float = 0.1,
        attention_dropout: float = 0.1,
        activation_dropout: float = 0.0,
        layerdrop: float = 0.0,
        init_std: float = 0.02,
        scale_embedding: bool = True,
        use_cache: bool = True,
        decoder_start_token_id: int | None = 2,
        pad_token_id: int | None = 1,
        bos_token_id: int | None = 0,
        eos_token_id: int | None = 2,
        add_cross_attention: bool = False,
        tie_word_embeddings: bool = True,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.d_model = d_model
        self.ffn_dim = ffn_dim
        self.num_layers = num_layers
        self.attention_heads = attention_heads
        self.activation_function = activation_function
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.activation_dropout = activation_dropout
        self.layerdrop = layerdrop
        self.init_std = init_std
        self.scale_embedding = scale_embedding
        self.use_cache = use_cache
        self.decoder_start_token_id = decoder_start_token_id
        self.add_cross_attention = add_cross_attention
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        get_activation(self.activation_function)
        if self.d_model % self.attention_heads:
            raise ConfigError(f"d_model ({self.d_model}) must be divisible by attention_heads ({self.attention_heads})")
        if self.d_model < 4:
            raise ConfigError(f"d_model must be at least 4 for sinusoidal positions, got {self.d_model}")


def sinusoidal_positions(position_ids: torch.Tensor, dim: int, padding_idx: int | None) -> torch.Tensor:
    """(B, T) position ids -> (B, T, dim) fp32 sinusoids [sin | cos] (tensor2tensor layout), for any length.

    Same arithmetic as the reference's table (row = position + 2, row padding_idx zeroed, odd dims
    zero-padded), computed per call so nothing is stored or saved; position_ids is not modified.
    """
    half = dim // 2
    step = math.log(10000) / (half - 1)
    freq = torch.exp(torch.arange(half, dtype=torch.int64, device=position_ids.device).float() * -step)
    rows = position_ids + POSITION_OFFSET  # a new tensor: the caller's ids stay as they were
    angles = rows.float()[..., None] * freq  # (B, T, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    if padding_idx is not None:
        emb = emb.masked_fill((rows == padding_idx)[..., None], 0.0)
    return emb


class XGLMScaledWordEmbedding(nn.Embedding):
    """Token embedding multiplied by `embed_scale` (sqrt(d_model) when config.scale_embedding)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None, embed_scale: float = 1.0):
        super().__init__(num_embeddings, embedding_dim, padding_idx)
        self.embed_scale = embed_scale

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return super().forward(input_ids) * self.embed_scale


class XGLMCache(KVCache):
    """KVCache for self-attention plus each layer's cross-attention K/V (the projected encoder states),
    computed on the first call and reused after: they do not change while decoding.

    The legacy tuple form is per layer (self_k, self_v) or (self_k, self_v, cross_k, cross_v), as the
    reference's EncoderDecoderCache writes it.
    """

    def __init__(self, capacity: int | None = None, static: bool = False):
        super().__init__(capacity, static)
        self.cross: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def reorder(self, index: torch.Tensor) -> None:
        super().reorder(index)
        self.cross = {
            i: (k.index_select(0, index.to(k.device)), v.index_select(0, index.to(v.device)))
            for i, (k, v) in self.cross.items()
        }

    def to_legacy(self) -> tuple[tuple[torch.Tensor, ...], ...]:
        return tuple((*kv, *self.cross.get(i, ())) for i, kv in enumerate(super().to_legacy()))

    @classmethod
    def from_legacy(cls, past: tuple | list) -> XGLMCache:
        cache = super().from_legacy([layer[:2] for layer in past])
        cache.cross = {i: (layer[2], layer[3]) for i, layer in enumerate(past) if len(layer) == 4}
        return cache


@dataclass
class EncoderInputs:
    """Cross-attention inputs shared by every layer: encoder states (B, S, C), their mask, head masks."""

    states: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # bool (B, 1, T, S)
    head_mask: torch.Tensor | None = None  # (num_layers, heads) for self-attention
    cross_head_mask: torch.Tensor | None = None  # (num_layers, heads) for cross-attention


class XGLMAttention(nn.Module):
    """Multi-head attention; cross-attention when called with `kv_states` (the encoder's hidden states)."""

    def __init__(self, config: XGLMConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads = config.attention_heads
        self.head_dim = config.d_model // config.attention_heads
        C = config.d_model
        self.k_proj = Linear(C, C)
        self.v_proj = Linear(C, C)
        self.q_proj = Linear(C, C)
        self.out_proj = Linear(C, C)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        return x.view(B, S, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, S, D)

    def _keys_values(self, x: torch.Tensor, kv_states: torch.Tensor | None,
                     cache: Cache | None) -> tuple[torch.Tensor, ...]:  # fmt: skip
        if kv_states is None:  # self-attention: the new positions join the cache
            k, v = self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
            return cache.update(self.layer_idx, k, v) if cache is not None else (k, v)
        cross = getattr(cache, "cross", None)
        if cross is not None and self.layer_idx in cross:
            return cross[self.layer_idx]
        k, v = self._heads(self.k_proj(kv_states)), self._heads(self.v_proj(kv_states))
        if cross is not None:
            cross[self.layer_idx] = (k, v)
        return k, v

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        cache: Cache | None,
        kv_states: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q = self._heads(self.q_proj(x))  # (B, H, T, D)
        k, v = self._keys_values(x, kv_states, cache)
        out, weights = attention(
            q, k, v, mask,
            scale=self.head_dim**-0.5,
            dropout_p=self.config.attention_dropout if self.training else 0.0,
            impl=self.config._attn_implementation,
            # (H,) -> (1, H, 1, 1): scales each head's weights (B, H, T, S)
            head_mask=head_mask.view(1, -1, 1, 1) if head_mask is not None else None,
            return_weights=output_attentions,
        )  # fmt: skip
        return self.out_proj(out), weights


class XGLMDecoderLayer(nn.Module):
    def __init__(self, config: XGLMConfig, layer_idx: int):
        super().__init__()
        C = config.d_model
        self.dropout, self.activation_dropout = config.dropout, config.activation_dropout
        self.self_attn = XGLMAttention(config, layer_idx)
        self.activation_fn = get_activation(config.activation_function)
        if config.add_cross_attention:
            self.encoder_attn = XGLMAttention(config, layer_idx)
            self.encoder_attn_layer_norm = nn.LayerNorm(C)
        self.self_attn_layer_norm = nn.LayerNorm(C)
        self.fc1 = Linear(C, config.ffn_dim)
        self.fc2 = Linear(config.ffn_dim, C)
        self.final_layer_norm = nn.LayerNorm(C)

    def forward(self, x, mask, cache, enc: EncoderInputs | None = None, output_attentions=False):
        i = self.self_attn.layer_idx
        head = enc.head_mask[i] if enc is not None and enc.head_mask is not None else None
        h, weights = self.self_attn(self.self_attn_layer_norm(x), mask, cache, None, head, output_attentions)
        x = x + F.dropout(h, self.dropout, self.training)
        cross_weights = None
        if enc is not None and enc.states is not None:
            cross_head = enc.cross_head_mask[i] if enc.cross_head_mask is not None else None
            h, cross_weights = self.encoder_attn(
                self.encoder_attn_layer_norm(x), enc.mask, cache, enc.states, cross_head, output_attentions
            )
            x = x + F.dropout(h, self.dropout, self.training)
        h = self.activation_fn(self.fc1(self.final_layer_norm(x)))
        h = F.dropout(h, self.activation_dropout, self.training)
        x = x + F.dropout(self.fc2(h), self.dropout, self.training)
        return x, weights, cross_weights


def _check_head_mask(head_mask: torch.Tensor | None, name: str, config: XGLMConfig) -> None:
    if head_mask is not None and tuple(head_mask.shape) != (config.num_layers, config.attention_heads):
        raise ValueError(
            f"{name} must have shape (num_layers, attention_heads) = ({config.num_layers}, "
            f"{config.attention_heads}), got {tuple(head_mask.shape)}"
        )


class XGLMPreTrainedModel(PreTrainedModel):
    """Shared by the XGLM classes: the config class and the checkpoint names to skip."""

    config_class = XGLMConfig
    # exported position tables of older conversions: derived, never loaded
    ignore_on_load = (*PreTrainedModel.ignore_on_load, r"embed_positions\.(weights|_float_tensor)$")


class XGLMModel(DecoderModel, XGLMPreTrainedModel):
    """The decoder stack without a head: returns last_hidden_state (after the final LayerNorm).

    `embed_tokens` may be passed in (e.g. shared with an encoder); it is then used as is, unscaled.
    """

    cache_class = XGLMCache
    output_class = BaseModelOutputWithPastAndCrossAttentions

    def __init__(self, config: XGLMConfig, embed_tokens: nn.Embedding | None = None):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        if embed_tokens is None:
            embed_tokens = XGLMScaledWordEmbedding(config.vocab_size, config.d_model, self.padding_idx, scale)
        self.embed_tokens = embed_tokens
        self.layers = nn.ModuleList(XGLMDecoderLayer(config, i) for i in range(config.num_layers))
        self.layer_norm = nn.LayerNorm(config.d_model)
        self.gradient_checkpointing = False
        self.post_init()

    def core_extras(self, T: int, extra: dict[str, Any]) -> dict[str, Any]:
        """encoder_hidden_states / encoder_attention_mask / head_mask / cross_attn_head_mask -> EncoderInputs."""
        extra = dict(extra)
        states, mask = extra.pop("encoder_hidden_states", None), extra.pop("encoder_attention_mask", None)
        head_mask, cross_head_mask = extra.pop("head_mask", None), extra.pop("cross_attn_head_mask", None)
        super().core_extras(T, extra)
        _check_head_mask(head_mask, "head_mask", self.config)
        _check_head_mask(cross_head_mask, "cross_attn_head_mask", self.config)
        if states is not None:
            if not self.config.add_cross_attention:
                raise ValueError(
                    "encoder_hidden_states given, but this model has no cross-attention layers "
                    "(config.add_cross_attention is False)"
                )
            if mask is not None:
                B, S = states.shape[:2]
                mask = build_attention_mask(mask, torch.arange(T, device=states.device), S, B, causal=False)
        if states is None and head_mask is None and cross_head_mask is None:
            return {}
        return {"enc": EncoderInputs(states, mask if states is not None else None, head_mask, cross_head_mask)}

    def core(self, x, positions, mask, cache, trace=None, enc=None):
        """(B, T, C) token embeddings at positions (B, T) -> (B, T, C) after the final LayerNorm."""
        x = x + sinusoidal_positions(positions, self.config.d_model, self.padding_idx).to(x.device, x.dtype)
        x = F.dropout(x, self.config.dropout, self.training)
        if trace is not None and self.training:
            trace.layerdrop = self.config.layerdrop
        return self.layer_norm(run_layers(self.layers, x, (mask, cache, enc), trace))

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, encoder_hidden_states=None,
                encoder_attention_mask=None, head_mask=None, cross_attn_head_mask=None, past_key_values=None,
                inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None,
                return_dict=None, cache_position=None):  # fmt: skip
        """The reference's positional order; the work is DecoderModel.forward's. No cache is kept while
        training with gradient checkpointing (as the reference)."""
        if self.gradient_checkpointing and self.training:
            use_cache = False
        return super().forward(
            input_ids, attention_mask, position_ids, past_key_values, inputs_embeds, use_cache, cache_position,
            output_attentions, output_hidden_states, return_dict, encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask, head_mask=head_mask,
            cross_attn_head_mask=cross_attn_head_mask,
        )  # fmt: skip


class XGLMForCausalLM(ForCausalLM, XGLMPreTrainedModel):
    """XGLMModel + lm_head tied to the token embedding (checkpoints usually omit lm_head.weight)."""

    base_model_class = XGLMModel
    output_class = CausalLMOutputWithCrossAttentions

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        head_mask: torch.Tensor | None = None,
        cross_attn_head_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> CausalLMOutputWithCrossAttentions | tuple:
        """The reference's positional order; the work is ForCausalLM.forward's."""
        return super().forward(
            input_ids, attention_mask, labels, logits_to_keep, return_dict,
            position_ids=position_ids,
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=encoder_attention_mask,
            head_mask=head_mask,
            cross_attn_head_mask=cross_attn_head_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            cache_position=cache_position,
            **kwargs,
        )  # fmt: skip
