"""The original THUDM GLM-4 release layout (model_type "chatglm", fused query_key_value) loads straight into
the GLM classes: tiny reference models written out in that layout by the documented mapping, loaded by glmkit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import assert_close, scale_weights

import glmkit
from glmkit import CheckpointError, ConfigError, GlmConfig, GlmForCausalLM, GlmModel
from glmkit.checkpoint import WeightReader, save_state_dict
from glmkit.cli import main
from glmkit.models.glm import CHATGLM_FIXED, convert_chatglm_state_dict

BASE = dict(
    vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, rms_norm_eps=1.5625e-07, max_position_embeddings=256,
    attention_bias=True, partial_rotary_factor=0.5, pad_token_id=0, eos_token_id=[1, 2],
)  # fmt: skip
VARIANTS = {  # name: (reference overrides, rope_ratio, weight format)
    "gqa": (dict(), 1.0, "safetensors"),
    "mha_ratio_0.05": (dict(num_key_value_heads=4), 0.05, "sharded"),
    "mqa_ratio_500": (dict(num_key_value_heads=1), 500.0, "bin"),
}


def reference(seed: int = 0, rope_ratio: float = 1.0, **overrides) -> transformers.GlmForCausalLM:
    torch.manual_seed(seed)
    cfg = transformers.GlmConfig(**{**BASE, **overrides}, rope_theta=10000.0 * rope_ratio)
    model = transformers.GlmForCausalLM(cfg).eval()
    scale_weights(model, seed=seed)
    return model


def chatglm_config(ref: transformers.GlmForCausalLM, rope_ratio: float) -> dict:
    c = ref.config
    return {
        "model_type": "chatglm", "architectures": ["ChatGLMModel"],
        "auto_map": {"AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"},
        "num_layers": c.num_hidden_layers, "padded_vocab_size": c.vocab_size, "hidden_size": c.hidden_size,
        "ffn_hidden_size": c.intermediate_size, "kv_channels": c.head_dim,
        "num_attention_heads": c.num_attention_heads,
        "multi_query_attention": c.num_key_value_heads != c.num_attention_heads,
        "multi_query_group_num": c.num_key_value_heads, "layernorm_epsilon": c.rms_norm_eps,
        "rope_ratio": rope_ratio, "add_qkv_bias": True, "add_bias_linear": False, "seq_length": 256,
        "original_rope": True, "apply_query_key_layer_scaling": True, "attention_softmax_in_fp32": True,
        "fp32_residual_connection": False, "post_layer_norm": True, "rmsnorm": True,
        "apply_residual_connection_post_layernorm": False, "tie_word_embeddings": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "bias_dropout_fusion": True, "use_cache": True,
        "eos_token_id": [1, 2], "pad_token_id": 0, "torch_dtype": "float32", "transformers_version": "4.44.0",
    }  # fmt: skip


def chatglm_state_dict(ref: transformers.GlmForCausalLM) -> dict[str, torch.Tensor]:
    """The inverse of the loader's mapping, written from the documented layout: q/k/v rows fused in that
    order into query_key_value, gate_up kept as dense_h_to_4h, plus the rotary buffer old exports carry."""
    sd = ref.state_dict()
    out = {
        "transformer.embedding.word_embeddings.weight": sd["model.embed_tokens.weight"],
        "transformer.rotary_pos_emb.inv_freq": torch.rand(ref.config.head_dim // 4),
        "transformer.encoder.final_layernorm.weight": sd["model.norm.weight"],
        "transformer.output_layer.weight": sd["lm_head.weight"],
    }
    for i in range(ref.config.num_hidden_layers):
        hf, og = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        for kind in ("weight", "bias"):
            qkv = [sd[f"{hf}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{og}self_attention.query_key_value.{kind}"] = torch.cat(qkv)
        out[f"{og}input_layernorm.weight"] = sd[f"{hf}input_layernorm.weight"]
        out[f"{og}self_attention.dense.weight"] = sd[f"{hf}self_attn.o_proj.weight"]
        out[f"{og}post_attention_layernorm.weight"] = sd[f"{hf}post_attention_layernorm.weight"]
        out[f"{og}mlp.dense_h_to_4h.weight"] = sd[f"{hf}mlp.gate_up_proj.weight"]
        out[f"{og}mlp.dense_4h_to_h.weight"] = sd[f"{hf}mlp.down_proj.weight"]
    return {k: v.clone() for k, v in out.items()}


def write_chatglm(ref, path: Path, rope_ratio: float = 1.0, fmt: str = "safetensors", **config_edits) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({**chatglm_config(ref, rope_ratio), **config_edits}))
    state = chatglm_state_dict(ref)
    if fmt == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_state_dict(state, path, max_shard_size=30_000 if fmt == "sharded" else "5GB")
    (path / "modeling_chatglm.py").write_text("raise RuntimeError('remote code must never run')\n")
    return path


def ids(batch: int = 2, length: int = 13) -> torch.Tensor:
    return torch.randint(3, BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_original_layout_logits(variant, tmp_path):
    overrides, ratio, fmt = VARIANTS[variant]
    ref = reference(rope_ratio=ratio, **overrides)
    path = write_chatglm(ref, tmp_path / "orig", ratio, fmt)
    if fmt == "sharded":
        assert (path / "model.safetensors.index.json").is_file()
    ours = GlmForCausalLM.from_pretrained(path)
    cfg = ours.config
    assert (cfg.model_type, cfg.rope_theta, cfg.partial_rotary_factor) == ("glm", 10000.0 * ratio, 0.5)
    assert cfg.num_key_value_heads == ref.config.num_key_value_heads and not cfg.tie_word_embeddings
    x = ids()
    with torch.no_grad():
        assert_close(ours(x).logits, ref(x).logits, rtol=1e-5, what=f"chatglm logits[{variant}]")


def test_auto_classes_and_base_model(tmp_path):
    ref = reference(rope_ratio=2.5)
    path = write_chatglm(ref, tmp_path / "orig", 2.5)
    assert type(glmkit.AutoConfig.from_pretrained(path)) is GlmConfig
    assert type(glmkit.AutoModelForCausalLM.from_pretrained(path)) is GlmForCausalLM
    base = glmkit.AutoModel.from_pretrained(path)  # lm_head belongs to another head: skipped
    assert type(base) is GlmModel
    x = ids()
    with torch.no_grad():
        assert_close(base(x).last_hidden_state, ref.model(x).last_hidden_state, rtol=1e-5, what="base model")
    half = GlmForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    want = ref.model.layers[1].self_attn.k_proj.weight.to(torch.bfloat16)
    assert torch.equal(half.model.layers[1].self_attn.k_proj.weight, want)


def test_in_memory_conversion_is_exact():
    ref = reference(num_key_value_heads=1)
    config = GlmConfig.from_dict(chatglm_config(ref, 1.0))
    converted = convert_chatglm_state_dict(chatglm_state_dict(ref), config)
    want = ref.state_dict()
    assert sorted(converted) == sorted(want)
    assert all(torch.equal(converted[k], want[k]) for k in want)


@pytest.mark.parametrize("key", sorted(CHATGLM_FIXED) + ["pre_seq_len"])
def test_settings_that_change_the_math_are_rejected(key, tmp_path):
    ref = reference()
    value = 16 if key == "pre_seq_len" else not CHATGLM_FIXED[key]
    path = write_chatglm(ref, tmp_path / "orig", **{key: value})
    with pytest.raises(ConfigError, match=key):
        GlmForCausalLM.from_pretrained(path)


def test_wrong_fused_qkv_rows_named_before_reading(tmp_path, monkeypatch):
    ref = reference()
    path = write_chatglm(ref, tmp_path / "orig", multi_query_group_num=1)  # says 1 kv head, weights have 2

    def no_reads(*_):
        raise AssertionError("a tensor was read before the checkpoint was checked")

    monkeypatch.setattr(WeightReader, "get", no_reads)
    with pytest.raises(CheckpointError, match=r"query_key_value must have .* = 96 rows.*\(128, 48\)"):
        GlmForCausalLM.from_pretrained(path)


def glmkit_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "glmkit.cli", *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_convert_then_reference_loads_and_info(tmp_path, capsys):
    """`glmkit convert` writes the HF layout plus tokenizer files (no code, the vocabulary also as
    tokenizer.json) that transformers loads unchanged."""
    ref = reference(num_key_value_heads=1, rope_ratio=500.0)
    src = write_chatglm(ref, tmp_path / "orig", 500.0, "sharded")
    (src / "tokenizer.model").write_bytes(b"IQ== 0\nISE= 1\n")  # "!" and "!!"
    tokenizer_config = {"chat_template": "{{ messages }}", "auto_map": {"AutoTokenizer": ["tokenization_chatglm.X"]}}
    (src / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    (src / "tokenization_chatglm.py").write_text("raise RuntimeError\n")
    out = tmp_path / "hf"
    done = glmkit_cli("convert", str(src), str(out))
    assert done.returncode == 0, done.stderr
    assert json.loads((out / "config.json").read_text())["model_type"] == "glm"
    assert (out / "tokenizer.model").read_bytes() == b"IQ== 0\nISE= 1\n"
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)  # the converted tokenizer.json, no remote code
    assert tokenizer("!!!")["input_ids"] == tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>"]) + [1, 0]
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "!"}], tokenize=False)
    assert chat == "[{'role': 'user', 'content': '!'}]"  # the source's template, kept
    assert "auto_map" not in json.loads((out / "tokenizer_config.json").read_text())
    assert not list(out.glob("*.py"))
    back = transformers.GlmForCausalLM.from_pretrained(out).eval()
    x = ids()
    with torch.no_grad():
        assert_close(back(x).logits, ref(x).logits, rtol=1e-5, what="convert -> transformers")

    done = glmkit_cli("info", str(out), "--json")
    assert done.returncode == 0, done.stderr
    facts = json.loads(done.stdout)
    assert facts["family"] == facts["model_type"] == "glm"
    assert facts["parameters"] == ref.num_parameters() and facts["chat_template"] is True
    assert facts["weight_files"] == {"model.safetensors": (out / "model.safetensors").stat().st_size}
    assert facts["dtype"] == "float32"

    assert main(["info", str(src)]) == 0  # in-process: a third interpreter start costs seconds
    text = capsys.readouterr().out
    assert "model_type:    chatglm" in text and "family:        glm" in text
    assert "model-00001-of-" in text and f"{ref.num_parameters():,}" in text
