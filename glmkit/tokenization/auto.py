"""`AutoTokenizer`: read a checkpoint directory's files and configs, pick the class and build it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .. import chat as _chat
from ..quant.gguf import gguf_file_path, is_gguf_path
from .base import Tokenizer, _load_init_kwargs, _read_json, _resolve_dir
from .fast import FastTokenizer, LlamaTokenizerFast, XGLMTokenizerFast
from .gguf import gguf_tokenizer
from .glm4 import GLM4_GMASK, ChatGLM4Tokenizer, _is_tiktoken_file
from .sentencepiece import LlamaTokenizer, XGLMTokenizer

_SLOW_CLASSES: dict[str, type[Tokenizer]] = {
    "XGLMTokenizer": XGLMTokenizer,
    "LlamaTokenizer": LlamaTokenizer,
    "ChatGLM4Tokenizer": ChatGLM4Tokenizer,
}
_FAST_CLASSES: dict[str, type[Tokenizer]] = {
    "XGLMTokenizer": XGLMTokenizerFast,
    "LlamaTokenizer": LlamaTokenizerFast,
    "PreTrainedTokenizer": FastTokenizer,
    "ChatGLM4Tokenizer": FastTokenizer,
    "ChatGLMTokenizer": FastTokenizer,
}
_MODEL_TYPE_TO_CLASS = {
    "xglm": "XGLMTokenizer",
    "persimmon": "LlamaTokenizer",
    "glm": "ChatGLM4Tokenizer",
    "glm4": "ChatGLM4Tokenizer",
    "chatglm": "ChatGLM4Tokenizer",
}


class AutoTokenizer:
    """Pick and load the right tokenizer class from a checkpoint directory."""

    def __init__(self) -> None:
        raise TypeError("use AutoTokenizer.from_pretrained(path)")

    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str | os.PathLike, *, use_fast: bool = True, **kwargs: Any
    ) -> Tokenizer:
        """Load the tokenizer shipped in `pretrained_model_name_or_path`.

        tokenizer.json wins when present (unless use_fast=False and a slow vocabulary exists);
        otherwise the sentencepiece model or the GLM-4 tiktoken-format `tokenizer.model` is used;
        `gguf_file=` (or a path to a .gguf file) builds the tokenizer a GGUF file carries.
        """
        gguf_file = kwargs.pop("gguf_file", None)
        if gguf_file is not None or is_gguf_path(pretrained_model_name_or_path):
            hub = {k: v for k, v in kwargs.items() if k in _LOADING_KWARGS}
            return gguf_tokenizer(gguf_file_path(pretrained_model_name_or_path, gguf_file, **hub))
        return _load(None, pretrained_model_name_or_path, kwargs, use_fast)


_LOADING_KWARGS = (
    "trust_remote_code",
    "revision",
    "cache_dir",
    "local_files_only",
    "token",
    "force_download",
)


def _load(cls: type[Tokenizer] | None, name_or_path: Any, kwargs: dict[str, Any], use_fast: bool = True) -> Any:
    """Read the configs in the checkpoint directory, pick the class (unless given) and build it."""
    directory = _resolve_dir(name_or_path, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in _LOADING_KWARGS}
    init = {**_load_init_kwargs(directory), **kwargs}
    cls = cls or _pick_class(directory, init, use_fast)
    init.pop("tokenizer_class", None)
    tok = cls._from_dir(directory, init)
    tok.name_or_path = str(name_or_path)
    family = _family(directory, tok)
    if family is not None:
        tok.default_chat_template = _chat.default_template_for(family)
    return tok


def _family(directory: Path, tok: Tokenizer) -> str | None:
    """The model family whose built-in chat template applies ("glm4", "persimmon"), if known."""
    model_type = _read_json(directory / "config.json").get("model_type")
    if model_type in _MODEL_TYPE_TO_CLASS:
        return {"xglm": "xglm", "persimmon": "persimmon"}.get(model_type, "glm4")
    if isinstance(tok, ChatGLM4Tokenizer) or tok.convert_tokens_to_ids(GLM4_GMASK) not in (
        None,
        tok.unk_token_id,
    ):
        return "glm4"
    if isinstance(tok, (LlamaTokenizer, LlamaTokenizerFast)):
        return "persimmon"
    return None


def _pick_class(directory: Path, init: dict[str, Any], use_fast: bool) -> type[Tokenizer]:
    name = str(init.get("tokenizer_class") or "")
    base = name[:-4] if name.endswith("Fast") else name
    if not base:
        base = _MODEL_TYPE_TO_CLASS.get(_read_json(directory / "config.json").get("model_type"), "")
    has_json = (directory / "tokenizer.json").is_file()
    tiktoken_vocab = _is_tiktoken_file(directory / "tokenizer.model")
    slow = _SLOW_CLASSES.get(base)
    if slow is None and tiktoken_vocab:
        slow = ChatGLM4Tokenizer
    if slow is XGLMTokenizer and not (directory / XGLMTokenizer.vocab_file_name).is_file():
        slow = None
    if slow is LlamaTokenizer and (tiktoken_vocab or not (directory / "tokenizer.model").is_file()):
        slow = None
    if slow is ChatGLM4Tokenizer and not tiktoken_vocab:
        slow = None
    if has_json and (use_fast or slow is None):
        return _FAST_CLASSES.get(base, FastTokenizer)
    if slow is not None:
        return slow
    if name and base not in _SLOW_CLASSES and base not in _FAST_CLASSES and name != "PreTrainedTokenizerFast":
        raise ValueError(f"unsupported tokenizer_class {name!r} in {directory}")
    found = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(
        f"no usable tokenizer files in {directory}: need tokenizer.json, a sentencepiece model "
        f"(sentencepiece.bpe.model / tokenizer.model) or a GLM-4 tokenizer.model; found {found}"
    )
