"""PreTrainedModel: building, loading, saving and initialising, shared by every family and head."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .cache import Cache, KVCache, as_cache
from .checkpoint import CheckpointError, WeightReader, resolve_device, resolve_dtype, stage_state_dict
from .config import PretrainedConfig
from .generation.config import GENERATION_CONFIG_NAME, GenerationConfig
from .hub import pop_hub_kwargs, resolve_checkpoint_dir
from .layers import RMSNorm, build_attention_mask
from .outputs import BaseModelOutputWithPast, ModelOutput
from .quant import prepare_loading, resolve_spec

logger = logging.getLogger("glmkit")
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs")


class PreTrainedModel(nn.Module):
    """Base class. Subclasses set `config_class`, build their modules in `__init__(config)` and call
    `self.post_init()` last."""

    config_class: ClassVar[type[PretrainedConfig]] = PretrainedConfig
    base_model_prefix: ClassVar[str] = "model"
    # checkpoint names to drop silently (buffers older exports wrote, e.g. rotary inv_freq)
    ignore_on_load: ClassVar[tuple[str, ...]] = (r"rotary_emb\.inv_freq$",)
    # head weights that may be absent and are then freshly initialised (classification heads)
    init_if_missing: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}"
            )
        self.config = config

    # ---- initialisation -------------------------------------------------------------------------
    def post_init(self) -> None:
        """Initialise weights the reference's way (skipped on the meta device) and tie embeddings."""
        if next(self.parameters()).device.type != "meta":
            self.apply(self._init_weights)
        self.tie_weights()

    def _init_weights(self, module: nn.Module) -> None:
        std = getattr(self.config, "initializer_range", getattr(self.config, "init_std", 0.02))
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
            if module.padding_idx is not None:
                module.weight.data[module.padding_idx].zero_()
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            if module.weight is not None:
                module.weight.data.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.data.zero_()

    @property
    def base_model(self) -> nn.Module:
        return getattr(self, self.base_model_prefix, self)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.base_model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.base_model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear | None:
        return getattr(self, "lm_head", None)

    def tie_weights(self) -> None:
        """Share the input embedding with lm_head when the config says so (survives .to())."""
        head = self.get_output_embeddings()
        if head is not None and getattr(self.config, "tie_word_embeddings", False):
            head.weight = self.get_input_embeddings().weight

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute each layer's activations in backward: less memory for more compute when training.
        Checkpointing is always non-reentrant; `gradient_checkpointing_kwargs` may only say so."""
        extra = {k: v for k, v in (gradient_checkpointing_kwargs or {}).items() if (k, v) != ("use_reentrant", False)}
        if extra:
            raise ValueError(f"glmkit checkpoints layers non-reentrantly only; unsupported options: {extra}")
        self.base_model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.base_model.gradient_checkpointing = False

    # ---- properties -----------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(p.dtype for p in self.parameters() if p.is_floating_point())

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        params = {id(p): p for p in self.parameters()}  # tied weights counted once
        if exclude_embeddings:
            for module in self.modules():
                if isinstance(module, nn.Embedding):
                    params.pop(id(module.weight), None)
        return sum(p.numel() for p in params.values())

    # ---- loading --------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: PretrainedConfig, **kwargs: Any) -> PreTrainedModel:
        """A randomly initialised model (dtype / attn_implementation accepted as in from_pretrained)."""
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        if kwargs.get("attn_implementation"):
            config._attn_implementation = kwargs.pop("attn_implementation")
        model = cls(config)
        return model.to(resolve_dtype(dtype, config.torch_dtype, None)) if dtype is not None else model

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        config: PretrainedConfig | None = None,
        dtype: str | torch.dtype | None = None,
        torch_dtype: str | torch.dtype | None = None,
        device_map: str | int | torch.device | dict | None = None,
        attn_implementation: str | None = None,
        quantization: str | None = None,
        quantization_config: dict | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Load a checkpoint directory: built on the meta device, weights assigned once, no double copy.
        `quantization="int8"|"int4"` (or an HF-style `quantization_config`) quantizes linears as they are read.

        Extra keyword arguments override config.json fields (e.g. `num_labels=3`). Every problem with
        the weights (missing, unexpected, wrong shape) is raised before any tensor is read.
        """
        directory = resolve_checkpoint_dir(name_or_path, **pop_hub_kwargs(kwargs))
        if config is None:
            config = cls.config_class.from_pretrained(directory, **kwargs)
        elif kwargs:
            raise TypeError(f"unexpected keyword arguments with an explicit config: {sorted(kwargs)}")
        if attn_implementation is not None:
            if attn_implementation not in ("sdpa", "eager"):
                raise ValueError(
                    f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}"
                )
            config._attn_implementation = attn_implementation
        reader = cls.adapt_checkpoint(WeightReader(directory), config)
        target_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, config.torch_dtype, reader)
        device = resolve_device(device_map)
        with torch.device("meta"):
            model = cls(config)
        quant = resolve_spec(quantization, quantization_config, getattr(config, "quantization_config", None))
        if quant is not None:  # quantized modules swapped in; the reader quantizes each weight as it is read
            reader = prepare_loading(model, reader, quant, device)
        names = model._match_checkpoint(reader)
        state = {}
        for ours, theirs in names.items():  # floating tensors arrive in the target dtype, converted in slices
            state[ours] = reader.get(theirs, dtype=target_dtype).to(device)
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        model._materialize_missing(device, target_dtype)
        if hasattr(model, "generation_config") and (directory / GENERATION_CONFIG_NAME).is_file():
            model.generation_config = GenerationConfig.from_pretrained(directory)
        return model.eval()

    @classmethod
    def adapt_checkpoint(cls, reader: WeightReader, config: PretrainedConfig) -> WeightReader:
        """Hook for a family whose released checkpoints use other names or fused tensors (the original
        GLM-4 layout): return a reader presenting them in the HF layout. Default: unchanged."""
        return reader

    def _checkpoint_name_map(self, reader_keys: list[str]) -> tuple[dict[str, str], list[str]]:
        """Map our parameter names to checkpoint names, allowing for the base-model prefix being present
        in one and absent in the other. Returns (ours -> theirs, unmatched checkpoint names)."""
        ours = set(self.state_dict())
        prefix = self.base_model_prefix + "."
        is_base = not hasattr(self, self.base_model_prefix)
        mapping, unmatched = {}, []
        for name in reader_keys:
            if name in ours:
                mapping[name] = name
            elif is_base and name.startswith(prefix) and name[len(prefix) :] in ours:
                mapping[name[len(prefix) :]] = name
            elif not is_base and prefix + name in ours:
                mapping[prefix + name] = name
            elif not any(re.search(p, name) for p in self.ignore_on_load):
                unmatched.append(name)
        return mapping, unmatched

    def _match_checkpoint(self, reader: WeightReader) -> dict[str, str]:
        mapping, unmatched = self._checkpoint_name_map(reader.keys())
        # top-level head names we lack belong to another head (lm_head vs score): skip those
        unexpected = [n for n in unmatched if n.split(".", 1)[0] not in HEAD_NAMES]
        skipped = sorted(set(unmatched) - set(unexpected))
        if skipped:
            logger.warning(
                "%s: ignoring checkpoint weights of another head: %s", type(self).__name__, ", ".join(skipped)
            )
        tied = {"lm_head.weight"} if getattr(self.config, "tie_word_embeddings", False) else set()
        missing = sorted(set(self.state_dict()) - set(mapping) - tied)
        fresh = [n for n in missing if n.startswith(self.init_if_missing)] if self.init_if_missing else []
        missing = [n for n in missing if n not in fresh]
        params = self.state_dict()
        wrong = [
            f"{ours} (checkpoint {tuple(reader.shape(theirs))}, model {tuple(params[ours].shape)})"
            for ours, theirs in mapping.items()
            if tuple(reader.shape(theirs)) != tuple(params[ours].shape)
        ]
        problems = []
        if missing:
            problems.append(f"missing weights: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected weights: {', '.join(sorted(unexpected))}")
        if wrong:
            problems.append(f"wrong shapes: {', '.join(wrong)}")
        if problems:
            raise CheckpointError(
                f"checkpoint in {reader.directory} does not fit {type(self).__name__}: " + "; ".join(problems)
            )
        if fresh:
            logger.warning(
                "%s: newly initialised (not in checkpoint): %s", type(self).__name__, ", ".join(fresh)
            )
        return mapping

    def _materialize_missing(self, device: torch.device, dtype: torch.dtype) -> None:
        """Give parameters still on the meta device (fresh heads) real storage, then initialise them."""
        for module in self.modules():
            if any(p.device.type == "meta" for p in module.parameters(recurse=False)):
                module.to_empty(device=device, recurse=False)
                self._init_weights(module)
                module.to(dtype)

    # ---- saving ---------------------------------------------------------------------------------
    def save_pretrained(
        self,
        save_directory: str | os.PathLike,
        max_shard_size: int | str = "5GB",
        safe_serialization: bool = True,
        is_main_process: bool = True,
    ) -> None:
        """Write config.json and safetensors weights (sharded past max_shard_size) that the reference loads.
        Only safetensors is written (never pickles); `is_main_process=False` writes nothing (multi-process)."""
        if not safe_serialization:
            raise ValueError("glmkit saves safetensors only (safe_serialization=False would write a pickle)")
        if not is_main_process:
            return
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        self.config.torch_dtype = str(self.dtype).removeprefix("torch.")
        state = self.state_dict()
        if getattr(self.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)
        # every weight file is written before anything in the directory changes; an interrupted save
        # leaves the old checkpoint whole
        staged = stage_state_dict(state, path, max_shard_size)
        try:
            self.config.save_pretrained(path)
            staged.commit()
        finally:
            staged.discard()
        generation_config = getattr(self, "generation_config", None)
        if generation_config is not None:
            generation_config.save_pretrained(path)


class InputError(ValueError):
    """Bad model input: token ids outside the vocabulary, inconsistent shapes, a too-long sequence."""


def check_token_ids(input_ids: torch.Tensor, vocab_size: int) -> None:
    """Raise InputError naming the first id outside [0, vocab_size) (one host sync per call)."""
    if input_ids.numel() == 0:
        return
    low, high = torch.aminmax(input_ids)
    if int(low) < 0 or int(high) >= vocab_size:
        bad = input_ids[(input_ids < 0) | (input_ids >= vocab_size)][0]
        raise InputError(f"token id {int(bad)} is outside the vocabulary (valid ids are 0..{vocab_size - 1})")


@dataclass
class LayerTrace:
    """What the HF-style forward collects while the layers run (the engine passes none of it)."""

    hidden_states: bool = False
    attentions: bool = False
    checkpointing: bool = False  # recompute each layer in backward
    layerdrop: float | None = None  # XGLM: skip a layer with this probability (drawn at every layer)
    all_hidden: list[torch.Tensor] = field(default_factory=list)
    all_attentions: list[torch.Tensor | None] = field(default_factory=list)
    all_cross: list[torch.Tensor | None] = field(default_factory=list)


def run_layers(layers: nn.ModuleList, x: torch.Tensor, args: tuple, trace: LayerTrace | None = None) -> torch.Tensor:
    """`layer(x, *args, output_attentions) -> (x, weights[, cross_weights])` for each layer. With a trace,
    each layer's input and weights are collected and activations recomputed in backward when asked."""
    if trace is None:
        for layer in layers:
            x = layer(x, *args)[0]
        return x
    for layer in layers:
        if trace.hidden_states:
            trace.all_hidden.append(x)
        # LayerDrop draws at every layer even at probability 0, as the reference does: a seed then gives the
        # same dropout masks and skipped layers there and here
        if trace.layerdrop is not None and torch.rand([]) < trace.layerdrop:
            continue
        if trace.checkpointing:
            out = checkpoint(layer, x, *args, trace.attentions, use_reentrant=False)
        else:
            out = layer(x, *args, trace.attentions)
        x = out[0]
        trace.all_attentions.append(out[1])
        if len(out) > 2:
            trace.all_cross.append(out[2])
    return x


class DecoderModel(PreTrainedModel):
    """The ONE HF translation layer (DESIGN rule 4) around a family's pure core.

    A family's *Model defines `core(x, positions, mask, cache, trace=None, **extra) -> hidden` (its whole
    decoder: positions, layers, final norm) and, where it has more inputs than ids and a mask, `core_extras`.
    This class turns the reference's forward arguments into those: it validates ids, embeds them, sets up
    the cache, the positions the reference defaults to and the mask, and builds the outputs.
    """

    cache_class: ClassVar[type[KVCache]] = KVCache
    output_class: ClassVar[type] = BaseModelOutputWithPast

    def core(self, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None, cache: Cache | None,
             trace: LayerTrace | None = None, **extra: Any) -> torch.Tensor:  # fmt: skip
        raise NotImplementedError

    def core_extras(self, T: int, extra: dict[str, Any]) -> dict[str, Any]:
        """Family-specific forward arguments, checked and turned into `core` keywords (XGLM's encoder)."""
        unknown = sorted(k for k, v in extra.items() if v is not None)
        if unknown:
            raise TypeError(f"{type(self).__name__}.forward() got unexpected arguments: {', '.join(unknown)}")
        return {}

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        cache_position: torch.LongTensor | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **extra: Any,
    ) -> ModelOutput | tuple:
        cfg = self.config
        use_cache = (cfg.use_cache and not self.training) if use_cache is None else use_cache
        trace = LayerTrace(
            hidden_states=cfg.output_hidden_states if output_hidden_states is None else output_hidden_states,
            attentions=cfg.output_attentions if output_attentions is None else output_attentions,
            checkpointing=self.gradient_checkpointing and self.training,
        )
        x = self._embed_inputs(input_ids, inputs_embeds)
        B, T, _ = x.shape
        core_extra = self.core_extras(T, extra)
        cache = as_cache(past_key_values, use_cache, self.cache_class)
        past = cache.get_seq_length() if cache is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + T, device=x.device)
        if position_ids is None:  # the reference continues from the cache; it does not look at the mask
            position_ids = cache_position[None]
        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[0] != B):
            raise InputError(f"attention_mask must have shape (batch, seq_len) = ({B}, {past + T}), "
                             f"got {tuple(attention_mask.shape)}")  # fmt: skip
        if cache is not None:
            cache.begin(B, T, x.device)
            if attention_mask is not None:
                cache.set_valid(attention_mask)
            mask = cache.attention_mask(T)
        else:
            mask = build_attention_mask(attention_mask, cache_position, past + T, B)
        x = self.core(x, position_ids, mask, cache, trace, **core_extra)
        fields = dict(
            last_hidden_state=x,
            past_key_values=cache if use_cache else None,
            hidden_states=(*trace.all_hidden, x) if trace.hidden_states else None,
            attentions=tuple(trace.all_attentions) if trace.attentions else None,
        )
        if "cross_attentions" in self.output_class.__dataclass_fields__:
            fields["cross_attentions"] = (
                tuple(trace.all_cross) if trace.attentions and any(w is not None for w in trace.all_cross) else None
            )
        out = self.output_class(**fields)
        return out if (cfg.return_dict if return_dict is None else return_dict) else out.to_tuple()

    def _embed_inputs(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise InputError("You must specify exactly one of input_ids or inputs_embeds")
        if input_ids is None:
            return inputs_embeds
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must have shape (batch, seq_len), got {tuple(input_ids.shape)}")
        check_token_ids(input_ids, self.embed_tokens.num_embeddings)
        return self.embed_tokens(input_ids)
