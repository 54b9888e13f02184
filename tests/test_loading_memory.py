"""Loading without waste (DESIGN rule 7): no fp32 detour for bf16 checkpoints, peak memory near the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import glmkit
import glmkit.checkpoint as checkpoint
from glmkit.checkpoint import WeightReader

CONFIG = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, pad_token_id=0, eos_token_id=1)  # fmt: skip
XGLM_CONFIG = dict(vocab_size=512, d_model=64, ffn_dim=96, num_layers=2, attention_heads=4, pad_token_id=1)


class Float32Watch(TorchDispatchMode):
    """Records every real (non-meta) fp32 tensor an operation produces."""

    def __init__(self):
        super().__init__()
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.device.type != "meta":
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bf16")
    glmkit.GlmForCausalLM(glmkit.GlmConfig(**CONFIG)).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype", [torch.bfloat16, "auto"])
def test_bf16_checkpoint_never_materialises_fp32(bf16_checkpoint, dtype):
    watch = Float32Watch()
    with watch:
        model = glmkit.GlmForCausalLM.from_pretrained(bf16_checkpoint, dtype=dtype)
    assert watch.seen == []
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_converting_reads_in_slices(bf16_checkpoint, tmp_path, monkeypatch):
    """An fp32 checkpoint read as bf16 goes through a bounded staging buffer, never a whole fp32 tensor."""
    model = glmkit.GlmForCausalLM.from_pretrained(bf16_checkpoint, dtype=torch.float32)
    model.save_pretrained(tmp_path)
    monkeypatch.setattr(checkpoint, "_READ_CHUNK", 1024)  # bytes: 256 fp32 values at a time
    reader = WeightReader(tmp_path)
    watch = Float32Watch()
    with watch:
        tensors = {name: reader.get(name, torch.bfloat16) for name in reader.keys()}
    assert watch.seen and max(torch.Size(shape).numel() for _, shape in watch.seen) <= 256
    for name, tensor in tensors.items():
        assert torch.equal(tensor, model.state_dict()[name].to(torch.bfloat16)), name


def test_weights_are_private_memory_not_file_mappings(bf16_checkpoint, tmp_path):
    """Overwriting the checkpoint after loading must not change (or fault) the loaded model."""
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(bf16_checkpoint, copy)
    model = glmkit.GlmForCausalLM.from_pretrained(copy, dtype="auto")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = copy / "model.safetensors"
    weights.write_bytes(b"\0" * weights.stat().st_size)  # same inode, truncated and rewritten
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


CHILD = """
import json, sys, torch, glmkit
def kb(field):
    return int(next(l for l in open("/proc/self/status") if l.startswith(field + ":")).split()[1])
glmkit.AutoModelForCausalLM.from_pretrained(sys.argv[2], dtype=sys.argv[3])  # one-time set-up: not loading
base = kb("VmRSS")
open("/proc/self/clear_refs", "w").write("5")
model = glmkit.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[3])
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"peak": (kb("VmHWM") - base) * 1024, "weights": weights}))
"""


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak")
@pytest.mark.parametrize("family, saved, loaded", [("glm", torch.bfloat16, "auto"),
                                                   ("xglm", torch.float32, "bfloat16")])  # fmt: skip
def test_peak_resident_memory_near_weight_bytes(tmp_path, family, saved, loaded):
    """Load a 40-170 MB checkpoint (as is, or fp32 converted to bf16 while reading) in a fresh process: peak RSS
    growth <= 1.15 x the loaded weights' bytes."""
    if family == "glm":
        make = lambda **kw: glmkit.GlmForCausalLM(glmkit.GlmConfig(**{**CONFIG, **kw}))
        big = dict(vocab_size=32768, hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    else:
        make = lambda **kw: glmkit.XGLMForCausalLM(glmkit.XGLMConfig(**{**XGLM_CONFIG, **kw}))
        big = dict(vocab_size=32768, d_model=1024, ffn_dim=4096, num_layers=4)  # a 134 MB fp32 embedding
    with torch.device("meta"):
        model = make(**big)
    model = model.to_empty(device="cpu").to(saved)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(tmp_path / "big")
    make().to(saved).save_pretrained(tmp_path / "small")
    root = str(Path(glmkit.__file__).resolve().parents[1])
    args = [sys.executable, "-c", CHILD, str(tmp_path / "big"), str(tmp_path / "small"), loaded]
    out = subprocess.run(args, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": root})  # fmt: skip
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["weights"] > 30e6
    assert result["peak"] <= 1.15 * result["weights"], result
