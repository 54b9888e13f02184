"""Decoding in three layers (DESIGN rule 6):

1. `decode_steps` owns the KV cache and yields one token per row per step;
2. `stream` turns steps into token ids, text deltas and finish reasons (for servers and the CLI);
3. `GenerationMixin.generate` is the reference-compatible API on top.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..cache import KVCache
from ..outputs import ModelOutput
from .beam import beam_search
from .config import DEFAULTS, GenerationConfig
from .processors import LogitsProcessor, build_processors
from .stopping import StopStrings

PREFILL_CHUNK = 512


@dataclass
class Step:
    tokens: torch.Tensor  # (B,) the token appended to each row (pad for finished rows)
    logits: torch.Tensor  # (B, V) raw fp32 logits it was chosen from
    scores: torch.Tensor  # (B, V) after the processors
    finished: torch.Tensor  # (B,) bool: the row has stopped (EOS or stop string) as of this token
    stopped_now: torch.Tensor  # (B,) bool: the row stopped at this token


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
    if "eos_token_id" in kwargs and kwargs["eos_token_id"] is None:
        eos = []  # explicitly disabled, as in the reference
    else:
        eos = list(dict.fromkeys(_as_list(kwargs.get("eos_token_id")) + _as_list(base.eos_token_id)
                                 + _as_list(getattr(model.config, "eos_token_id", None))))  # fmt: skip
    pad = config.pad_token_id if config.pad_token_id is not None else (eos[0] if eos else None)
    if config.max_new_tokens is not None:
        max_new = config.max_new_tokens
    else:
        max_new = config.max_length - prompt_length
    stop = StopStrings(config.stop_strings, tokenizer) if config.stop_strings else None
    return Plan(config, eos, pad, max(1, max_new), build_processors(config, prompt_length, eos), stop)


def choose_tokens(plan: Plan, ids: torch.Tensor, cur: int, logits: torch.Tensor, finished: torch.Tensor,
                  eos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """One step's choice for every row: run the processors on ids[:, :cur], pick greedily or sample,
    pad rows already finished, write the tokens at `cur`. Returns (tokens, scores, stopped)."""
    scores = logits
    for processor in plan.processors:
        scores = processor(ids[:, :cur], scores)
    if plan.config.do_sample:
        tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    else:
        tokens = torch.argmax(scores, dim=-1)
    if eos is not None and plan.pad is not None:
        tokens = torch.where(finished, plan.pad, tokens)
    ids[:, cur] = tokens
    stopped = torch.isin(tokens, eos) if eos is not None else torch.zeros_like(finished)
    if plan.stop_strings is not None:  # needs the text: a host round trip by nature
        rows = ids[:, : cur + 1].tolist()
        stopped = stopped | torch.tensor([plan.stop_strings.row_done(r) for r in rows], device=ids.device)
    return tokens, scores, stopped


@torch.no_grad()
def decode_steps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: Plan,
                 prefill_chunk: int = PREFILL_CHUNK) -> Iterator[Step]:  # fmt: skip
    """Prefill the prompt in chunks (bounded memory), then decode one token per step into a
    preallocated cache and token buffer until every row stops or max_new_tokens is reached."""
    B, P = input_ids.shape
    total = P + plan.max_new_tokens
    ids = input_ids.new_full((B, total), plan.pad if plan.pad is not None else 0)
    ids[:, :P] = input_ids
    mask = attention_mask.new_ones((B, total))
    mask[:, :P] = attention_mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # pads get a dummy position
    cache = KVCache(max_length=total)
    for start in range(0, P, prefill_chunk):
        end = min(P, start + prefill_chunk)
        out = model(ids[:, start:end], attention_mask=mask[:, :end], position_ids=positions[:, start:end],
                    past_key_values=cache, use_cache=True, logits_to_keep=1)  # fmt: skip
    eos = torch.tensor(plan.eos, device=ids.device) if plan.eos else None
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    for step in range(plan.max_new_tokens):
        cur = P + step
        logits = out.logits[:, -1].float()
        tokens, scores, stopped = choose_tokens(plan, ids, cur, logits, finished, eos)
        stopped_now = stopped & ~finished
        finished = finished | stopped
        yield Step(tokens, logits, scores, finished, stopped_now)
        if step + 1 == plan.max_new_tokens or bool(finished.all()):
            return
        out = model(ids[:, cur : cur + 1], attention_mask=mask[:, : cur + 1], position_ids=positions[:, cur : cur + 1],
                    past_key_values=cache, use_cache=True)  # fmt: skip


def select_steps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: Plan,
                 fast: dict[str, Any], check_every: int | None = None) -> Iterator[Step]:  # fmt: skip
    """The plain `decode_steps`, or the static-cache path when `fast` (the `compile` and
    `cache_implementation` arguments popped from a call) asks for it."""
    compile_step = fast.get("compile", False)  # True, or a dict of torch.compile arguments
    if fast.get("cache_implementation") != "static" and not compile_step:
        return decode_steps(model, input_ids, attention_mask, plan)
    from .fast import CHECK_EVERY, static_decode_steps  # fast imports this module

    return static_decode_steps(model, input_ids, attention_mask, plan, compile_step, check_every or CHECK_EVERY)


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
    """Yield a StreamChunk per decoding step. Text deltas never split a multi-byte character; a row
    that stops reports "stop" (EOS or stop string), one cut off by the length limit reports "length".
    `compile=True` / `cache_implementation="static"` take the fast path, as in `generate`."""
    fast = _pop_fast(kwargs)
    plan = plan_generation(model, input_ids.shape[1], generation_config, tokenizer, **kwargs)
    if attention_mask is None:
        attention_mask = _default_attention_mask(input_ids, plan.pad, plan.eos)
    B = input_ids.shape[0]
    # A few prompt tokens decoded in front keep the first new word's leading space (sentencepiece drops
    # it when a piece is decoded alone); their own text is cut off again.
    context = [
        [t for t, m in zip(ids, keep) if m][-4:] for ids, keep in zip(input_ids.tolist(), attention_mask.tolist())
    ]
    prefix = [tokenizer.decode(c, skip_special_tokens=True) if tokenizer is not None else "" for c in context]
    generated: list[list[int]] = [[] for _ in range(B)]
    shown = [""] * B
    done = [False] * B
    # every step is synced here anyway (text needs the ids), so the fast path checks "all finished" each step
    for steps, step in enumerate(select_steps(model, input_ids, attention_mask, plan, fast, check_every=1), 1):
        tokens, stopped = step.tokens.tolist(), step.stopped_now.tolist()
        chunk = StreamChunk([[] for _ in range(B)], [""] * B, [None] * B)
        last_step = steps == plan.max_new_tokens or bool(step.finished.all())
        for row in range(B):
            if done[row]:
                continue
            generated[row].append(tokens[row])
            chunk.token_ids[row].append(tokens[row])
            if tokenizer is not None:
                text = tokenizer.decode(context[row] + generated[row], skip_special_tokens=True)
                text = (
                    text[len(prefix[row]) :]
                    if text.startswith(prefix[row])
                    else tokenizer.decode(generated[row], skip_special_tokens=True)
                )
                if not text.endswith("\ufffd") or stopped[row] or last_step:
                    chunk.text[row], shown[row] = text[len(shown[row]) :], text
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
        inputs = kwargs.pop("inputs", None)
        input_ids = inputs if input_ids is None else input_ids
        known = set(DEFAULTS) | set(vars(generation_config or getattr(self, "generation_config", GenerationConfig())))
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"generate() got unexpected keyword arguments: {', '.join(unknown)}")
        if input_ids is None or input_ids.dim() != 2:
            raise ValueError("generate() needs input_ids of shape (batch, seq_len)")
        plan = plan_generation(self, input_ids.shape[1], generation_config, tokenizer, **kwargs)
        config = plan.config
        if attention_mask is None:
            attention_mask = _default_attention_mask(input_ids, plan.pad, plan.eos)
        if config.num_beams > 1:
            if fast.get("compile") or fast.get("cache_implementation") == "static":
                warnings.warn("beam search runs on the plain decode path; compile / static cache ignored",
                              stacklevel=2)  # fmt: skip
            if streamer is not None:
                raise ValueError("`streamer` cannot be used with beam search")
            if plan.stop_strings is not None:
                raise NotImplementedError("stop_strings with beam search is not implemented in glmkit")
            out = beam_search(self, input_ids, attention_mask, plan, PREFILL_CHUNK)
            if not config.return_dict_in_generate:
                return out.sequences
            out.scores = out.scores if config.output_scores else None
            out.sequences_scores = out.sequences_scores if config.output_scores else None
            out.logits = out.logits if config.output_logits else None
            return out
        if config.num_return_sequences > 1:
            input_ids = input_ids.repeat_interleave(config.num_return_sequences, dim=0)
            attention_mask = attention_mask.repeat_interleave(config.num_return_sequences, dim=0)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        every = 1 if streamer is not None else None  # a streamer must not see all-pad steps
        steps = select_steps(self, input_ids, attention_mask, plan, fast, every)
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
