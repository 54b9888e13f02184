"""glmkit.lora: LoRA / QLoRA as a module swap, PEFT-format adapters both ways against peft + transformers,
merging (API and `glmkit merge`), and the errors for adapters that do not fit."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, assert_close, reference_and_ours

from glmkit import AutoModelForCausalLM, lora
from glmkit.cli import main
from glmkit.quant import Int4Linear, Int8Linear

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

FAMILIES = ("glm", "xglm", "persimmon")


def _ids(seed: int = 0, shape: tuple[int, int] = (2, 11)) -> torch.Tensor:
    return torch.randint(3, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _randomize_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero B (a fresh adapter is an identity): the comparisons below then test the adapter math."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora.lora_modules(model).values():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=gen) * 0.2)


def _logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=x).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_adapter_is_the_base(tmp_path, family):
    _, ours = reference_and_ours(family, tmp_path)
    x = _ids()
    before = _logits(ours, x)
    lora.apply(ours, rank=4, alpha=8, target_modules="all")
    assert lora.lora_modules(ours) and torch.equal(_logits(ours, x), before)


def test_a_step_changes_only_the_adapters(tmp_path):
    _, ours = reference_and_ours("glm", tmp_path)
    lora.apply(ours, rank=4, alpha=8, dropout=0.1, target_modules=["q_proj", "down_proj"])
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    ours.train()
    x = _ids()
    ours(input_ids=x, labels=x).loss.backward()
    optimizer.step()
    changed = {k for k, v in ours.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if ".lora_" in k}  # A and B of both targets, in every layer
    assert len(changed) == 2 * 2 * ours.config.num_hidden_layers


@pytest.mark.parametrize("family", FAMILIES)
def test_glmkit_adapter_loads_in_peft(tmp_path, family):
    ref, ours = reference_and_ours(family, tmp_path / "base")
    x = _ids()
    base_logits = _logits(ref, x)
    lora.apply(ours, rank=4, alpha=12, target_modules="all")
    _randomize_adapters(ours)
    lora.save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    keys = set(lora.read_adapter(tmp_path / "adapter")[1])
    assert f"base_model.model.{next(iter(lora.lora_modules(ours)))}.lora_A.weight" in keys
    assert not any("lm_head" in k for k in keys)  # "all" is every linear but the output head, as in PEFT
    with_peft = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").eval()
    assert_close(_logits(ours, x), _logits(with_peft, x), rtol=1e-5, what=f"{family} glmkit adapter in peft")
    assert (_logits(ours, x) - base_logits).abs().max() > 1e-3  # the adapter does change the logits


@pytest.mark.parametrize("family", FAMILIES)
def test_peft_adapter_loads_in_glmkit(tmp_path, family):
    ref, _ = reference_and_ours(family, tmp_path / "base")
    targets = {"glm": ["q_proj", "v_proj", "gate_up_proj"], "xglm": ["k_proj", "out_proj", "fc2"],
               "persimmon": ["query_key_value", "dense_4h_to_h"]}[family]  # fmt: skip
    config = peft.LoraConfig(r=4, lora_alpha=6, target_modules=targets, init_lora_weights=False, use_rslora=True,
                             rank_pattern={targets[0]: 2}, alpha_pattern={targets[-1]: 3})  # fmt: skip
    theirs = peft.get_peft_model(ref, config).eval()
    theirs.save_pretrained(tmp_path / "adapter")
    x = _ids()
    expected = _logits(theirs, x)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "base", adapter=tmp_path / "adapter")
    assert_close(_logits(ours, x), expected, rtol=1e-5, what=f"{family} peft adapter in glmkit")
    with theirs.disable_adapter():
        assert (_logits(theirs, x) - expected).abs().max() > 1e-3  # the adapter does change the logits


def test_merged_checkpoint_equals_the_adapter(tmp_path):
    ref, ours = reference_and_ours("glm", tmp_path / "base")
    lora.apply(ours, rank=4, alpha=8, target_modules="all")
    _randomize_adapters(ours)
    lora.save_adapter(ours, tmp_path / "adapter")
    x = _ids()
    with_adapter = _logits(ours, x)
    lora.merge(ours)
    assert not lora.lora_modules(ours)
    assert_close(_logits(ours, x), with_adapter, rtol=1e-5, what="merge() in memory")
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()  # plain checkpoint
    assert_close(_logits(merged, x), with_adapter, rtol=1e-5, what="glmkit merge loaded in transformers")
    peft_merged = peft.PeftModel.from_pretrained(ref, tmp_path / "adapter").merge_and_unload()
    assert_close(_logits(peft_merged, x), with_adapter, rtol=1e-5, what="peft's own merge")


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_qlora_on_a_quantized_base(tmp_path, method):
    """The adapter trains on a frozen int8 / int4 base; its forward and input gradients equal LoRA on a float
    base holding the dequantized weights (an independent computation through autograd's own nn.Linear)."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    quantize = (lambda m: Int8Linear.from_linear(m)) if method == "int8" else (lambda m: Int4Linear.from_linear(m, 32))
    quantized = torch.nn.Sequential(quantize(base[0]), torch.nn.GELU(), quantize(base[2]))
    dequantized = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    with torch.no_grad():
        for i in (0, 2):
            dequantized[i].weight.copy_(quantized[i].dequantized_weight())
            dequantized[i].bias.copy_(quantized[i].bias)
    x = torch.randn(5, 64)
    assert torch.allclose(quantized(x), dequantized(x), atol=1e-5)
    for model in (quantized, dequantized):
        torch.manual_seed(1)
        lora.apply(model, rank=4, alpha=8, target_modules=["0", "2"])
        _randomize_adapters(model)
    grads = []
    for model in (quantized, dequantized):
        out = model(x)
        out.square().sum().backward()
        grads.append([model[i].lora_A.weight.grad for i in (0, 2)])
    assert_close(quantized(x), dequantized(x), rtol=1e-5, what=f"{method} QLoRA forward")
    for g_quant, g_float in zip(*grads):
        assert g_quant is not None and g_quant.abs().max() > 0
        assert_close(g_quant, g_float, rtol=1e-4, what=f"{method} QLoRA gradient through the frozen base")
    assert isinstance(lora.merge(quantized)[0], torch.nn.Linear)


def test_qlora_on_a_quantized_checkpoint(tmp_path):
    _, ours = reference_and_ours("glm", tmp_path / "base")
    quantized = AutoModelForCausalLM.from_pretrained(tmp_path / "base", quantization="int8")
    x = _ids()
    before = _logits(quantized, x)
    lora.apply(quantized, rank=4, alpha=8, target_modules="all")
    assert torch.equal(_logits(quantized, x), before)
    quantized.train()
    quantized(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for n, p in quantized.named_parameters() if ".lora_" in n]
    assert grads and all(g is not None for g in grads)
    assert all(not p.requires_grad for n, p in quantized.named_parameters() if ".lora_" not in n)


# ---- errors -------------------------------------------------------------------------------------------


def test_target_that_matches_nothing(tmp_path):
    _, ours = reference_and_ours("glm", tmp_path)
    with pytest.raises(lora.AdapterError, match=r"query_key_value match no linear layer of GlmForCausalLM.*q_proj"):
        lora.apply(ours, target_modules=["q_proj", "query_key_value"])
    with pytest.raises(lora.AdapterError, match="match no linear layer"):
        lora.apply(ours, target_modules=r".*\.nothing")
    lora.apply(ours, target_modules=["q_proj"])
    with pytest.raises(lora.AdapterError, match="already has LoRA adapters"):
        lora.apply(ours, target_modules=["q_proj"])


def test_adapter_for_another_model(tmp_path):
    _, glm = reference_and_ours("glm", tmp_path / "glm")
    _, xglm = reference_and_ours("xglm", tmp_path / "xglm")
    lora.apply(xglm, rank=4, target_modules=["out_proj"])
    lora.save_adapter(xglm, tmp_path / "xglm_adapter")
    with pytest.raises(lora.AdapterError, match="made for another architecture: GlmForCausalLM has no linear"):
        glm.load_adapter(tmp_path / "xglm_adapter")
    assert not lora.lora_modules(glm)  # nothing was swapped in
    _, wider = reference_and_ours("glm", tmp_path / "wide", hidden_size=96)
    lora.apply(wider, rank=4, target_modules=["q_proj"])
    lora.save_adapter(wider, tmp_path / "wide_adapter")
    with pytest.raises(lora.AdapterError, match=r"wrong shapes: .*q_proj\.lora_A\.weight \(4, 96\)"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "glm", adapter=tmp_path / "wide_adapter")


def test_adapter_features_glmkit_does_not_read(tmp_path):
    _, ours = reference_and_ours("glm", tmp_path / "base")
    lora.apply(ours, rank=4, target_modules=["q_proj"])
    lora.save_adapter(ours, tmp_path / "adapter")
    config_file = tmp_path / "adapter" / lora.CONFIG_FILE
    config = json.loads(config_file.read_text())
    _, fresh = reference_and_ours("glm", tmp_path / "base")
    for key, value in (("use_dora", True), ("peft_type", "IA3"), ("bias", "all")):
        config_file.write_text(json.dumps({**config, key: value}))
        with pytest.raises(lora.AdapterError, match=key):
            fresh.load_adapter(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        fresh.load_adapter(tmp_path)
    assert main(["merge", str(tmp_path / "base"), str(tmp_path / "base"), str(tmp_path / "m")]) == 1
