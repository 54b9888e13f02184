"""model_type -> family classes, and the Auto* entry points that dispatch on config.json."""

from __future__ import annotations

import importlib
import os
from typing import Any

from .config import ConfigError, PretrainedConfig
from .hub import pop_hub_kwargs
from .sources import open_source

# model_type -> (module, config class, {task: class name})
REGISTRY: dict[str, tuple[str, str, dict[str, str]]] = {
    "glm": (
        "glmkit.models.glm",
        "GlmConfig",
        {
            "base": "GlmModel",
            "causal-lm": "GlmForCausalLM",
            "sequence-classification": "GlmForSequenceClassification",
            "token-classification": "GlmForTokenClassification",
        },
    ),
    "xglm": ("glmkit.models.xglm", "XGLMConfig", {"base": "XGLMModel", "causal-lm": "XGLMForCausalLM"}),
    "persimmon": (
        "glmkit.models.persimmon",
        "PersimmonConfig",
        {
            "base": "PersimmonModel",
            "causal-lm": "PersimmonForCausalLM",
            "sequence-classification": "PersimmonForSequenceClassification",
            "token-classification": "PersimmonForTokenClassification",
        },
    ),
}
# other model_types a family's config class translates on load: the original THUDM GLM-4 release
ALIASES = {"chatglm": "glm"}


def _family(model_type: Any) -> tuple[Any, dict[str, str]]:
    model_type = ALIASES.get(model_type, model_type)
    if model_type not in REGISTRY:
        raise ConfigError(
            f"unknown model_type {model_type!r}; glmkit supports: {', '.join(sorted(REGISTRY))}"
        )
    module_name, config_name, tasks = REGISTRY[model_type]
    module = importlib.import_module(module_name)
    return module, {"config": config_name, **tasks}


def _config_for(name_or_path: Any, **hub_kwargs: Any) -> tuple[str, dict[str, Any]]:
    data = open_source(name_or_path, **hub_kwargs).config
    if "model_type" not in data:
        raise ConfigError(f"config.json in {name_or_path} has no model_type; cannot pick a model family")
    return data["model_type"], data


class AutoConfig:
    """`AutoConfig.from_pretrained(path)` reads config.json and builds the family's config class."""

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> PretrainedConfig:
        model_type, data = _config_for(pretrained_model_name_or_path, **pop_hub_kwargs(kwargs))
        module, names = _family(model_type)
        return getattr(module, names["config"]).from_dict(data, **kwargs)

    @staticmethod
    def for_model(model_type: str, **kwargs: Any) -> PretrainedConfig:
        module, names = _family(model_type)
        return getattr(module, names["config"])(**kwargs)


class _AutoModel:
    task: str = "base"

    @classmethod
    def _class_for(cls, model_type: str) -> type:
        module, names = _family(model_type)
        if cls.task not in names:
            raise ConfigError(f"model_type {model_type!r} has no {cls.task} model in glmkit")
        return getattr(module, names[cls.task])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any):
        """Pick the family from config.json's model_type and load with that class's from_pretrained."""
        source = open_source(pretrained_model_name_or_path, kwargs.pop("gguf_file", None),
                             **pop_hub_kwargs(kwargs))  # opened once
        config = kwargs.get("config")
        model_type = config.model_type if config is not None else _config_for(source)[0]
        return cls._class_for(model_type).from_pretrained(source, **kwargs)

    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs: Any):
        return cls._class_for(config.model_type).from_config(config, **kwargs)


class AutoModel(_AutoModel):
    task = "base"


class AutoModelForCausalLM(_AutoModel):
    task = "causal-lm"


class AutoModelForSequenceClassification(_AutoModel):
    task = "sequence-classification"


class AutoModelForTokenClassification(_AutoModel):
    task = "token-classification"
