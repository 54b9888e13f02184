"""Tokenizers for GLM-4, XGLM and Persimmon with the Hugging Face call API.

Three backends share one front end (`base.Tokenizer`): special tokens, batching, truncation, padding,
tensors, decoding, chat templates, saving and streaming detokenization.

- `fast.FastTokenizer` wraps a `tokenizers` tokenizer.json (GLM-4 ``-hf``, XGLM fast, Persimmon fast).
- `slow.SlowTokenizer` reproduces the reference "slow" tokenizers: added tokens are split out of the
  text first, the rest goes to a model-specific `_tokenize_chunk`. Subclasses: `XGLMTokenizer` and
  `LlamaTokenizer` (sentencepiece.py) and `ChatGLM4Tokenizer` (glm4.py: the original GLM-4
  tiktoken-format ``tokenizer.model``, implemented without tiktoken and without checkpoint code).
- `detokenizer.StreamingDetokenizer`: text as generated ids arrive, at a cost per token independent
  of the text length (`tokenizer.streaming_detokenizer()`).

`AutoTokenizer.from_pretrained(dir)` (auto.py) picks the class from the files and the configs.
"""

from .auto import AutoTokenizer
from .base import (
    SPECIAL_ROLES,
    SPIECE_UNDERLINE,
    VERY_LARGE_INTEGER,
    AddedToken,
    BatchEncoding,
    Tokenizer,
    TokenizerFileError,
)
from .base import _resolve_dir as _resolve_dir  # (private, used by tests)
from .detokenizer import StreamingDetokenizer, streaming_detokenizer
from .fast import FastTokenizer, LlamaTokenizerFast, PreTrainedTokenizerFast, XGLMTokenizerFast
from .glm4 import (
    GLM4_EOS_TOKEN,
    GLM4_GMASK,
    GLM4_PATTERN,
    GLM4_PREFIX,
    GLM4_ROLE_TOKENS,
    GLM4_SOP,
    GLM4_SPECIAL_TOKENS,
    ChatGLM4Tokenizer,
)
from .sentencepiece import LlamaTokenizer, XGLMTokenizer
from .slow import SlowTokenizer

__all__ = [
    "AddedToken",
    "AutoTokenizer",
    "BatchEncoding",
    "ChatGLM4Tokenizer",
    "FastTokenizer",
    "GLM4_EOS_TOKEN",
    "GLM4_GMASK",
    "GLM4_PATTERN",
    "GLM4_PREFIX",
    "GLM4_ROLE_TOKENS",
    "GLM4_SOP",
    "GLM4_SPECIAL_TOKENS",
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "PreTrainedTokenizerFast",
    "SPECIAL_ROLES",
    "SPIECE_UNDERLINE",
    "SlowTokenizer",
    "StreamingDetokenizer",
    "Tokenizer",
    "TokenizerFileError",
    "VERY_LARGE_INTEGER",
    "XGLMTokenizer",
    "XGLMTokenizerFast",
    "streaming_detokenizer",
]
