"""The decode engine: one cache owner and step function under every way of decoding (DESIGN rules 5, 6).

`Decoder` owns the KV cache and runs the model core on new tokens: eagerly on a preallocated cache
("plain", the default), on a static cache with fixed shapes ("static"), or that step under torch.compile
("compiled"; CUDA graphs on GPU). `decode_steps` is the one token loop on top (greedy, sampling and
speculative verification are options of it); beam search drives the same `Decoder` and reorders its
cache. Nothing here syncs with the host per token except what must: stop strings (they need text) and
speculative acceptance; "all rows finished" is checked every CHECK_EVERY steps, and callers trim.
"""

from __future__ import annotations

import contextlib
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..attn_backends import FLASH, AttentionBackendError, flash_mask
from ..cache import KVCache
from ..layers import gemv_as_reduction
from ..modeling import LayerTrace, check_token_ids
from ..placement import DeviceMapError, spans_devices

PREFILL_CHUNK = 512  # prompt tokens per forward pass: bounds prefill memory
CHECK_EVERY = 8  # decode steps between host syncs for "all rows finished"
MAX_GRAPHS = 64  # compiled graphs kept per model (one per batch size); dynamo's default is 8
_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # < 2.7
_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {options: (signature, step)}


@dataclass
class Step:
    tokens: torch.Tensor  # (B,) the token appended to each row (pad for finished rows)
    logits: torch.Tensor  # (B, V) raw fp32 logits it was chosen from
    scores: torch.Tensor  # (B, V) after the processors
    finished: torch.Tensor  # (B,) bool: the row has stopped (EOS or stop string) as of this token
    stopped_now: torch.Tensor  # (B,) bool: the row stopped at this token
    attentions: tuple[torch.Tensor, ...] | None = None  # per layer, of the pass the logits came from (when recorded)
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, then each layer's output (when recorded)
    cache: KVCache | None = None  # the decoder's cache (one object for every step), for generate's output


def forward_tokens(model: Any, cache: KVCache, tokens: torch.Tensor, token_mask: torch.Tensor | None = None,
                   last_only: bool = True, trace: LayerTrace | None = None,
                   last: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """tokens (B, T), or embeddings (B, T, C) in their place -> fp32 logits (B, V) of the last position (or,
    given `last` (B,), of position last[i] in row i: right-padded rows), or (B, T, V). The cache decides where
    the tokens go and which keys they see; ids are not range-checked here (the caller checked the prompt once).
    A `trace` collects what the HF-style forward returns per layer: attentions, and hidden states to which the
    last layer's (after the final norm) is added here."""
    base = model.base_model
    x = base.embed_tokens(tokens) if tokens.dim() == 2 else tokens  # (B, T, C)
    B, T = x.shape[:2]
    mask, positions = cache.begin(B, T, x.device, token_mask)
    if model.config._attn_implementation == FLASH:  # the real tokens packed, made once for every layer
        mask = flash_mask(mask, *cache.real_tokens(T))
    hidden = base.core(x, positions, mask, cache, trace)
    if trace is not None and trace.hidden_states:
        trace.all_hidden.append(hidden)
    if last is not None:
        hidden = hidden[torch.arange(B, device=hidden.device), last.to(hidden.device)]  # (B, C)
    elif last_only:
        hidden = hidden[:, -1]  # (B, C)
    return model.lm_head(hidden).float().to(tokens.device)  # from the head's device, under a device_map


# ---- the compiled step ------------------------------------------------------------------------------


def compile_options(options: dict[str, Any] | None, cuda: bool, collectives: bool = False) -> dict[str, Any]:
    """torch.compile arguments: the caller's, else inductor with CUDA graphs on GPU (what mode
    "reduce-overhead" sets) and `emulate_precision_casts`, which rounds bf16/fp16 intermediates where eager
    does: without it the fused kernels keep them in fp32 and greedy bf16 tokens drift from the eager path's.
    The per-call stride checks are dropped: the step's inputs are built here, and on CPU the checks cost
    about as much as the small fused kernels. On CPU the graph is called through inductor's C++ wrapper
    (2-20 % more tokens/s measured: less Python per step), except for a tensor-parallel model (`collectives`):
    the C++ wrapper cannot call collective ops ("arg type Any is not yet supported", torch 2.13)."""
    options = dict(options or {})
    if not {"mode", "options", "backend"} & set(options):
        device_options = {"triton.cudagraphs": True} if cuda else {} if collectives else {"cpp_wrapper": True}
        options["options"] = {"emulate_precision_casts": True, "size_asserts": False, "alignment_asserts": False,
                              **device_options}  # fmt: skip
        skip_model_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.8
        if skip_model_guards is not None:  # see `model_signature`
            options["options"]["guard_filter_fn"] = skip_model_guards
    return {"dynamic": False, **options}


def serving_compile_options() -> dict[str, Any]:
    """torch.compile arguments for a server's decode step (`Scheduler(compile=True)`): every shape dynamic, since
    rows join and leave and each stands at its own length (one graph for every batch of two rows or more; no
    CUDA graphs, which would be captured again for every batch size and length). Run it inside
    `serving_compile_settings`."""
    options = {"size_asserts": False, "alignment_asserts": False, "emulate_precision_casts": True}
    skip_model_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # see model_signature
    if skip_model_guards is not None:
        options["guard_filter_fn"] = skip_model_guards
    return {"dynamic": True, "options": options}


@contextlib.contextmanager
def serving_compile_settings(cuda: bool) -> Iterator[None]:
    """Global settings read whenever the server's step is (re)compiled, so held around every call. No duck sizing:
    a batch as wide as the model's KV heads would otherwise tie the two sizes and recompile later. On CPU,
    inductor's freezing prepacks the weights for oneDNN's matmuls (for a second copy of the weights): a 32-row step of
    a mid-size model about 1.9x faster than MKL's eager matmuls, ~1.1x the eager `layers.Linear`; given in
    torch.compile's options it has no effect (torch 2.13). The C++ wrapper runs the graph without the GIL: the
    Python wrapper's CPU kernels hold it, which starved the server's HTTP thread (time to first token under load
    2.9x idle, 1.8-2.0x with it)."""
    inductor = torch._inductor.config.patch(freezing=not cuda, cpp_wrapper=True)
    with torch.fx.experimental._config.patch(use_duck_shape=False), inductor:
        yield


def model_signature(model: Any) -> tuple:
    """What a compiled step is specialised on besides its tensor arguments. Dynamo's guards on the model
    are skipped (they cost ~30 us per layer per step: 1.2 ms of host time per token at 40 layers), so a
    change here (dtype, device, parameters replaced, train/eval, config) gets a fresh compile instead."""
    tensors = tuple((id(t), t.dtype, t.device, t.shape) for t in (*model.parameters(), *model.buffers()))
    return tensors, model.training, repr(sorted(vars(model.config).items()))


def _model_compile_options(model: Any, options: dict[str, Any] | None) -> tuple[dict[str, Any], str]:
    """compile_options for this model's device and parallelism, and the key its compiled step is kept under."""
    cuda = next(model.parameters()).device.type == "cuda"
    options = compile_options(options, cuda, collectives=getattr(model, "tp_group", None) is not None)
    return options, repr(sorted(options.items()))


def compiled_step(model: Any, options: dict[str, Any] | None = None) -> Callable[..., torch.Tensor] | None:
    """`forward_tokens` under torch.compile (see `compile_options`), made once per model, options and
    `model_signature`; None where torch.compile is unavailable or has failed for them before (the caller then
    runs eagerly, without paying for another failed compile on every call)."""
    options, key = _model_compile_options(model, options)
    per_model = _COMPILED.setdefault(model, {})
    signature = model_signature(model)
    if key not in per_model or per_model[key][0] != signature:
        # a code object of its own: dynamo caches graphs per code object, so no two models (or signatures)
        # ever share one through the guards skipped above
        step = types.FunctionType(forward_tokens.__code__.replace(), forward_tokens.__globals__, "forward_tokens",
                                  forward_tokens.__defaults__)  # fmt: skip
        try:
            fresh = {k: dict(v) if isinstance(v, dict) else v for k, v in options.items()}  # compile pops from it
            per_model[key] = (signature, torch.compile(step, **fresh))
        except Exception as err:  # noqa: BLE001 - unsupported platform / Python: run eagerly
            warnings.warn(f"torch.compile unavailable ({err}); decoding eagerly", stacklevel=3)
            per_model[key] = (signature, None)
    return per_model[key][1]


def forget_compiled_step(model: Any, options: dict[str, Any] | None) -> None:
    """Record that compiling failed for this model and options: later calls decode eagerly at once."""
    _COMPILED.setdefault(model, {})[_model_compile_options(model, options)[1]] = (model_signature(model), None)


# ---- the decoder ------------------------------------------------------------------------------------


class Decoder:
    """The cache and the step function of one generation (or of a server batch).

    mode "plain": eager, a cache preallocated to `capacity` that returns only the slots written so far;
    "static": eager on fixed-shape buffers; "compiled": the static step under torch.compile. The cache's
    slot dimension is marked dynamic for the compiler, so one graph serves every capacity and length.
    `cache`: the caller's (plain mode), continued. `record` = (attentions, hidden states): what to keep of
    every forward pass in `recorded` (generate's output_attentions / output_hidden_states; plain mode).
    """

    def __init__(self, model: Any, capacity: int | None, mode: str = "plain", compile: bool | dict[str, Any] = False,
                 cache: KVCache | None = None, record: tuple[bool, bool] = (False, False)):  # fmt: skip
        if mode not in ("plain", "static", "compiled"):
            raise ValueError(f"unknown decode mode {mode!r}")
        self.model, self.mode = model, mode
        self.cache = cache if cache is not None else model.base_model.cache_class(capacity, static=mode != "plain")
        self.record = record if any(record) else None
        self.recorded: tuple[tuple | None, tuple | None] = (None, None)  # (attentions, hidden states) of the last pass
        self.compiled = None
        if mode == "compiled":
            if model.config._attn_implementation == FLASH:
                raise AttentionBackendError("attn_implementation='flash_attention_2' does not run in the compiled "
                                            "decode step (its unpadding syncs with the host): use compile=False, "
                                            "or 'sdpa' / 'flex_attention' with compile=True")  # fmt: skip
            if spans_devices(model):
                raise DeviceMapError("compile=True does not run on a model placed over several devices "
                                     "(device_map): use compile=False, or load it on one device")  # fmt: skip
            self._compile_options = compile if isinstance(compile, dict) else None
            self.compiled = compiled_step(model, self._compile_options)
            backend = (self._compile_options or {}).get("backend", "inductor")
            self._gemv_as_reduction = backend == "inductor"  # see layers.gemv_as_reduction
        self.on_gpu = self.compiled is not None and next(model.parameters()).device.type == "cuda"
        self._prepared = False
        self._compiled_shapes: set[torch.Size] = set()  # token shapes this decoder's compiled step has run

    def prefill(self, ids: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the prompt (B, P), or its embeddings (B, P, C), through the model in chunks of PREFILL_CHUNK
        (eagerly; in one pass when recording: the reference's first step covers the whole prompt); fp32 logits
        (B, V) of its last position. Ids are range-checked here, once per call. Called again, it continues the cache."""
        if ids.dim() == 2:
            check_token_ids(ids, self.model.base_model.embed_tokens.num_embeddings)
        chunk = PREFILL_CHUNK if self.record is None else max(ids.shape[1], 1)
        if token_mask is not None and bool(token_mask.all()):
            token_mask = None  # no padding: the cache can skip masks for one-token steps
        logits = None
        for start in range(0, ids.shape[1], chunk):
            part = token_mask[:, start : start + chunk] if token_mask is not None else None
            logits = self._forward(ids[:, start : start + chunk], part)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One new token per row (B, 1) -> fp32 logits (B, V)."""
        if self.compiled is not None:
            if not self._prepared:
                self._prepare_for_compile()
            try:
                with gemv_as_reduction(self._gemv_as_reduction):
                    if tokens.shape in self._compiled_shapes:  # compiled already: patching the limit costs ~25 us
                        logits = self.compiled(self.model, self.cache, tokens)
                    else:
                        with torch._dynamo.config.patch({_LIMIT: MAX_GRAPHS}):
                            logits = self.compiled(self.model, self.cache, tokens)
                        self._compiled_shapes.add(tokens.shape)
                return logits.clone() if self.on_gpu else logits  # CUDA graph outputs are overwritten
            except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for inductor on CPU
                warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); decoding eagerly", stacklevel=2)
                forget_compiled_step(self.model, self._compile_options)
                self.compiled = None
        return self._forward(tokens)

    def verify(self, tokens: torch.Tensor) -> torch.Tensor:
        """Several tokens per row (B, T) in one forward (speculative verification) -> logits (B, T, V)."""
        return self._forward(tokens, last_only=False)

    def _forward(self, tokens: torch.Tensor, token_mask: torch.Tensor | None = None,
                 last_only: bool = True) -> torch.Tensor:  # fmt: skip
        if self.record is None:  # the default: the model collects nothing
            return forward_tokens(self.model, self.cache, tokens, token_mask, last_only)
        trace = LayerTrace(attentions=self.record[0], hidden_states=self.record[1])
        logits = forward_tokens(self.model, self.cache, tokens, token_mask, last_only, trace)
        self.recorded = (tuple(trace.all_attentions) if trace.attentions else None,
                         tuple(trace.all_hidden) if trace.hidden_states else None)  # fmt: skip
        return logits

    def _prepare_for_compile(self) -> None:
        cache = self.cache
        for t in (*cache.keys, *cache.values):
            torch._dynamo.maybe_mark_dynamic(t, 2)  # the slot dimension: one graph for every capacity
        torch._dynamo.maybe_mark_dynamic(cache.valid, 1)
        if self.on_gpu:
            cache.mark_static()
        self._prepared = True


def choose_tokens(plan: Any, ids: torch.Tensor, cur: int, logits: torch.Tensor, finished: torch.Tensor,
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
    tokens, stopped = place_tokens(plan, ids, cur, tokens, finished, eos)
    return tokens, scores, stopped


def place_tokens(plan: Any, ids: torch.Tensor, cur: int, tokens: torch.Tensor, finished: torch.Tensor,
                 eos: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Write each row's chosen token at `cur`, pad for rows already finished. Returns (tokens, stopped): the
    rows whose token is an EOS id or completes a stop string."""
    if eos is not None and plan.pad is not None:
        tokens = torch.where(finished, plan.pad, tokens)
    ids[:, cur] = tokens
    stopped = torch.isin(tokens, eos) if eos is not None else torch.zeros_like(finished)
    if plan.stop_strings is not None:  # needs the text: a host round trip by nature
        rows = ids[:, : cur + 1].tolist()
        stopped = stopped | torch.tensor([plan.stop_strings.row_done(r) for r in rows], device=ids.device)
    return tokens, stopped


STATIC_PAST_CONTEXT = 4  # a static cache / beam search reserves at most this many times the context


def reserved_length(model: Any, prompt_length: int, total: int, mode: str) -> int:
    """Token slots to allocate up front for a generation of `total` tokens (prompt + max_new_tokens): all of
    them within the model's context (max_position_embeddings), else the context only and the plain path
    grows from there. A static cache cannot grow: it reserves `total` up to STATIC_PAST_CONTEXT times the
    context (RoPE scaling runs past the trained length) and past that raises, before anything is allocated."""
    context = getattr(model.config, "max_position_embeddings", None)
    if context is None or total <= context:
        return total
    if mode != "plain":
        if total <= STATIC_PAST_CONTEXT * context:
            return total
        raise ValueError(f"the prompt plus max_new_tokens is {total} tokens, more than {STATIC_PAST_CONTEXT}x the "
                         f"model's max_position_embeddings ({context}) that a static cache (compile=True / "
                         "cache_implementation='static') or beam search may preallocate: "
                         "lower max_new_tokens")  # fmt: skip
    return max(context, prompt_length + 1)


def _room(ids: torch.Tensor, needed: int, total: int, pad: int | None) -> torch.Tensor:
    """ids (B, L, ...) with at least `needed` columns (at most `total`): doubled when full (host ints, no sync)."""
    if needed <= ids.shape[1]:
        return ids
    size = min(total, max(needed, 2 * ids.shape[1]))
    grown = ids.new_full((ids.shape[0], size, *ids.shape[2:]), pad if pad is not None else 0)
    grown[:, : ids.shape[1]] = ids
    return grown


def decode_mode(fast: dict[str, Any]) -> str:
    if fast.get("compile"):
        return "compiled"
    return "static" if fast.get("cache_implementation") == "static" else "plain"


@torch.no_grad()
def decode_steps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: Any,
                 fast: dict[str, Any] | None = None, check_every: int = CHECK_EVERY,
                 drafter: Any = None, inputs_embeds: torch.Tensor | None = None,
                 cache: KVCache | None = None) -> Iterator[Step]:  # fmt: skip
    """The token loop: prefill, then one token per row per step (or, with a `drafter`, several verified
    in one forward pass) until every row stops or max_new_tokens is reached. May yield up to
    check_every - 1 all-pad steps after every row has finished; `Step.finished` says where that was.

    `inputs_embeds` (B, T, C) run in place of the prompt's ids, which may then be empty (B, 0): the
    sequences hold the new tokens only. A `cache` (plain mode) holding the prompt's first tokens already
    is continued: only the rest runs, and `attention_mask` (over the whole prompt) re-marks its padding.
    `plan.record` asks each step for the attentions / hidden states of its forward pass (plain mode)."""
    fast = fast or {}
    B, P = input_ids.shape
    past = 0 if cache is None else cache.get_seq_length()
    first = input_ids[:, past:] if inputs_embeds is None else inputs_embeds  # what the first forward pass runs
    shift = past + first.shape[1] - P  # cache slots ahead of the ids: an embeddings-only prompt's
    total = P + plan.max_new_tokens
    mode = "plain" if drafter is not None else decode_mode(fast)
    reserve = reserved_length(model, P + shift, total + shift, mode)
    ids = input_ids.new_full((B, reserve - shift), plan.pad if plan.pad is not None else 0)
    ids[:, :P] = input_ids
    # past the context length a plain cache grows with the generation instead of reserving max_new_tokens
    capacity = total + shift if reserve == total + shift else None
    decoder = Decoder(model, capacity, mode, fast.get("compile", False), cache, plan.record)
    if past:
        decoder.cache.set_valid(attention_mask)
    logits = decoder.prefill(first, attention_mask[:, past:])
    eos = torch.tensor(plan.eos, device=ids.device) if plan.eos else None
    finished = torch.zeros(B, dtype=torch.bool, device=ids.device)
    if drafter is not None:
        yield from _speculative_steps(decoder, drafter, ids, P, logits, plan, eos, finished)
        return
    for step in range(plan.max_new_tokens):
        cur = P + step
        ids = _room(ids, cur + 1, total, plan.pad)
        tokens, scores, stopped = choose_tokens(plan, ids, cur, logits, finished, eos)
        stopped_now = stopped & ~finished
        finished = finished | stopped
        yield Step(tokens, logits, scores, finished, stopped_now, *decoder.recorded, decoder.cache)
        if step + 1 == plan.max_new_tokens or ((step + 1) % check_every == 0 and bool(finished.all())):
            return
        logits = decoder.step(tokens[:, None])


def _speculative_steps(decoder: Decoder, drafter: Any, ids: torch.Tensor, P: int, logits: torch.Tensor, plan: Any,
                       eos: torch.Tensor | None, finished: torch.Tensor) -> Iterator[Step]:  # fmt: skip
    """Draft tokens, verify them in one forward pass, keep the longest prefix the model itself chooses
    plus the model's own next token. Every kept token is chosen exactly as the plain loop chooses it
    (processors, sampling: one draw per position, in order), so the output is the plain loop's. Batch 1."""
    end = P + plan.max_new_tokens
    tokens, scores, stopped = choose_tokens(plan, ids, P, logits, finished, eos)
    finished = finished | stopped
    yield Step(tokens, logits, scores, finished, stopped, cache=decoder.cache)
    cur = P + 1  # ids[:, cur - 1] is chosen but not yet in the cache
    while cur < end and not bool(finished.all()):
        draft = drafter.propose(ids[:, :cur], min(drafter.max_tokens, end - cur - 1))  # (1, k)
        k = draft.shape[1]
        ids = _room(ids, cur + k + 1, end, plan.pad)
        ids[:, cur : cur + k] = draft
        all_logits = decoder.verify(ids[:, cur - 1 : cur + k])  # (1, k + 1, V): positions cur .. cur + k
        for j in range(k + 1):
            tokens, scores, stopped = choose_tokens(plan, ids, cur + j, all_logits[:, j], finished, eos)
            finished = finished | stopped
            yield Step(tokens, all_logits[:, j], scores, finished, stopped, cache=decoder.cache)
            if j == k or bool(finished.all()) or int(tokens[0]) != int(draft[0, j]):
                break  # the model chose otherwise at cur + j (its token is written there) or all were kept
        decoder.cache.rewind(k - j)  # drafts after the last one kept
        drafter.accepted(j, k)
        cur += j + 1
