"""glmkit: GLM-4, XGLM and Persimmon in plain PyTorch, loading the checkpoints people already have."""

__version__ = "0.1.0"

from .auto import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from .cache import KVCache
from .checkpoint import CheckpointError, infer_device
from .config import ConfigError, PretrainedConfig
from .modeling import InputError, PreTrainedModel
from .models.glm import (
    GlmConfig,
    GlmForCausalLM,
    GlmForSequenceClassification,
    GlmForTokenClassification,
    GlmModel,
)

__all__ = [
    "AutoConfig",
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
    "InputError",
    "KVCache",
    "PreTrainedModel",
    "PretrainedConfig",
    "infer_device",
]
