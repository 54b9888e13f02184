"""GLM-4 (THUDM glm-4-9b / -chat, Hugging Face "glm" layout).

Pre-norm decoder: RMSNorm, grouped-query attention with q/k/v bias and partial *interleaved* RoPE
(channels (0,1), (2,3), … of the first head_dim * partial_rotary_factor), fused gate_up SwiGLU MLP.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ConfigError, PretrainedConfig
from ..heads import ForCausalLM, ForSequenceClassification, ForTokenClassification
from ..layers import RMSNorm, RotaryEmbedding, apply_rotary, attention, build_attention_mask, get_activation
from ..modeling import PreTrainedModel, prepare_decoder_inputs
from ..outputs import BaseModelOutputWithPast


class GlmConfig(PretrainedConfig):
    """Defaults are the reference GlmConfig's (a glm-4-9b-chat shape). partial_rotary_factor is 0.5
    when config.json omits it; rope_theta may also come inside a v5 `rope_parameters` block."""

    model_type = "glm"
    uses_rope = True

    def __init__(
        self,
        vocab_size: int = 151552,
        hidden_size: int = 4096,
        intermediate_size: int = 13696,
        num_hidden_layers: int = 40,
        num_attention_heads: int = 32,
        num_key_value_heads: int = 2,
        partial_rotary_factor: float = 0.5,
        head_dim: int = 128,
        hidden_act: str = "silu",
        attention_dropout: float = 0.0,
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 0.00000015625,
        use_cache: bool = True,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        pad_token_id: int | None = 151329,
        eos_token_id: int | list[int] | None = (151329, 151336, 151338),
        bos_token_id: int | None = None,
        attention_bias: bool = True,
        **kwargs: Any,
    ):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.partial_rotary_factor = partial_rotary_factor
        self.head_dim = head_dim
        self.num_key_value_heads = (
            num_key_value_heads if num_key_value_heads is not None else num_attention_heads
        )
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        eos = list(eos_token_id) if isinstance(eos_token_id, (list, tuple)) else eos_token_id
        super().__init__(
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )
        get_activation(self.hidden_act)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if int(self.head_dim * self.partial_rotary_factor) % 2:
            raise ConfigError("head_dim * partial_rotary_factor must be even")


class GlmMLP(nn.Module):
    def __init__(self, config: GlmConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.activation_fn = get_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))


class GlmAttention(nn.Module):
    def __init__(self, config: GlmConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        C, H, Hkv, D = config.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(C, H * D, bias=config.attention_bias)
        self.k_proj = nn.Linear(C, Hkv * D, bias=config.attention_bias)
        self.v_proj = nn.Linear(C, Hkv * D, bias=config.attention_bias)
        self.o_proj = nn.Linear(H * D, C, bias=False)

    def forward(self, x, cos, sin, mask, cache, output_attentions=False):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin, interleaved=True), apply_rotary(k, cos, sin, interleaved=True)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out, weights = attention(
            q, k, v, mask,
            scale=self.head_dim**-0.5,
            dropout_p=self.config.attention_dropout if self.training else 0.0,
            impl=self.config._attn_implementation,
            return_weights=output_attentions,
        )  # fmt: skip
        return self.o_proj(out), weights


class GlmDecoderLayer(nn.Module):
    def __init__(self, config: GlmConfig, layer_idx: int):
        super().__init__()
        self.self_attn = GlmAttention(config, layer_idx)
        self.mlp = GlmMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache, output_attentions=False):
        attn, weights = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, output_attentions)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, weights


class GlmModel(PreTrainedModel):
    """The decoder stack without a head: returns last_hidden_state (after the final norm)."""

    config_class = GlmConfig

    def __init__(self, config: GlmConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList(GlmDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            dim=int(config.head_dim * config.partial_rotary_factor),
            base=config.rope_theta,
            max_position_embeddings=config.max_position_embeddings,
            scaling=config.rope_scaling,
        )
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> BaseModelOutputWithPast | tuple:
        cfg = self.config
        use_cache = (cfg.use_cache and not self.training) if use_cache is None else use_cache
        output_attentions = cfg.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (
            cfg.output_hidden_states if output_hidden_states is None else output_hidden_states
        )
        inp = prepare_decoder_inputs(
            self.embed_tokens,
            input_ids,
            inputs_embeds,
            position_ids,
            past_key_values,
            cache_position,
            use_cache,
        )
        x = inp.hidden
        B, T, _ = x.shape
        mask = build_attention_mask(attention_mask, inp.cache_position, inp.past_length + T, B)
        cos, sin = self.rotary_emb(inp.position_ids, x.dtype)
        all_hidden, all_attn = [], []
        for layer in self.layers:
            if output_hidden_states:
                all_hidden.append(x)
            if self.gradient_checkpointing and self.training:
                x, weights = checkpoint(
                    layer, x, cos, sin, mask, inp.cache, output_attentions, use_reentrant=False
                )
            else:
                x, weights = layer(x, cos, sin, mask, inp.cache, output_attentions)
            if output_attentions:
                all_attn.append(weights)
        x = self.norm(x)
        if output_hidden_states:
            all_hidden.append(x)
        out = BaseModelOutputWithPast(
            last_hidden_state=x,
            past_key_values=inp.cache if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(all_attn) if output_attentions else None,
        )
        return out if (cfg.return_dict if return_dict is None else return_dict) else out.to_tuple()


class GlmForCausalLM(ForCausalLM):
    config_class = GlmConfig
    base_model_class = GlmModel


class GlmForSequenceClassification(ForSequenceClassification):
    config_class = GlmConfig
    base_model_class = GlmModel


class GlmForTokenClassification(ForTokenClassification):
    config_class = GlmConfig
    base_model_class = GlmModel
