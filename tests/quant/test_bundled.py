"""The bundled models quantized, on held-out Tiny Shakespeare (the last 5 % of the text they were trained on):
int8 picks the bf16 model's next token almost everywhere, and quantization costs little loss."""

from __future__ import annotations

import math

import pytest
import torch

from glmkit import AutoModelForCausalLM, AutoTokenizer
from glmkit.quant import quantize_
from tests.conftest import REPO

HELD_OUT = 0.95  # glmkit.train's eval_fraction: the tail the bundled models never trained on


@pytest.fixture(scope="module", params=["glm", "xglm", "persimmon"])
def held_out(request):
    name = f"default:{request.param}"
    text = (REPO / "data" / "tinyshakespeare.txt").read_text()
    tail = text[int(len(text) * HELD_OUT) :]
    ids = AutoTokenizer.from_pretrained(name)(tail[:20000], return_tensors="pt").input_ids[:, :1024]
    return name, ids.reshape(4, 256)  # (B, T)


def loss_and_argmax(name: str, ids: torch.Tensor, method: str | None = None, group_size: int | None = None):
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.bfloat16)
    if method is not None:
        quantize_(model, method, group_size)
    with torch.no_grad():
        out = model(ids, labels=ids)
    return float(out.loss), out.logits.argmax(-1)


def test_int8_next_token_agrees_with_bf16(held_out):
    name, ids = held_out
    bf16_loss, bf16_argmax = loss_and_argmax(name, ids)
    int8_loss, int8_argmax = loss_and_argmax(name, ids, "int8")
    agreement = (int8_argmax == bf16_argmax).float().mean().item()
    assert agreement >= 0.95, f"{name}: int8 argmax agrees with bf16 on {agreement:.1%} of held-out positions"
    assert math.exp(int8_loss - bf16_loss) <= 1.01, f"{name}: int8 perplexity {math.exp(int8_loss - bf16_loss):.4f}x"


def test_int4_g32_perplexity_within_5_percent(held_out):
    name, ids = held_out
    bf16_loss, _ = loss_and_argmax(name, ids)
    int4_loss, _ = loss_and_argmax(name, ids, "int4", 32)
    ratio = math.exp(int4_loss - bf16_loss)
    assert ratio <= 1.05, f"{name}: int4 g32 perplexity {ratio:.4f}x bf16's"
