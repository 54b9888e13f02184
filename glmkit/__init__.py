"""glmkit: GLM-4, XGLM and Persimmon in plain PyTorch, loading the checkpoints people already have."""

import importlib

__version__ = "0.1.0"

from .auto import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from .cache import KVCache
from .chat import ChatTemplateError
from .checkpoint import CheckpointError, infer_device
from .config import ConfigError, PretrainedConfig
from .eval import Score, loglikelihood_rolling, perplexity, score
from .generation import DisjunctiveConstraint, GenerationConfig, PhrasalConstraint, TextIteratorStreamer, TextStreamer
from .modeling import InputError, PreTrainedModel
from .models.glm import (
    GlmConfig,
    GlmForCausalLM,
    GlmForSequenceClassification,
    GlmForTokenClassification,
    GlmModel,
)
from .models.persimmon import (
    PersimmonConfig,
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonForTokenClassification,
    PersimmonModel,
)
from .models.xglm import XGLMConfig, XGLMForCausalLM, XGLMModel, XGLMPreTrainedModel
from .tokenization import (
    AutoTokenizer,
    BatchEncoding,
    ChatGLM4Tokenizer,
    LlamaTokenizer,
    LlamaTokenizerFast,
    PreTrainedTokenizerFast,
    Tokenizer,
    XGLMTokenizer,
    XGLMTokenizerFast,
)

__all__ = [
    "AutoConfig",
    "AutoTokenizer",
    "BatchEncoding",
    "ChatGLM4Tokenizer",
    "ChatTemplateError",
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "PreTrainedTokenizerFast",
    "Tokenizer",
    "XGLMTokenizer",
    "XGLMTokenizerFast",
    "AutoModel",
    "AutoModelForCausalLM",
    "AutoModelForSequenceClassification",
    "AutoModelForTokenClassification",
    "CheckpointError",
    "ConfigError",
    "GlmConfig",
    "GlmForCausalLM",
    "GlmForSequenceClassification",
    "GlmForTokenClassification",
    "GlmModel",
    "DisjunctiveConstraint",
    "GenerationConfig",
    "PhrasalConstraint",
    "InputError",
    "KVCache",
    "PersimmonConfig",
    "PersimmonForCausalLM",
    "PersimmonForSequenceClassification",
    "PersimmonForTokenClassification",
    "PersimmonModel",
    "PreTrainedModel",
    "PretrainedConfig",
    "TextIteratorStreamer",
    "TextStreamer",
    "XGLMConfig",
    "XGLMForCausalLM",
    "XGLMModel",
    "XGLMPreTrainedModel",
    "infer_device",
    "Score",
    "loglikelihood_rolling",
    "perplexity",
    "score",
]

# XGLM in TensorFlow / Flax: imported on first use, so the PyTorch install needs neither stack
_OPTIONAL_STACKS = {
    "TFXGLMModel": "tf", "TFXGLMForCausalLM": "tf", "FlaxXGLMModel": "flax", "FlaxXGLMForCausalLM": "flax",
}  # fmt: skip


def __getattr__(name: str):
    extra = _OPTIONAL_STACKS.get(name)
    if extra is None:
        raise AttributeError(f"module 'glmkit' has no attribute {name!r}")
    try:
        module = importlib.import_module(f".{extra}", __name__)
    except ImportError as err:
        raise ImportError(f"glmkit.{name} needs the {extra} extra: pip install 'glmkit[{extra}]' ({err})") from err
    return getattr(module, name)
