"""PreTrainedModel: building, loading, saving and initialising, shared by every family and head."""

from __future__ import annotations

import difflib
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attn_backends import FLASH, check_attn_implementation, flash_mask
from .cache import Cache, KVCache, as_cache
from .checkpoint import CheckpointError, WeightReader, resolve_device, resolve_dtype, stage_state_dict
from .config import IGNORED_LOADING_KWARGS, PretrainedConfig, unknown_overrides
from .generation.config import GenerationConfig
from .hub import pop_hub_kwargs
from .layers import RMSNorm, build_attention_mask, packed_documents, restrict_to_documents
from .outputs import BaseModelOutputWithPast, ModelOutput
from .placement import DeviceMapError, device_of, dispatch, plan_device_map, wants_placement
from .quant import prepare_loading, resolve_spec
from .reference_api import (
    LoadingOptions,
    ModelAPIMixin,
    loading_device,
    mask_from_4d,
    read_weight,
    report_or_keep,
)
from .sources import open_source

logger = logging.getLogger("glmkit")
HEAD_NAMES = ("lm_head", "score", "classifier", "qa_outputs")


class PreTrainedModel(ModelAPIMixin, nn.Module):
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
        if getattr(self.config, "gradient_checkpointing", False):  # older configs switch it on this way
            self.gradient_checkpointing_enable()

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
        Non-reentrant unless `gradient_checkpointing_kwargs={"use_reentrant": True}` (torch's older mode, which
        needs an input that requires grad: see enable_input_require_grads)."""
        options = dict(gradient_checkpointing_kwargs or {})
        reentrant = options.pop("use_reentrant", False)
        if options:
            raise ValueError(f"gradient_checkpointing_kwargs: glmkit takes only use_reentrant; got {options}")
        self.base_model.gradient_checkpointing = True
        self.base_model.gradient_checkpointing_reentrant = bool(reentrant)

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
            config._attn_implementation = check_attn_implementation(kwargs.pop("attn_implementation"))
        kwargs.pop("attn_implementation", None)
        if kwargs:
            raise TypeError(f"{cls.__name__}.from_config() got unexpected keyword arguments {', '.join(sorted(kwargs))}"
                            " (set config fields on the config itself)")  # fmt: skip
        model = cls(config)
        return model.to(resolve_dtype(dtype, config.torch_dtype, None)) if dtype is not None else model

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | os.PathLike | None = None,
        *,
        config: PretrainedConfig | None = None,
        dtype: str | torch.dtype | None = None,
        torch_dtype: str | torch.dtype | None = None,
        device_map: str | int | torch.device | dict | None = None,
        attn_implementation: str | None = None,
        quantization: str | None = None,
        quantization_config: dict | None = None,
        adapter: str | os.PathLike | None = None,
        tp_plan: str | None = None,
        tp_size: int | None = None,
        device_mesh: Any = None,
        max_memory: dict | None = None,
        gguf_file: str | os.PathLike | None = None,
        **kwargs: Any,
    ) -> PreTrainedModel:
        """Load a checkpoint directory: built on the meta device, weights assigned once, no double copy.
        `quantization="int8"|"int4"` (or an HF-style `quantization_config`) quantizes linears as they are read.
        `adapter=DIR` applies a PEFT LoRA adapter on top (QLoRA when quantized; see glmkit.lora).
        `tp_plan="auto"` (or `tp_size=` / a `device_mesh=`) splits the model over the ranks of a torchrun
        launch, each rank reading only its own slices (glmkit.distributed).
        `gguf_file="model.Q8_0.gguf"` (or a path to a .gguf file) loads llama.cpp's format (glmkit.quant.gguf);
        a directory holding Adept's original Persimmon release loads too (glmkit.models.adept).
        `device_map="auto"|"balanced"|"sequential"|{module: device}` with several devices (and `max_memory=`)
        places the layers over them in one process (glmkit.placement); `model.hf_device_map` reports the plan.

        Extra keyword arguments override config.json fields (e.g. `num_labels=3`). Every problem with
        the weights (missing, unexpected, wrong shape) is raised before any tensor is read, unless asked to
        report it instead (`output_loading_info=True` / `strict=False`, `ignore_mismatched_sizes=True`: see
        LoadingOptions). `state_dict=` with `config=` loads without a checkpoint directory.
        """
        options = LoadingOptions.pop_from(kwargs)
        if pretrained_model_name_or_path is None and (config is None or options.state_dict is None):
            raise ValueError("from_pretrained needs a checkpoint path, or config= and state_dict= without one")
        source = open_source(pretrained_model_name_or_path, gguf_file, options.state_dict, **pop_hub_kwargs(kwargs))
        for ignored in IGNORED_LOADING_KWARGS:
            kwargs.pop(ignored, None)
        source.check_family(cls.config_class.model_type, cls.__name__)
        if config is None:
            unknown = unknown_overrides(cls.config_class, source.config, kwargs)
            if unknown:
                raise TypeError(f"{cls.__name__}.from_pretrained() got unexpected keyword arguments "
                                f"{', '.join(unknown)}: neither loading options nor fields of "
                                f"{cls.config_class.__name__}{_did_you_mean(unknown[0])}")  # fmt: skip
            config = cls.config_class.from_dict(source.config, **kwargs)
        elif kwargs:
            raise TypeError(f"unexpected keyword arguments with an explicit config: {sorted(kwargs)}")
        if attn_implementation is not None:
            config._attn_implementation = check_attn_implementation(attn_implementation)
        reader = source.reader(cls, config)
        target_dtype = resolve_dtype(dtype if dtype is not None else torch_dtype, config.torch_dtype, reader)
        with torch.device("meta"):
            model = cls(config)
        tp_group, plan, device = _layout(model, target_dtype, device_map, max_memory, tp_plan, tp_size, device_mesh)
        quant = resolve_spec(quantization, quantization_config, getattr(config, "quantization_config", None))
        _refuse_combinations(tp_group, plan, quant is not None, adapter is not None, source.kind)
        if quant is not None:  # quantized modules swapped in; the reader quantizes each weight as it is read
            reader = prepare_loading(model, reader, quant, device)
        elif source.kind == "gguf":  # the file's int4 blocks go to int4 linears as they are
            reader = reader.keep_int4(model, device)
        if tp_group is not None:  # this rank's shards swapped in; the reader reads only their slices
            from .distributed import shard_for_loading

            reader = shard_for_loading(model, reader, tp_group, device)
        names = model._match_checkpoint(reader, options)
        state = {}
        for ours, theirs in names.items():  # floating tensors arrive in the target dtype, converted in slices
            state[ours] = read_weight(reader, theirs, target_dtype, device if plan is None else device_of(plan, ours))
        model.load_state_dict(state, strict=False, assign=True)
        model.tie_weights()
        model._materialize_missing(device, target_dtype)
        if plan is not None:
            dispatch(model, plan, device_map)
        if hasattr(model, "generation_config") and source.has_generation_config():
            model.generation_config = GenerationConfig.from_pretrained(source.directory)
        if adapter is not None:
            model.load_adapter(adapter)
        return (model.eval(), options.report) if options.output_loading_info else model.eval()

    def load_adapter(self, adapter_dir: str | os.PathLike) -> PreTrainedModel:
        """Apply the PEFT LoRA adapter in `adapter_dir` (glmkit.lora.load_adapter) in place; returns self."""
        from .lora import load_adapter

        return load_adapter(self, adapter_dir)

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

    def _match_checkpoint(self, reader: WeightReader, options: LoadingOptions | None = None) -> dict[str, str]:
        mapping, unmatched = self._checkpoint_name_map(reader.keys())
        # top-level head names we lack belong to another head (lm_head vs score): skip those
        unexpected = [n for n in unmatched if n.split(".", 1)[0] not in HEAD_NAMES]
        skipped = sorted(set(unmatched) - set(unexpected))
        if skipped:
            logger.warning(
                "%s: ignoring checkpoint weights of another head: %s", type(self).__name__, ", ".join(skipped)
            )
        # a tied lm_head is loaded with its embedding (and missing with it)
        embedding_found = any(n.endswith("embed_tokens.weight") for n in mapping)
        tied = {"lm_head.weight"} if getattr(self.config, "tie_word_embeddings", False) and embedding_found else set()
        missing = sorted(set(self.state_dict()) - set(mapping) - tied)
        fresh = [n for n in missing if n.startswith(self.init_if_missing)] if self.init_if_missing else []
        missing = [n for n in missing if n not in fresh]
        params = self.state_dict()
        wrong = {
            ours: f"{ours} (checkpoint {tuple(reader.shape(theirs))}, model {tuple(params[ours].shape)})"
            for ours, theirs in mapping.items()
            if tuple(reader.shape(theirs)) != tuple(params[ours].shape)
        }
        options = options or LoadingOptions()
        mapping, missing, unexpected, wrong = report_or_keep(options, type(self).__name__, mapping, missing,
                                                             unexpected, wrong)  # fmt: skip
        options.report["missing_keys"] += fresh
        options.report["unexpected_keys"] += skipped
        problems = []
        if missing:
            problems.append(f"missing weights: {', '.join(missing)}")
        if unexpected:
            problems.append(f"unexpected weights: {', '.join(sorted(unexpected))}")
        if wrong:
            problems.append(f"wrong shapes: {', '.join(wrong.values())}")
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
        state = self.state_dict()
        if getattr(self, "tp_shards", None) is not None:  # tensor parallel: every rank joins, the first writes
            from .distributed import gather_state_dict

            state = gather_state_dict(self)
            is_main_process = is_main_process and state is not None
        if not is_main_process:
            return
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        self.config.architectures = [type(self).__name__]
        self.config.torch_dtype = str(self.dtype).removeprefix("torch.")
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


def _layout(model: PreTrainedModel, dtype: torch.dtype, device_map: Any, max_memory: dict | None, tp_plan: Any,
            tp_size: int | None, device_mesh: Any) -> tuple[Any, dict | None, torch.device]:  # fmt: skip
    """Where the weights go: (tensor-parallel group, per-module device plan, first device); at most one of the
    first two is set (device_map with tensor parallelism is refused by tensor_parallel_group)."""
    if tp_plan is not None or tp_size is not None or device_mesh is not None:
        from .distributed import tensor_parallel_group

        group, device = tensor_parallel_group(tp_plan, tp_size, device_mesh, device_map)
        return group, None, device
    if wants_placement(device_map, max_memory):
        plan = plan_device_map(model, device_map, dtype, max_memory)
        return None, plan, next(iter(plan.values()))
    return None, None, loading_device(resolve_device(device_map), device_map)


def _refuse_combinations(tp_group: Any, plan: dict | None, quantized: bool, adapter: bool, kind: str) -> None:
    """The loading options that do not work together yet, refused before any weight is read."""
    if tp_group is not None and (quantized or adapter or kind == "gguf"):
        raise ValueError("quantization and tensor parallelism cannot be combined yet (nor GGUF files or LoRA "
                         "adapters with tensor parallelism): load with one of them")  # fmt: skip
    if plan is not None and (quantized or kind == "gguf"):
        raise DeviceMapError("quantization (and GGUF files) cannot be combined with a device_map over several "
                             "devices yet: load on one device")  # fmt: skip


_FROM_PRETRAINED_KWARGS = ("config", "dtype", "torch_dtype", "device_map", "attn_implementation", "quantization",
                           "quantization_config", "revision", "local_files_only", "cache_dir", "token",
                           "adapter", "tp_plan", "tp_size", "device_mesh", "max_memory")  # fmt: skip


def _did_you_mean(name: str) -> str:
    close = difflib.get_close_matches(name, _FROM_PRETRAINED_KWARGS, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


class InputError(ValueError):
    """Bad model input: token ids outside the vocabulary, inconsistent shapes, a too-long sequence."""


def check_token_ids(input_ids: torch.Tensor, vocab_size: int, name: str = "input_ids", ignore: int | None = None,
                    kind: str = "token id", where: str = "the vocabulary") -> None:  # fmt: skip
    """Raise InputError naming the first id outside [0, vocab_size) (one host sync per call); `ignore`
    (labels' -100) is allowed too."""
    if input_ids.numel() == 0:
        return
    bad = (input_ids < 0) | (input_ids >= vocab_size)
    if ignore is not None:
        bad &= input_ids != ignore
    if bool(bad.any()):
        allowed = f"0..{vocab_size - 1}" + (f" or {ignore}" if ignore is not None else "")
        raise InputError(f"{name}: {kind} {int(input_ids[bad][0])} is outside {where} "
                         f"(valid ids are {allowed})")  # fmt: skip


def check_id_tensor(value: Any, name: str, dims: tuple[int, ...] = (2,)) -> torch.Tensor:
    """`value` must be an integer tensor of one of `dims` dimensions: raise TypeError / InputError naming it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer ids, got {type(value).__name__} "
                        f"(wrap it: torch.tensor(...))")  # fmt: skip
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer ids (torch.long), got dtype {value.dtype}")
    if value.dim() not in dims:
        raise InputError(f"{name} must have shape (batch, seq_len), got {tuple(value.shape)}")
    return value


def check_attention_mask(mask: Any, B: int, K: int, tokens_in: str | None = "every row") -> None:
    """A (B, K) mask over every key (past and new) with a token to attend to in "every row", in "some row",
    or (None) unchecked: an all-zero mask silently attends everywhere."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() != 2 or tuple(mask.shape) != (B, K):
        raise InputError(f"attention_mask must have shape (batch, past + seq_len) = ({B}, {K}), "
                         f"got {tuple(mask.shape)}")  # fmt: skip
    if tokens_in == "some row" and not bool(mask.any()):
        raise InputError(f"attention_mask is all zeros (shape {tuple(mask.shape)}): there is no token to attend to")
    if tokens_in == "every row":
        empty = ~mask.bool().any(dim=-1)
        if bool(empty.any()):
            raise InputError(f"attention_mask row {int(empty.nonzero()[0, 0])} is all zeros: every row needs at "
                             "least one token to attend to")  # fmt: skip


_WARNED_CONTEXT: set[tuple[str, int]] = set()


def warn_past_context(model: Any, length: int, what: str) -> None:
    """The reference runs past max_position_embeddings without a word; say it once per model class."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and length > limit and (type(model).__name__, limit) not in _WARNED_CONTEXT:
        _WARNED_CONTEXT.add((type(model).__name__, limit))
        logger.warning("%s reaches position %d, past the model's max_position_embeddings (%d): outputs there are "
                       "not what the model was trained for", what, length, limit)  # fmt: skip


@dataclass
class LayerTrace:
    """What the HF-style forward collects while the layers run (the engine passes none of it)."""

    hidden_states: bool = False
    attentions: bool = False
    checkpointing: bool = False  # recompute each layer in backward
    reentrant: bool = False  # torch's reentrant checkpointing (asked for by gradient_checkpointing_kwargs)
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
            out = checkpoint(layer, x, *args, trace.attentions, use_reentrant=trace.reentrant)
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

    Packed sequences: when `position_ids` are given, `attention_mask` is None and nothing is cached yet (no
    cache, or a fresh one), a position 0 inside a row starts a new document and no token attends across
    documents (e.g. position_ids [[0, 1, 2, 0, 1]] is two documents of 3 and 2 tokens). Anything else keeps
    the ordinary causal (and padding) mask. A cache kept from a packed pass holds every document's keys.
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
        use_cache_arg = bool(use_cache)
        use_cache = (cfg.use_cache and not self.training) if use_cache is None else use_cache
        trace = LayerTrace(
            hidden_states=cfg.output_hidden_states if output_hidden_states is None else output_hidden_states,
            attentions=cfg.output_attentions if output_attentions is None else output_attentions,
            checkpointing=self.gradient_checkpointing and self.training,
            reentrant=getattr(self, "gradient_checkpointing_reentrant", False),
        )
        x = self._embed_inputs(input_ids, inputs_embeds)
        B, T, _ = x.shape
        core_extra = self.core_extras(T, extra)
        cache = as_cache(past_key_values, use_cache, self.cache_class)
        past = cache.get_seq_length() if cache is not None else 0
        if cache_position is None:
            cache_position = torch.arange(past, past + T, device=x.device)
        documents = None
        if position_ids is None:  # the reference continues from the cache; it does not look at the mask
            position_ids = cache_position[None]
            warn_past_context(self, past + T, "the input")
        else:
            position_ids = self._check_position_ids(position_ids, B, T)
            # packed sequences (see the class docstring): a position 0 inside a row starts a document
            documents = packed_documents(position_ids) if attention_mask is None and past == 0 else None
        custom_mask = None
        if attention_mask is not None and getattr(attention_mask, "ndim", 2) == 4:  # the caller's whole mask
            custom_mask, attention_mask = mask_from_4d(attention_mask, B, T, past + T), None
        if attention_mask is not None:
            # a padding-only row in a batch is allowed (its outputs are meaningless, the others' are right); a
            # mask with no token at all is a mistake. Incremental decoding may start on an all-padding chunk.
            incremental = past_key_values is not None or use_cache_arg
            check_attention_mask(attention_mask, B, past + T, None if incremental else "some row")
        if cache is not None:
            cache.begin(B, T, x.device)
            if attention_mask is not None:
                cache.set_valid(attention_mask)
            mask = cache.attention_mask(T)
        else:
            mask = build_attention_mask(attention_mask, cache_position, past + T, B)
        if custom_mask is not None:
            mask = custom_mask
        elif documents is not None:
            mask = restrict_to_documents(mask, documents)
        if cfg._attn_implementation == FLASH:  # made once here for every layer
            if custom_mask is not None:
                raise InputError("a 4D attention_mask cannot run on flash_attention_2 (its kernels take no mask "
                                 "matrix): load with attn_implementation='sdpa', 'eager' or 'flex_attention'")
            real = cache.real_tokens(T) if cache is not None else (attention_mask, attention_mask)
            mask = flash_mask(mask, *real, documents)
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
            C = self.embed_tokens.embedding_dim
            if not isinstance(inputs_embeds, torch.Tensor) or not inputs_embeds.is_floating_point():
                raise TypeError(f"inputs_embeds must be a floating-point torch.Tensor, got "
                                f"{getattr(inputs_embeds, 'dtype', type(inputs_embeds).__name__)}")  # fmt: skip
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != C:
                raise InputError(f"inputs_embeds must have shape (batch, seq_len, {C}), "
                                 f"got {tuple(inputs_embeds.shape)}")  # fmt: skip
            x = inputs_embeds
        else:
            check_id_tensor(input_ids, "input_ids")
            check_token_ids(input_ids, self.embed_tokens.num_embeddings)
            x = self.embed_tokens(input_ids)
        if x.shape[1] == 0:
            raise InputError(f"{'input_ids' if input_ids is not None else 'inputs_embeds'} is empty (seq_len 0): "
                             "there is nothing to run")  # fmt: skip
        return x

    def _check_position_ids(self, position_ids: Any, B: int, T: int) -> torch.Tensor:
        """(B, T) or (1, T) non-negative integer positions (one host sync per call)."""
        check_id_tensor(position_ids, "position_ids", dims=(1, 2))
        position_ids = position_ids if position_ids.dim() == 2 else position_ids[None]
        if position_ids.shape[1] != T or position_ids.shape[0] not in (1, B):
            raise InputError(f"position_ids must have shape ({B}, {T}) or (1, {T}), got {tuple(position_ids.shape)}")
        low, high = torch.aminmax(position_ids)
        if int(low) < 0:
            raise InputError(f"position_ids must be >= 0, got {int(low)}")
        warn_past_context(self, int(high) + 1, "position_ids")
        return position_ids
