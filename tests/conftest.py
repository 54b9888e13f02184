"""Shared test helpers: build tiny reference models, save them, compare numbers."""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def scale_weights(model: torch.nn.Module, factor: float = 4.0, seed: int = 0) -> None:
    """Re-draw every weight larger than the reference init (std 0.02) so that a wrong RoPE layout,
    norm or head mapping moves the logits far beyond tolerance; norms get non-unit weights too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            elif p.dim() == 1:  # norm weights
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.2)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02 * factor)


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a| — the figure the closing notes quote."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4, what: str = "") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual.float()).all(), f"{what}: non-finite values"
    diff = max_rel_diff(expected, actual)
    assert diff <= rtol, f"{what}: max relative difference {diff:.3g} > {rtol}"


def ran_ops(fn) -> tuple[object, set[str]]:
    """fn()'s result and the names of the CPU ops it ran (torch.profiler): which kernels a path really took."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        out = fn()
    return out, {e.key for e in prof.key_averages()}


@pytest.fixture
def save_dir(tmp_path: Path) -> Path:
    return tmp_path / "ckpt"


# tiny causal LMs of every family (vocabulary VOCAB) for the decode-engine tests: (reference config class,
# model class, glmkit module, config keywords)
VOCAB = 96
TINY_DECODERS = {
    "glm": ("GlmConfig", "GlmForCausalLM", "glmkit.models.glm", dict(
        hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, pad_token_id=0, eos_token_id=1,
    )),
    "xglm": ("XGLMConfig", "XGLMForCausalLM", "glmkit.models.xglm", dict(
        d_model=48, ffn_dim=80, num_layers=2, attention_heads=4, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        dropout=0.0, attention_dropout=0.0,
    )),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", "glmkit.models.persimmon", dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
        eos_token_id=1, bos_token_id=2,
    )),
}  # fmt: skip


def reference_and_ours(family: str, directory: Path, seed: int = 0, **overrides):
    """A random reference model of `family` (weights scaled up) and glmkit's, loaded from its saved copy."""
    import transformers

    config_name, model_name, module_name, kwargs = TINY_DECODERS[family]
    torch.manual_seed(seed)
    config = getattr(transformers, config_name)(vocab_size=VOCAB, **{**kwargs, **overrides})
    ref = getattr(transformers, model_name)(config).eval()
    scale_weights(ref, factor=6.0, seed=seed)
    ref.save_pretrained(directory)
    return ref, getattr(importlib.import_module(module_name), model_name).from_pretrained(directory)
