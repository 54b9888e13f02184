"""What the Flax and TF XGLM tests share (no TF / JAX imports here): tiny reference configs, the comparison
helpers, and a builder of (torch reference, framework reference, ours, glmkit torch, checkpoint dir) per variant."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import transformers
from conftest import scale_weights

import glmkit

RTOL = 1e-5
VOCAB, PAD, EOS = 120, 1, 2
BASE = dict(vocab_size=VOCAB, ffn_dim=64, num_layers=2, max_position_embeddings=40, dropout=0.1,
            attention_dropout=0.1, activation_dropout=0.1, pad_token_id=PAD, bos_token_id=0,
            eos_token_id=EOS)  # fmt: skip

# (settings, eos, left padding): hypotheses ending on EOS (ids 25 / 39 are frequent in these prompts' beams), the
# three early_stopping modes, both length_penalty signs, num_return_sequences
BEAM_CASES = [
    (dict(num_beams=3, num_return_sequences=3), 25, 2),
    (dict(num_beams=4, num_return_sequences=2, early_stopping="never", length_penalty=2.0), 39, 0),
    (dict(num_beams=2, early_stopping=True, length_penalty=-1.0), 25, 2),
]


def rel(expected, actual) -> float:
    expected, actual = np.asarray(expected, np.float64), np.asarray(actual, np.float64)
    assert expected.shape == actual.shape, (expected.shape, actual.shape)
    return float(np.abs(expected - actual).max() / max(np.abs(expected).max(), 1e-12))


def close(expected, actual, what: str, rtol: float = RTOL) -> None:
    diff = rel(expected, actual)
    assert diff <= rtol, f"{what}: max relative difference {diff:.3g} > {rtol}"


def batch(B: int = 2, T: int = 7, seed: int = 0, left_pad: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, VOCAB, (B, T)).astype(np.int32)
    mask = np.ones((B, T), np.int32)
    if left_pad:
        ids[1, :left_pad], mask[1, :left_pad] = PAD, 0
    return ids, mask


def model_builder(tmp_path_factory: Any, variants: dict[str, dict], reference_class: type,
                  ours_class: type) -> Callable[[str], tuple]:  # fmt: skip
    """variant -> (torch reference, framework reference, ours, glmkit torch, checkpoint dir), each built once
    from one random torch checkpoint (weights scaled up so a mapping error shows)."""
    models: dict[str, tuple] = {}

    def get(variant: str) -> tuple:
        if variant not in models:
            torch.manual_seed(0)
            ref = transformers.XGLMForCausalLM(transformers.XGLMConfig(**BASE, **variants[variant])).eval()
            scale_weights(ref)
            path = tmp_path_factory.mktemp(variant)
            ref.save_pretrained(path)
            models[variant] = ref, reference_class.from_pretrained(path, from_pt=True), \
                ours_class.from_pretrained(path), glmkit.XGLMForCausalLM.from_pretrained(path).eval(), path  # fmt: skip
        return models[variant]

    return get
