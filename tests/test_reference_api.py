"""The reference's model / config API beyond the math (glmkit/reference_api.py), checked against transformers."""

from __future__ import annotations

import importlib
import json
import logging

import pytest
import torch
from conftest import TINY_DECODERS, VOCAB, assert_close, reference_and_ours

import glmkit
from glmkit.checkpoint import CheckpointError
from glmkit.modeling import InputError

FAMILIES = sorted(TINY_DECODERS)


def _classes(family: str, task: str = "ForCausalLM"):
    """(transformers class, glmkit class) for e.g. task "ForCausalLM", "Model", "ForSequenceClassification"."""
    import transformers

    name = TINY_DECODERS[family][1].replace("ForCausalLM", task)
    return getattr(transformers, name), getattr(importlib.import_module(TINY_DECODERS[family][2]), name)


@pytest.mark.parametrize("family", FAMILIES)
def test_class_flags_match_reference(family):
    ref, ours = _classes(family)
    assert ours.can_generate() and ref.can_generate()
    base_ref, base_ours = _classes(family, "Model")
    assert base_ours.can_generate() == base_ref.can_generate() is False
    assert ours.main_input_name == ref.main_input_name == "input_ids"
    assert ours.supports_gradient_checkpointing and ours._supports_sdpa


@pytest.mark.parametrize("family", FAMILIES)
def test_base_checkpoint_into_lm_reports_what_the_reference_reports(family, tmp_path):
    base_ref, _ = _classes(family, "Model")
    ref_cls, ours_cls = _classes(family)
    ref, _ = reference_and_ours(family, tmp_path / "lm")
    ref.model.save_pretrained(tmp_path / "base")  # no lm_head (and no "model." prefix)
    _, ref_info = ref_cls.from_pretrained(tmp_path / "base", output_loading_info=True)
    model, info = ours_cls.from_pretrained(pretrained_model_name_or_path=tmp_path / "base", output_loading_info=True)
    assert sorted(info["missing_keys"]) == sorted(ref_info["missing_keys"])
    assert info["unexpected_keys"] == list(ref_info["unexpected_keys"]) == []
    assert all(p.device.type == "cpu" for p in model.parameters())
    if ref_info["missing_keys"]:  # an untied lm_head; glmkit's default stays strict about it
        with pytest.raises(CheckpointError, match="missing weights"):
            ours_cls.from_pretrained(tmp_path / "base")


@pytest.mark.parametrize("family", ["glm", "persimmon"])
def test_ignore_mismatched_sizes_as_reference(family, tmp_path, caplog):
    ref_cls, ours_cls = _classes(family, "ForSequenceClassification")
    reference_and_ours(family, tmp_path / "lm")
    ref_cls.from_pretrained(tmp_path / "lm", num_labels=2).save_pretrained(tmp_path / "cls")
    _, ref_info = ref_cls.from_pretrained(tmp_path / "cls", num_labels=5, ignore_mismatched_sizes=True,
                                          output_loading_info=True)  # fmt: skip
    with pytest.raises(CheckpointError, match="wrong shapes: score.weight"):
        ours_cls.from_pretrained(tmp_path / "cls", num_labels=5)
    with caplog.at_level(logging.WARNING, logger="glmkit"):
        model, info = ours_cls.from_pretrained(tmp_path / "cls", num_labels=5, ignore_mismatched_sizes=True,
                                               output_loading_info=True)  # fmt: skip
    assert info["mismatched_keys"] == list(ref_info["mismatched_keys"]) == ["score.weight"]
    assert "score.weight" in caplog.text
    assert model.score.weight.shape == (5, model.config.hidden_size)


@pytest.mark.parametrize("family", FAMILIES)
def test_state_dict_without_path_and_meta_device(family, tmp_path):
    ref, ours = reference_and_ours(family, tmp_path)
    _, ours_cls = _classes(family)
    again = ours_cls.from_pretrained(None, config=ours.config, state_dict=ours.state_dict())
    ids = torch.randint(3, VOCAB, (2, 6))
    assert_close(again(ids).logits, ref(ids).logits, what="from state_dict")
    with torch.device("meta"):
        meta = ours_cls.from_pretrained(tmp_path)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    with pytest.raises(ValueError, match="config= and state_dict="):
        ours_cls.from_pretrained(None, config=ours.config)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tied", [True, False])
def test_resize_token_embeddings_as_reference(family, tied, tmp_path):
    ref, ours = reference_and_ours(family, tmp_path, tie_word_embeddings=tied)
    old = ours.get_input_embeddings().weight.detach().clone()
    embedding_class = type(ours.get_input_embeddings())  # XGLM's scaled embedding stays one
    for model in (ref, ours):
        model.resize_token_embeddings(VOCAB + 5, pad_to_multiple_of=8, mean_resizing=False)
    assert ours.config.vocab_size == ref.config.vocab_size == ours.vocab_size == 104
    assert ours.get_input_embeddings().weight.shape == ref.get_input_embeddings().weight.shape
    assert ours.get_output_embeddings().weight.shape == ref.get_output_embeddings().weight.shape
    assert type(ours.get_input_embeddings()) is embedding_class
    assert ours.get_input_embeddings().num_embeddings == 104
    assert torch.equal(ours.get_input_embeddings().weight[:VOCAB], old)
    assert (ours.get_output_embeddings().weight is ours.get_input_embeddings().weight) == tied
    ids = torch.tensor([[1, 2, 103]])
    assert ours(ids).logits.shape == (1, 3, 104)
    with pytest.raises(ValueError, match="multiple of `2.5`"):
        ours.resize_token_embeddings(VOCAB, pad_to_multiple_of=2.5)


@pytest.mark.parametrize("family", ["glm", "persimmon"])
def test_custom_4d_mask_equals_reference(family, tmp_path):
    """Three continuations sharing a prefix in one row, each attending the prefix and itself only. (The
    reference's XGLM reads a 4D mask in its legacy 1 = attend form; glmkit takes bool or additive for all.)"""
    ref, ours = reference_and_ours(family, tmp_path)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    allowed = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    allowed[3:, 3:] = torch.eye(3, dtype=torch.bool)
    additive = torch.zeros(1, 1, 6, 6).masked_fill(~allowed, torch.finfo(torch.float32).min)
    positions = torch.tensor([[0, 1, 2, 3, 3, 3]])
    expected = ref(ids, attention_mask=additive, position_ids=positions).logits
    assert_close(ours(ids, attention_mask=additive, position_ids=positions).logits, expected, what="additive mask")
    assert_close(ours(ids, attention_mask=allowed[None, None], position_ids=positions).logits, expected,
                 what="bool 4D mask")  # fmt: skip
    with pytest.raises(InputError, match="4D attention_mask must have shape"):
        ours(ids, attention_mask=additive[..., :5])
    with pytest.raises(InputError, match="other additive biases"):
        ours(ids, attention_mask=additive - 1.0)


@pytest.mark.filterwarnings("ignore:sdpa cannot return attention weights")
@pytest.mark.parametrize("family", FAMILIES)
def test_attention_weights_keep_their_graph(family, tmp_path):
    _, ours = reference_and_ours(family, tmp_path)
    out = ours(torch.randint(3, VOCAB, (2, 5)), output_attentions=True, output_hidden_states=True)
    weights, hidden = out.attentions[0], out.hidden_states[0]
    weights.retain_grad()
    hidden.retain_grad()
    out.logits.flatten()[0].backward()
    assert weights.grad is not None and hidden.grad is not None


@pytest.mark.parametrize("family", FAMILIES)
def test_set_attn_implementation(family, tmp_path):
    _, ours = reference_and_ours(family, tmp_path)
    ids = torch.randint(3, VOCAB, (2, 5))
    sdpa = ours(ids).logits
    ours.set_attn_implementation("eager")
    assert ours.config._attn_implementation == "eager"
    assert_close(ours(ids).logits, sdpa, what="eager vs sdpa")
    with pytest.raises(ValueError, match='attn_implementation="foo"` is not supported'):
        ours.set_attn_implementation("foo")
    assert ours.config._attn_implementation == "eager"


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_with_frozen_embeddings(reentrant, tmp_path):
    """PEFT's recipe: frozen embeddings + enable_input_require_grads + checkpointing gives the same gradients."""
    _, ours = reference_and_ours("glm", tmp_path)
    ours.train()
    ids = torch.randint(3, VOCAB, (2, 6))
    ours.get_input_embeddings().weight.requires_grad_(False)
    ours(ids, labels=ids).loss.backward()
    expected = ours.model.layers[0].mlp.down_proj.weight.grad.clone()
    ours.zero_grad()
    ours.enable_input_require_grads()
    ours.gradient_checkpointing_enable({"use_reentrant": reentrant})
    assert ours.is_gradient_checkpointing
    ours(ids, labels=ids).loss.backward()
    assert_close(ours.model.layers[0].mlp.down_proj.weight.grad, expected, what="checkpointed gradient")
    ours.disable_input_require_grads()
    with pytest.raises(ValueError, match="use_reentrant"):
        ours.gradient_checkpointing_enable({"preserve_rng_state": False})


def test_config_gradient_checkpointing_switches_it_on():
    config = glmkit.GlmConfig(vocab_size=VOCAB, **TINY_DECODERS["glm"][3], gradient_checkpointing=True)
    assert glmkit.GlmForCausalLM(config).is_gradient_checkpointing


@pytest.mark.parametrize("family", FAMILIES)
def test_config_json_helpers_as_reference(family, tmp_path):
    import transformers

    config_name, _, module_name, kwargs = TINY_DECODERS[family]
    ours = getattr(importlib.import_module(module_name), config_name)(vocab_size=VOCAB, **kwargs)
    ref = getattr(transformers, config_name)(vocab_size=VOCAB, **kwargs)
    diff = ours.to_diff_dict()
    assert set(kwargs) | {"vocab_size"} <= set(diff) | {k for k, v in kwargs.items() if ours.to_dict()[k] ==
                                                        type(ours)().to_dict()[k]}  # fmt: skip
    assert set(diff) - {"model_type"} <= set(ref.to_diff_dict())
    ours.to_json_file(tmp_path / "diff.json")
    ours.to_json_file(tmp_path / "full.json", use_diff=False)
    assert json.loads((tmp_path / "full.json").read_text()) == json.loads(ours.to_json_string(use_diff=False))
    for name in ("diff.json", "full.json"):  # the reference reads both; so do we, to an equal config
        loaded = getattr(transformers, config_name).from_json_file(tmp_path / name)
        assert {k: getattr(loaded, k) for k in kwargs} == {k: getattr(ref, k) for k in kwargs}
        assert type(ours).from_json_file(tmp_path / name) == ours
    assert ours.get_text_config() is ours and ours.dtype is None
    ours.dtype = torch.bfloat16
    assert ours.dtype == torch.bfloat16 and ours.torch_dtype == "bfloat16"


def test_config_from_pretrained_subfolder_as_reference(tmp_path):
    import transformers

    glmkit.GlmConfig(vocab_size=VOCAB, **TINY_DECODERS["glm"][3]).save_pretrained(tmp_path / "sub")
    ref = transformers.GlmConfig.from_pretrained(tmp_path, subfolder="sub")
    ours = glmkit.GlmConfig.from_pretrained(tmp_path, subfolder="sub")
    assert ours.to_dict() == glmkit.GlmConfig.from_pretrained(tmp_path / "sub").to_dict()
    assert (ours.vocab_size, ours.hidden_size) == (ref.vocab_size, ref.hidden_size) != (151552, 4096)
    assert not hasattr(ours, "subfolder")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        glmkit.GlmConfig.from_pretrained(tmp_path, subfolder="missing")


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_reads_like_the_reference(family, tmp_path):
    """cache[layer] -> (k, v), len, iteration, get_seq_length, to_legacy_cache: the reference's DynamicCache's."""
    ref, ours = reference_and_ours(family, tmp_path)
    ids = torch.randint(3, VOCAB, (2, 5))
    ref_cache = ref(ids, use_cache=True).past_key_values
    cache = ours(ids, use_cache=True).past_key_values
    assert len(cache) == len(ref_cache) and cache.get_seq_length() == ref_cache.get_seq_length() == 5
    for layer in range(len(cache)):
        for got, want in zip(cache[layer], ref_cache[layer]):
            assert_close(got, want, what=f"layer {layer}")
    assert [k.shape for k, _ in cache] == [k.shape for k, _ in ref_cache.to_legacy_cache()]
    assert len(cache.to_legacy_cache()) == len(cache)
    cache.crop(3)
    assert cache.get_seq_length() == 3 and cache[0][0].shape[2] == 3
    with pytest.raises(IndexError, match="no layer"):
        cache[len(cache)]


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_dynamic_cache_accepted(family, tmp_path):
    """A DynamicCache the reference filled continues in glmkit (duck-typed: glmkit does not import transformers)."""
    from transformers import DynamicCache

    ref, ours = reference_and_ours(family, tmp_path)
    ids = torch.randint(3, VOCAB, (2, 7))
    full = ref(ids).logits
    prefix = ref(ids[:, :5], past_key_values=DynamicCache(), use_cache=True).past_key_values
    out = ours(ids[:, 5:], past_key_values=prefix, use_cache=True)
    assert_close(out.logits, full[:, 5:], what="continued from a DynamicCache")
    assert out.past_key_values.get_seq_length() == 7
    fresh = ours(ids, past_key_values=DynamicCache(), use_cache=True)  # an empty one starts a new cache
    assert_close(fresh.logits, full, what="empty DynamicCache")
    with pytest.raises(TypeError, match="transformers-style cache"):
        ours(ids, past_key_values=object())


@pytest.mark.parametrize("family", FAMILIES)
def test_prepare_inputs_for_generation_as_reference(family, tmp_path):
    """The next step's inputs (uncached ids, positions from a left-padded mask) as the reference builds them, and
    a loop driven by them decodes what generate() decodes."""
    from transformers import DynamicCache

    ref, ours = reference_and_ours(family, tmp_path)
    ids = torch.randint(3, VOCAB, (2, 6))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    ref_cache = ref(ids[:, :5], attention_mask=mask[:, :5], past_key_values=DynamicCache(), use_cache=True)
    cache = ours(ids[:, :5], attention_mask=mask[:, :5], use_cache=True).past_key_values
    step = torch.arange(5, 6)  # the reference needs the step's cache positions given
    want = ref.prepare_inputs_for_generation(ids, past_key_values=ref_cache.past_key_values, attention_mask=mask,
                                             cache_position=step)  # fmt: skip
    got = ours.prepare_inputs_for_generation(ids, past_key_values=cache, attention_mask=mask)
    keys = ["input_ids", "cache_position", "attention_mask"] + [k for k in ("position_ids",) if k in want]
    for key in keys:
        assert torch.equal(got[key], want[key]), key
    step_ids, step_mask, past = ids[:, :4], mask[:, :4], None
    for _ in range(4):  # greedy by hand
        inputs = ours.prepare_inputs_for_generation(step_ids, past_key_values=past, attention_mask=step_mask)
        out = ours(**inputs)
        past = out.past_key_values
        step_ids = torch.cat([step_ids, out.logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        step_mask = torch.cat([step_mask, torch.ones_like(step_mask[:, :1])], dim=1)
    expected = ours.generate(ids[:, :4], attention_mask=mask[:, :4], max_new_tokens=4, eos_token_id=None)
    assert torch.equal(step_ids, expected)
