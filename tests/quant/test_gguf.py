"""GGUF import, against files built here with the `gguf` package (llama.cpp's own writer and quantizer) laid
out as llama.cpp's converter (convert_hf_to_gguf.py, ChatGLMModel: arch "chatglm") writes GLM-4.

Oracles: gguf.quants.dequantize for every tensor, transformers' GlmForCausalLM (with the file's dequantized
weights) for the logits, transformers' tokenizer over the bundled tokenizer.json for the tokenizer."""

from __future__ import annotations

import copy
from pathlib import Path

import gguf  # in the [test] extra: the proof must run, not skip
import numpy as np
import pytest
import torch

from glmkit import AutoModelForCausalLM, AutoTokenizer
from glmkit.bundled import path as bundled_path
from glmkit.checkpoint import CheckpointError
from glmkit.layers import Linear
from glmkit.models.glm import GlmForCausalLM
from glmkit.quant import Int4Linear, Int8Linear
from glmkit.quant.gguf import GGUFCheckpoint, dequantized, int4_blocks
from glmkit.quant.linear import dequantize_int4, unpack_nibbles
from tests.conftest import assert_close, max_rel_diff, reference_and_ours
from tests.quant.gguf_files import T, crafted_blocks, gguf_name, write_glm_gguf, write_tensors

# head_dim = hidden / heads: the converter derives the rotary width from hidden / heads, as real GLM-4 has it
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            rms_norm_eps=1e-5)  # fmt: skip  (the converter always writes layernorm_epsilon 1e-5 for GlmForCausalLM)


# ---- every tensor equals gguf's own dequantization -----------------------------------------------------


@pytest.mark.parametrize("qtype", [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q4_K, T.Q6_K])
def test_every_tensor_equals_gguf_dequantization(tmp_path, qtype):
    rows, cols = 48, 512
    if qtype in (T.Q4_K, T.Q6_K):
        raw = crafted_blocks(qtype, rows, cols)
    else:
        raw = gguf.quants.quantize(np.random.default_rng(1).standard_normal((rows, cols), np.float32), qtype)
    path = write_tensors(tmp_path / "t.gguf", {"w": (raw, qtype)})
    tensor = GGUFCheckpoint(path).tensors["w"]
    expected = torch.from_numpy(gguf.quants.dequantize(np.asarray(tensor.data), qtype).reshape(rows, cols).copy())
    assert torch.equal(dequantized(tensor, slice(None), torch.float32), expected)
    assert torch.equal(dequantized(tensor, slice(16, 40), torch.float32), expected[16:40])  # a qkv-style row range
    if qtype.name in ("Q4_0", "Q4_1", "Q4_K"):  # the int4 kernel's form: (q - 8) * scale + zero, group 32
        packed, scales_and_zeros = int4_blocks(tensor, slice(None), torch.float32)
        as_int4 = dequantize_int4(unpack_nibbles(packed), scales_and_zeros, 32)
        assert max_rel_diff(expected, as_int4) < 1e-6
        if qtype == T.Q4_0:  # no zero point, no sum: bit-exact
            assert torch.equal(as_int4, expected)


# ---- a GLM-4 GGUF gives the logits of the checkpoint it came from ---------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref, _ = reference_and_ours("glm", tmp_path_factory.mktemp("glm"), **TINY)
    return ref


def reference_with_file_weights(ref, path: Path):
    """The reference model with every weight replaced by gguf's dequantization of the file's."""
    checkpoint = GGUFCheckpoint(path)
    model = copy.deepcopy(ref)
    state = model.state_dict()
    with torch.no_grad():
        for name in state:
            key = gguf_name(name)
            if key not in checkpoint.tensors and (".k_proj." in name or ".v_proj." in name):
                continue  # set from attn_qkv with q_proj
            fused = key.replace("attn_q.", "attn_qkv.") if "attn_q." in key else key
            tensor = checkpoint.tensors.get(key) or checkpoint.tensors[fused]
            shape = [int(n) for n in reversed(tensor.shape)]
            value = torch.from_numpy(gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type).copy())
            value = value.reshape(shape)
            if key not in checkpoint.tensors:  # attn_qkv: split as the reference's q/k/v
                q_rows, kv_rows = state[name].shape[0], state[name.replace("q_proj", "k_proj")].shape[0]
                for part, rows in (("q_proj", slice(0, q_rows)), ("k_proj", slice(q_rows, q_rows + kv_rows)),
                                   ("v_proj", slice(q_rows + kv_rows, None))):  # fmt: skip
                    state[name.replace("q_proj", part)].copy_(value[rows])
            else:
                state[name].copy_(value)
    return model


IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38], [2, 71, 82, 81, 82, 8, 45, 90, 45, 23]])


@pytest.mark.parametrize("qtype,fused_qkv,rtol", [
    (T.F32, False, 1e-5), (T.F32, True, 1e-5), (T.F16, False, 1e-5), (T.Q8_0, False, 1e-5), (T.Q8_0, True, 1e-5),
    (T.Q4_0, False, 1e-5), (T.Q4_1, True, 1e-5),
])  # fmt: skip
def test_glm_gguf_gives_the_checkpoint_logits(reference, tmp_path, qtype, fused_qkv, rtol):
    path = write_glm_gguf(reference, tmp_path / f"glm.{qtype.name}.gguf", qtype, fused_qkv)
    ours = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name)
    assert isinstance(ours, GlmForCausalLM) and ours.dtype == torch.float32
    oracle = reference_with_file_weights(reference, path)
    with torch.no_grad():
        expected = oracle(IDS).logits
        actual = ours(IDS).logits
    assert_close(actual, expected, rtol=rtol, what=f"{qtype.name} logits")
    if qtype == T.F32:  # the file is the checkpoint: its own logits
        assert_close(actual, reference(IDS).logits, rtol=1e-5, what="F32 logits vs the source checkpoint")
    linears = {type(m) for m in ours.model.layers.modules()} & {Int4Linear, Linear}
    assert linears == ({Int4Linear} if qtype.name.startswith("Q4") else {Linear})


def q4_k_m(name: str):
    """llama.cpp's Q4_K_M mix, roughly: attn_v, ffn_down and the output in Q6_K, the rest Q4_K."""
    return T.Q6_K if name.startswith(("output.", "blk.0.attn_v", "blk.0.ffn_down")) else T.Q4_K


def test_q4_k_m_mix_gives_the_file_logits(tmp_path):
    """K-quant super-blocks span 256 inputs: a model 256 wide, Q4_K kept as int4 (group 32), Q6_K dequantized."""
    wide = dict(TINY, hidden_size=256, intermediate_size=256, head_dim=64)
    ref, _ = reference_and_ours("glm", tmp_path / "wide", **wide)
    path = write_glm_gguf(ref, tmp_path / "glm.Q4_K_M.gguf", q4_k_m)
    ours = AutoModelForCausalLM.from_pretrained(path)
    attn = ours.model.layers[0].self_attn
    assert isinstance(attn.q_proj, Int4Linear) and type(attn.v_proj) is Linear
    with torch.no_grad():
        assert_close(ours(IDS).logits, reference_with_file_weights(ref, path)(IDS).logits, rtol=1e-5, what="Q4_K_M")


def test_bf16_with_int4_blocks(reference, tmp_path):
    """bf16: the scales and zeros are rounded once to bf16; the logits stay near float32's."""
    path = write_glm_gguf(reference, tmp_path / "glm.Q4_1.gguf", T.Q4_1)
    fp32, bf16 = (AutoModelForCausalLM.from_pretrained(path, dtype=d) for d in (torch.float32, torch.bfloat16))
    assert bf16.model.layers[0].mlp.down_proj.scales_and_zeros.dtype == torch.bfloat16
    with torch.no_grad():
        assert max_rel_diff(fp32(IDS).logits, bf16(IDS).logits) < 0.05


def test_gguf_config_from_metadata(reference, tmp_path):
    path = write_glm_gguf(reference, tmp_path / "glm.gguf", T.F32)
    config = AutoModelForCausalLM.from_pretrained(path).config  # a .gguf path directly
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "partial_rotary_factor", "vocab_size", "attention_bias",
                "rope_theta", "tie_word_embeddings"):  # fmt: skip
        assert getattr(config, key) == getattr(reference.config, key), key
    assert config.rms_norm_eps == pytest.approx(1e-5)
    overridden = AutoModelForCausalLM.from_pretrained(path, max_position_embeddings=4096).config
    assert overridden.max_position_embeddings == 4096  # the converter wrote hidden_size there


def test_q8_0_requantized_per_channel_with_quantization_int8(reference, tmp_path):
    """Q8_0's per-32 scales do not fit the per-channel int8 kernel: by default it is dequantized (exact,
    above); quantization="int8" requantizes it per channel as it is read (close, not equal)."""
    path = write_glm_gguf(reference, tmp_path / "glm.Q8_0.gguf", T.Q8_0)
    ours = AutoModelForCausalLM.from_pretrained(path, quantization="int8")
    assert any(isinstance(m, Int8Linear) for m in ours.modules())
    with torch.no_grad():
        expected = reference_with_file_weights(reference, path)(IDS).logits
        actual = ours(IDS).logits
    assert max_rel_diff(expected, actual) < 0.05
    assert (actual.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_int4_linears_hold_the_file_values(reference, tmp_path):
    path = write_glm_gguf(reference, tmp_path / "glm.Q4_0.gguf", T.Q4_0)
    ours = AutoModelForCausalLM.from_pretrained(path)
    tensor = GGUFCheckpoint(path).tensors["blk.1.ffn_down.weight"]
    expected = gguf.quants.dequantize(np.asarray(tensor.data), T.Q4_0).reshape(64, 128)
    assert torch.equal(ours.model.layers[1].mlp.down_proj.dequantized_weight(), torch.from_numpy(expected))


def test_read_tensor_by_tensor_never_the_model_in_float(reference, tmp_path, monkeypatch):
    """Q4 linears never exist in float; with quantization="int8" a Q8_0 file's float copies live one at a time."""
    import weakref

    import glmkit.quant.gguf as reader

    alive: list[weakref.ref] = []
    floats: list[str] = []
    most = 0
    original = reader.dequantized

    def watched(tensor, rows, dtype):
        nonlocal most
        out = original(tensor, rows, dtype)
        alive[:] = [r for r in alive if r() is not None]
        if out.dim() == 2 and tensor.name.startswith("blk."):
            alive.append(weakref.ref(out))
            floats.append(tensor.name)
        most = max(most, len(alive))
        return out

    monkeypatch.setattr(reader, "dequantized", watched)
    AutoModelForCausalLM.from_pretrained(write_glm_gguf(reference, tmp_path / "glm.Q4_0.gguf", T.Q4_0))
    assert floats == []
    AutoModelForCausalLM.from_pretrained(write_glm_gguf(reference, tmp_path / "glm.Q8_0.gguf", T.Q8_0),
                                         quantization="int8")  # fmt: skip
    assert len(floats) == 12 and most == 1  # 2 layers x 6 linears
    AutoModelForCausalLM.from_pretrained(tmp_path / "glm.Q8_0.gguf")
    assert most > 1, "the watch must see a plain load keep every weight"


# ---- tokenizer ------------------------------------------------------------------------------------------

TEXTS = ["Hello world", "  leading spaces and trailing  ", "ROMEO:\nBut soft, what light through yonder window breaks?",
         "numbers 1234567 and 3.14159", "unicode: café, naïve, 東京, emoji 🙂", "<|user|>\nhi<|assistant|>",
         "it's they'RE we'd"]  # fmt: skip


def test_tokenizer_from_gguf_equals_the_source_tokenizer(tmp_path):
    from transformers import AutoTokenizer as ReferenceTokenizer

    source_dir = bundled_path("glm")
    source = ReferenceTokenizer.from_pretrained(source_dir)
    model = GlmForCausalLM.from_pretrained(source_dir)
    path = write_glm_gguf(model, tmp_path / "bundled.gguf", T.F32, tokenizer_dir=source_dir)
    ours = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in TEXTS:
        for special in (True, False):
            expected = source(text, add_special_tokens=special)["input_ids"]
            assert ours(text, add_special_tokens=special)["input_ids"] == expected, (text, special)
        ids = source(text)["input_ids"]
        assert ours.decode(ids) == source.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == source.decode(ids, skip_special_tokens=True)
    already = "[gMASK]<sop>already prefixed"  # glmkit adds the prefix once (the reference would repeat it)
    assert ours(already)["input_ids"] == AutoTokenizer.from_pretrained("default:glm")(already)["input_ids"]
    assert (ours.eos_token, ours.pad_token) == ("<|endoftext|>", "<|endoftext|>")
    assert ours.chat_template == (source_dir / "chat_template.jinja").read_text()
    # and the model loaded from that file is the bundled model; the converter writes layernorm_epsilon 1e-5 for
    # every GlmForCausalLM (it reads the THUDM key, absent here), so the checkpoint's own eps is passed back
    loaded = AutoModelForCausalLM.from_pretrained(path, rms_norm_eps=model.config.rms_norm_eps)
    assert loaded.config.eos_token_id == [ours.convert_tokens_to_ids("<|endoftext|>"),
                                          ours.convert_tokens_to_ids("<|user|>")]  # fmt: skip
    prompt = ours("ROMEO:", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert_close(loaded(prompt).logits, model(prompt).logits, rtol=1e-5, what="bundled GLM from GGUF")
    assert torch.equal(loaded.generate(prompt, max_new_tokens=12, do_sample=False),
                       model.generate(prompt, max_new_tokens=12, do_sample=False))  # fmt: skip


# ---- bad input ----------------------------------------------------------------------------------------


def test_unsupported_quant_type_names_type_and_tensor(tmp_path):
    block, size = gguf.GGML_QUANT_SIZES[T.Q8_K]
    raw = np.zeros((4, 256 // block * size), dtype=np.uint8)
    write_tensors(tmp_path / "bad.gguf", {"blk.0.attn_q.weight": (raw, T.Q8_K), "token_embd.weight":
                                          (np.zeros((8, 4), np.float32), T.F32)})  # fmt: skip
    checkpoint = GGUFCheckpoint(tmp_path / "bad.gguf")
    with pytest.raises(CheckpointError, match=r"blk\.0\.attn_q\.weight.*Q8_K"):
        GGUFCheckpoint(tmp_path / "bad.gguf").weights(GlmForCausalLM.config_class(
            hidden_size=256, num_attention_heads=4, head_dim=64, num_key_value_heads=2))  # fmt: skip
    assert checkpoint.arch == "chatglm"


@pytest.mark.parametrize("arch,message", [("glm4", "Glm4ForCausalLM"), ("llama", "glmkit reads: chatglm")])
def test_unknown_arch(tmp_path, arch, message):
    path = write_tensors(tmp_path / "x.gguf", {"token_embd.weight": (np.zeros((8, 4), np.float32), T.F32)}, arch)
    with pytest.raises(CheckpointError, match=message):
        AutoModelForCausalLM.from_pretrained(path)
    with pytest.raises(CheckpointError, match=message):
        AutoTokenizer.from_pretrained(path)


def test_missing_gguf_file(reference, tmp_path):
    write_glm_gguf(reference, tmp_path / "glm.Q8_0.gguf", T.Q8_0)
    with pytest.raises(FileNotFoundError, match=r"glm\.Q4_0\.gguf.*glm\.Q8_0\.gguf"):
        AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="glm.Q4_0.gguf")
    with pytest.raises(FileNotFoundError, match="glm.Q4_0.gguf"):
        AutoTokenizer.from_pretrained(tmp_path, gguf_file="glm.Q4_0.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(CheckpointError, match="junk.gguf"):
        AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="junk.gguf")


def test_missing_metadata_is_reported(tmp_path):
    path = write_tensors(tmp_path / "x.gguf", {"token_embd.weight": (np.zeros((8, 4), np.float32), T.F32)})
    with pytest.raises(CheckpointError, match="lacks the metadata key chatglm.embedding_length"):
        AutoModelForCausalLM.from_pretrained(path)


def test_base_model_keeps_int4(reference, tmp_path):
    """AutoModel (no lm_head, no "model." prefix) maps the file's names the same way."""
    from glmkit import AutoModel

    path = write_glm_gguf(reference, tmp_path / "glm.Q4_0.gguf", T.Q4_0)
    base = AutoModel.from_pretrained(path)
    assert isinstance(base.layers[0].mlp.down_proj, Int4Linear)
    full = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        assert torch.equal(base(IDS).last_hidden_state, full.model(IDS).last_hidden_state)


def test_missing_tensor_is_reported(reference, tmp_path):
    model = copy.deepcopy(reference)
    del model.model.layers[1].mlp.down_proj.weight  # the file lacks blk.1.ffn_down.weight
    model.model.layers[1].mlp.down_proj.register_buffer("unused", None)
    path = write_glm_gguf(model, tmp_path / "glm.gguf", T.F32)
    with pytest.raises(CheckpointError, match=r"missing weights: model\.layers\.1\.mlp\.down_proj\.weight"):
        AutoModelForCausalLM.from_pretrained(path)
