"""What to quantize and how (`QuantSpec`), and the module swap that does it from outside the model.

The swap (`quantize_`) walks the module tree and replaces `nn.Linear` / `nn.Embedding` children with
`setattr` (DESIGN rule 4, gpt-fast's quantize.py): the model files never know about quantization.
On the meta device (while loading) it swaps in empty quantized modules that the loader then fills.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .linear import Int4Linear, Int8Embedding, Int8Linear, check_cpu, check_int4_shape

logger = logging.getLogger("glmkit")
METHODS = ("int8", "int4")
DEFAULT_INT4_GROUP_SIZE = 128
QUANT_METHOD = "glmkit"  # what we write: the layout is ours (transformers' torchao loader cannot read it)
_QUANT_TYPES = {"int8_weight_only": "int8", "int4_weight_only": "int4"}
_HEADS = ("lm_head", "score", "classifier", "qa_outputs")  # output heads: kept full precision (lm_head by choice)
QUANTIZED_MODULES = (Int8Linear, Int4Linear, Int8Embedding)


@dataclass(frozen=True)
class QuantSpec:
    """int8 per output channel or int4 per group of `group_size` input features; embeddings and lm_head
    optional (int8 per row for embeddings, whatever the method)."""

    method: str
    group_size: int | None = None
    include_embeddings: bool = False
    include_lm_head: bool = False

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r}; use one of {', '.join(METHODS)}")
        if self.method == "int8" and self.group_size is not None:
            raise ValueError("int8 quantization is per output channel; group_size applies to int4 only")
        if self.method == "int4" and self.group_size is None:
            object.__setattr__(self, "group_size", DEFAULT_INT4_GROUP_SIZE)

    def to_config_dict(self) -> dict[str, Any]:
        """The `quantization_config` written to config.json."""
        fields = {k: v for k, v in asdict(self).items() if k != "method"}  # the method is in quant_type
        return {"quant_method": QUANT_METHOD, "quant_type": f"{self.method}_weight_only", **fields}

    @classmethod
    def from_config_dict(cls, config: dict[str, Any]) -> QuantSpec:
        """Ours, or the Hugging Face torchao style: {"quant_method": "torchao", "quant_type":
        "int4_weight_only", "group_size": 128} (group_size also read from "quant_type_kwargs")."""
        if not isinstance(config, dict):
            raise TypeError(f"quantization_config must be a dict, got {type(config).__name__}")
        quant_method, quant_type = config.get("quant_method"), config.get("quant_type")
        if quant_method not in (QUANT_METHOD, "torchao"):
            raise ValueError(f"quantization_config quant_method {quant_method!r} is not supported; "
                             f"glmkit reads 'torchao' and {QUANT_METHOD!r}")  # fmt: skip
        if quant_type not in _QUANT_TYPES:
            raise ValueError(f"quantization_config quant_type {quant_type!r} is not supported; "
                             f"use one of {', '.join(_QUANT_TYPES)}")  # fmt: skip
        method = _QUANT_TYPES[quant_type]
        group_size = config.get("group_size", (config.get("quant_type_kwargs") or {}).get("group_size"))
        if method == "int8" and group_size is not None:
            logger.warning("int8_weight_only is per output channel here; group_size %s ignored", group_size)
            group_size = None
        return cls(method, group_size, bool(config.get("include_embeddings", False)),
                   bool(config.get("include_lm_head", False)))  # fmt: skip


def resolve_spec(quantization: str | QuantSpec | None, quantization_config: dict | None,
                 saved: dict | None = None) -> QuantSpec | None:  # fmt: skip
    """What `from_pretrained` was asked for: `quantization="int8"|"int4"`, an HF-style dict, or the
    checkpoint's own config.json `quantization_config` (`saved`); asking for something else than a
    quantized checkpoint holds is an error."""
    if quantization is not None and quantization_config is not None:
        raise ValueError("pass quantization or quantization_config, not both")
    asked = quantization if isinstance(quantization, QuantSpec) else None
    if isinstance(quantization, str):
        asked = QuantSpec(quantization)
    elif quantization is not None and asked is None:
        raise TypeError(f"quantization must be 'int8', 'int4' or a QuantSpec, got {type(quantization).__name__}")
    if quantization_config is not None:
        asked = QuantSpec.from_config_dict(quantization_config)
    held = QuantSpec.from_config_dict(saved) if saved is not None else None
    if held is not None and quantization == held.method:  # a bare method name asks for no particular group size
        asked = held
    if held is not None and asked is not None and asked != held:
        raise ValueError(f"the checkpoint is already quantized ({held}); it cannot be loaded as {asked}")
    return held or asked


def quantize_(model: nn.Module, method: str | QuantSpec, group_size: int | None = None,
              include_embeddings: bool = False, include_lm_head: bool = False) -> nn.Module:  # fmt: skip
    """Quantize `model` in place (and return it): every `nn.Linear` except the output heads becomes an
    Int8Linear / Int4Linear; embeddings and lm_head too when asked. Shapes are checked before anything
    is swapped; a model that is already quantized is refused."""
    spec = method if isinstance(method, QuantSpec) else QuantSpec(method, group_size, include_embeddings,
                                                                   include_lm_head)  # fmt: skip
    if any(isinstance(m, QUANTIZED_MODULES) for m in model.modules()):
        raise ValueError("the model is already quantized; quantize a full-precision model")
    targets = list(_targets(model, spec))
    for name, module in targets:
        if spec.method == "int4" and isinstance(module, nn.Linear):
            check_int4_shape(module.in_features, module.out_features, spec.group_size, name)
        check_cpu(_device_of(module), spec.method)
    for name, module in targets:
        model.set_submodule(name, _quantized(module, spec))
    config = getattr(model, "config", None)
    if config is not None:
        config.quantization_config = spec.to_config_dict()
    return model


def _targets(model: nn.Module, spec: QuantSpec) -> Iterator[tuple[str, nn.Module]]:
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False) and hasattr(model, "lm_head")
    if spec.include_lm_head and tied and not spec.include_embeddings:
        logger.warning("lm_head is tied to the input embeddings: it stays full precision")
    if spec.include_embeddings and tied:
        raise ValueError("include_embeddings with tied input/output embeddings is not supported; "
                         "quantize the embeddings of an untied model, or leave them full precision")  # fmt: skip
    for name, module in model.named_modules():
        head = name.split(".")[-1] in _HEADS
        if isinstance(module, nn.Linear) and (not head or (spec.include_lm_head and name.endswith("lm_head"))):
            if not (tied and name.endswith("lm_head")):  # a tied head is the embedding: quantize both or neither
                yield name, module
        elif isinstance(module, nn.Embedding) and spec.include_embeddings:
            yield name, module


def _quantized(module: nn.Module, spec: QuantSpec) -> nn.Module:
    meta = _device_of(module).type == "meta"
    if isinstance(module, nn.Embedding):
        if meta:
            return Int8Embedding(module.num_embeddings, module.embedding_dim, module.padding_idx,
                                 module.weight.dtype, "meta")  # fmt: skip
        return Int8Embedding.from_embedding(module)
    bias = module.bias is not None
    if spec.method == "int8":
        if meta:
            return Int8Linear(module.in_features, module.out_features, bias, module.weight.dtype, "meta")
        return Int8Linear.from_linear(module)
    if meta:
        return Int4Linear(module.in_features, module.out_features, bias, spec.group_size, module.weight.dtype, "meta")
    return Int4Linear.from_linear(module, spec.group_size)


def _device_of(module: nn.Module) -> torch.device:
    return module.weight.device
