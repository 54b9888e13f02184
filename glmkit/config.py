"""Model configuration: config.json in, config.json out, with the reference's defaults and key forms."""

from __future__ import annotations

import copy
import inspect
import json
import os
from pathlib import Path
from typing import Any, ClassVar

import torch

from .checkpoint import atomic_write_text
from .reference_api import ConfigAPIMixin

CONFIG_NAME = "config.json"

# Keys that other model families use and that would change the math if honoured. Finding one set to a
# non-trivial value means the checkpoint is not what its model_type says, so refusing beats fluent garbage.
UNSUPPORTED_MATH_KEYS = {
    "sliding_window": (None, 0),
    "use_sliding_window": (None, False),
    "attn_logit_softcapping": (None, 0, 0.0),
    "final_logit_softcapping": (None, 0, 0.0),
    "query_pre_attn_scalar": (None,),
    "embedding_multiplier": (None, 1, 1.0),
    "residual_multiplier": (None, 1, 1.0),
    "attention_multiplier": (None,),
    "logits_scaling": (None, 1, 1.0),
}
# sizes every family reads (the names differ between families); each must be a positive integer
POSITIVE_INT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings", "d_model", "ffn_dim", "num_layers",
                     "attention_heads")  # fmt: skip
NUMBER_KEYS = ("rms_norm_eps", "layer_norm_eps", "rope_theta", "partial_rotary_factor", "initializer_range",
               "init_std", "dropout", "attention_dropout", "activation_dropout", "hidden_dropout", "layerdrop")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic")


class ConfigError(ValueError):
    """config.json is malformed or asks for something glmkit does not implement."""


def _dtype_name(dtype: Any) -> str | None:
    if dtype is None or isinstance(dtype, str):
        return dtype
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    raise ConfigError(f"dtype must be a string or torch.dtype, got {dtype!r}")


class PretrainedConfig(ConfigAPIMixin):
    """Attribute bag with the generic keys every reference config carries, plus JSON round-tripping.

    Subclasses set `model_type` and call `super().__init__(**kwargs)` after storing their own fields.
    Unknown keys are kept as attributes (and written back on save) so nothing in a config.json is lost.
    """

    model_type: ClassVar[str] = ""
    # rope handling applies to families that use rotary embeddings
    uses_rope: ClassVar[bool] = False

    def __init__(
        self,
        *,
        pad_token_id: int | None = None,
        bos_token_id: int | None = None,
        eos_token_id: int | list[int] | None = None,
        tie_word_embeddings: bool = True,
        num_labels: int | None = None,
        id2label: dict | None = None,
        label2id: dict | None = None,
        problem_type: str | None = None,
        architectures: list[str] | None = None,
        output_hidden_states: bool = False,
        output_attentions: bool = False,
        return_dict: bool = True,
        is_decoder: bool = False,
        **kwargs: Any,
    ):
        self.pad_token_id = pad_token_id
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.tie_word_embeddings = tie_word_embeddings
        if id2label is None:
            id2label = {i: f"LABEL_{i}" for i in range(num_labels if num_labels is not None else 2)}
        self.id2label = {int(k): v for k, v in id2label.items()}
        self.label2id = label2id if label2id is not None else {v: k for k, v in self.id2label.items()}
        if num_labels is not None and num_labels != len(self.id2label):
            self.num_labels = num_labels
        if problem_type not in (
            None,
            "regression",
            "single_label_classification",
            "multi_label_classification",
        ):
            raise ConfigError(
                f"problem_type must be 'regression', 'single_label_classification' or "
                f"'multi_label_classification', got {problem_type!r}"
            )
        self.problem_type = problem_type
        self.architectures = architectures
        self.output_hidden_states = output_hidden_states
        self.output_attentions = output_attentions
        self.return_dict = return_dict
        self.is_decoder = is_decoder
        # "dtype" is the v5 spelling of "torch_dtype"; keep one attribute, write both names back.
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        self.torch_dtype = _dtype_name(dtype)
        self._attn_implementation = kwargs.pop("attn_implementation", None) or "sdpa"
        kwargs.pop("transformers_version", None)
        for key, value in kwargs.items():
            setattr(self, key, value)
        if self.uses_rope:
            self._normalize_rope()
        self._reject_unsupported_math()
        self._check_sizes()

    # ---- validation -----------------------------------------------------------------------------
    def _check_sizes(self) -> None:
        """Sizes must be positive integers and numbers numbers (a "4096" string, zero heads or a pad id past
        the vocabulary would fail deep inside the model, or not at all)."""
        fields = self.__dict__
        for key in POSITIVE_INT_KEYS:
            value = fields.get(key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
                raise ConfigError(f"config {key} must be a positive integer, got {value!r}"
                                  + (" (a string)" if isinstance(value, str) else ""))  # fmt: skip
        for key in NUMBER_KEYS:
            value = fields.get(key)
            if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool)):
                raise ConfigError(f"config {key} must be a number, got {value!r}")
        self._check_heads()
        vocab = fields.get("vocab_size")
        for key in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
            value = fields.get(key)
            for token in value if isinstance(value, (list, tuple)) else [value]:
                if token is None:
                    continue
                if not isinstance(token, int) or isinstance(token, bool) or token < 0:
                    raise ConfigError(f"config {key} must be a non-negative token id, got {value!r}")
                if key == "pad_token_id" and vocab is not None and token >= vocab:
                    raise ConfigError(f"config pad_token_id {token} is outside the vocabulary (vocab_size {vocab})")

    def _check_heads(self) -> None:
        fields = self.__dict__
        heads = fields.get("num_attention_heads", fields.get("attention_heads"))
        width = fields.get("hidden_size", fields.get("d_model"))
        kv_heads = fields.get("num_key_value_heads")
        if heads and kv_heads and heads % kv_heads:
            raise ConfigError(f"config num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                              f"({kv_heads})")  # fmt: skip
        if heads and width and fields.get("head_dim") is None and width % heads:
            raise ConfigError(f"config hidden size {width} must be divisible by the {heads} attention heads")

    # ---- rope ---------------------------------------------------------------------------------
    def _normalize_rope(self) -> None:
        """Fold the v5 `rope_parameters` block into the v4 attributes (rope_theta, partial_rotary_factor,
        rope_scaling) that the model code reads, and validate the scaling type."""
        params = getattr(self, "rope_parameters", None)
        if params is not None:
            if not isinstance(params, dict):
                raise ConfigError(f"rope_parameters must be an object, got {params!r}")
            params = dict(params)
            del self.rope_parameters
            if "rope_theta" in params:
                self.rope_theta = float(params.pop("rope_theta"))
            if "partial_rotary_factor" in params:
                self.partial_rotary_factor = float(params.pop("partial_rotary_factor"))
            rope_type = params.get("rope_type", params.get("type", "default"))
            self.rope_scaling = None if rope_type == "default" else params
        scaling = getattr(self, "rope_scaling", None)
        if scaling is None:
            return
        if not isinstance(scaling, dict):
            raise ConfigError(f"rope_scaling must be an object or null, got {scaling!r}")
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type == "default":
            self.rope_scaling = None
            return
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope_scaling type {rope_type!r} is not implemented by glmkit "
                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})"
            )
        factor = scaling.get("factor")
        if not isinstance(factor, (int, float)) or factor < 1.0:
            raise ConfigError(f"rope_scaling.factor must be a number >= 1, got {factor!r}")

    def _reject_unsupported_math(self) -> None:
        for key, harmless in UNSUPPORTED_MATH_KEYS.items():
            if key in self.__dict__ and self.__dict__[key] not in harmless:
                raise ConfigError(
                    f"config key {key}={self.__dict__[key]!r} changes the model's math and is not "
                    f"implemented for model_type {self.model_type!r}"
                )

    # ---- derived ------------------------------------------------------------------------------
    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        self.id2label = {i: f"LABEL_{i}" for i in range(value)}
        self.label2id = {v: k for k, v in self.id2label.items()}

    # ---- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """All attributes as JSON-able values, in the v4 form the reference loads."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if not k.startswith("_")}
        out["model_type"] = self.model_type
        out["id2label"] = {str(k): v for k, v in self.id2label.items()}
        if self.torch_dtype is None:
            out.pop("torch_dtype")
        return dict(sorted(out.items()))

    def to_json_string(self, use_diff: bool = True) -> str:
        """JSON of the values that differ from the defaults (use_diff, as the reference) or of all of them."""
        return json.dumps(self.to_diff_dict() if use_diff else self.to_dict(), indent=2, sort_keys=True) + "\n"

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / CONFIG_NAME, self.to_json_string(use_diff=False))

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> PretrainedConfig:
        data = dict(config_dict)
        model_type = data.pop("model_type", None)
        if cls.model_type and model_type not in (
            None,
            cls.model_type,
            *getattr(cls, "model_type_aliases", ()),
        ):
            raise ConfigError(
                f"{cls.__name__} expects model_type {cls.model_type!r}, config.json says {model_type!r}"
            )
        data.update(overrides)
        return cls(**data)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **overrides: Any) -> PretrainedConfig:
        """Read config.json from a checkpoint directory, a hub id (revision=, token=, … accepted) or a path
        to the json file itself; `subfolder=` names a folder inside the directory, as in the reference."""
        from .hub import pop_hub_kwargs

        hub_kwargs = pop_hub_kwargs(overrides)
        subfolder = overrides.pop("subfolder", None) or ""
        return cls.from_dict(read_config_dict(pretrained_model_name_or_path, subfolder, **hub_kwargs), **overrides)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PretrainedConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"{type(self).__name__} {self.to_json_string(use_diff=False)}"


# from_pretrained keywords of the reference that change nothing here (accepted and dropped)
IGNORED_LOADING_KWARGS = ("trust_remote_code", "low_cpu_mem_usage", "use_safetensors", "force_download",
                          "resume_download", "proxies", "_fast_init")  # fmt: skip


def unknown_overrides(config_class: type[PretrainedConfig], data: dict[str, Any],
                      overrides: dict[str, Any]) -> list[str]:  # fmt: skip
    """Keyword arguments to a model's from_pretrained that are no config field (in config.json, the class's
    arguments or its defaults): a misspelling such as `torch_dtpye=` must not become a silent attribute."""
    known = set(data) | set(vars(config_class())) | {"num_labels", "dtype", "torch_dtype", "attn_implementation"}
    for klass in config_class.__mro__:
        if "__init__" in vars(klass):
            known |= set(inspect.signature(klass.__init__).parameters)
    return sorted(set(overrides) - known)


def read_config_dict(name_or_path: str | os.PathLike, subfolder: str = "", **hub_kwargs: Any) -> dict[str, Any]:
    """Parse config.json (in `subfolder` of the checkpoint directory), raising ConfigError with the path on any
    problem."""
    from .hub import resolve_checkpoint_dir

    path = Path(name_or_path)
    if not (path.is_file() and path.suffix == ".json"):
        path = resolve_checkpoint_dir(name_or_path, **hub_kwargs) / subfolder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path.parent}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data
