"""GGUF import: llama.cpp's files (arch `chatglm`, what its converter writes for GLM-4 `GlmForCausalLM` and
the original THUDM glm-4-9b release) read with the `gguf` package (llama.cpp's own reader and dequantizer).

Tensors stay in the memory-mapped file and are converted one at a time, a block of rows at a time:
- Q4_0 / Q4_1 / Q4_K linears go to `Int4Linear` (group size 32) unchanged: each 32-weight block is
  w = d*(q-8) (Q4_0), d*q + m (Q4_1) or d*sc*q - dmin*m (Q4_K), all of the kernel's (q-8)*scale + zero form,
  so the int4 values are the file's and scale / zero are exact in float32 (one rounding in bf16 / fp16);
- every other type (Q8_0 included: one scale per 32 weights, which the per-channel int8 kernel cannot hold)
  is dequantized by the `gguf` package to the target dtype; `quantization="int8"` then requantizes it per
  channel as it is read, like any float checkpoint.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..checkpoint import CheckpointError
from .linear import Int4Linear, check_int4_shape

GGUF_GROUP_SIZE = 32  # the block size of Q4_0 / Q4_1 and of Q4_K's sub-blocks
_ROWS = 256  # rows converted at a time: the float scratch stays small
_ARCHS = {"chatglm": "glm"}  # GGUF architecture -> glmkit model_type
_NOT_FAMILIES = {  # architectures users may try, and why they do not load
    "glm4": "GLM-4-0414 (transformers' Glm4ForCausalLM, with post-attention/post-MLP norms) is not a glmkit family",
    "persimmon": "llama.cpp removed its persimmon architecture (gguf-py no longer defines it)",
}
_LAYER_TENSORS = {  # GGUF block tensor -> GLM's name under model.layers.{i}.
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",  # the converter keeps GLM's fused [gate; up] as ffn_up (llama.cpp: SwiGLU split)
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as err:
        raise ImportError("reading GGUF files needs the gguf package: pip install 'glmkit[gguf]'") from err
    return gguf


def is_gguf_path(name_or_path: str | os.PathLike) -> bool:
    """A path to a .gguf file itself (the `from_pretrained("model.Q8_0.gguf")` form)."""
    return str(name_or_path).endswith(".gguf") and Path(name_or_path).is_file()


def gguf_file_path(name_or_path: str | os.PathLike, gguf_file: str | os.PathLike | None, **hub: Any) -> Path:
    """The .gguf file `from_pretrained(dir, gguf_file=...)` (or a direct file path) names; raise naming it."""
    if gguf_file is None:
        if not is_gguf_path(name_or_path):
            raise FileNotFoundError(f"{name_or_path!r} is not a .gguf file")
        return Path(name_or_path)
    from ..hub import resolve_checkpoint_dir

    path = resolve_checkpoint_dir(name_or_path, **hub) / gguf_file
    if not path.is_file():
        found = sorted(p.name for p in path.parent.glob("*.gguf")) if path.parent.is_dir() else []
        raise FileNotFoundError(f"gguf_file {str(gguf_file)!r} not found in {path.parent} (.gguf files there: {found})")
    return path


class GGUFCheckpoint:
    """One GGUF file: its metadata as a config dict, its tokenizer fields and its tensors under HF names."""

    def __init__(self, path: str | os.PathLike):
        gguf = _gguf()
        self.path = Path(path)
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as err:  # not a GGUF file, or truncated: say which
            raise CheckpointError(f"cannot read GGUF file {self.path}: {err}") from err
        self.arch = str(self.field("general.architecture", required=True))
        if self.arch not in _ARCHS:
            why = _NOT_FAMILIES.get(self.arch, f"glmkit reads: {', '.join(_ARCHS)}")
            raise CheckpointError(f"GGUF architecture {self.arch!r} in {self.path} is not supported: {why}")
        self.model_type = _ARCHS[self.arch]
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str, default: Any = None, required: bool = False) -> Any:
        """The metadata value `key` ("{arch}" stands for the architecture); a required one raises if absent."""
        key = key.replace("{arch}", getattr(self, "arch", ""))
        field = self.reader.get_field(key)
        if field is None and required:
            raise CheckpointError(f"GGUF file {self.path} lacks the metadata key {key}")
        return default if field is None else field.contents()

    def config_dict(self) -> dict[str, Any]:
        """GlmConfig keys from the `chatglm.*` metadata (the converter writes no head_dim: hidden / heads)."""
        hidden = self.field("{arch}.embedding_length", required=True)
        heads = self.field("{arch}.attention.head_count", required=True)
        head_dim = self.field("{arch}.attention.key_length", hidden // heads)
        if "token_embd.weight" not in self.tensors:
            raise CheckpointError(f"GGUF file {self.path} has no token_embd.weight tensor")
        eos = [i for i in (self.field("tokenizer.ggml.eos_token_id"), self.field("tokenizer.ggml.eot_token_id"))
               if i is not None]  # fmt: skip
        return {
            "model_type": self.model_type,
            "vocab_size": int(self.tensors["token_embd.weight"].shape[1]),
            "hidden_size": hidden,
            "intermediate_size": self.field("{arch}.feed_forward_length", required=True),
            "num_hidden_layers": self.field("{arch}.block_count", required=True),
            "num_attention_heads": heads,
            "num_key_value_heads": self.field("{arch}.attention.head_count_kv", heads),
            "head_dim": head_dim,
            "partial_rotary_factor": self.field("{arch}.rope.dimension_count", head_dim // 2) / head_dim,
            "rms_norm_eps": self.field("{arch}.attention.layer_norm_rms_epsilon", required=True),
            "rope_theta": self.field("{arch}.rope.freq_base", 10000.0),
            "max_position_embeddings": self.field("{arch}.context_length", required=True),
            "attention_bias": "blk.0.attn_q.bias" in self.tensors or "blk.0.attn_qkv.bias" in self.tensors,
            "tie_word_embeddings": "output.weight" not in self.tensors,
            "eos_token_id": list(dict.fromkeys(eos)) or None,
            "pad_token_id": self.field("tokenizer.ggml.padding_token_id"),
            "bos_token_id": None,
        }

    def weights(self, config: Any) -> GGUFWeights:
        return GGUFWeights(self, config)


class GGUFWeights:
    """The WeightReader interface over a GGUF file's tensors, under the model's HF names. A fused attn_qkv
    (the original THUDM layout) is presented as q/k/v row ranges of the same file data."""

    def __init__(self, checkpoint: GGUFCheckpoint, config: Any):
        self.directory, self.files = checkpoint.path, [checkpoint.path]
        self._entries: dict[str, tuple[Any, slice]] = {}  # HF name -> (ReaderTensor, rows)
        q_rows = config.num_attention_heads * config.head_dim
        kv_rows = config.num_key_value_heads * config.head_dim
        qkv = {"q": slice(0, q_rows), "k": slice(q_rows, q_rows + kv_rows), "v": slice(q_rows + kv_rows, None)}
        for name, tensor in checkpoint.tensors.items():
            stem, _, kind = name.rpartition(".")
            parts = stem.split(".")
            if parts[0] == "blk" and len(parts) == 3 and parts[2] == "attn_qkv":
                for letter, rows in qkv.items():
                    self._entries[f"model.layers.{parts[1]}.self_attn.{letter}_proj.{kind}"] = (tensor, rows)
            elif parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_TENSORS:
                self._entries[f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{kind}"] = (tensor, slice(None))
            else:  # an unknown name stays as it is: the loader reports it as unexpected
                self._entries[f"{_GLOBAL_TENSORS.get(stem, stem)}.{kind}"] = (tensor, slice(None))
        self._int4: dict[str, Int4Linear] = {}  # weight name -> module filled from the file's int4 blocks
        self._pending: dict[str, torch.Tensor] = {}  # scales_and_zeros made while reading their weight
        for name, (tensor, _) in self._entries.items():
            check_readable(tensor, name)

    # ---- the WeightReader interface ------------------------------------------------------------------
    def keys(self) -> list[str]:
        return [*self._entries, *(n.removesuffix("weight") + "scales_and_zeros" for n in self._int4)]

    def shape(self, name: str) -> tuple[int, ...]:
        if name.endswith("scales_and_zeros"):
            return tuple(self._int4[name.removesuffix("scales_and_zeros") + "weight"].scales_and_zeros.shape)
        if name in self._int4:
            return tuple(self._int4[name].weight.shape)
        tensor, rows = self._entries[name]
        return _shape(tensor, rows)

    def dtype(self, name: str) -> torch.dtype | None:
        if name in self._int4 or name.endswith("scales_and_zeros"):
            return None
        return _PLAIN_DTYPES.get(self._entries[name][0].tensor_type.name, torch.float32)

    def floating_dtype(self) -> torch.dtype | None:
        """`dtype="auto"`: an F16 / BF16 file's dtype, else float32 (quantized blocks dequantize to it)."""
        types = {t.tensor_type.name for t, _ in self._entries.values() if len(t.shape) > 1}
        return next((_PLAIN_DTYPES[t] for t in ("BF16", "F16") if t in types), torch.float32)

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        if name.endswith("scales_and_zeros"):
            weight = name.removesuffix("scales_and_zeros") + "weight"
            if name not in self._pending:  # asked before its weight
                self.get(weight, dtype)
            return self._pending.pop(name)
        tensor, rows = self._entries[name]
        if name in self._int4:
            q, self._pending[name.removesuffix("weight") + "scales_and_zeros"] = int4_blocks(tensor, rows, dtype)
            return q
        return dequantized(tensor, rows, dtype or self.dtype(name))

    # ---- int4 linears kept as the file's blocks ------------------------------------------------------
    def keep_int4(self, model: nn.Module, device: torch.device) -> GGUFWeights:
        """Swap `Int4Linear` (group 32) into the meta-device `model` for every linear whose weight is a
        Q4_0 / Q4_1 / Q4_K tensor of a shape the CPU kernel takes; the rest stays float."""
        if device.type != "cpu":
            return self
        mapping, _ = model._checkpoint_name_map(self.keys())  # ours -> the reader's (a base model lacks "model.")
        for module_name, module in list(model.named_modules()):
            name = mapping.get(f"{module_name}.weight")
            if not isinstance(module, nn.Linear) or name is None:
                continue
            if self._entries[name][0].tensor_type.name not in _INT4_TYPES or not _int4_shape_ok(module):
                continue
            int4 = Int4Linear(module.in_features, module.out_features, module.bias is not None, GGUF_GROUP_SIZE,
                              module.weight.dtype, "meta")  # fmt: skip
            model.set_submodule(module_name, int4)
            self._int4[name] = int4
        return self


_PLAIN_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_INT4_TYPES = ("Q4_0", "Q4_1", "Q4_K")


def _int4_shape_ok(linear: nn.Linear) -> bool:
    try:
        check_int4_shape(linear.in_features, linear.out_features, GGUF_GROUP_SIZE)
    except ValueError:
        return False
    return True


def check_readable(tensor: Any, name: str) -> None:
    """Raise naming the tensor and its type when the gguf package cannot dequantize it (probed on one row)."""
    gguf = _gguf()
    try:
        gguf.quants.dequantize(np.asarray(_raw_rows(tensor, slice(0, 1))), tensor.tensor_type)
    except NotImplementedError as err:
        raise CheckpointError(f"GGUF tensor {tensor.name} ({name}) has quantization type {tensor.tensor_type.name}, "
                              f"which the gguf package {_version()} cannot dequantize") from err  # fmt: skip


def _version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _shape(tensor: Any, rows: slice) -> tuple[int, ...]:
    """torch's (rows, columns) or (elements,) shape of the tensor's `rows` (GGUF lists columns first)."""
    if len(tensor.shape) > 2:
        raise CheckpointError(f"GGUF tensor {tensor.name} has {len(tensor.shape)} dimensions; GLM's have 1 or 2")
    shape = [int(n) for n in reversed(tensor.shape)]
    shape[0] = len(range(shape[0])[rows])
    return tuple(shape)


def _raw_rows(tensor: Any, rows: slice) -> np.ndarray:
    """The tensor's file data as (rows, bytes or values per row), still memory-mapped; a 1-D tensor's
    rows are its elements."""
    n_rows = int(tensor.shape[-1]) if len(tensor.shape) > 1 else int(tensor.shape[0])
    return tensor.data.reshape(n_rows, -1)[rows]


def dequantized(tensor: Any, rows: slice, dtype: torch.dtype) -> torch.Tensor:
    """The tensor (its `rows`) dequantized by the gguf package into `dtype`, a block of rows at a time."""
    gguf = _gguf()
    raw, shape = _raw_rows(tensor, rows), _shape(tensor, rows)
    out = torch.empty(raw.shape[0], math.prod(shape) // raw.shape[0], dtype=dtype)
    for start in range(0, raw.shape[0], _ROWS):
        block = gguf.quants.dequantize(np.array(raw[start : start + _ROWS]), tensor.tensor_type)  # a private copy
        out[start : start + _ROWS] = torch.from_numpy(block.reshape(len(block), -1))
    return out.reshape(shape)


def int4_blocks(tensor: Any, rows: slice, dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 / Q4_K weight as Int4Linear's saved layout: (uint8 nibbles (N, K/2) with the file's
    4-bit values, scales_and_zeros (K/32, N, 2) in `dtype`) such that (q - 8) * scale + zero is the file's
    weight. Scales and zeros are computed in float32 from the file's fp16 fields; the bit unpacking runs in
    numpy, whose small uint8 operations start no threads (torch's were ~10x slower on a loaded machine)."""
    raw = _raw_rows(tensor, rows)
    decode = {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}[tensor.tensor_type.name]
    n, k = raw.shape[0], int(tensor.shape[0])
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scales_and_zeros = torch.empty(k // GGUF_GROUP_SIZE, n, 2, dtype=dtype or torch.float32)
    for start in range(0, n, _ROWS):
        q, scale, zero = decode(np.asarray(raw[start : start + _ROWS]))
        q = q.reshape(len(q), k)
        packed[start : start + _ROWS] = torch.from_numpy(q[:, 0::2] | (q[:, 1::2] << 4))
        groups = np.stack([scale.reshape(len(q), -1), zero.reshape(len(q), -1)], axis=-1)  # (rows, K/32, 2)
        scales_and_zeros[:, start : start + _ROWS] = torch.from_numpy(groups.transpose(1, 0, 2))
    return packed, scales_and_zeros


def _f16(raw: np.ndarray) -> np.ndarray:
    """Little-endian fp16 fields (..., 2) uint8 -> float32 (...)."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0].astype(np.float32)


def _low_high(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) values: the 16 low nibbles, then the 16 high ones (Q4_0 / Q4_1 order)."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _q4_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks of 18 bytes: fp16 d, 16 bytes of nibbles; w = d * (q - 8)."""
    blocks = raw.reshape(raw.shape[0], -1, 18)
    d = _f16(blocks[..., :2])
    return _low_high(blocks[..., 2:]), d, np.zeros_like(d)


def _q4_1(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blocks of 20 bytes: fp16 d, fp16 m, 16 bytes of nibbles; w = d * q + m = d * (q - 8) + (m + 8d)."""
    blocks = raw.reshape(raw.shape[0], -1, 20)
    d, m = _f16(blocks[..., :2]), _f16(blocks[..., 2:4])
    return _low_high(blocks[..., 4:]), d, m + 8 * d


def _q4_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Super-blocks of 144 bytes for 256 weights: fp16 d, fp16 dmin, 12 bytes of eight 6-bit scales and
    mins, 128 bytes of nibbles (per 64 weights: 32 low nibbles, then 32 high); sub-block j of 32 weights is
    w = d*sc_j*q - dmin*m_j = (d*sc_j) * (q - 8) + (8*d*sc_j - dmin*m_j)."""
    blocks = raw.reshape(raw.shape[0], -1, 144)
    d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])
    packed = blocks[..., 4:16]  # bytes 0-3: low 6 bits = sc0-3; 4-7: mins 0-3; 8-11: low/high nibble = sc/m 4-7
    low, mid, top = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([low & 63, (top & 0xF) | ((low >> 6) << 4)], axis=-1).astype(np.float32)  # (..., 8)
    mins = np.concatenate([mid & 63, (top >> 4) | ((mid >> 6) << 4)], axis=-1).astype(np.float32)
    nibbles = blocks[..., 16:].reshape(*blocks.shape[:2], 4, 1, 32)
    q = np.concatenate([nibbles & 0xF, nibbles >> 4], axis=3)  # (rows, super-blocks, 4, 2, 32): sub-blocks 2c, 2c+1
    scale = d[..., None] * sc
    return q, scale, 8 * scale - dmin[..., None] * mins
