"""GLM-4 (THUDM glm-4-9b / -chat, Hugging Face "glm" layout).

Pre-norm decoder: RMSNorm, grouped-query attention with q/k/v bias and partial *interleaved* RoPE
(channels (0,1), (2,3), … of the first head_dim * partial_rotary_factor), fused gate_up SwiGLU MLP.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..cache import Cache
from ..checkpoint import CheckpointError, WeightReader
from ..config import ConfigError, PretrainedConfig
from ..heads import ForCausalLM, ForSequenceClassification, ForTokenClassification
from ..layers import Linear, RMSNorm, RotaryEmbedding, Rotation, apply_rotary, attention, get_activation
from ..modeling import DecoderModel, run_layers


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

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> GlmConfig:
        """Also accepts the original THUDM release's config (model_type "chatglm"), translated first."""
        if config_dict.get("model_type") == "chatglm":
            config_dict = chatglm_config_to_glm(config_dict)
        return super().from_dict(config_dict, **overrides)


class GlmMLP(nn.Module):
    def __init__(self, config: GlmConfig):
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
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
        self.q_proj = Linear(C, H * D, bias=config.attention_bias)
        self.k_proj = Linear(C, Hkv * D, bias=config.attention_bias)
        self.v_proj = Linear(C, Hkv * D, bias=config.attention_bias)
        self.o_proj = Linear(H * D, C, bias=False)

    def forward(self, x: torch.Tensor, rot: Rotation, mask: torch.Tensor | None, cache: Cache | None,
                output_attentions: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
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
        return self.o_proj(out), weights


class GlmDecoderLayer(nn.Module):
    def __init__(self, config: GlmConfig, layer_idx: int):
        super().__init__()
        self.self_attn = GlmAttention(config, layer_idx)
        self.mlp = GlmMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, x, rot, mask, cache, output_attentions=False):
        attn, weights = self.self_attn(self.input_layernorm(x), rot, mask, cache, output_attentions)
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, weights


class ChatGLMCheckpointMixin:
    """Lets every GLM class load the original THUDM checkpoints (`transformer.encoder.…` names)."""

    @classmethod
    def adapt_checkpoint(cls, reader: WeightReader, config: GlmConfig) -> WeightReader:
        if any(name.startswith("transformer.") for name in reader.keys()):
            return ChatGLMWeights(reader, config)
        return reader


class GlmModel(ChatGLMCheckpointMixin, DecoderModel):
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

    def core(self, x, positions, mask, cache, trace=None):
        """(B, T, C) embeddings at positions (B, T) -> (B, T, C) after the final norm."""
        rot = self.rotary_emb.rotation(positions, x.dtype, True, self.config.head_dim)  # (B, 1, T, ...) tables
        return self.norm(run_layers(self.layers, x, (rot, mask, cache), trace))


class GlmForCausalLM(ChatGLMCheckpointMixin, ForCausalLM):
    config_class = GlmConfig
    base_model_class = GlmModel


class GlmForSequenceClassification(ChatGLMCheckpointMixin, ForSequenceClassification):
    config_class = GlmConfig
    base_model_class = GlmModel


class GlmForTokenClassification(ChatGLMCheckpointMixin, ForTokenClassification):
    config_class = GlmConfig
    base_model_class = GlmModel


# ---- the original THUDM release layout (model_type "chatglm") --------------------------------------------

# settings the GLM classes implement one way only; a checkpoint asking for the other would load into garbage
CHATGLM_FIXED = {
    "rmsnorm": True,
    "apply_residual_connection_post_layernorm": False,
    "post_layer_norm": True,
    "add_bias_linear": False,
    "original_rope": True,
}
# keys without effect on inference math (dropouts, fusions, precision switches) or pointing at remote code.
# apply_query_key_layer_scaling divides the scores by the layer number and multiplies them back before softmax.
CHATGLM_DROPPED = (
    "hidden_dropout", "classifier_dropout", "bias_dropout_fusion", "apply_query_key_layer_scaling",
    "attention_softmax_in_fp32", "fp32_residual_connection", "prefix_projection", "auto_map", "vocab_size",
    "num_hidden_layers", "architectures", "_name_or_path",
)  # fmt: skip
CHATGLM_NAMES = (  # (original name prefix, HF name prefix), anchored at the start
    (r"transformer\.embedding\.word_embeddings\.", "model.embed_tokens."),
    (r"transformer\.encoder\.final_layernorm\.", "model.norm."),
    (r"transformer\.output_layer\.", "lm_head."),
    (r"transformer\.encoder\.layers\.(\d+)\.self_attention\.dense\.", r"model.layers.\1.self_attn.o_proj."),
    (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_h_to_4h\.", r"model.layers.\1.mlp.gate_up_proj."),
    (r"transformer\.encoder\.layers\.(\d+)\.mlp\.dense_4h_to_h\.", r"model.layers.\1.mlp.down_proj."),
    (r"transformer\.encoder\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.", r"model.layers.\1.\2."),
)
CHATGLM_QKV = re.compile(r"transformer\.encoder\.layers\.(\d+)\.self_attention\.query_key_value\.(weight|bias)")
CHATGLM_IGNORED = re.compile(r"transformer\.rotary_pos_emb\.inv_freq")


def chatglm_config_to_glm(data: dict[str, Any]) -> dict[str, Any]:
    """Translate an original GLM-4 config.json (model_type "chatglm") into GlmConfig keys. Absent keys take
    the reference ChatGLMConfig's defaults; rope base = 10000 * rope_ratio over half of each head."""
    src = dict(data)
    src.pop("model_type", None)
    for key, implemented in CHATGLM_FIXED.items():
        if bool(src.pop(key, implemented)) != implemented:
            raise ConfigError(
                f"chatglm config {key}={data[key]!r} changes the model's math and is not implemented "
                f"by glmkit's GLM classes (they implement {key}={implemented})"
            )
    if src.pop("pre_seq_len", None) is not None:
        raise ConfigError("chatglm config pre_seq_len (prefix tuning) is not implemented by glmkit")
    if "vision_config" in src:
        raise ConfigError("GLM-4V (a chatglm config with vision_config) is not supported by glmkit")
    for key in CHATGLM_DROPPED:
        src.pop(key, None)
    heads = src.pop("num_attention_heads", 32)
    multi_query, groups = src.pop("multi_query_attention", False), src.pop("multi_query_group_num", 1)
    glm = dict(
        vocab_size=src.pop("padded_vocab_size", 65024),
        hidden_size=src.pop("hidden_size", 4096),
        intermediate_size=src.pop("ffn_hidden_size", 13696),
        num_hidden_layers=src.pop("num_layers", 28),
        num_attention_heads=heads,
        num_key_value_heads=groups if multi_query else heads,
        head_dim=src.pop("kv_channels", 128),
        partial_rotary_factor=0.5,
        rms_norm_eps=src.pop("layernorm_epsilon", 1e-5),
        rope_theta=10000.0 * src.pop("rope_ratio", 1),
        attention_bias=src.pop("add_qkv_bias", False),
        max_position_embeddings=src.pop("seq_length", 2048),
        tie_word_embeddings=src.pop("tie_word_embeddings", False),
        pad_token_id=src.pop("pad_token_id", None),
        eos_token_id=src.pop("eos_token_id", None),
        architectures=["GlmForCausalLM"],
    )
    return {**src, **glm, "model_type": "glm"}


def chatglm_weight_plan(names: Iterable[str], config: GlmConfig) -> dict[str, tuple[str, slice | None]]:
    """HF name -> (original name, rows to take or None for all) for an original GLM-4 checkpoint.

    query_key_value rows are [q (H*D); k (Hkv*D); v (Hkv*D)] and split plainly: the original rotates
    interleaved pairs over the first half of each head exactly as GlmAttention does, so q/k need no
    permutation. Unknown names pass through unchanged, to be reported as unexpected.
    """
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    parts = {"q_proj": slice(0, q), "k_proj": slice(q, q + kv), "v_proj": slice(q + kv, q + 2 * kv)}
    plan: dict[str, tuple[str, slice | None]] = {}
    for name in names:
        if CHATGLM_IGNORED.fullmatch(name):
            continue
        if match := CHATGLM_QKV.fullmatch(name):
            for proj, rows in parts.items():
                plan[f"model.layers.{match[1]}.self_attn.{proj}.{match[2]}"] = (name, rows)
            continue
        new = name
        for pattern, replacement in CHATGLM_NAMES:
            new, found = re.subn("^" + pattern, replacement, name)
            if found:
                break
        plan[new] = (name, None)
    return plan


def convert_chatglm_state_dict(state_dict: dict[str, torch.Tensor], config: GlmConfig) -> dict[str, torch.Tensor]:
    """An original GLM-4 state dict in the HF "glm" layout (in memory; loading does this lazily)."""
    plan = chatglm_weight_plan(state_dict, config)
    return {new: state_dict[old] if rows is None else state_dict[old][rows] for new, (old, rows) in plan.items()}


class ChatGLMWeights:
    """A WeightReader look-alike over an original GLM-4 checkpoint that shows HF names and shapes. Nothing
    is read before `get`; each fused query_key_value is read once and sliced into q, k and v."""

    def __init__(self, reader: WeightReader, config: GlmConfig):
        self.reader, self.directory, self.files = reader, reader.directory, reader.files
        self.plan = chatglm_weight_plan(reader.keys(), config)
        self._fused: tuple[str, torch.Tensor] | None = None
        rows = (config.num_attention_heads + 2 * config.num_key_value_heads) * config.head_dim
        fused = sorted({old for old, part in self.plan.values() if part is not None})
        bad = [f"{old} {tuple(reader.shape(old))}" for old in fused if reader.shape(old)[0] != rows]
        if bad:
            raise CheckpointError(
                f"checkpoint in {reader.directory}: query_key_value must have (num_attention_heads + "
                f"2 * num_key_value_heads) * head_dim = {rows} rows; got {', '.join(bad)}"
            )

    def keys(self) -> list[str]:
        return list(self.plan)

    def shape(self, name: str) -> tuple[int, ...]:
        old, rows = self.plan[name]
        shape = tuple(self.reader.shape(old))
        return shape if rows is None else (rows.stop - rows.start, *shape[1:])

    def dtype(self, name: str) -> torch.dtype | None:
        return self.reader.dtype(self.plan[name][0])

    def floating_dtype(self) -> torch.dtype | None:
        return self.reader.floating_dtype()

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        old, rows = self.plan[name]
        if rows is None:
            return self.reader.get(old) if dtype is None else self.reader.get(old, dtype)
        if self._fused is None or self._fused[0] != old:  # q, k, v are asked for in a row
            self._fused = (old, self.reader.get(old))
        part = self._fused[1][rows]
        # own storage either way: safetensors refuses to save tensors that share it
        return part.to(dtype) if dtype is not None and part.dtype != dtype else part.clone()
