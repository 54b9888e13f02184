"""The parts of the reference's PreTrainedModel / PretrainedConfig API that user code and libraries (PEFT, TRL,
accelerate, lm-eval) touch and that are not about the math: capability flags, attention switching, input
embeddings that require grad, embedding resizing, loading reports, JSON helpers. Mixed into glmkit's base
classes so each family gets them once."""

from __future__ import annotations

import copy
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .attn_backends import check_attn_implementation
from .layers import open_empty_rows

logger = logging.getLogger("glmkit")


class ModelAPIMixin:
    """Class flags and small methods of the reference's PreTrainedModel (mixed into glmkit's)."""

    main_input_name: ClassVar[str] = "input_ids"
    supports_gradient_checkpointing: ClassVar[bool] = True
    # capability flags libraries read before choosing a code path; they say what glmkit does
    _supports_sdpa: ClassVar[bool] = True
    _supports_flash_attn: ClassVar[bool] = True  # flash_attention_2 where flash_attn and CUDA exist
    _supports_flex_attn: ClassVar[bool] = True
    _supports_attention_backend: ClassVar[bool] = False
    _can_compile_fullgraph: ClassVar[bool] = True
    _supports_static_cache: ClassVar[bool] = True
    _keep_in_fp32_modules: ClassVar[list[str] | None] = None
    _keys_to_ignore_on_load_missing: ClassVar[list[str] | None] = None
    _keys_to_ignore_on_load_unexpected: ClassVar[list[str] | None] = None
    _no_split_modules: ClassVar[list[str] | None] = None
    _tied_weights_keys: ClassVar[list[str] | None] = None

    @classmethod
    def can_generate(cls) -> bool:
        """True for the classes with `generate` (the ForCausalLM heads)."""
        return callable(getattr(cls, "generate", None))

    @classmethod
    def _can_set_attn_implementation(cls) -> bool:
        return True

    @classmethod
    def _from_config(cls, config: Any, **kwargs: Any) -> Any:
        return cls.from_config(config, **kwargs)

    def set_attn_implementation(self, attn_implementation: str | dict[str, str]) -> None:
        """Switch the attention backend in place ('eager' or 'sdpa'); the model reads it at every call."""
        if isinstance(attn_implementation, dict):
            attn_implementation = attn_implementation.get("", self.config._attn_implementation)
        self.config._attn_implementation = check_attn_implementation(attn_implementation)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.base_model, "gradient_checkpointing", False))

    def enable_input_require_grads(self) -> None:
        """Make the input embeddings' output require grad, so gradient checkpointing works with frozen
        embeddings (PEFT adapters)."""

        def require_grads(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            output.requires_grad_(True)

        self._require_grads_hook = self.get_input_embeddings().register_forward_hook(require_grads)

    def disable_input_require_grads(self) -> None:
        self._require_grads_hook.remove()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:  # fmt: skip
        """Grow or shrink the vocabulary (input embedding and lm_head). New rows are the mean of the old ones
        (mean_resizing, as the reference) or drawn at initializer_range; config.vocab_size follows."""
        old = self.get_input_embeddings()
        if new_num_tokens is None and pad_to_multiple_of is None:
            return old
        size = old.num_embeddings if new_num_tokens is None else new_num_tokens
        if pad_to_multiple_of is not None:
            multiple = pad_to_multiple_of
            if not isinstance(multiple, int) or isinstance(multiple, bool) or multiple <= 0:
                raise ValueError(f"Asking to pad the embedding matrix to a multiple of `{multiple}`, which is not "
                                 "and integer. Please make sure to pass an integer")  # fmt: skip
            size = -(-size // pad_to_multiple_of) * pad_to_multiple_of
        new = copy.deepcopy(old)  # the same class (XGLM's scaled embedding) and settings
        new.weight = nn.Parameter(_resized_rows(old.weight.data, size, mean_resizing, self._init_std()))
        new.num_embeddings = size
        self.set_input_embeddings(new)
        head = self.get_output_embeddings()
        if head is not None and not getattr(self.config, "tie_word_embeddings", False):
            head.weight = nn.Parameter(_resized_rows(head.weight.data, size, mean_resizing, self._init_std()))
            if head.bias is not None:
                head.bias = nn.Parameter(_resized_rows(head.bias.data[:, None], size, False, 0.0)[:, 0])
            head.out_features = size
        self.config.vocab_size = size
        for model in (self, self.base_model):  # the attribute the reference's models carry
            model.vocab_size = size
        self.tie_weights()
        return new

    def _init_std(self) -> float:
        return getattr(self.config, "initializer_range", getattr(self.config, "init_std", 0.02))


def _resized_rows(weight: torch.Tensor, size: int, mean_resizing: bool, std: float) -> torch.Tensor:
    """`weight` (N, C) cut or extended to (size, C): new rows drawn from a normal with the old rows' mean and
    covariance (the reference's mean_resizing, so new tokens do not skew the softmax) or N(0, std)."""
    old = weight.shape[0]
    if size <= old:
        return weight[:size].clone()
    extra = size - old
    if mean_resizing and old > 1:
        rows = weight.float()
        mean = rows.mean(0)
        centred = rows - mean
        covariance = centred.T @ centred / old
        try:
            dist = torch.distributions.MultivariateNormal(mean, covariance_matrix=1e-9 * covariance)
            new_rows = dist.sample((extra,))
        except ValueError:  # covariance not positive definite: the mean alone
            new_rows = mean.expand(extra, -1)
    else:
        new_rows = torch.randn(extra, weight.shape[1], device=weight.device) * std
    return torch.cat([weight, new_rows.to(weight.dtype)], dim=0)


class ConfigAPIMixin:
    """The reference's config helpers: JSON files and strings, the difference from the defaults, text config."""

    is_encoder_decoder: ClassVar[bool] = False
    sub_configs: ClassVar[dict[str, type]] = {}
    has_no_defaults_at_init: ClassVar[bool] = False

    @property
    def dtype(self) -> torch.dtype | None:
        """config.torch_dtype as a torch.dtype (the reference's v4.56 `config.dtype`)."""
        name = self.torch_dtype
        return getattr(torch, name) if isinstance(name, str) and name != "auto" else name

    @dtype.setter
    def dtype(self, value: Any) -> None:
        self.torch_dtype = None if value is None else str(value).removeprefix("torch.")

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> Any:
        """The config of the text model: the config itself for these text-only families."""
        return self

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the values that differ from the class's defaults (plus model_type), as the reference writes."""
        defaults = type(self)().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "model_type" or defaults.get(k, object()) != v}

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        Path(json_file_path).write_text(self.to_json_string(use_diff=use_diff))

    @classmethod
    def from_json_file(cls, json_file: str | os.PathLike) -> Any:
        return cls.from_dict(json.loads(Path(json_file).read_text()))

    def __iter__(self):
        """Attribute names, as iterating the reference's config yields them."""
        return iter(k for k in copy.copy(self.__dict__) if not k.startswith("_"))


@dataclass
class LoadingOptions:
    """The reference's from_pretrained switches about what to do with weights that do not fit.

    strict: missing / unexpected weights raise (glmkit's default) or are reported, warned about and the missing
    ones initialised (the reference's behaviour; the default when output_loading_info=True asks for the report).
    ignore_mismatched_sizes: a weight of the wrong shape is initialised afresh instead of raising."""

    state_dict: dict | None = None
    output_loading_info: bool = False
    ignore_mismatched_sizes: bool = False
    strict: bool = True
    report: dict[str, list] = field(default_factory=lambda: {
        "missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []})  # fmt: skip

    @classmethod
    def pop_from(cls, kwargs: dict[str, Any]) -> LoadingOptions:
        info = bool(kwargs.pop("output_loading_info", False))
        strict = kwargs.pop("strict", None)
        return cls(state_dict=kwargs.pop("state_dict", None), output_loading_info=info,
                   ignore_mismatched_sizes=bool(kwargs.pop("ignore_mismatched_sizes", False)),
                   strict=not info if strict is None else bool(strict))  # fmt: skip


def loading_device(device: torch.device, device_map: Any) -> torch.device:
    """Inside `with torch.device("meta"):` (and no device_map) the model stays on meta, as the reference's."""
    if device_map is None and torch.get_default_device().type == "meta":
        return torch.device("meta")
    return device


def report_or_keep(options: LoadingOptions, owner: str, mapping: dict[str, str], missing: list[str],
                   unexpected: list[str], wrong: dict[str, str]) -> tuple:  # fmt: skip
    """Move the weight problems `options` says to tolerate into its report (with a warning naming them); return
    (mapping without weights of the wrong shape, missing, unexpected, wrong) still to raise. Weights left out
    of the mapping stay on the meta device and are initialised like a fresh model's."""
    report = options.report
    if options.ignore_mismatched_sizes and wrong:
        report["mismatched_keys"] += list(wrong)
        logger.warning("%s: weights of another shape in the checkpoint, newly initialised: %s", owner,
                       ", ".join(wrong.values()))  # fmt: skip
        mapping = {k: v for k, v in mapping.items() if k not in wrong}
        wrong = {}
    if not options.strict:
        report["missing_keys"] += missing
        report["unexpected_keys"] += unexpected
        if missing:
            logger.warning("%s: newly initialised (not in checkpoint): %s", owner, ", ".join(missing))
        if unexpected:
            logger.warning("%s: checkpoint weights not used: %s", owner, ", ".join(sorted(unexpected)))
        missing, unexpected = [], []
    return mapping, missing, unexpected, wrong


def read_weight(reader: Any, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Checkpoint tensor `name` on `device` (floating ones in `dtype`); on the meta device nothing is read."""
    if device.type != "meta":
        return reader.get(name, dtype=dtype).to(device)
    stored = reader.dtype(name)
    return torch.empty(reader.shape(name), dtype=dtype if stored is None or stored.is_floating_point else stored,
                       device=device)  # fmt: skip


def mask_from_4d(mask: torch.Tensor, B: int, T: int, K: int) -> torch.Tensor:
    """A caller's 4D attention mask (B, 1, T, past + T), as the reference takes it (used instead of the causal
    mask): bool (True attends) or additive float (0 attends, the dtype's minimum masks). Returns the bool mask
    the attention layers take; a query that may attend nothing attends everything (no NaN from softmax)."""
    from .modeling import InputError

    if mask.shape[0] not in (1, B) or mask.shape[1] != 1 or tuple(mask.shape[2:]) != (T, K):
        raise InputError(f"a 4D attention_mask must have shape ({B}, 1, {T}, {K}) (batch, 1, seq_len, past + "
                         f"seq_len), got {tuple(mask.shape)}")  # fmt: skip
    if mask.dtype == torch.bool:
        allowed = mask
    elif mask.is_floating_point():
        masked = mask <= torch.finfo(mask.dtype).min / 2
        if not bool(((mask == 0) | masked).all()):
            raise InputError("a float 4D attention_mask must hold 0 (attend) or the dtype's minimum (masked); "
                             "other additive biases are not supported")  # fmt: skip
        allowed = ~masked
    else:
        raise TypeError(f"a 4D attention_mask must be bool or floating point, got {mask.dtype}")
    return open_empty_rows(allowed.expand(B, 1, T, K))


class CacheAPIMixin:
    """The reference's Cache reading API on glmkit's KVCache: `cache[layer] -> (keys, values)` over the written
    slots, iteration, `to_legacy_cache` / `from_legacy_cache`, `crop`, `reorder_cache`."""

    def __getitem__(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self.keys) <= layer_idx < len(self.keys):
            raise IndexError(f"cache has {len(self.keys)} layers, no layer {layer_idx}")
        n = self.get_seq_length()
        return self.keys[layer_idx][:, :, :n], self.values[layer_idx][:, :, :n]  # (B, Hkv, n, D) views

    def __iter__(self):
        return (self[i] for i in range(len(self.keys)))

    def to_legacy_cache(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        return self.to_legacy()

    @classmethod
    def from_legacy_cache(cls, past_key_values: tuple | list | None) -> Any:
        return cls.from_legacy(past_key_values or ())

    def crop(self, max_length: int) -> None:
        """Keep the first max_length slots (a negative value drops that many from the end)."""
        seen = self.get_seq_length()
        self.rewind(seen - max_length if max_length >= 0 else -max_length)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.reorder(beam_idx)


def legacy_from_foreign_cache(cache: Any) -> tuple | None:
    """(keys, values) per layer from another library's cache object, recognised by its attributes (transformers'
    DynamicCache: `.layers[i].keys` in 4.56+, `to_legacy_cache()` or `key_cache` lists before), so glmkit never
    imports transformers. None when `cache` is none of these."""
    layers = getattr(cache, "layers", None)
    if isinstance(layers, (list, tuple)) and all(hasattr(layer, "keys") for layer in layers):
        return tuple((layer.keys, layer.values) for layer in layers if isinstance(layer.keys, torch.Tensor))
    if callable(getattr(cache, "to_legacy_cache", None)):
        return tuple(cache.to_legacy_cache())
    if isinstance(getattr(cache, "key_cache", None), list):
        return tuple(zip(cache.key_cache, cache.value_cache))
    return None


class PrepareInputsMixin:
    """`prepare_inputs_for_generation`, which PEFT and hand-written decode loops call: the forward keywords of
    the next step (the ids not yet in the cache, positions from the padding mask), as the reference builds."""

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Any = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        cache_position: torch.LongTensor | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, input_ids.shape[1], device=input_ids.device)
        inputs: dict[str, Any] = {"cache_position": cache_position, "past_key_values": past_key_values,
                                  "attention_mask": attention_mask, "use_cache": kwargs.pop("use_cache", True)}
        if inputs_embeds is not None and len(cache_position) == inputs_embeds.shape[1]:  # the prompt's step
            inputs["inputs_embeds"], inputs["input_ids"] = inputs_embeds, None
        else:
            inputs["input_ids"] = input_ids[:, -len(cache_position):]
        if attention_mask is not None and kwargs.get("position_ids") is None:
            positions = attention_mask.long().cumsum(-1) - 1  # left padding: real tokens count from 0
            kwargs["position_ids"] = positions.masked_fill(attention_mask == 0, 1)[:, -len(cache_position):]
        inputs.update((k, v) for k, v in kwargs.items() if v is not None)
        return inputs
