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

from ..cache import KVCache, as_cache
from ..modeling import InputError, check_attention_mask, check_id_tensor, warn_past_context
from ..outputs import ModelOutput
from ..tokenization import streaming_detokenizer
from . import engine
from .beam import GenerateBeamDecoderOnlyOutput, beam_search
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
    attentions: tuple[tuple[torch.Tensor, ...], ...] | None = None
    hidden_states: tuple[tuple[torch.Tensor, ...], ...] | None = None
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
    record: tuple[bool, bool] = (False, False)  # keep each step's (attentions, hidden states) for the output


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        return value.flatten().tolist()
    return [value] if isinstance(value, int) else list(value)


def plan_generation(model: Any, prompt_length: int, generation_config: GenerationConfig | None, tokenizer: Any,
                    embedded: int = 0, **kwargs: Any) -> Plan:  # fmt: skip
    """Merge config sources, validate, and build processors. EOS ids are the union of the argument,
    generation_config and the model config (GLM-4 needs all three of its ids). `embedded`: the length of a
    prompt given as embeddings without ids; as in the reference, max_length and min_length then count it,
    while the processors see the new tokens only."""
    base = generation_config or getattr(model, "generation_config", None) or GenerationConfig()
    config = base.update(**kwargs)
    config.validate()
    if embedded and config.min_new_tokens is None:
        config.min_length = max(config.min_length - embedded, 0)
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
    max_new = _max_new_tokens(model, config, prompt_length, "max_length" in kwargs, embedded)
    warn_past_context(model, prompt_length + embedded, "the prompt")
    stop = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    processors = build_processors(config, prompt_length, eos, vocab, max_length=prompt_length + max_new)
    wanted = config.return_dict_in_generate  # as the reference: per-step outputs only in the dict output
    record = (wanted and config.output_attentions, wanted and config.output_hidden_states)
    return Plan(config, eos, pad, max_new, processors, stop, record)


def _max_new_tokens(model: Any, config: GenerationConfig, prompt_length: int, max_length_given: bool,
                    embedded: int = 0) -> int:  # fmt: skip
    """New tokens to generate, as the reference decides: max_new_tokens, else max_length minus the prompt,
    where the untouched default max_length (20) means 20 new tokens within max_position_embeddings (an
    embeddings-only prompt counts in max_length, default or not)."""
    if config.max_new_tokens is not None:
        return config.max_new_tokens
    max_length = config.max_length
    if embedded:
        prompt_length = embedded
    elif not max_length_given and max_length == DEFAULTS["max_length"]:
        context = getattr(model.config, "max_position_embeddings", None)
        max_length = prompt_length + max_length if context is None else min(prompt_length + max_length, context)
    if prompt_length >= max_length:
        raise ValueError(f"Input length of {'inputs_embeds' if embedded else 'input_ids'} is {prompt_length}, but "
                         f"`max_length` is set to {max_length}: nothing is left to generate. Increase `max_length` "
                         "or, better, set `max_new_tokens`.")  # fmt: skip
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
    ) -> torch.Tensor | GenerateDecoderOnlyOutput | GenerateBeamDecoderOnlyOutput:
        """Greedy, sampled or beam decoding. Returns prompt + new tokens (finished rows padded with
        pad_token_id), or, when return_dict_in_generate=True, an output with the cache (`past_key_values`) and
        what output_scores / output_logits / output_attentions / output_hidden_states ask for, per step.
        `inputs_embeds=` runs embeddings in place of the prompt's ids (without input_ids the sequences hold the
        new tokens only); `past_key_values=` continues a cache holding the first tokens of input_ids."""
        for ignored in ("token_type_ids", "position_ids"):  # tokenizer outputs; positions come from the mask
            kwargs.pop(ignored, None)
        fast = _pop_fast(kwargs)
        assistant_model = kwargs.pop("assistant_model", None)
        inputs_embeds, past_key_values = kwargs.pop("inputs_embeds", None), kwargs.pop("past_key_values", None)
        inputs = kwargs.pop("inputs", None)
        input_ids = inputs if input_ids is None else input_ids
        known = set(DEFAULTS) | set(vars(generation_config or getattr(self, "generation_config", GenerationConfig())))
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(unknown)}")
        if inputs_embeds is not None:
            input_ids = _embedded_prompt(self, input_ids, inputs_embeds, attention_mask)
        else:
            if input_ids is None:  # the reference starts one row from the BOS token
                input_ids = _bos_prompt(self, generation_config, kwargs)
            check_prompt(input_ids, attention_mask)
        B, P = input_ids.shape
        T = P if inputs_embeds is None else inputs_embeds.shape[1]  # prompt positions the model runs
        plan = plan_generation(self, P, generation_config, tokenizer, embedded=T - P, **kwargs)
        config = plan.config
        if attention_mask is None:
            attention_mask = _default_attention_mask(input_ids, plan.pad, plan.eos) if P else input_ids.new_ones(B, T)
        cache = _continued_cache(self, past_key_values, input_ids, B * config.num_return_sequences,
                                 inputs_embeds is not None)  # fmt: skip
        drafter = _drafter(self, config, input_ids, attention_mask, T + plan.max_new_tokens,
                           assistant_model)  # fmt: skip
        fast = _decode_options(fast, plan, drafter, cache, inputs_embeds)
        if config.num_beams > 1:
            if streamer is not None:
                raise ValueError("`streamer` cannot be used with beam search")
            if plan.stop_strings is not None:
                raise NotImplementedError("stop_strings with beam search is not implemented in glmkit")
            engine.reserved_length(self, T, T + plan.max_new_tokens, "beam")  # raises past the context
            variant = None
            if config.constraints is not None or config.force_words_ids is not None:
                variant = constrained_beam_search
            elif config.num_beam_groups > 1:
                variant = group_beam_search
            if variant is None:
                out = beam_search(self, input_ids, attention_mask, plan, inputs_embeds)
            elif inputs_embeds is not None or any(plan.record):
                raise NotImplementedError("group / constrained beam search take input_ids only: not inputs_embeds "
                                          "nor output_attentions / output_hidden_states")  # fmt: skip
            else:
                out = variant(self, input_ids, attention_mask, plan)
            if not config.return_dict_in_generate:
                return out.sequences
            out.scores = out.scores if config.output_scores else None
            out.sequences_scores = out.sequences_scores if config.output_scores else None
            out.logits = out.logits if config.output_logits else None
            if out.past_key_values is not None:
                out.past_key_values = _returned_cache(out.past_key_values, 0)
            return out
        if config.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
            if inputs_embeds is not None:
                inputs_embeds = inputs_embeds.repeat_interleave(config.num_return_sequences, dim=0)
        steps = layered_steps(self, input_ids, attention_mask, plan, fast, drafter)  # contrastive search / DoLa
        if streamer is not None:
            streamer.put(input_ids.cpu())
        every = 1 if streamer is not None else engine.CHECK_EVERY  # a streamer must not see all-pad steps
        if steps is None:
            steps = decode_steps(self, input_ids, attention_mask, plan, fast, every, drafter, inputs_embeds, cache)
        new_tokens, scores, logits, attentions, hidden_states, finished = [], [], [], [], [], []
        for step in steps:
            new_tokens.append(step.tokens)
            finished.append(step.finished.all())
            if config.output_scores:
                scores.append(step.scores)
            if config.output_logits:
                logits.append(step.logits)
            attentions.append(step.attentions)  # None unless recorded
            hidden_states.append(step.hidden_states)
            if streamer is not None:
                streamer.put(step.tokens.cpu())
        if streamer is not None:
            streamer.end()
        n = _steps_taken(finished)
        sequences = torch.cat([input_ids, torch.stack(new_tokens[:n], dim=1)], dim=1)
        if not config.return_dict_in_generate:
            return sequences
        return GenerateDecoderOnlyOutput(
            sequences=sequences,
            scores=tuple(scores[:n]) if config.output_scores else None,
            logits=tuple(logits[:n]) if config.output_logits else None,
            attentions=tuple(attentions[:n]) if plan.record[0] else None,
            hidden_states=tuple(hidden_states[:n]) if plan.record[1] else None,
            past_key_values=_returned_cache(step.cache, len(finished) - n),
        )

    def stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, tokenizer: Any = None,
               **kwargs: Any) -> Iterator[StreamChunk]:  # fmt: skip
        """Lower-level iterator: per step, per row token ids, text deltas and finish reasons."""
        return stream(self, input_ids, attention_mask, tokenizer, **kwargs)


def _embedded_prompt(model: Any, input_ids: torch.Tensor | None, inputs_embeds: Any,
                     attention_mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """generate(inputs_embeds=...): the embeddings, checked as forward checks them, run in place of the prompt's
    ids. Returns those ids (checked, the embeddings' batch and length) or, without input_ids, an empty (B, 0)
    prompt: the reference's sequences then hold the new tokens only."""
    model.base_model._embed_inputs(None, inputs_embeds)
    B, T = inputs_embeds.shape[:2]
    if input_ids is None:
        if attention_mask is not None:
            check_attention_mask(attention_mask, B, T)
        return torch.ones(B, 0, dtype=torch.long, device=inputs_embeds.device)
    check_prompt(input_ids, attention_mask)
    if tuple(input_ids.shape) != (B, T):
        raise InputError(f"input_ids {tuple(input_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} must "
                         "have the same batch size and length: the embeddings stand for the ids")  # fmt: skip
    return input_ids


def _continued_cache(model: Any, past_key_values: Any, input_ids: torch.Tensor, rows: int,
                     embedded: bool) -> KVCache | None:  # fmt: skip
    """generate(past_key_values=...): the cache (glmkit's, legacy tuples or a transformers-style cache) holds the
    first tokens of input_ids; as in the reference, only the rest runs."""
    if past_key_values is None:
        return None
    if embedded:
        raise NotImplementedError("inputs_embeds with past_key_values is not implemented in glmkit's generate")
    cache = as_cache(past_key_values, True, model.base_model.cache_class)
    if cache.static:
        raise ValueError("past_key_values: generate cannot continue a static KVCache (pass the cache a plain "
                         "generate or forward returned)")  # fmt: skip
    past = cache.get_seq_length()
    if past >= input_ids.shape[1]:
        raise ValueError(f"past_key_values holds {past} tokens and input_ids has {input_ids.shape[1]}: pass the "
                         "tokens the cache holds followed by at least one new token")  # fmt: skip
    if past and cache.lengths.shape[0] != rows:
        raise ValueError(f"past_key_values holds {cache.lengths.shape[0]} rows, the generation {rows} (batch "
                         "size x num_return_sequences)")  # fmt: skip
    return cache


def _decode_options(fast: dict[str, Any], plan: Plan, drafter: Any, cache: KVCache | None,
                    inputs_embeds: torch.Tensor | None) -> dict[str, Any]:  # fmt: skip
    """Refuse the combinations glmkit does not implement; run on the plain path (and say so when compile / a
    static cache was asked for) what needs it: beam search, speculative decoding, a continued cache, outputs per
    layer (a static cache's attention covers its whole capacity)."""
    beams = plan.config.num_beams > 1
    if drafter is not None and (cache is not None or inputs_embeds is not None or any(plan.record)):
        raise NotImplementedError("speculative decoding (prompt_lookup_num_tokens / assistant_model) with "
                                  "past_key_values, inputs_embeds, output_attentions or output_hidden_states is not "
                                  "implemented in glmkit")  # fmt: skip
    if beams and cache is not None:
        raise NotImplementedError("beam search with past_key_values is not implemented in glmkit")
    if cache is not None and fast.get("cache_implementation") is not None:
        raise ValueError("pass either cache_implementation or past_key_values, not both (as in the reference)")
    layered = bool(plan.config.penalty_alpha) or plan.config.dola_layers is not None
    if layered and (cache is not None or inputs_embeds is not None):
        raise NotImplementedError("contrastive search (penalty_alpha) and DoLa (dola_layers) take input_ids only: "
                                  "not past_key_values nor inputs_embeds")  # fmt: skip
    plain = [name for name, needed in (("beam search", beams), ("speculative decoding", drafter is not None),
             ("past_key_values", cache is not None), ("output_attentions / output_hidden_states", any(plan.record)),
             ("contrastive search / DoLa", layered)) if needed]  # fmt: skip
    if plain and engine.decode_mode(fast) != "plain":
        warnings.warn(f"{plain[0]} runs on the plain decode path; compile / static cache ignored", stacklevel=3)
        return {}
    return fast


def _returned_cache(cache: KVCache, extra_steps: int) -> KVCache:
    """The cache as the reference returns it: holding every token of the sequences but the last (the fast path
    may have run `extra_steps` all-pad steps past the end), and able to grow, for generate(past_key_values=...)."""
    if cache.static:
        cache = cache.clone()
    cache.rewind(extra_steps)
    cache.capacity = None
    return cache


def _bos_prompt(model: Any, generation_config: GenerationConfig | None, kwargs: dict[str, Any]) -> torch.Tensor:
    """generate() without input_ids: one row holding the BOS token (the argument's, the generation config's or
    the model config's), as the reference does."""
    sources = (kwargs.get("bos_token_id"), getattr(generation_config or getattr(model, "generation_config", None),
               "bos_token_id", None), getattr(model.config, "bos_token_id", None))  # fmt: skip
    bos = next((b for b in sources if b is not None), None)
    if bos is None:
        raise ValueError("generate() needs input_ids of shape (batch, seq_len), or a bos_token_id to start from")
    return torch.tensor([[bos]], device=model.device)
