"""GGUF files laid out as llama.cpp's converter (convert_hf_to_gguf.py, ChatGLMModel: arch "chatglm") writes
a GLM-4 `GlmForCausalLM` checkpoint, built with the `gguf` package's writer and quantizer (tests/quant/test_gguf.py
and benchmarks/gguf_import.py)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

T = gguf.GGMLQuantizationType

LAYER_NAMES = {  # the converter's tensor map for GlmForCausalLM (gguf-py tensor_mapping.py)
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip
GLOBAL_NAMES = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str) -> str:
    stem, _, kind = hf_name.rpartition(".")
    if stem in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[stem]}.{kind}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{LAYER_NAMES[rest]}.{kind}"


def add_tensor(writer, name: str, tensor: torch.Tensor, qtype) -> None:
    """2-D weights in `qtype` (or `qtype(name)`), 1-D (norms, biases) in F32, as llama.cpp keeps them. K-quants,
    which gguf-py cannot quantize, are crafted blocks (their values are not the checkpoint's)."""
    data = tensor.detach().float().numpy()
    qtype = qtype(name) if callable(qtype) else qtype
    if data.ndim == 1 or qtype == T.F32:
        writer.add_tensor(name, data)
    elif qtype in (T.Q4_K, T.Q6_K):
        writer.add_tensor(name, crafted_blocks(qtype, *data.shape, seed=len(name)), raw_dtype=qtype)
    else:
        writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)


def write_glm_gguf(model, path: Path, qtype, fused_qkv: bool = False, tokenizer_dir: Path | None = None) -> Path:
    """ChatGLMModel.set_gguf_parameters + the tensor map; `fused_qkv` writes attn_qkv as the original THUDM
    release converts (query_key_value)."""
    c = model.config
    writer = gguf.GGUFWriter(path, "chatglm")
    writer.add_context_length(c.hidden_size)  # the converter's hparams.get("seq_length", n_embed)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(0)
    writer.add_rope_dimension_count(int(c.hidden_size // c.num_attention_heads * 0.5))
    writer.add_add_bos_token(False)
    writer.add_rope_freq_base(10000)
    if tokenizer_dir is not None:
        add_glm_tokenizer(writer, tokenizer_dir, c.vocab_size)
    state = model.state_dict()
    for name, tensor in state.items():
        if fused_qkv and ".self_attn.k_proj." in name or fused_qkv and ".self_attn.v_proj." in name:
            continue
        if fused_qkv and ".self_attn.q_proj." in name:
            parts = [state[name.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")]
            add_tensor(writer, gguf_name(name).replace("attn_q", "attn_qkv"), torch.cat(parts), qtype)
        else:
            add_tensor(writer, gguf_name(name), tensor, qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_glm_tokenizer(writer, directory: Path, vocab_size: int) -> None:
    """get_vocab_base + SpecialVocab as ChatGLMModel.set_vocab does for a GlmForCausalLM checkpoint."""
    data = json.loads((directory / "tokenizer.json").read_text())
    by_id = {i: t for t, i in data["model"]["vocab"].items()}
    added = {t["id"]: t for t in data["added_tokens"]}
    tokens, types = [], []
    for i in range(vocab_size):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i]["special"] else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    ids = {t: i for i, t in enumerate(tokens)}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("chatglm-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]])
    writer.add_eos_token_id(ids["<|endoftext|>"])
    writer.add_eot_token_id(ids["<|user|>"])
    writer.add_unk_token_id(ids["<|endoftext|>"])
    writer.add_pad_token_id(ids["<|endoftext|>"])
    writer.add_chat_template((directory / "chat_template.jinja").read_text())


def write_tensors(path: Path, tensors: dict[str, tuple[np.ndarray, object]], arch: str = "chatglm") -> Path:
    writer = gguf.GGUFWriter(path, arch)
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def crafted_blocks(qtype, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Raw blocks of a type gguf-py cannot quantize: random bytes, with sane fp16 scale fields
    (d, and dmin for Q4_K) so the values are finite."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)
    scale_at = {T.Q4_K: (0, 2), T.Q6_K: (size - 2,)}[qtype]
    for at in scale_at:
        raw[..., at : at + 2] = (rng.random((rows, cols // block, 1)) * 1e-4).astype(np.float16).view(np.uint8)
    return raw.reshape(rows, -1)
