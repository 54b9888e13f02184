"""XGLM in TensorFlow: Keras 2 models (tf-keras), layer and weight names those of the reference's TFXGLM*, so
tf_model.h5 files load both ways.

`past_key_values` in calls is the reference's: per layer (k, v) of shape (B, H, S, D), grown by concatenation,
plus the cross-attention (k, v) after a call with encoder_hidden_states. `generate` instead writes into
preallocated buffers inside one XLA-compiled function (prefill + while loop; beam search gathers their rows).
"""

from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras as keras
from tensorflow.compiler.tf2xla.python.xla import dynamic_update_slice

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

TF_WEIGHTS = "tf_model.h5"
LARGE_NEGATIVE = -1e8  # the reference's additive mask value (causal and padding each add it)
_ACTS = {"gelu": partial(tf.nn.gelu, approximate=False), "gelu_new": partial(tf.nn.gelu, approximate=True),
         "relu": tf.nn.relu, "silu": tf.nn.silu, "swish": tf.nn.silu, "tanh": tf.tanh}  # fmt: skip


class TFXGLMAttention(keras.layers.Layer):
    """Multi-head attention; `past` (k, v) is extended by concatenation (cross-attention reuses it as is),
    `buffers` (k, v, index) are written in place (XLA only); `head_mask` (H,) scales each head's weights."""

    def __init__(self, config: XGLMConfig, **kwargs: Any):
        super().__init__(**kwargs)
        C, self.heads = config.d_model, config.attention_heads
        self.head_dim = C // self.heads
        self.k_proj = keras.layers.Dense(C, name="k_proj")
        self.q_proj = keras.layers.Dense(C, name="q_proj")
        self.v_proj = keras.layers.Dense(C, name="v_proj")
        self.out_proj = keras.layers.Dense(C, name="out_proj")
        self.dropout = keras.layers.Dropout(config.attention_dropout)

    def _split(self, x: tf.Tensor) -> tf.Tensor:
        B, S = tf.shape(x)[0], tf.shape(x)[1]
        return tf.transpose(tf.reshape(x, (B, S, self.heads, self.head_dim)), (0, 2, 1, 3))  # (B, H, S, D)

    def call(self, x, bias, kv_states=None, past=None, buffers=None, head_mask=None, training=False):
        q = self._split(self.q_proj(x) * self.head_dim**-0.5)
        if kv_states is not None and past is not None:  # the encoder's keys, cached by an earlier call
            k, v = past
        else:
            src = x if kv_states is None else kv_states
            k, v = self._split(self.k_proj(src)), self._split(self.v_proj(src))
            if past is not None:
                k, v = tf.concat([past[0], k], axis=2), tf.concat([past[1], v], axis=2)
        if buffers is not None:
            k_buf, v_buf, index = buffers
            k = dynamic_update_slice(k_buf, k, tf.stack([0, 0, index, 0]))
            v = dynamic_update_slice(v_buf, v, tf.stack([0, 0, index, 0]))
        weights = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) + bias, axis=-1)  # (B, H, T, S)
        if head_mask is not None:  # the reference's: the returned weights are the masked ones
            weights = tf.cast(head_mask, weights.dtype)[None, :, None, None] * weights
        out = tf.matmul(self.dropout(weights, training=training), v)  # (B, H, T, D)
        B, T = tf.shape(x)[0], tf.shape(x)[1]
        out = tf.reshape(tf.transpose(out, (0, 2, 1, 3)), (B, T, self.heads * self.head_dim))
        return self.out_proj(out), weights, (k, v)


class TFXGLMDecoderLayer(keras.layers.Layer):
    def __init__(self, config: XGLMConfig, **kwargs: Any):
        super().__init__(**kwargs)
        norm = lambda name: keras.layers.LayerNormalization(epsilon=1e-5, name=name)
        self.self_attn = TFXGLMAttention(config, name="self_attn")
        if config.add_cross_attention:
            self.encoder_attn = TFXGLMAttention(config, name="encoder_attn")
            self.encoder_attn_layer_norm = norm("encoder_attn_layer_norm")
        self.self_attn_layer_norm = norm("self_attn_layer_norm")
        self.fc1 = keras.layers.Dense(config.ffn_dim, name="fc1")
        self.fc2 = keras.layers.Dense(config.d_model, name="fc2")
        self.final_layer_norm = norm("final_layer_norm")
        self.dropout = keras.layers.Dropout(config.dropout)
        self.activation_dropout = keras.layers.Dropout(config.activation_dropout)
        if config.activation_function not in _ACTS:
            raise ValueError(f"activation_function {config.activation_function!r} is not implemented in glmkit.tf")
        self.act = _ACTS[config.activation_function]

    def call(self, x, bias, enc=None, past=None, buffers=None, head_masks=(None, None), training=False):
        """past: the reference's per-layer cache, (k, v) or, after a cross-attention call, (k, v, cross k, cross v);
        the returned cache has the same form."""
        h, weights, kv = self.self_attn(self.self_attn_layer_norm(x), bias, None, past[:2] if past else None,
                                        buffers, head_masks[0], training)  # fmt: skip
        x = x + self.dropout(h, training=training)
        cross = None
        if enc is not None:
            cached = past[2:] if past is not None and len(past) == 4 else None
            h, cross, cross_kv = self.encoder_attn(self.encoder_attn_layer_norm(x), enc[1], enc[0], cached,
                                                   head_mask=head_masks[1], training=training)  # fmt: skip
            x = x + self.dropout(h, training=training)
            kv = (*kv, *cross_kv)
        h = self.activation_dropout(self.act(self.fc1(self.final_layer_norm(x))), training=training)
        return x + self.dropout(self.fc2(h), training=training), weights, cross, kv


class _Embedding(keras.layers.Layer):
    """The reference's TFSharedEmbeddings weight: `embed_tokens/weight` (V, C)."""

    def __init__(self, config: XGLMConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.vocab_size, self.d_model, self.init_std = config.vocab_size, config.d_model, config.init_std

    def build(self, input_shape=None):
        init = keras.initializers.TruncatedNormal(stddev=self.init_std)
        self.weight = self.add_weight("weight", shape=[self.vocab_size, self.d_model], initializer=init)
        super().build(input_shape)

    def call(self, ids: tf.Tensor) -> tf.Tensor:
        return tf.gather(self.weight, ids)


def _bias(mask: tf.Tensor, start: Any, T: Any) -> tf.Tensor:
    """(B, S) 0/1 mask, queries at slots start..start+T-1 -> (B, 1, T, S) additive bias, as the reference adds it."""
    S = tf.shape(mask)[1]
    future = tf.range(S)[None, :] > start + tf.range(T)[:, None]  # (T, S)
    causal = tf.where(future, LARGE_NEGATIVE, 0.0)
    return causal[None, None] + (1.0 - tf.cast(mask, tf.float32))[:, None, None, :] * LARGE_NEGATIVE


class TFXGLMMainLayer(keras.layers.Layer):
    """The decoder stack (the reference's `model` layer): embeddings + positions, layers, final LayerNorm."""

    def __init__(self, config: XGLMConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.embed_tokens = _Embedding(config, name="embed_tokens")
        self.embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.positions = tf.constant(position_table(config))
        self.dropout = keras.layers.Dropout(config.dropout)
        self.layers = [TFXGLMDecoderLayer(config, name=f"layers.{i}") for i in range(config.num_layers)]
        self.layer_norm = keras.layers.LayerNormalization(epsilon=1e-5, name="layer_norm")

    def call(self, ids, positions, mask, start, past=None, buffers=None, inputs_embeds=None, enc=None,
             head_masks=(None, None), training=False):  # fmt: skip
        """ids (B, T) at positions (B, T); mask (B, S) over every key slot; queries sit at slots start… .
        head_masks: (self, cross) (num_layers, H) or None. Returns (hidden, per-layer inputs + final, attentions,
        cross attentions, new cache per layer)."""
        x = self.embed_tokens(ids) * self.embed_scale if inputs_embeds is None else inputs_embeds
        x = self.dropout(tf.cast(x, tf.float32) + tf.gather(self.positions, positions + 2), training=training)
        bias = _bias(mask, start, tf.shape(x)[1])
        hidden, attns, crosses, kvs = [], [], [], []
        for i, layer in enumerate(self.layers):
            hidden.append(x)
            layer_buffers = (*buffers[i], start) if buffers is not None else None
            layer_masks = tuple(m[i] if m is not None else None for m in head_masks)
            x, weights, cross, kv = layer(x, bias, enc, past[i] if past is not None else None, layer_buffers,
                                          layer_masks, training=training)  # fmt: skip
            attns.append(weights)
            crosses.append(cross)
            kvs.append(kv)
        x = self.layer_norm(x)
        return x, (*hidden, x), tuple(attns), tuple(crosses), tuple(kvs)


class TFXGLMPreTrainedModel(keras.Model):
    """Input handling, from_pretrained / save_pretrained shared by the two classes."""

    def __init__(self, config: XGLMConfig, **kwargs: Any):
        super().__init__(**kwargs)
        self.config = config
        self.model = TFXGLMMainLayer(config, name="model")
        self.generation_config = GenerationConfig.from_model_config(config)

    def __call__(self, input_ids: Any = None, *args: Any, **kwargs: Any) -> Any:
        """Keras needs a first argument; `model(inputs_embeds=...)` passes input_ids=None (the reference's call)."""
        return super().__call__(input_ids, *args, **kwargs)

    def build_weights(self) -> None:
        """Create every variable under the reference's names by one call on a dummy token."""
        enc = tf.zeros((1, 1, self.config.d_model)) if self.config.add_cross_attention else None
        self(tf.zeros((1, 1), tf.int32), encoder_hidden_states=enc)

    def _prepare(self, input_ids, inputs_embeds, attention_mask, position_ids, past_key_values,
                 encoder_hidden_states, encoder_attention_mask):  # fmt: skip
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        input_ids = np.asarray(input_ids) if input_ids is not None else None
        B, T = tuple((input_ids if input_ids is not None else inputs_embeds).shape[:2])
        if input_ids is not None and input_ids.size:
            if input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size:
                raise ValueError(f"input_ids must lie in [0, {self.config.vocab_size}) (vocab_size)")
        past_len = int(past_key_values[0][0].shape[2]) if past_key_values is not None else 0
        if position_ids is None:  # the reference's: continued from the cache, blind to the mask
            position_ids = np.broadcast_to(np.arange(past_len, past_len + T)[None], (B, T))
        check_positions(position_ids, self.config)
        mask = np.ones((B, past_len + T), np.float32) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != (B, past_len + T):
            raise ValueError(f"attention_mask must have shape ({B}, {past_len + T}) (past + new), got {mask.shape}")
        enc = None
        if encoder_hidden_states is not None:
            if not self.config.add_cross_attention:
                raise ValueError("encoder_hidden_states given, but config.add_cross_attention is False")
            S = encoder_hidden_states.shape[1]
            enc_mask = np.ones((B, S)) if encoder_attention_mask is None else np.asarray(encoder_attention_mask)
            enc_bias = tf.constant((1.0 - enc_mask.astype(np.float32))[:, None, None, :] * LARGE_NEGATIVE)
            enc = (tf.convert_to_tensor(encoder_hidden_states, tf.float32), enc_bias)
        ids = tf.zeros((B, T), tf.int32) if input_ids is None else tf.convert_to_tensor(input_ids, tf.int32)
        return ids, tf.constant(position_ids, tf.int32), tf.constant(mask, tf.float32), past_len, enc

    def _run(self, input_ids, attention_mask, position_ids, encoder_hidden_states, encoder_attention_mask,
             head_mask, cross_attn_head_mask, past_key_values, inputs_embeds, training):  # fmt: skip
        ids, positions, mask, start, enc = self._prepare(input_ids, inputs_embeds, attention_mask, position_ids,
                                                         past_key_values, encoder_hidden_states,
                                                         encoder_attention_mask)  # fmt: skip
        head_masks = (self._head_mask(head_mask, "head_mask"),
                      self._head_mask(cross_attn_head_mask, "cross_attn_head_mask"))  # fmt: skip
        return self.model(ids, positions, mask, start, past=past_key_values, inputs_embeds=inputs_embeds, enc=enc,
                          head_masks=head_masks, training=training)  # fmt: skip

    def _head_mask(self, mask: Any, name: str) -> tf.Tensor | None:
        """A (num_layers, attention_heads) multiplier of each head's attention weights (1 keeps, 0 drops)."""
        if mask is None:
            return None
        mask = tf.convert_to_tensor(mask, tf.float32)
        expected = (self.config.num_layers, self.config.attention_heads)
        if tuple(mask.shape) != expected:
            raise ValueError(f"{name} must have shape (num_layers, attention_heads) = {expected}, "
                             f"got {tuple(mask.shape)}")  # fmt: skip
        return mask

    def _outputs(self, hidden, attns, crosses, kvs, use_cache, output_attentions, output_hidden_states, enc):
        attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        hiddens = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        return {
            "past_key_values": kvs if use_cache else None,
            "hidden_states": hidden if hiddens else None,
            "attentions": attns if attentions else None,
            "cross_attentions": crosses if attentions and enc is not None else None,
        }

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, **kwargs: Any):
        """Load tf_model.h5 when present, else the PyTorch weights (safetensors through numpy;
        pytorch_model.bin with torch.load(weights_only=True)). Config overrides go in kwargs."""
        directory = checkpoint_dir(name_or_path, kwargs)
        model = cls(XGLMConfig.from_pretrained(directory, **kwargs))
        model.build_weights()
        if (directory / TF_WEIGHTS).is_file():
            weights = _read_h5(directory / TF_WEIGHTS)
        else:
            weights = {_tf_name(k): _tf_value(k, v) for k, v in read_state_dict(directory).items()
                       if "embed_positions" not in k}  # fmt: skip
        model._assign(weights)
        model.generation_config = generation_config(directory, model.config)
        return model

    def _assign(self, weights: dict[str, np.ndarray]) -> None:
        """Stripped variable names ("model/layers.0/fc1/kernel") -> values; a bare-model file lacks "model/"."""
        if not any(k.startswith("model/") for k in weights):
            weights = {f"model/{k}": v for k, v in weights.items()}
        if "lm_head/kernel" in [_strip(v.name) for v in self.weights] and "lm_head/kernel" not in weights:
            weights["lm_head/kernel"] = weights["model/embed_tokens/weight"].T  # tied: the reference copies it
        names = {_strip(v.name): v for v in self.weights}
        missing = sorted(names.keys() - weights.keys())
        unexpected = sorted(weights.keys() - names.keys() - {"lm_head/kernel"})
        wrong = sorted(f"{k}: {weights[k].shape} != {tuple(names[k].shape)}" for k in names.keys() & weights.keys()
                       if tuple(weights[k].shape) != tuple(names[k].shape))  # fmt: skip
        if missing or unexpected or wrong:
            raise CheckpointError(f"weights do not match {type(self).__name__}: missing {missing[:8]}, "
                                  f"unexpected {unexpected[:8]}, wrong shape {wrong[:8]}")  # fmt: skip
        for name, var in names.items():
            var.assign(weights[name].astype(np.float32))

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """config.json, generation_config.json and tf_model.h5 (Keras h5 by layer, the reference's file)."""
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(path)
        self.generation_config.save_pretrained(path)
        tmp = path / "tf_model.tmp.h5"
        self.save_weights(str(tmp))
        tmp.replace(path / TF_WEIGHTS)


def _strip(name: str) -> str:
    """"tfxglm_for_causal_lm/model/fc1/kernel:0" -> "model/fc1/kernel": the part the reference matches on."""
    return name.split("/", 1)[1].removesuffix(":0")


def _read_h5(path: Path) -> dict[str, np.ndarray]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            out = {}
            for layer in f.attrs["layer_names"]:
                group = f[layer]
                for name in group.attrs["weight_names"]:
                    name = name.decode() if isinstance(name, bytes) else name
                    out[_strip(name)] = np.asarray(group[name])
            return out
    except (OSError, KeyError) as err:
        raise CheckpointError(f"cannot read {path}: {err}") from err


def _tf_name(name: str) -> str:
    """HF PyTorch name -> stripped TF variable name (Linear weight -> kernel, LayerNorm -> gamma / beta)."""
    *module, leaf = name.split(".")
    if module and module[-1].endswith("layer_norm"):
        leaf = {"weight": "gamma", "bias": "beta"}[leaf]
    elif module and module[-1] != "embed_tokens":
        leaf = "kernel" if leaf == "weight" else leaf
    parts = []
    for part in module:  # "layers", "0" -> "layers.0"
        if part.isdigit() and parts:
            parts[-1] += f".{part}"
        else:
            parts.append(part)
    return "/".join([*parts, leaf])


def _tf_value(name: str, value: np.ndarray) -> np.ndarray:
    return value.T if name.endswith(".weight") and value.ndim == 2 and "embed_tokens" not in name else value


class TFXGLMModel(TFXGLMPreTrainedModel):
    """The bare decoder: last_hidden_state after the final LayerNorm (the reference's TFXGLMModel)."""

    def call(self, input_ids=None, attention_mask=None, position_ids=None, encoder_hidden_states=None,
             encoder_attention_mask=None, head_mask=None, cross_attn_head_mask=None, past_key_values=None,
             inputs_embeds=None, use_cache=None, output_attentions=None, output_hidden_states=None, return_dict=None,
             training=False):  # fmt: skip
        x, hidden, attns, crosses, kvs = self._run(input_ids, attention_mask, position_ids, encoder_hidden_states,
                                                   encoder_attention_mask, head_mask, cross_attn_head_mask,
                                                   past_key_values, inputs_embeds, training)  # fmt: skip
        out = BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=x, **self._outputs(
            hidden, attns, crosses, kvs, use_cache, output_attentions, output_hidden_states, encoder_hidden_states))
        return out if return_dict is not False else out.to_tuple()


class TFXGLMForCausalLM(TFXGLMPreTrainedModel):
    """Decoder + lm_head (its own `lm_head/kernel` as in the reference, filled from the embedding when the
    checkpoint ties them); `labels` give the shifted next-token loss."""

    def __init__(self, config: XGLMConfig, **kwargs: Any):
        super().__init__(config, **kwargs)
        self.lm_head = keras.layers.Dense(config.vocab_size, use_bias=False, name="lm_head")
        self._decoders: dict[tuple, Any] = {}

    def call(self, input_ids=None, attention_mask=None, position_ids=None, encoder_hidden_states=None,
             encoder_attention_mask=None, head_mask=None, cross_attn_head_mask=None, past_key_values=None,
             inputs_embeds=None, labels=None, use_cache=None, output_attentions=None, output_hidden_states=None,
             return_dict=None, training=False):  # fmt: skip
        x, hidden, attns, crosses, kvs = self._run(input_ids, attention_mask, position_ids, encoder_hidden_states,
                                                   encoder_attention_mask, head_mask, cross_attn_head_mask,
                                                   past_key_values, inputs_embeds, training)  # fmt: skip
        logits = self.lm_head(x)
        loss = causal_lm_loss(logits, tf.convert_to_tensor(labels)) if labels is not None else None
        out = CausalLMOutputWithCrossAttentions(loss=loss, logits=logits, **self._outputs(
            hidden, attns, crosses, kvs, use_cache, output_attentions, output_hidden_states, encoder_hidden_states))
        return out if return_dict is not False else out.to_tuple()

    def generate(self, input_ids: Any, attention_mask: Any = None, generation_config: Any = None,
                 seed: tuple[int, int] = (0, 0), **kwargs: Any) -> tf.Tensor:
        """Greedy, sampled (temperature, top_k, top_p) or beam search (num_beams, length_penalty, early_stopping,
        num_return_sequences: the reference's TFGenerationMixin algorithm) decoding, left padding allowed; returns
        (B * num_return_sequences, max_length) ids with pad_token_id after each row's end. One XLA compile per
        (batch, prompt length, settings)."""
        ids, mask, settings = prepare_generation(generation_config or self.generation_config, input_ids,
                                                 attention_mask, self.config.max_position_embeddings, kwargs)
        if settings not in self._decoders:
            decoder = _beam_search if settings.num_beams > 1 else _decode
            self._decoders[settings] = tf.function(partial(decoder, self, settings), jit_compile=True,
                                                   autograph=False)  # fmt: skip
        return self._decoders[settings](tf.constant(ids), tf.constant(mask), tf.constant(seed, tf.int32))


def causal_lm_loss(logits: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
    """Mean next-token cross entropy over labels != -100 (the shift and ignore index of the other ports)."""
    logits, labels = tf.cast(logits[:, :-1], tf.float32), tf.cast(labels[:, 1:], tf.int32)
    valid = tf.cast(labels != -100, tf.float32)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(tf.where(labels == -100, 0, labels), logits)
    return tf.reduce_sum(losses * valid) / tf.maximum(tf.reduce_sum(valid), 1.0)


def _choose(logits, seed, do_sample, temperature, top_k, top_p):
    """Next token per row: argmax, or a draw after temperature, top-k and top-p (the reference's order)."""
    if not do_sample:
        return tf.argmax(logits, axis=-1, output_type=tf.int32)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = tf.math.top_k(logits, top_k).values[:, -1:]
        logits = tf.where(logits < kth, -np.inf, logits)
    if top_p < 1.0:
        order = tf.argsort(logits, axis=-1, direction="DESCENDING")
        probs = tf.nn.softmax(tf.gather(logits, order, batch_dims=1), axis=-1)
        drop_sorted = tf.cumsum(probs, axis=-1) - probs >= top_p  # keep the smallest prefix reaching top_p
        drop = tf.gather(drop_sorted, tf.argsort(order, axis=-1), batch_dims=1)
        logits = tf.where(drop, -np.inf, logits)
    return tf.cast(tf.random.stateless_categorical(logits, 1, seed)[:, 0], tf.int32)


def _prefill(model, ids, mask, total):
    """The prompt into fresh (B, H, total, D) buffers: (last logits, buffers, mask over all slots, next positions)."""
    c = model.config
    B, P = ids.shape
    shape = (B, c.attention_heads, total, c.d_model // c.attention_heads)
    buffers = tuple((tf.zeros(shape), tf.zeros(shape)) for _ in range(c.num_layers))
    full_mask = tf.concat([tf.cast(mask, tf.float32), tf.ones((B, total - P))], axis=1)
    positions = tf.maximum(tf.cumsum(mask, axis=-1) - 1, -1)  # pads at -1 (the zero row), as the Flax reference
    x, _, _, _, buffers = model.model(ids, positions, full_mask, tf.constant(0), buffers=buffers)
    return model.lm_head(x[:, -1]), buffers, full_mask, positions[:, -1:] + 1


def _decode(model, s: DecodeSettings, ids, mask, seed):
    """Prefill the prompt into (B, H, total, D) buffers, then one token per while_loop iteration."""
    B, P = ids.shape
    logits, buffers, full_mask, position = _prefill(model, ids, mask, s.total)
    sequences = tf.concat([ids, tf.fill((B, s.total - P), s.pad)], axis=1)
    eos_ids_ = tf.constant(list(s.eos) or [-1], tf.int32)

    def step(sequences, buffers, logits, position, finished, cur):
        token = _choose(logits, tf.stack([seed[0], seed[1] + cur]), s.do_sample, s.temperature, s.top_k, s.top_p)
        token = tf.where(finished, s.pad, token)
        sequences = dynamic_update_slice(sequences, token[:, None], tf.stack([0, cur]))
        finished = finished | tf.reduce_any(token[:, None] == eos_ids_[None], axis=-1)
        x, _, _, _, buffers = model.model(token[:, None], position, full_mask, cur, buffers=buffers)
        return sequences, buffers, model.lm_head(x[:, -1]), position + 1, finished, cur + 1

    def running(sequences, buffers, logits, position, finished, cur):
        return (cur < s.total) & ~tf.reduce_all(finished)

    state = (sequences, buffers, logits, position, tf.zeros(B, tf.bool), tf.constant(P))
    return tf.while_loop(running, step, state)[0]


BEAM_NEG = -1.0e9  # the reference's (TF) score of an empty or excluded hypothesis


def _beam_search(model, s: DecodeSettings, ids, mask, _seed):  # no draws: _seed keeps _decode's signature
    """The reference's TF beam search: each step keeps the top 2K continuations of the K running beams, the top
    K without EOS keep running (their buffer rows gathered from the parent beams), and EOS among the first K
    candidates ends a hypothesis, competing (score / new-length ** length_penalty) for the K finished slots."""
    B, P = ids.shape
    K, total, lp = s.num_beams, s.total, s.length_penalty
    logits, buffers, full_mask, position = _prefill(model, tf.repeat(ids, K, 0), tf.repeat(mask, K, 0), total)
    eos_ids_ = tf.constant(list(s.eos) or [-1], tf.int32)
    first_half = tf.concat([tf.ones(K, tf.bool), tf.zeros(K, tf.bool)], axis=0)
    gather = partial(tf.gather, axis=1, batch_dims=1)

    def select(cur, running, running_scores, sequences, scores, finished, logits):
        """One step's choice from (B*K, V) logits; returns the new beam state and each new beam's parent row."""
        V = logits.shape[-1]
        log_probs = tf.reshape(tf.nn.log_softmax(logits), (B, K, V)) + running_scores[:, :, None]
        top_scores, top_index = tf.math.top_k(tf.reshape(log_probs, (B, K * V)), 2 * K)
        parent = top_index // V
        candidates = tf.where(tf.range(total) == cur, (top_index % V)[:, :, None], gather(running, parent))
        eos_next = tf.reduce_any(candidates[:, :, cur][..., None] == eos_ids_, axis=-1)
        ended = eos_next & first_half
        live_scores = top_scores + tf.cast(eos_next, tf.float32) * BEAM_NEG
        keep = tf.math.top_k(live_scores, K).indices
        final_scores = top_scores / (tf.cast(cur + 1 - P, tf.float32) ** lp)
        full = tf.broadcast_to(tf.reduce_all(finished, axis=-1, keepdims=True), ended.shape)
        full = full & (s.early_stopping is True)
        final_scores += tf.cast(~ended | full, tf.float32) * BEAM_NEG
        merged_scores = tf.concat([scores, final_scores], axis=1)
        best = tf.math.top_k(merged_scores, K).indices
        parent_rows = tf.reshape(tf.range(B)[:, None] * K + gather(parent, keep), (-1,))
        return (cur + 1, gather(candidates, keep), gather(live_scores, keep),
                gather(tf.concat([sequences, candidates], axis=1), best), gather(merged_scores, best),
                gather(tf.concat([finished, ended], axis=1), best)), parent_rows  # fmt: skip

    def improvable(cur, running, running_scores, sequences, scores, finished):
        if s.early_stopping == "never" and lp > 0.0:
            best_running = running_scores[:, :1] / ((total - P) ** lp)
        else:
            best_running = running_scores[:, :1] / (tf.cast(cur - P, tf.float32) ** lp)
        worst_finished = tf.where(finished, tf.reduce_min(scores, axis=1, keepdims=True), BEAM_NEG)
        still_open = ~(tf.reduce_all(finished) & (s.early_stopping is True))
        return (cur < total) & still_open & tf.reduce_any(best_running > worst_finished)

    def advance(beams, logits, buffers, position):
        beams, parent_rows = select(*beams, logits)
        return beams, tf.nest.map_structure(lambda x: tf.gather(x, parent_rows), buffers), position

    def step(beams, buffers, position):
        cur, running = beams[:2]
        x, _, _, _, buffers = model.model(tf.reshape(running[:, :, cur - 1], (B * K, 1)), position, full_mask,
                                          cur - 1, buffers=buffers)  # fmt: skip
        return advance(beams, model.lm_head(x[:, -1]), buffers, position + 1)

    running = tf.concat([tf.broadcast_to(ids[:, None], (B, K, P)), tf.fill((B, K, total - P), s.pad)], axis=-1)
    running_scores = tf.tile(tf.constant([[0.0] + [BEAM_NEG] * (K - 1)]), (B, 1))
    beams = (tf.constant(P), running, running_scores, tf.fill((B, K, total), s.pad), tf.fill((B, K), BEAM_NEG),
             tf.zeros((B, K), tf.bool))  # fmt: skip
    state = advance(beams, logits, buffers, position)  # the first step runs unconditionally, as the reference's
    cur, running, running_scores, sequences, scores, finished = tf.while_loop(
        lambda beams, buffers, position: improvable(*beams), step, state)[0]  # fmt: skip
    any_finished = tf.reduce_any(finished, axis=1)  # a row with no finished hypothesis returns its running beams
    sequences = tf.where(any_finished[:, None, None], sequences, running)[:, : s.num_return_sequences]
    return tf.reshape(sequences, (-1, total))
