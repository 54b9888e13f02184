"""What the TensorFlow and Flax XGLM ports (glmkit.tf, glmkit.flax) share with the PyTorch model, as numpy.

The position table comes from the PyTorch model's own `sinusoidal_positions`, the config from XGLMConfig,
the decoding settings from GenerationConfig, and checkpoints are found by the same code: only the
framework maths lives in the ports.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .checkpoint import CheckpointError, find_weight_files
from .generation.config import DEFAULTS, GENERATION_CONFIG_NAME, GenerationConfig
from .hub import pop_hub_kwargs, resolve_checkpoint_dir
from .models.xglm import POSITION_OFFSET, XGLMConfig, sinusoidal_positions

# decoding settings the TF / Flax `generate` implement; any other non-default setting is refused by name
GENERATE_SETTINGS = frozenset({
    "max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
    "bos_token_id", "num_beams", "num_return_sequences", "use_cache", "length_penalty", "early_stopping",
})  # fmt: skip


class DecodeSettings(NamedTuple):
    """One `generate` call's resolved settings; hashable, so each port keeps one compiled decoder per settings
    and shape. `total` is the output length (prompt + new tokens)."""

    total: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    eos: tuple[int, ...]
    pad: int
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    num_return_sequences: int


def position_table(config: XGLMConfig) -> np.ndarray:
    """(max_position_embeddings + 2, d_model) fp32: row r is the PyTorch model's sinusoid for position
    r - 2, so `table[position_ids + 2]` is what the reference TF / Flax classes look up."""
    import torch

    rows = torch.arange(config.max_position_embeddings + POSITION_OFFSET)[None] - POSITION_OFFSET
    return sinusoidal_positions(rows, config.d_model, config.pad_token_id)[0].numpy()


def check_positions(position_ids: np.ndarray, config: XGLMConfig) -> None:
    """The ports look positions up in a fixed table: one past it is an error here, not a silent clamp."""
    ids = np.asarray(position_ids)
    if ids.size and (ids.min() < -1 or ids.max() >= config.max_position_embeddings):
        raise ValueError(
            f"position ids must lie in [-1, {config.max_position_embeddings - 1}] (max_position_embeddings), "
            f"got [{ids.min()}, {ids.max()}]"
        )


def checkpoint_dir(name_or_path: str | os.PathLike, kwargs: dict[str, Any]) -> Path:
    """A local checkpoint directory (hub ids resolved as for the PyTorch models); pops the hub keywords."""
    return resolve_checkpoint_dir(name_or_path, **pop_hub_kwargs(kwargs))


def generation_config(directory: Path, config: XGLMConfig) -> GenerationConfig:
    if (directory / GENERATION_CONFIG_NAME).is_file():
        return GenerationConfig.from_pretrained(directory)
    return GenerationConfig.from_model_config(config)


def prepare_generation(base: GenerationConfig, input_ids: Any, attention_mask: Any, max_positions: int,
                       kwargs: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, DecodeSettings]:  # fmt: skip
    """One `generate` call's checked (ids, mask, settings). Refuses, by name, the settings the ports lack. Sampling
    with num_return_sequences > 1 repeats each prompt row that many times (as the TF reference and PyTorch do)."""
    ids = np.asarray(input_ids, np.int32)
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must have shape (batch, length >= 1), got {ids.shape}")
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {ids.shape}, got {mask.shape}")
    gen = base.update(**kwargs)
    gen.validate()
    unsupported = sorted(k for k, v in DEFAULTS.items() if k not in GENERATE_SETTINGS and getattr(gen, k) != v)
    if gen.num_beams > 1 and gen.do_sample:
        unsupported.append("do_sample with num_beams > 1 (beam sampling)")
    if unsupported:
        raise NotImplementedError(
            f"the TensorFlow / Flax generate supports greedy, sampling (temperature, top_k, top_p) and beam search "
            f"(num_beams, length_penalty, early_stopping), num_return_sequences with either, only; unsupported "
            f"settings: {unsupported}"
        )
    prompt_length = ids.shape[1]
    total = prompt_length + gen.max_new_tokens if gen.max_new_tokens is not None else gen.max_length
    if total <= prompt_length:
        raise ValueError(f"nothing to generate: the prompt has {prompt_length} tokens and max_length is {total}")
    if total > max_positions:
        raise ValueError(f"max_length {total} > max_position_embeddings {max_positions}")
    eos = gen.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    pad = gen.pad_token_id if gen.pad_token_id is not None else (eos or [0])[0]
    settings = DecodeSettings(total, gen.do_sample, float(gen.temperature or 1.0), int(gen.top_k or 0),
                              float(gen.top_p or 1.0), tuple(eos), int(pad), gen.num_beams, float(gen.length_penalty),
                              gen.early_stopping, gen.num_return_sequences)  # fmt: skip
    if gen.num_beams == 1 and gen.num_return_sequences > 1:  # sampling: validate() refuses it for greedy
        ids, mask = np.repeat(ids, gen.num_return_sequences, 0), np.repeat(mask, gen.num_return_sequences, 0)
    return ids, mask, settings


def read_state_dict(directory: Path) -> dict[str, np.ndarray]:
    """The PyTorch-layout weights (HF names) as numpy: safetensors through safetensors' numpy API;
    `.bin` only through torch.load(weights_only=True); bf16 (which numpy lacks) via torch as fp32."""
    state: dict[str, np.ndarray] = {}
    for path in find_weight_files(directory):
        try:
            state.update(_read_safetensors(path) if path.suffix == ".safetensors" else _read_bin(path))
        except CheckpointError:
            raise
        except Exception as err:  # corrupt or foreign file: say which
            raise CheckpointError(f"cannot read weights from {path}: {err}") from err
    return state


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    if any(isinstance(e, dict) and e.get("dtype") == "BF16" for e in header.values()):
        return _read_bin(path)
    return load_file(str(path))


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError as err:
        raise CheckpointError(f"reading {path.name} needs torch (pip install torch)") from err
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(str(path))
    else:
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    return {k: (v.float() if v.dtype == torch.bfloat16 else v).numpy() for k, v in tensors.items()}
