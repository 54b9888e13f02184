"""Quantized linears (glmkit.quant): the kernels compute the dequantized-weight matmul, the swap refuses
bad input, and quantized models decode through generate() and the server scheduler."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from glmkit.quant import Int4Linear, Int8Embedding, Int8Linear, quantize_
from glmkit.quant.linear import dequantize_int4, dequantize_int8, quantize_int4, quantize_int8
from tests.conftest import max_rel_diff

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 8e-3}  # bf16: the output itself is rounded to 8 bits


def linear(in_features: int = 256, out_features: int = 96, bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.linspace(0.2, 3.0, in_features))  # uneven columns: groups get different scales
    return layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5,), (2, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("method,group_size", [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)])
def test_quantized_linear_is_the_dequantized_matmul(method, group_size, shape, dtype):
    layer = linear().to(dtype)
    w = layer.weight.detach()
    if method == "int8":
        q, scales = quantize_int8(w, dtype)
        module = Int8Linear.from_linear(layer)
        assert torch.equal(module.weight, q) and torch.equal(module.scales, scales)
        dequantized = dequantize_int8(q, scales)
    else:
        q, scales_and_zeros = quantize_int4(w, group_size, dtype)
        module = Int4Linear.from_linear(layer, group_size)
        assert torch.equal(module.int4_values(), q)  # the kernel's packed layout holds exactly these values
        dequantized = dequantize_int4(q, scales_and_zeros, group_size)
    step = (w.float() - dequantized).abs().max()  # the quantization error is half a step at most
    assert step <= (w.float().abs().max() / (127 if method == "int8" else 7.5)), "quantization error too large"
    x = torch.randn(*shape, 256).to(dtype)
    expected = x.float() @ dequantized.t() + layer.bias.float()
    got = module(x)
    assert got.dtype == dtype and got.shape == (*shape, 96)
    assert max_rel_diff(expected, got) <= TOLERANCE[dtype]


def test_int8_embedding_is_the_dequantized_lookup():
    torch.manual_seed(0)
    table = nn.Embedding(50, 24)
    module = Int8Embedding.from_embedding(table)
    ids = torch.tensor([[3, 0, 49], [7, 7, 1]])
    expected = dequantize_int8(*quantize_int8(table.weight.detach(), torch.float32))[ids]
    assert torch.equal(module(ids), expected)


def test_fp32_scales_follow_the_model_dtype():
    module = Int8Linear.from_linear(linear())
    module.to(torch.bfloat16)
    assert module.scales.dtype == torch.bfloat16 and module.weight.dtype == torch.int8
    assert module(torch.randn(3, 256, dtype=torch.bfloat16)).dtype == torch.bfloat16


class Tiny(nn.Module):
    def __init__(self, width: int = 128):
        super().__init__()
        self.embed_tokens = nn.Embedding(64, width)
        self.proj = nn.Linear(width, width)
        self.block = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))
        self.lm_head = nn.Linear(width, 64, bias=False)


def test_swap_quantizes_linears_and_keeps_heads():
    model = quantize_(Tiny(), "int8")
    assert isinstance(model.proj, Int8Linear) and isinstance(model.block[0], Int8Linear)
    assert type(model.lm_head) is nn.Linear and type(model.embed_tokens) is nn.Embedding
    both = quantize_(Tiny(), "int4", group_size=32, include_embeddings=True, include_lm_head=True)
    assert isinstance(both.lm_head, Int4Linear) and isinstance(both.embed_tokens, Int8Embedding)


def test_swap_refuses_bad_input():
    with pytest.raises(ValueError, match="already quantized"):
        quantize_(quantize_(Tiny(), "int8"), "int8")
    with pytest.raises(ValueError, match="unknown quantization method 'int3'"):
        quantize_(Tiny(), "int3")
    with pytest.raises(ValueError, match="group_size 64 does not divide the 96 input features of proj"):
        quantize_(Tiny(96), "int4", group_size=64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        quantize_(Tiny(), "int4", group_size=48)
    with pytest.raises(ValueError, match="group_size applies to int4 only"):
        quantize_(Tiny(), "int8", group_size=32)
    model = Tiny(96)
    with pytest.raises(ValueError):
        quantize_(model, "int4", group_size=64)
    assert type(model.proj) is nn.Linear, "a refused swap must leave the model untouched"


# ---- quantized models on the decode paths ---------------------------------------------------------------


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with every quantized linear replaced by a plain nn.Linear of its dequantized weight."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if isinstance(module, (Int8Linear, Int4Linear)):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            plain.weight = nn.Parameter(module.dequantized_weight())
            if module.bias is not None:
                plain.bias = nn.Parameter(module.bias.detach().float())
            parent, _, child = name.rpartition(".")
            setattr(ref.get_submodule(parent), child, plain)
    return ref


@pytest.fixture(scope="module", params=["int8", "int4"])
def quantized_glm(request):
    from glmkit import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained("default:glm")
    quantize_(model, request.param, group_size=32 if request.param == "int4" else None)
    return model, AutoTokenizer.from_pretrained("default:glm")


def test_quantized_model_logits_and_generate(quantized_glm):
    model, tokenizer = quantized_glm
    ids = tokenizer("ROMEO: What light", return_tensors="pt").input_ids
    ref = dequantized_copy(model)
    assert max_rel_diff(ref(ids).logits, model(ids).logits) <= 1e-5
    expected = ref.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False), expected)
    static = model.generate(ids, max_new_tokens=12, do_sample=False, cache_implementation="static")
    assert torch.equal(static, expected)


def test_quantized_model_compiled_generate(quantized_glm):
    model, tokenizer = quantized_glm
    ids = tokenizer("JULIET: O Romeo", return_tensors="pt").input_ids
    plain = model.generate(ids, max_new_tokens=8, do_sample=False)
    with _no_fallback():
        compiled = model.generate(ids, max_new_tokens=8, do_sample=False, compile=True)
    assert torch.equal(compiled, plain)


class _no_fallback:
    """Fail if the engine fell back to eager decoding (its fallback only warns)."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self._seen = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        fallbacks = [str(w.message) for w in self._seen if "eagerly" in str(w.message)]
        assert not fallbacks, fallbacks


def test_quantized_model_through_the_scheduler(quantized_glm):
    import threading

    from glmkit.serve.scheduler import Request, SamplingParams, Scheduler

    model, tokenizer = quantized_glm
    prompts = ["ROMEO:", "First Citizen:\nBefore we proceed", "KING"]
    got: dict[str, list[int]] = {}
    finished: set[str] = set()
    done = threading.Event()

    def on_event(event):
        got.setdefault(event.request_id, []).extend(event.token_ids)
        if event.finish_reason is not None:
            finished.add(event.request_id)
            if len(finished) == len(prompts):
                done.set()

    scheduler = Scheduler(model, tokenizer)
    scheduler.start()
    try:
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
            scheduler.submit(Request(tokenizer(prompt).input_ids, params, on_event, str(i)))
        assert done.wait(120)
    finally:
        scheduler.stop()
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        alone = model.generate(ids, max_new_tokens=10, do_sample=False, eos_token_id=None)[0, ids.shape[1]:]
        assert got[str(i)] == alone.tolist()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_loaded_packed_weight_is_realigned_for_the_kernel(method):
    """safetensors hands out integer tensors as views at any byte offset; torch 2.13's int8 kernel with bf16
    rows crashes the process on such a weight (AMX CPUs), so loading copies it onto a 64-byte boundary."""
    linear = nn.Linear(128, 64, bias=False).to(torch.bfloat16)
    module = Int8Linear.from_linear(linear) if method == "int8" else Int4Linear.from_linear(linear.float(), 32)
    state = module.state_dict()
    packed = state["weight"]
    slab = torch.empty(packed.numel() + 128, dtype=packed.dtype)
    start = (-slab.data_ptr()) % 64 + 24  # 8-byte aligned, not 64
    state["weight"] = slab[start : start + packed.numel()].view(packed.shape).copy_(packed)
    assert state["weight"].data_ptr() % 64 == 24
    module.load_state_dict(state, assign=True)
    assert module.weight.data_ptr() % 64 == 0
    x = torch.randn(5, 128, dtype=torch.bfloat16 if method == "int8" else torch.float32)
    expected = x.float() @ module.dequantized_weight().float().t()
    assert max_rel_diff(module(x).float(), expected) < 2e-2
