"""Decoding in three layers (DESIGN rule 6):

1. `engine.decode_steps` owns the decoder (cache + step function) and yields one token per row per step;
2. `stream` turns steps into token ids, text deltas and finish reasons (for servers and the CLI);
3. `GenerationMixin.generate` is the reference-compatible API on top.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..modeling import check_attention_mask, check_id_tensor, warn_past_context
from ..outputs import ModelOutput
from ..tokenization import streaming_detokenizer
from . import engine
from .beam import beam_search
from .beam_variants import constrained_beam_search, group_beam_search
from .config import DEFAULTS, GenerationConfig
from .contrastive import layered_steps
from .engine import decode_steps
from .processors import LogitsProcessor, build_processors
from .speculative import AssistantDrafter, PromptLookup
from .stopping import StopStrings


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    sequences: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    past_key_values: Any = None


@dataclass
class Plan:
    """Everything decided before the first forward pass."""

    config: GenerationConfig
    eos: list[int]
    pad: int | None
    max_new_tokens: int
    processors: list[LogitsProcessor] = field(default_factory=list)
    stop_strings: StopStrings | None = None


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist()
    return [value] if isinstance(value, int) else list(value)


def plan_generation(model: Any, prompt_length: int, generation_config: GenerationConfig | None, tokenizer: Any,
                    **kwargs: Any) -> Plan:  # fmt: skip
    """Merge config sources, validate, and build processors. EOS ids are the union of the argument,
    generation_config and the model config (GLM-4 needs all three of its ids)."""
    base = generation_config or getattr(model, "generation_config", None) or GenerationConfig()
    config = base.update(**kwargs)
    config.validate()
    if not config.use_cache:
        raise ValueError("use_cache=False is not supported by glmkit's generate: it would recompute the whole "
                         "sequence at every step for the same tokens")  # fmt: skip
    if "eos_token_id" in kwargs and kwargs["eos_token_id"] is None:
        eos = []  # explicitly disabled, as in the reference
    else:
        eos = list(dict.fromkeys(_as_list(kwargs.get("eos_token_id")) + _as_list(base.eos_token_id)
                                 + _as_list(getattr(model.config, "eos_token_id", None))))  # fmt: skip
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    vocab = model.get_output_embeddings().out_features
    for name, ids in (("eos_token_id", eos), ("pad_token_id", [] if pad is None else [pad])):
        outside = [i for i in ids if not 0 <= i < vocab]
        if outside:
            raise ValueError(f"`{name}` {outside[0]} is outside the model's vocabulary (0..{vocab - 1})")
    max_new = _max_new_tokens(model, config, prompt_length, "max_length" in kwargs)
    warn_past_context(model, prompt_length, "the prompt")
    stop = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    processors = build_processors(config, prompt_length, eos, vocab, max_length=prompt_length + max_new)
    return Plan(config, eos, pad, max_new, processors, stop)


def _max_new_tokens(model: Any, config: GenerationConfig, prompt_length: int, max_length_given: bool) -> int:
    """New tokens to generate, as the reference decides: max_new_tokens, else max_length minus the prompt,
    where the untouched default max_length (20) means 20 new tokens within max_position_embeddings."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    max_length = config.max_length
    if not max_length_given and max_length == DEFAULTS["max_length"]:
        context = getattr(model.config, "max_position_embeddings", None)
        max_length = prompt_length + max_length if context is None else min(prompt_length + max_length, context)
    if prompt_length >= max_length:
        raise ValueError(f"Input length of input_ids is {prompt_length}, but `max_length` is set to {max_length}: "
                         "nothing is left to generate. Increase `max_length` or, better, set `max_new_tokens`.")
    return max_length - prompt_length


def check_prompt(input_ids: Any, attention_mask: Any) -> None:
    """Once per call, before any work: ids (batch, seq_len) of integers with at least one token, and a mask
    of the same shape with a real token in every row."""
    check_id_tensor(input_ids, "input_ids")
    if input_ids.shape[1] == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): generation needs at least one "
                         "prompt token (e.g. the BOS token)")  # fmt: skip
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has no rows (batch size 0)")
    if attention_mask is not None:
        check_attention_mask(attention_mask, *input_ids.shape)


def _drafter(model: Any, config: GenerationConfig, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             total: int, assistant_model: Any) -> PromptLookup | AssistantDrafter | None:  # fmt: skip
    """The draft proposer speculative decoding asks for (prompt_lookup_num_tokens / assistant_model), checked."""
    lookup = config.prompt_lookup_num_tokens
    if lookup is None and assistant_model is None:
        return None
    if lookup is not None and assistant_model is not None:
        raise ValueError("pass either prompt_lookup_num_tokens or assistant_model, not both")
    if input_ids.shape[0] * config.num_return_sequences != 1:
        raise ValueError("speculative decoding (prompt_lookup_num_tokens / assistant_model) needs batch size 1")
    if config.num_beams > 1:
        raise ValueError("speculative decoding cannot be combined with beam search (num_beams > 1)")
    if not bool(attention_mask.all()):
        raise ValueError("speculative decoding needs a prompt without padding")
    if lookup is not None:
        return PromptLookup(int(lookup), int(config.max_matching_ngram_size or 2))
    ours, theirs = model.get_output_embeddings().out_features, assistant_model.get_output_embeddings().out_features
    if ours != theirs:
        raise ValueError(f"assistant_model must share the model's vocabulary: {theirs} logits vs {ours}")
    if assistant_model.device != model.device:
        raise ValueError(f"assistant_model is on {assistant_model.device}, the model on {model.device}")
    return AssistantDrafter(assistant_model, total, int(config.num_assistant_tokens),
                            config.assistant_confidence_threshold, config.num_assistant_tokens_schedule)  # fmt: skip


def _pop_fast(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Take the fast-path arguments out of a generate / stream call, checked."""
    fast = {name: kwargs.pop(name) for name in ("compile", "cache_implementation") if name in kwargs}
    if fast.get("cache_implementation") not in (None, "static", "dynamic"):
        raise ValueError(f"cache_implementation must be 'static' or 'dynamic', got {fast['cache_implementation']!r}")
    return fast


def _default_attention_mask(input_ids: torch.Tensor, pad: int | None, eos: Sequence[int]) -> torch.Tensor:
    """As the reference: mask out pad tokens when the pad id is not also an EOS id."""
    if pad is not None and pad not in eos and bool((input_ids == pad).any()):
        return (input_ids != pad).long()
    return torch.ones_like(input_ids)


@dataclass
class StreamChunk:
    """One step of `stream`: per row, the new token ids, the new text, and why it finished (if it did)."""

    token_ids: list[list[int]]
    text: list[str]
    finish_reason: list[str | None]


def stream(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, tokenizer: Any = None,
           generation_config: GenerationConfig | None = None, **kwargs: Any) -> Iterator[StreamChunk]:  # fmt: skip
    """Yield a StreamChunk per decoding step. Text deltas never split a multi-byte character and cost the
    same at any length (an incremental detokenizer per row); a row that stops reports "stop" (EOS or stop
    string), one cut off by the length limit reports "length". `compile=True` /
    `cache_implementation="static"` and speculative decoding work as in `generate`."""
    fast = _pop_fast(kwargs)
    assistant_model = kwargs.pop("assistant_model", None)
    check_prompt(input_ids, attention_mask)
    plan = plan_generation(model, input_ids.shape[1], generation_config, tokenizer, **kwargs)
    if attention_mask is None:
        attention_mask = _default_attention_mask(input_ids, plan.pad, plan.eos)
    B = input_ids.shape[0]
    drafter = _drafter(model, plan.config, input_ids, attention_mask, input_ids.shape[1] + plan.max_new_tokens,
                       assistant_model)  # fmt: skip
    detokenizers = []
    if tokenizer is not None:
        # a few prompt tokens in front keep the first new word's leading space (sentencepiece drops it when
        # a piece is decoded alone); their own text is not emitted
        for ids, keep in zip(input_ids.tolist(), attention_mask.tolist()):
            context = [t for t, m in zip(ids, keep) if m][-4:]
            detokenizers.append(streaming_detokenizer(tokenizer, skip_special_tokens=True, prefix_ids=context))
    done = [False] * B
    produced = 0
    # every step is synced here anyway (text needs the ids), so "all finished" is checked each step
    steps = layered_steps(model, input_ids, attention_mask, plan, fast, drafter)  # contrastive search / DoLa
    for step in steps or decode_steps(model, input_ids, attention_mask, plan, fast, check_every=1, drafter=drafter):
        produced += 1
        tokens, stopped = step.tokens.tolist(), step.stopped_now.tolist()
        chunk = StreamChunk([[] for _ in range(B)], [""] * B, [None] * B)
        last_step = produced == plan.max_new_tokens or bool(step.finished.all())
        for row in range(B):
            if done[row]:
                continue
            chunk.token_ids[row].append(tokens[row])
            if detokenizers:
                text = detokenizers[row].add(tokens[row])
                if stopped[row] or last_step:
                    text += detokenizers[row].finalize()
                chunk.text[row] = text
            if stopped[row]:
                chunk.finish_reason[row], done[row] = "stop", True
            elif last_step:
                chunk.finish_reason[row], done[row] = "length", True
        yield chunk


def _steps_taken(all_finished: list[torch.Tensor]) -> int:
    """Steps up to the first at which every row had finished (one host sync): the fast path may run a
    few all-pad steps past it, the plain path never does."""
    done = torch.stack(all_finished)
    return int(done.int().argmax()) + 1 if bool(done.any()) else len(all_finished)


class GenerationMixin:
    """`generate` for every ForCausalLM, with the reference's arguments and outputs."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        streamer: Any = None,
        tokenizer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor | GenerateDecoderOnlyOutput:
        """Greedy or sampled decoding. Returns prompt + new tokens (finished rows padded with
        pad_token_id), or a GenerateDecoderOnlyOutput when return_dict_in_generate=True."""
        for ignored in ("token_type_ids", "position_ids"):  # tokenizer outputs; positions come from the mask
            kwargs.pop(ignored, None)
        fast = _pop_fast(kwargs)
        assistant_model = kwargs.pop("assistant_model", None)
        inputs = kwargs.pop("inputs", None)
        input_ids = inputs if input_ids is None else input_ids
        known = set(DEFAULTS) | set(vars(generation_config or getattr(self, "generation_config", GenerationConfig())))
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(unknown)}")
        if input_ids is None:  # the reference starts one row from the BOS token
            input_ids = _bos_prompt(self, generation_config, kwargs)
        check_prompt(input_ids, attention_mask)
        plan = plan_generation(self, input_ids.shape[1], generation_config, tokenizer, **kwargs)
        config = plan.config
        if attention_mask is None:
            attention_mask = _default_attention_mask(input_ids, plan.pad, plan.eos)
        drafter = _drafter(self, config, input_ids, attention_mask, input_ids.shape[1] + plan.max_new_tokens,
                           assistant_model)  # fmt: skip
        if (drafter is not None or config.num_beams > 1) and engine.decode_mode(fast) != "plain":
            warnings.warn(f"{'beam search' if drafter is None else 'speculative decoding'} runs on the plain "
                          "decode path; compile / static cache ignored", stacklevel=2)  # fmt: skip
        if config.num_beams > 1:
            if streamer is not None:
                raise ValueError("`streamer` cannot be used with beam search")
            if plan.stop_strings is not None:
                raise NotImplementedError("stop_strings with beam search is not implemented in glmkit")
            P = input_ids.shape[1]
            engine.reserved_length(self, P, P + plan.max_new_tokens, "beam")  # raises past the context
            search = beam_search
            if config.constraints is not None or config.force_words_ids is not None:
                search = constrained_beam_search
            elif config.num_beam_groups > 1:
                search = group_beam_search
            out = search(self, input_ids, attention_mask, plan)
            if not config.return_dict_in_generate:
                return out.sequences
            out.scores = out.scores if config.output_scores else None
            out.sequences_scores = out.sequences_scores if config.output_scores else None
            out.logits = out.logits if config.output_logits else None
            return out
        if config.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        steps = layered_steps(self, input_ids, attention_mask, plan, fast, drafter)  # contrastive search / DoLa
        if streamer is not None:
            streamer.put(input_ids.cpu())
        every = 1 if streamer is not None else engine.CHECK_EVERY  # a streamer must not see all-pad steps
        if steps is None:
            steps = decode_steps(self, input_ids, attention_mask, plan, fast, every, drafter)
        new_tokens, scores, logits, finished = [], [], [], []
        for step in steps:
            new_tokens.append(step.tokens)
            finished.append(step.finished.all())
            if config.output_scores:
                scores.append(step.scores)
            if config.output_logits:
                logits.append(step.logits)
            if streamer is not None:
                streamer.put(step.tokens.cpu())
        if streamer is not None:
            streamer.end()
        n = _steps_taken(finished)
        new_tokens, scores, logits = new_tokens[:n], scores[:n], logits[:n]
        sequences = torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)
        if not config.return_dict_in_generate:
            return sequences
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=tuple(scores) if config.output_scores else None,
            logits=tuple(logits) if config.output_logits else None,
        )

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, tokenizer: Any = None,
               **kwargs: Any) -> Iterator[StreamChunk]:  # fmt: skip
        """Lower-level iterator: per step, per row token ids, text deltas and finish reasons."""
        return stream(self, input_ids, attention_mask, tokenizer, **kwargs)


def _bos_prompt(model: Any, generation_config: GenerationConfig | None, kwargs: dict[str, Any]) -> torch.Tensor:
    """generate() without input_ids: one row holding the BOS token (the argument's, the generation config's or
    the model config's), as the reference does."""
    sources = (kwargs.get("bos_token_id"), getattr(generation_config or getattr(model, "generation_config", None),
               "bos_token_id", None), getattr(model.config, "bos_token_id", None))  # fmt: skip
    bos = next((b for b in sources if b is not None), None)
    if bos is None:
        raise ValueError("generate() needs input_ids of shape (batch, seq_len), or a bos_token_id to start from")
    return torch.tensor([[bos]], device=model.device)
