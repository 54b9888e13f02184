"""The tokenizer a GGUF file carries (`tokenizer.ggml.*` metadata) as a tokenizers-backed FastTokenizer.

llama.cpp's converter writes GLM-4's byte-level BPE as model "gpt2": the token strings (byte-level
alphabet), the merges, a type per token (control / user-defined tokens are the added ones) and a
pre-tokenizer name whose split regex lives in llama.cpp (llama-vocab.cpp), not in the file.
"""

from __future__ import annotations

import os
from typing import Any

from .fast import FastTokenizer
from .glm4 import GLM4_GMASK, GLM4_SOP

# tokenizer.ggml.pre -> the split regex llama.cpp applies before byte-level BPE (GLM-4's tokenizer.json regex)
_GLM4_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")  # fmt: skip
_PRE_TOKENIZER_REGEX = {"chatglm-bpe": _GLM4_SPLIT, "glm4": _GLM4_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # gguf.TokenType values


def gguf_tokenizer(path: str | os.PathLike) -> FastTokenizer:
    """The GGUF file's tokenizer; GLM-4 files also get the "[gMASK]<sop>" prefix that `add_special_tokens`
    adds in the source tokenizer (the GGUF leaves it to llama.cpp's chat template)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    from ..quant.gguf import GGUFCheckpoint

    checkpoint = GGUFCheckpoint(path)
    kind, pre = checkpoint.field("tokenizer.ggml.model"), checkpoint.field("tokenizer.ggml.pre")
    if kind != "gpt2" or pre not in _PRE_TOKENIZER_REGEX:
        raise ValueError(f"GGUF tokenizer model {kind!r} with pre-tokenizer {pre!r} in {path} is not supported; "
                         f"glmkit builds 'gpt2' with {', '.join(_PRE_TOKENIZER_REGEX)}")  # fmt: skip
    tokens = checkpoint.field("tokenizer.ggml.tokens")
    types = checkpoint.field("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in checkpoint.field("tokenizer.ggml.merges", [])]
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_PRE_TOKENIZER_REGEX[pre]), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    backend.decoder = decoders.ByteLevel()
    special = [t for t, kind in zip(tokens, types) if kind == _CONTROL]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    backend.add_tokens([AddedToken(t, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED])
    vocab = {t: i for i, t in enumerate(tokens)}
    if GLM4_GMASK in vocab and GLM4_SOP in vocab:
        prefix = f"{GLM4_GMASK}:0 {GLM4_SOP}:0"
        backend.post_processor = processors.TemplateProcessing(
            single=f"{prefix} $A:0", pair=f"{prefix} $A:0 $B:1",
            special_tokens=[(GLM4_GMASK, vocab[GLM4_GMASK]), (GLM4_SOP, vocab[GLM4_SOP])],
        )  # fmt: skip
    return FastTokenizer(tokenizer_object=backend, chat_template=checkpoint.field("tokenizer.chat_template"),
                         additional_special_tokens=special, **_special_roles(checkpoint, tokens))  # fmt: skip


def _special_roles(checkpoint: Any, tokens: list[str]) -> dict[str, str]:
    roles = {"eos_token": "eos", "bos_token": "bos", "unk_token": "unknown", "pad_token": "padding"}
    found = {role: checkpoint.field(f"tokenizer.ggml.{key}_token_id") for role, key in roles.items()}
    return {role: tokens[i] for role, i in found.items() if i is not None and 0 <= i < len(tokens)}
