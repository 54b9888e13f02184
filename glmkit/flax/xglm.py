"""XGLM in Flax (flax.linen), parameter for parameter the reference's FlaxXGLM* pytree.

The modules are pure: (ids, positions, mask, cache) -> (hidden, new cache), where the cache is a pytree
of preallocated (B, S, H, D) buffers plus the index of the next free slot. `generate` runs prefill and the
whole decode loop (`lax.while_loop`) in one jitted function: one compile per shape, none per token.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.serialization import msgpack_restore, to_bytes
from flax.traverse_util import flatten_dict, unflatten_dict

from ..checkpoint import CheckpointError
from ..generation.config import GenerationConfig
from ..interop import (
    DecodeSettings,
    check_positions,
    checkpoint_dir,
    generation_config,
    position_table,
    prepare_generation,
    read_state_dict,
)
from ..models.xglm import XGLMConfig
from ..outputs import BaseModelOutputWithPastAndCrossAttentions, CausalLMOutputWithCrossAttentions

FLAX_WEIGHTS = "flax_model.msgpack"
Cache = dict[str, Any]  # {"key": (L x (B, S, H, D)), "value": same, "index": int32 scalar}


def _position_table(config: XGLMConfig) -> np.ndarray:
    """Built once per shape as numpy (a jnp array made inside a trace would leak its tracer)."""
    key = (config.max_position_embeddings, config.d_model, config.pad_token_id)
    if key not in _TABLES:
        _TABLES[key] = position_table(config)
    return _TABLES[key]


_TABLES: dict[tuple, np.ndarray] = {}


def _act(name: str):
    acts = {"gelu": partial(jax.nn.gelu, approximate=False), "gelu_new": jax.nn.gelu, "relu": jax.nn.relu,
            "silu": jax.nn.silu, "swish": jax.nn.silu, "tanh": jnp.tanh}  # fmt: skip
    if name not in acts:
        raise ValueError(f"activation_function {name!r} is not implemented in glmkit.flax (have {sorted(acts)})")
    return acts[name]


class FlaxXGLMAttention(nn.Module):
    """Multi-head attention over this chunk's keys, or over the whole cache buffer when one is given."""

    config: XGLMConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        C = self.config.d_model
        dense = partial(nn.Dense, C, dtype=self.dtype, kernel_init=nn.initializers.normal(self.config.init_std))
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = dense(), dense(), dense(), dense()
        self.dropout = nn.Dropout(self.config.attention_dropout)

    def _heads(self, x: jnp.ndarray) -> jnp.ndarray:
        B, S, C = x.shape
        H = self.config.attention_heads
        return x.reshape(B, S, H, C // H)  # (B, S, H, D)

    def __call__(self, x, allowed, kv_states=None, cache_kv=None, index=None, deterministic=True):
        """x (B, T, C); allowed bool (B, 1, T, S); cache_kv: this layer's (B, S, H, D) buffers, written at
        `index`. Returns (out (B, T, C), weights (B, H, T, S), updated buffers or None)."""
        q = self._heads(self.q_proj(x)) / jnp.sqrt(x.shape[-1] // self.config.attention_heads).astype(self.dtype)
        src = x if kv_states is None else kv_states
        k, v = self._heads(self.k_proj(src)), self._heads(self.v_proj(src))
        if cache_kv is not None:
            k = jax.lax.dynamic_update_slice(cache_kv[0], k.astype(cache_kv[0].dtype), (0, index, 0, 0))
            v = jax.lax.dynamic_update_slice(cache_kv[1], v.astype(cache_kv[1].dtype), (0, index, 0, 0))
        scores = jnp.einsum("bthd,bshd->bhts", q, k)
        scores = jnp.where(allowed, scores, jnp.finfo(scores.dtype).min)  # all-masked rows: uniform, as the reference
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(self.dtype)
        attn = self.dropout(weights, deterministic=deterministic)
        out = jnp.einsum("bhts,bshd->bthd", attn, v)
        B, T = out.shape[:2]
        return self.out_proj(out.reshape(B, T, -1)), weights, (k, v) if cache_kv is not None else None


class FlaxXGLMDecoderLayer(nn.Module):
    config: XGLMConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        c = self.config
        norm = partial(nn.LayerNorm, epsilon=1e-5, dtype=self.dtype)
        dense = partial(nn.Dense, dtype=self.dtype, kernel_init=nn.initializers.normal(c.init_std))
        self.self_attn = FlaxXGLMAttention(c, self.dtype)
        self.self_attn_layer_norm = norm()
        if c.add_cross_attention:
            self.encoder_attn = FlaxXGLMAttention(c, self.dtype)
            self.encoder_attn_layer_norm = norm()
        self.fc1, self.fc2 = dense(c.ffn_dim), dense(c.d_model)
        self.final_layer_norm = norm()
        self.dropout, self.activation_dropout = nn.Dropout(c.dropout), nn.Dropout(c.activation_dropout)
        self.act = _act(c.activation_function)

    def __call__(self, x, allowed, enc=None, cache_kv=None, index=None, deterministic=True):
        h, weights, cache_kv = self.self_attn(self.self_attn_layer_norm(x), allowed, None, cache_kv, index,
                                              deterministic)  # fmt: skip
        x = x + self.dropout(h, deterministic=deterministic)
        cross = None
        if enc is not None:
            h, cross, _ = self.encoder_attn(self.encoder_attn_layer_norm(x), enc[1], enc[0],
                                            deterministic=deterministic)  # fmt: skip
            x = x + self.dropout(h, deterministic=deterministic)
        h = self.activation_dropout(self.act(self.fc1(self.final_layer_norm(x))), deterministic=deterministic)
        x = x + self.dropout(self.fc2(h), deterministic=deterministic)
        return x, weights, cross, cache_kv


class _Layers(nn.Module):
    """Holds the layers as children "0", "1", …: the reference's `layers/{i}` parameter paths."""

    config: XGLMConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.layers = [FlaxXGLMDecoderLayer(c, self.dtype, name=str(i)) for i in range(c.num_layers)]

    def __call__(self, x, allowed, enc, cache, deterministic, trace):
        kvs = []
        for i, layer in enumerate(self.layers):
            trace["hidden"].append(x)
            kv = (cache["key"][i], cache["value"][i]) if cache is not None else None
            index = cache["index"] if cache is not None else None
            x, weights, cross, kv = layer(x, allowed, enc, kv, index, deterministic)
            trace["attn"].append(weights)
            trace["cross"].append(cross)
            kvs.append(kv)
        new_cache = None
        if cache is not None:
            T = x.shape[1]
            new_cache = {"key": tuple(k for k, _ in kvs), "value": tuple(v for _, v in kvs),
                         "index": cache["index"] + T}  # fmt: skip
        return x, new_cache


class FlaxXGLMModule(nn.Module):
    """The decoder stack: (B, T) ids or (B, T, C) embeddings at positions (B, T) -> (B, T, C) after the final
    LayerNorm, plus every layer's input, attention weights and the updated cache."""

    config: XGLMConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        c = self.config
        self.embed_tokens = nn.Embed(c.vocab_size, c.d_model, embedding_init=nn.initializers.normal(c.init_std))
        self.embed_scale = math.sqrt(c.d_model) if c.scale_embedding else 1.0
        self.positions = _position_table(c)
        self.dropout = nn.Dropout(c.dropout)
        self.layers = _Layers(c, self.dtype)
        self.layer_norm = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype)

    def __call__(self, input_ids, position_ids, attention_mask, cache=None, inputs_embeds=None,
                 encoder_hidden_states=None, encoder_attention_mask=None, deterministic=True):  # fmt: skip
        x = self.embed_tokens(input_ids) * self.embed_scale if inputs_embeds is None else inputs_embeds
        x = x + jnp.take(self.positions, position_ids + 2, axis=0).astype(x.dtype)
        x = self.dropout(x.astype(self.dtype), deterministic=deterministic)
        B, T = x.shape[:2]
        start = cache["index"] if cache is not None else 0
        S = attention_mask.shape[1]
        # key s is visible to query t when it is at or before t's slot and not padding
        causal = jnp.arange(S)[None, :] <= start + jnp.arange(T)[:, None]  # (T, S)
        allowed = causal[None, None] & (attention_mask[:, None, None, :] > 0)  # (B, 1, T, S)
        enc = None
        if encoder_hidden_states is not None:
            enc_mask = encoder_attention_mask[:, None, None, :] > 0  # (B, 1, 1, S_enc)
            enc = (encoder_hidden_states.astype(self.dtype), jnp.broadcast_to(enc_mask, (B, 1, T, enc_mask.shape[-1])))
        trace: dict[str, list] = {"hidden": [], "attn": [], "cross": []}
        x, cache = self.layers(x, allowed, enc, cache, deterministic, trace)
        x = self.layer_norm(x)
        return x, (*trace["hidden"], x), trace, cache

    def embed(self, input_ids):
        return self.embed_tokens(input_ids) * self.embed_scale

    def attend(self, x):
        return self.embed_tokens.attend(x)


class FlaxXGLMForCausalLMModule(nn.Module):
    config: XGLMConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.model = FlaxXGLMModule(self.config, self.dtype)
        if not self.config.tie_word_embeddings:
            self.lm_head = nn.Dense(self.config.vocab_size, use_bias=False, dtype=self.dtype,
                                    kernel_init=nn.initializers.normal(self.config.init_std))  # fmt: skip

    def __call__(self, *args, **kwargs):
        x, hidden, trace, cache = self.model(*args, **kwargs)
        logits = self.model.attend(x) if self.config.tie_word_embeddings else self.lm_head(x)
        return logits, hidden, trace, cache


def causal_lm_loss(logits: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """Mean next-token cross entropy in fp32 over labels != -100 (the PyTorch model's shift and ignore index)."""
    logits, labels = logits[:, :-1].astype(jnp.float32), labels[:, 1:]
    valid = labels != -100
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return -(picked * valid).sum() / jnp.maximum(valid.sum(), 1)


@dataclass
class FlaxGenerateOutput:
    """`sequences`: (B * num_return_sequences, max_length) prompt + new tokens, pad_token_id after each row's end
    (the reference's); `scores`: beam search's length-penalised sequence scores (B * num_return_sequences,)."""

    sequences: jnp.ndarray
    scores: jnp.ndarray | None = None


class FlaxXGLMPreTrainedModel:
    """A module, its params pytree and the HF methods: __call__ with the reference's keywords,
    init_cache, from_pretrained / save_pretrained, generate."""

    module_class: type[nn.Module]

    def __init__(self, config: XGLMConfig, params: dict | None = None, seed: int = 0, dtype: jnp.dtype = jnp.float32):
        self.config, self.dtype = config, dtype
        self.module = self.module_class(config, dtype)
        self.params = params if params is not None else self.init_weights(jax.random.PRNGKey(seed))
        self.generation_config = GenerationConfig.from_model_config(config)
        self._decoders: dict[tuple, Any] = {}

    def init_weights(self, rng: jax.Array) -> dict:
        """Random params (normal(init_std) kernels); cross-attention ones too when the config has it."""
        ids = jnp.zeros((1, 1), jnp.int32)
        enc = jnp.zeros((1, 1, self.config.d_model), self.dtype) if self.config.add_cross_attention else None
        variables = self.module.init(rng, ids, ids, ids + 1, encoder_hidden_states=enc, encoder_attention_mask=ids + 1)
        return variables["params"]

    def param_shapes(self) -> dict:
        return jax.eval_shape(lambda: self.init_weights(jax.random.PRNGKey(0)))

    def init_cache(self, batch_size: int, max_length: int) -> Cache:
        """Zeroed key / value buffers for `max_length` positions (prompt + new tokens) and index 0."""
        c = self.config
        shape = (batch_size, max_length, c.attention_heads, c.d_model // c.attention_heads)
        zeros = tuple(jnp.zeros(shape, self.dtype) for _ in range(c.num_layers))
        return {"key": zeros, "value": zeros, "index": jnp.array(0, jnp.int32)}

    def _inputs(self, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values):
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        input_ids = np.asarray(input_ids) if input_ids is not None else None
        B, T = (input_ids if input_ids is not None else inputs_embeds).shape[:2]
        if input_ids is not None and input_ids.size:
            if input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) (vocab_size)")
        start = int(past_key_values["index"]) if past_key_values is not None else 0
        if position_ids is None:  # the reference's arange; continued from the cache
            position_ids = np.broadcast_to(np.arange(start, start + T)[None], (B, T))
        check_positions(position_ids, self.config)
        S = past_key_values["key"][0].shape[1] if past_key_values is not None else T
        if past_key_values is not None and start + T > S:
            raise ValueError(f"the cache holds {S} positions; {start} are used and {T} more do not fit")
        mask = np.ones((B, S), np.int32)
        if attention_mask is not None:
            given = np.asarray(attention_mask)
            if given.ndim != 2 or given.shape[0] != B or not (start + T <= given.shape[1] <= S):
                raise ValueError(f"attention_mask must have shape ({B}, n) with {start + T} <= n <= {S}, "
                                 f"got {given.shape}")  # fmt: skip
            mask[:, : given.shape[1]] = given
        return (jnp.asarray(input_ids, jnp.int32) if input_ids is not None else jnp.zeros((B, T), jnp.int32),
                jnp.asarray(position_ids, jnp.int32), jnp.asarray(mask))  # fmt: skip

    def _run(self, input_ids=None, attention_mask=None, position_ids=None, encoder_hidden_states=None,
             encoder_attention_mask=None, train=False, params=None, past_key_values=None, dropout_rng=None,
             inputs_embeds=None):  # fmt: skip
        ids, positions, mask = self._inputs(input_ids, inputs_embeds, attention_mask, position_ids, past_key_values)
        if encoder_hidden_states is not None:
            if not self.config.add_cross_attention:
                raise ValueError("encoder_hidden_states given, but config.add_cross_attention is False")
            if encoder_attention_mask is None:
                encoder_attention_mask = jnp.ones(encoder_hidden_states.shape[:2], jnp.int32)
        if train and dropout_rng is None:
            raise ValueError("train=True needs dropout_rng (a jax.random key) for dropout")
        rngs = {"dropout": dropout_rng} if train else {}
        return self.module.apply(
            {"params": params if params is not None else self.params}, ids, positions, mask, past_key_values,
            inputs_embeds, encoder_hidden_states, encoder_attention_mask, deterministic=not train, rngs=rngs,
        )  # fmt: skip

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, dtype: jnp.dtype = jnp.float32, **kwargs: Any):
        """Load flax_model.msgpack when present, else the PyTorch weights (safetensors through numpy;
        pytorch_model.bin with torch.load(weights_only=True)). Config overrides go in kwargs."""
        directory = checkpoint_dir(name_or_path, kwargs)
        config = XGLMConfig.from_pretrained(directory, **kwargs)
        model = cls(config, params={}, dtype=dtype)
        if (directory / FLAX_WEIGHTS).is_file():
            try:
                flat = flatten_dict(msgpack_restore((directory / FLAX_WEIGHTS).read_bytes()))
            except Exception as err:
                raise CheckpointError(f"cannot read {directory / FLAX_WEIGHTS}: {err}") from err
        else:
            flat = {tuple(_flax_path(k, v.ndim)): _flax_value(k, v) for k, v in read_state_dict(directory).items()
                    if "embed_positions" not in k}  # fmt: skip
        model.params = model._match(flat)
        model.generation_config = generation_config(directory, config)
        return model

    def _match(self, flat: dict[tuple, np.ndarray]) -> dict:
        """Checkpoint entries -> this class's pytree (adding or dropping the base-model prefix), in self.dtype;
        missing, unexpected or mis-shaped entries are a CheckpointError naming them."""
        expected = flatten_dict(self.param_shapes())
        prefix = "model"  # the reference's base_model_prefix: present in CausalLM files, absent in bare ones
        has_prefix = any(k[0] == prefix for k in flat)
        wants_prefix = any(k[0] == prefix for k in expected)
        flat = {(k[1:] if has_prefix and not wants_prefix and k[0] == prefix else
                 (prefix, *k) if wants_prefix and not has_prefix and k[0] != "lm_head" else k): v
                for k, v in flat.items()}  # fmt: skip
        if self.config.tie_word_embeddings:
            flat.pop(("lm_head", "kernel"), None)
        missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
        unexpected = sorted("/".join(k) for k in flat.keys() - expected.keys())
        wrong = sorted(f"{'/'.join(k)}: {np.shape(flat[k])} != {expected[k].shape}"
                       for k in expected.keys() & flat.keys() if tuple(np.shape(flat[k])) != tuple(expected[k].shape))
        if missing or unexpected or wrong:
            raise CheckpointError(f"weights do not match {type(self).__name__}: missing {missing[:8]}, "
                                  f"unexpected {unexpected[:8]}, wrong shape {wrong[:8]}")  # fmt: skip
        return unflatten_dict({k: jnp.asarray(flat[k], self.dtype) for k in expected})

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """config.json, generation_config.json and flax_model.msgpack (the reference's Flax file)."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(path)
        self.generation_config.save_pretrained(path)
        tmp = path / (FLAX_WEIGHTS + ".tmp")
        tmp.write_bytes(to_bytes(jax.tree_util.tree_map(np.asarray, self.params)))
        tmp.replace(path / FLAX_WEIGHTS)


def _flax_path(name: str, ndim: int) -> list[str]:
    """HF PyTorch name -> Flax param path: Linear weight -> kernel, LayerNorm weight -> scale,
    embed_tokens.weight -> embedding."""
    *module, leaf = name.split(".")
    if leaf == "weight":
        leaf = "embedding" if module[-1] == "embed_tokens" else "kernel" if ndim == 2 else "scale"
    return [*module, leaf]


def _flax_value(name: str, value: np.ndarray) -> np.ndarray:
    return value.T if name.endswith(".weight") and value.ndim == 2 and "embed_tokens" not in name else value


class FlaxXGLMModel(FlaxXGLMPreTrainedModel):
    """The bare decoder: last_hidden_state after the final LayerNorm (the reference's FlaxXGLMModel)."""

    module_class = FlaxXGLMModule

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, encoder_hidden_states=None,
                 encoder_attention_mask=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                 train=False, params=None, past_key_values=None, dropout_rng=None, inputs_embeds=None):  # fmt: skip
        """The reference's keywords, plus inputs_embeds; with past_key_values (from init_cache) the updated
        cache comes back as `past_key_values`."""
        x, hidden, trace, cache = self._run(input_ids, attention_mask, position_ids, encoder_hidden_states,
                                            encoder_attention_mask, train, params, past_key_values, dropout_rng,
                                            inputs_embeds)  # fmt: skip
        out = BaseModelOutputWithPastAndCrossAttentions(
            last_hidden_state=x, past_key_values=cache, **_extras(self.config, trace, hidden, output_attentions,
                                                                  output_hidden_states, encoder_hidden_states))
        return out if return_dict is not False else out.to_tuple()


class FlaxXGLMForCausalLM(FlaxXGLMPreTrainedModel):
    """Decoder + lm_head tied to the token embedding; `labels` give the shifted next-token loss."""

    module_class = FlaxXGLMForCausalLMModule

    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, encoder_hidden_states=None,
                 encoder_attention_mask=None, output_attentions=None, output_hidden_states=None, return_dict=None,
                 train=False, params=None, past_key_values=None, dropout_rng=None, inputs_embeds=None,
                 labels=None):  # fmt: skip
        logits, hidden, trace, cache = self._run(input_ids, attention_mask, position_ids, encoder_hidden_states,
                                                 encoder_attention_mask, train, params, past_key_values,
                                                 dropout_rng, inputs_embeds)  # fmt: skip
        loss = causal_lm_loss(logits, jnp.asarray(labels)) if labels is not None else None
        out = CausalLMOutputWithCrossAttentions(
            loss=loss, logits=logits, past_key_values=cache, **_extras(self.config, trace, hidden, output_attentions,
                                                                       output_hidden_states, encoder_hidden_states))
        return out if return_dict is not False else out.to_tuple()

    def generate(self, input_ids: Any, attention_mask: Any = None, generation_config: Any = None,
                 prng_key: jax.Array | None = None, params: dict | None = None, **kwargs: Any) -> FlaxGenerateOutput:
        """Greedy, sampled (temperature, top_k, top_p) or beam search (num_beams, length_penalty, early_stopping,
        num_return_sequences: the reference's FlaxGenerationMixin algorithm) decoding, left padding allowed.
        Sampling with num_return_sequences draws that many rows per prompt (the Flax reference ignores it; the TF
        and PyTorch ones do this). Prefill and the decode loop are one jitted function per (batch, prompt length,
        settings)."""
        ids, mask, settings = prepare_generation(generation_config or self.generation_config, input_ids,
                                                 attention_mask, self.config.max_position_embeddings, kwargs)
        key = (settings, ids.shape)
        if key not in self._decoders:
            decoder = _beam_search if settings.num_beams > 1 else _decode
            self._decoders[key] = jax.jit(partial(decoder, self, settings))
        rng = prng_key if prng_key is not None else jax.random.PRNGKey(0)
        out = self._decoders[key](params if params is not None else self.params, jnp.asarray(ids), jnp.asarray(mask),
                                  rng)  # fmt: skip
        return FlaxGenerateOutput(*out) if isinstance(out, tuple) else FlaxGenerateOutput(out)


def _extras(config, trace, hidden, output_attentions, output_hidden_states, encoder_hidden_states) -> dict:
    attentions = output_attentions if output_attentions is not None else config.output_attentions
    hiddens = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
    return {
        "hidden_states": hidden if hiddens else None,
        "attentions": tuple(trace["attn"]) if attentions else None,
        "cross_attentions": tuple(trace["cross"]) if attentions and encoder_hidden_states is not None else None,
    }


def _choose(logits, rng, do_sample, temperature, top_k, top_p):
    """Next token per row: argmax, or a draw after temperature, top-k and top-p (the reference's order)."""
    if not do_sample:
        return jnp.argmax(logits, axis=-1)
    logits = logits.astype(jnp.float32) / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        probs = jax.nn.softmax(jnp.take_along_axis(logits, order, -1), axis=-1)
        drop_sorted = jnp.cumsum(probs, axis=-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(drop_sorted)
        logits = jnp.where(drop, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1)


def _prefill(model, params, ids, mask, total):
    """The prompt through a fresh (B, total) cache: (last logits, cache, mask over all slots, next positions)."""
    B, P = ids.shape
    cache = model.init_cache(B, total)
    full_mask = jnp.concatenate([mask, jnp.ones((B, total - P), mask.dtype)], axis=1)
    positions = jnp.cumsum(mask, axis=-1) - 1  # the reference's generate: pads sit at -1 (the zero row)
    logits, _, _, cache = model.module.apply({"params": params}, ids, positions, full_mask, cache)
    return logits[:, -1], cache, full_mask, positions[:, -1:] + 1


def _decode(model, s: DecodeSettings, params, ids, mask, rng):
    """Prefill the prompt into a (B, total) cache, then one token per while_loop iteration."""
    B, P = ids.shape
    logits, cache, full_mask, position = _prefill(model, params, ids, mask, s.total)
    apply = partial(model.module.apply, {"params": params})
    sequences = jnp.full((B, s.total), s.pad, jnp.int32).at[:, :P].set(ids)
    eos_arr = jnp.asarray(s.eos or (-1,), jnp.int32)

    def step(state):
        sequences, cache, logits, position, finished, cur, rng = state
        rng, draw = jax.random.split(rng)
        token = _choose(logits, draw, s.do_sample, s.temperature, s.top_k, s.top_p).astype(jnp.int32)
        token = jnp.where(finished, s.pad, token)
        sequences = jax.lax.dynamic_update_slice(sequences, token[:, None], (0, cur))
        finished = finished | jnp.isin(token, eos_arr)
        logits, _, _, cache = apply(token[:, None], position, full_mask, cache)
        return sequences, cache, logits[:, -1], position + 1, finished, cur + 1, rng

    def running(state):
        return (state[5] < s.total) & ~jnp.all(state[4])

    state = (sequences, cache, logits, position, jnp.zeros(B, bool), jnp.array(P, jnp.int32), rng)
    return jax.lax.while_loop(running, step, state)[0]


BEAM_NEG = -1.0e7  # the reference's (Flax) score of an empty or excluded hypothesis


def _beam_search(model, s: DecodeSettings, params, ids, mask, _rng):  # no draws: _rng keeps _decode's signature
    """The reference's Flax beam search: each step keeps the top 2K continuations of the K running beams, the
    top K without EOS keep running (their cache rows gathered from the parent beams), and the EOS-ended ones
    compete (score / new-length ** length_penalty) for the K finished slots. Returns (sequences, scores)."""
    B, P = ids.shape
    K, total, lp = s.num_beams, s.total, s.length_penalty
    logits, cache, full_mask, position = _prefill(model, params, jnp.repeat(ids, K, 0), jnp.repeat(mask, K, 0), total)
    apply = partial(model.module.apply, {"params": params})
    eos_arr = jnp.asarray(s.eos or (-1,), jnp.int32)
    batch_rows = jnp.arange(B)[:, None]

    def select(cur, running, running_scores, sequences, scores, finished, logits):
        """One step's choice from (B*K, V) logits; returns the new beam state and each new beam's parent row."""
        V = logits.shape[-1]
        log_probs = jax.nn.log_softmax(logits).reshape(B, K, V) + running_scores[:, :, None]
        top_scores, top_index = jax.lax.top_k(log_probs.reshape(B, K * V), 2 * K)
        parent = top_index // V
        candidates = jax.lax.dynamic_update_slice(running[batch_rows, parent], (top_index % V)[:, :, None],
                                                  (0, 0, cur))  # fmt: skip
        ended = jnp.isin(candidates[:, :, cur], eos_arr)
        live_scores = top_scores + ended * BEAM_NEG
        keep = jax.lax.top_k(live_scores, K)[1]
        final_scores = top_scores / ((cur + 1 - P) ** lp)
        full = jnp.broadcast_to(finished.all(axis=-1, keepdims=True), ended.shape) & (s.early_stopping is True)
        final_scores += (~ended | full) * BEAM_NEG
        merged_scores = jnp.concatenate([scores, final_scores], axis=1)
        best = jax.lax.top_k(merged_scores, K)[1]
        sequences = jnp.concatenate([sequences, candidates], axis=1)[batch_rows, best]
        finished = jnp.concatenate([finished, ended], axis=1)[batch_rows, best]
        parent_rows = (batch_rows * K + parent[batch_rows, keep]).reshape(-1)
        return (cur + 1, candidates[batch_rows, keep], live_scores[batch_rows, keep], sequences,
                merged_scores[batch_rows, best], finished), parent_rows  # fmt: skip

    def improvable(beams):
        cur, _, running_scores, _, scores, finished = beams
        length = (total - P) ** lp if s.early_stopping == "never" and lp > 0.0 else (cur - P) ** lp
        worst_finished = jnp.where(finished, jnp.min(scores, axis=1, keepdims=True), BEAM_NEG)
        still_open = ~(jnp.all(finished) & (s.early_stopping is True))
        return (cur < total) & still_open & jnp.any(running_scores[:, :1] / length > worst_finished)

    def advance(beams, logits, cache, position):
        beams, parent_rows = select(*beams, logits)
        return beams, jax.tree_util.tree_map(lambda x: x[parent_rows] if x.ndim else x, cache), position

    def step(state):
        (cur, running, *_), cache, position = state
        logits, _, _, cache = apply(running[:, :, cur - 1].reshape(B * K, 1), position, full_mask, cache)
        return advance(state[0], logits[:, -1], cache, position + 1)

    running = jnp.full((B, K, total), s.pad, jnp.int32).at[:, :, :P].set(ids[:, None])
    running_scores = jnp.tile(jnp.array([0.0] + [BEAM_NEG] * (K - 1)), (B, 1))
    beams = (jnp.array(P, jnp.int32), running, running_scores, jnp.full((B, K, total), s.pad, jnp.int32),
             jnp.full((B, K), BEAM_NEG), jnp.zeros((B, K), bool))  # fmt: skip
    state = advance(beams, logits, cache, position)  # the first step runs unconditionally, as the reference's
    cur, running, running_scores, sequences, scores, finished = jax.lax.while_loop(
        lambda state: improvable(state[0]), step, state)[0]  # fmt: skip
    any_finished = jnp.any(finished, axis=1)  # a row with no finished hypothesis returns its running beams
    sequences = jnp.where(any_finished[:, None, None], sequences, running)[:, : s.num_return_sequences]
    scores = jnp.where(any_finished[:, None], scores, running_scores)[:, : s.num_return_sequences]
    return sequences.reshape(-1, total), scores.reshape(-1)
