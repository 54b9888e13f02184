"""Continuous batching on the decode engine: requests join and leave the running batch between steps.

One background thread owns the model. Each step it admits waiting requests (new prompts that fit the step's
prefill budget go through one batched forward, right-padded; a long prompt is prefilled in chunks into a cache of
its own, interleaved with decode steps, so it never stalls the running streams), stacks their caches into the
running batch (`KVCache.stack`: every row keeps its own length and positions), decodes one token for every
running row, and drops rows that finished or were cancelled. A request that arrives while a decode step runs
does not wait for the step to end: between two layers of that step its prompt is prefilled and its first token
sent (once per step; it joins the batch after the step), so its time to first token hardly depends on how many
streams are running.
Sampling is per request (its own settings and its own seeded generator), so a request's tokens do not
depend on what else shares the batch. Events go to each request's callback from the engine thread.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import lora
from ..cache import KVCache
from ..generation.engine import (
    PREFILL_CHUNK,
    compiled_step,
    forget_compiled_step,
    forward_tokens,
    serving_compile_options,
    serving_compile_settings,
)
from ..generation.grammar import Constraint, GrammarError, grammar_tokenizer
from ..tokenization import streaming_detokenizer

logger = logging.getLogger("glmkit.serve")


class QueueFull(RuntimeError):
    """The wait queue holds max_queue_len requests already (the server answers 429)."""


class RequestError(ValueError):
    """A request the engine cannot run (too long a prompt, bad ids, bad settings): the server answers 400."""


@dataclass
class SamplingParams:
    """Per-request decoding settings, with OpenAI's meanings. temperature 0 is greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)  # strings: the text is cut before the first one
    stop_token_ids: list[int] = field(default_factory=list)  # ids that end the request (not shown)
    ignore_eos: bool = False
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob and the top k
    grammar: str | None = None  # llguidance grammar (glmkit.generation.grammar): only tokens it accepts


@dataclass
class Event:
    """What a request produced in one engine step (delivered to its callback, in order)."""

    request_id: str
    token_ids: list[int]  # new ids (a stop string's ids included; its text is not)
    text: str  # new text, never a partial character; a stop string and what follows it are cut
    finish_reason: str | None = None  # "stop" / "length" / "abort" (cancelled) / "error"
    logprobs: list[dict[str, Any]] | None = None  # per new token: {"id", "logprob", "top": [(id, logprob)]}
    prompt_tokens: int = 0
    completion_tokens: int = 0  # so far
    error: str | None = None


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    on_event: Callable[[Event], None]
    request_id: str = ""
    arrival: float = field(default_factory=time.monotonic)
    adapter: int = 0  # the LoRA adapter its rows use (glmkit.lora.load_adapters ids; 0: the base model)


@dataclass
class _Sequence:
    """A request inside the engine: its cache while prefilling, its sampler state and text state."""

    request: Request
    eos: set[int]
    detok: Any
    generator: torch.Generator
    prefilled: int = 0  # prompt tokens through the model so far
    cache: KVCache | None = None  # its own until it joins the running batch
    generated: list[int] = field(default_factory=list)
    counts: torch.Tensor | None = None  # (V,) generated-token counts (presence / frequency penalties)
    held: str = ""  # text held back: it may be the start of a stop string
    constraint: Constraint | None = None  # the grammar's state, when the request has one
    done: bool = False


class Scheduler:
    """The engine thread. `submit` (any thread) returns at once; results arrive through `on_event`.

    max_num_seqs: rows decoded together; max_queue_len: requests waiting beyond those (QueueFull past it);
    max_model_len: prompt + max_tokens limit (RequestError past it; default the model's position limit).
    compile: run the decode step of two rows or more under torch.compile (`engine.serving_compile_options`, or
    these torch.compile arguments); call `warm_up()` before serving, or the first such step waits for the
    compiler. Prompts are prefilled eagerly, and an arriving request then waits for the running step to end (no
    prefill between its layers).
    """

    def __init__(self, model: Any, tokenizer: Any, max_num_seqs: int = 32, max_queue_len: int = 256,
                 max_model_len: int | None = None, prefill_chunk: int = PREFILL_CHUNK,
                 prefix_cache_size: int = 16, min_prefix: int = 8,
                 compile: bool | dict[str, Any] = False):  # fmt: skip
        if max_num_seqs < 1 or max_queue_len < 0 or prefill_chunk < 1 or prefix_cache_size < 0:
            raise ValueError("max_num_seqs and prefill_chunk must be >= 1, max_queue_len and prefix_cache_size >= 0")
        # prompts kept after prefill (their KV): a new prompt sharing at least `min_prefix` leading tokens with
        # one reuses that much of it (a system prompt, a chat's earlier turns)
        self.prefix_cache_size, self.min_prefix = prefix_cache_size, min_prefix
        self._prefixes: OrderedDict[tuple[int, ...], KVCache] = OrderedDict()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_num_seqs, self.max_queue_len, self.prefill_chunk = max_num_seqs, max_queue_len, prefill_chunk
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_model_len = max_model_len or limit or 2048
        self.vocab_size = model.get_output_embeddings().out_features
        # ids past the tokenizer (a vocabulary padded for speed, as GLM-4's 151552 rows for 151343 tokens) are
        # not text: they are never sampled
        self.text_vocab = min(self.vocab_size, len(tokenizer))
        eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) else None
        eos = eos if eos is not None else model.config.eos_token_id
        self.eos_ids = set([eos] if isinstance(eos, int) else list(eos or []))
        self.device = model.device
        self._adapters = lora.multi_lora_modules(model)  # empty unless adapters were loaded for serving
        self._compiled: Callable[..., torch.Tensor] | None = None
        if compile:
            if self._adapters:
                raise ValueError("a compiled decode step does not serve LoRA adapters yet: use compile=False")
            self._compile_options = compile if isinstance(compile, dict) else serving_compile_options()
            self._compile_settings = (contextlib.nullcontext if isinstance(compile, dict) else
                                      lambda: serving_compile_settings(self.device.type == "cuda"))  # fmt: skip
            self._compiled = compiled_step(model, self._compile_options)
        self._lock = threading.Condition()
        self._waiting: deque[_Sequence] = deque()
        self._prefilling: list[_Sequence] = []
        self._running: list[_Sequence] = []  # row order of self._batch
        self._joining: list[_Sequence] = []  # prefilled, joining the batch at the end of the step
        self._decoding = False  # a decode step is running: arrivals may be prefilled between its layers
        self._batch: KVCache | None = None
        self._cancelled: set[str] = set()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.counters = {"prompt_tokens_total": 0, "generation_tokens_total": 0, "prefix_cache_hit_tokens_total": 0}
        # tensor parallel: (scheduler, stopping, admitted, cancelled) -> the same, as rank 0 decided them
        self.sync: Callable[..., tuple[bool, list[_Sequence], set[str]]] | None = None

    # ---- the API (any thread) -----------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(target=self._loop, name="glmkit-engine", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Finish: every request still queued or running gets finish_reason "abort"; the thread ends."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
        for seq in [*self._waiting, *self._prefilling, *self._joining, *self._running]:
            self._finish(seq, "abort")
        self._waiting.clear()
        self._prefilling, self._joining, self._running, self._batch = [], [], [], None

    def submit(self, request: Request) -> str:
        """Queue a request; returns its id. Raises RequestError (bad request) or QueueFull."""
        self._check(request)
        constraint = self._constraint(request.params.grammar)
        with self._lock:
            if len(self._waiting) >= self.max_queue_len + max(0, self.max_num_seqs - self._active()):
                raise QueueFull(f"the wait queue is full ({self.max_queue_len} requests waiting)")
            if not request.request_id:
                request.request_id = f"req-{next(self._ids)}"
            self._waiting.append(self._sequence(request, constraint))
            self._lock.notify_all()
        return request.request_id

    def cancel(self, request_id: str) -> None:
        """Stop a request (client gone): its row is freed before the next step; it gets an "abort" event."""
        with self._lock:
            self._cancelled.add(request_id)
            self._lock.notify_all()

    def stats(self) -> dict[str, float]:
        """running, waiting, kv_cache_usage (slots written / allocated), and the token counters."""
        batch = self._batch
        usage = 0.0
        if batch is not None and batch.valid is not None and batch.valid.numel():
            usage = float(batch.lengths.sum()) / batch.valid.numel()
        return {"running": len(self._running), "waiting": len(self._waiting) + len(self._prefilling),
                "kv_cache_usage": usage, **self.counters}  # fmt: skip

    # ---- checks and set-up --------------------------------------------------------------------------
    def _active(self) -> int:
        return len(self._running) + len(self._prefilling) + len(self._joining)

    def _check(self, request: Request) -> None:
        ids, p = request.prompt_ids, request.params
        if request.adapter and not 0 < request.adapter <= max((len(m.A) - 1 for m in self._adapters), default=0):
            raise RequestError(f"no LoRA adapter {request.adapter} is loaded")
        if not ids:
            raise RequestError("the prompt is empty")
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        if p.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {p.max_tokens}")
        if len(ids) + p.max_tokens > self.max_model_len:
            raise RequestError(f"the prompt ({len(ids)} tokens) plus max_tokens ({p.max_tokens}) exceeds the "
                               f"model's context of {self.max_model_len} tokens")  # fmt: skip
        if p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0 or not 0 <= p.min_p <= 1:
            raise RequestError("temperature must be >= 0, top_p in (0, 1], top_k >= 0 and min_p in [0, 1]")
        if p.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {p.repetition_penalty}")
        bad = [i for i in (*p.logit_bias, *p.stop_token_ids) if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise RequestError(f"token ids {bad} in logit_bias / stop_token_ids are outside 0..{self.vocab_size - 1}")
        if p.logprobs is not None and not 0 <= p.logprobs <= 20:
            raise RequestError(f"logprobs must be in 0..20, got {p.logprobs}")

    def grammar_tokenizer(self) -> Any:
        """The grammar engine's view of this model's vocabulary (for building grammars against it)."""
        return grammar_tokenizer(self.tokenizer, self.vocab_size, sorted(self.eos_ids))

    def _constraint(self, grammar: str | None) -> Constraint | None:
        if grammar is None:
            return None
        try:
            return Constraint(grammar, self.grammar_tokenizer())
        except (GrammarError, ImportError) as err:
            raise RequestError(str(err)) from err

    def _sequence(self, request: Request, constraint: Constraint | None = None) -> _Sequence:
        p = request.params
        generator = torch.Generator(self.device)
        if p.seed is not None:
            generator.manual_seed(p.seed)
        else:
            generator.seed()
        eos = set() if p.ignore_eos else set(self.eos_ids)
        detok = streaming_detokenizer(self.tokenizer, skip_special_tokens=True, prefix_ids=request.prompt_ids[-4:])
        return _Sequence(request, eos | set(p.stop_token_ids), detok, generator, constraint=constraint)

    # ---- the engine thread --------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._lock:
                    while self._idle():
                        if not self._lock.wait(timeout=1.0) and self.sync is not None:
                            break  # a tensor-parallel leader broadcasts at least once a second
                    stopping, cancelled, self._cancelled = self._stopping, self._cancelled, set()
                    admitted = []
                    while not stopping and self._waiting and self._active() + len(admitted) < self.max_num_seqs:
                        admitted.append(self._waiting.popleft())
                if self.sync is not None:  # tensor parallel: every rank runs the same steps (glmkit.distributed)
                    stopping, admitted, cancelled = self.sync(self, stopping, admitted, cancelled)
                if stopping:
                    return
                with self._lock:
                    self._prefilling.extend(admitted)
                    self._drop_cancelled(cancelled)
                try:
                    self._step()
                except Exception as err:  # noqa: BLE001 - a failed step must not end the server
                    logger.exception("engine step failed")
                    for seq in [*self._prefilling, *self._joining, *self._running]:
                        self._finish(seq, "error", error=f"{type(err).__name__}: {err}")
                    self._prefilling, self._joining, self._running, self._batch = [], [], [], None

    def _idle(self) -> bool:
        """Nothing to do. A tensor-parallel follower never idles here: it waits in the leader's broadcast."""
        busy = self._stopping or self._waiting or self._prefilling or self._running or self._cancelled
        return not busy and getattr(self.sync, "leader", True)

    def _drop_cancelled(self, ids: set[str]) -> None:
        if not ids:
            return
        for seq in [s for s in self._waiting if s.request.request_id in ids]:
            self._waiting.remove(seq)
            self._finish(seq, "abort")
        for seq in [s for s in self._prefilling if s.request.request_id in ids]:
            self._prefilling.remove(seq)
            self._finish(seq, "abort")
        for seq in self._running:
            if seq.request.request_id in ids:
                self._finish(seq, "abort")
        self._compact()

    def _step(self) -> None:
        """A prefill budget of `prefill_chunk` prompt tokens, then one decode step for every running row."""
        self._prefill_for(self.prefill_chunk)
        self._join()
        if self._running:
            tokens = torch.tensor([[s.generated[-1]] for s in self._running], device=self.device)
            with self._routed([s.request.adapter for s in self._running]), self._preemptible():
                logits = self._decode(self._batch, tokens)  # (B, V)
            for row, seq in enumerate(self._running):
                self._take_or_fail(seq, logits[row])
            self._compact()
            self._join()  # requests prefilled during the step

    def _decode(self, batch: KVCache, tokens: torch.Tensor) -> torch.Tensor:
        """One token per row through the model: compiled where asked (eagerly, with a warning, if compiling fails).
        A single row runs eagerly: a graph of its own (dynamo specialises a size-1 batch) would freeze a second copy
        of the weights. (On CPU in fp32, `generate(compile=True)`'s step reads them 1.2-1.7x faster for one row, with
        its multiply-reduce GEMV: `layers.gemv_as_reduction`; not used here yet.)"""
        if self._compiled is not None and tokens.shape[0] > 1:
            # per-row writes and a mask even for aligned rows without padding (always safe): one graph serves all
            batch.uniform = batch.all_valid = False
            batch.reserve(2)  # a free slot beyond this step's: slicing the keys never takes all of them (a recompile)
            try:
                with self._compile_settings():
                    return self._compiled(self.model, batch, tokens)
            except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for inductor on CPU
                logger.warning("torch.compile failed (%s: %s); decoding eagerly", type(err).__name__, err)
                forget_compiled_step(self.model, self._compile_options)
                self._compiled = None
        return forward_tokens(self.model, batch, tokens)

    def warm_up(self) -> None:
        """Compile the decode step (what `glmkit serve --compile` does while /health says 503) on a throwaway
        batch, so that no request waits for the compiler."""
        if self._compiled is None:
            return
        with torch.inference_mode():
            caches = []
            for length in (2, 3):
                cache = self.model.base_model.cache_class()
                forward_tokens(self.model, cache, torch.zeros(1, length, dtype=torch.long, device=self.device))
                caches.append(cache)
            batch = KVCache.stack(caches)
            for _ in range(2):
                self._decode(batch, torch.zeros(2, 1, dtype=torch.long, device=self.device))

    def _prefill_for(self, budget: int) -> None:
        """Up to `budget` prompt tokens, first come first served: new prompts that fit whole go through one
        batched forward; a prompt continued from a kept prefix, or too long for what is left, gets a chunk alone."""
        together = []
        for seq in list(self._prefilling):
            if budget <= 0:
                break
            if seq.cache is None:
                self._start_cache(seq)
            left = len(seq.request.prompt_ids) - seq.prefilled
            if seq.prefilled == 0 and left <= budget:
                together.append(seq)
                budget -= left
            else:
                budget -= self._prefill(seq, budget)
        if len(together) == 1:
            self._prefill(together[0], len(together[0].request.prompt_ids))
        elif together:
            self._prefill_together(together)

    def _start_cache(self, seq: _Sequence) -> None:
        """The request's cache: a kept prefix of its prompt, or empty. Kept prefixes are the base model's KV,
        so an adapter's request starts afresh."""
        if seq.request.adapter:
            seq.cache, seq.prefilled = self.model.base_model.cache_class(), 0
        else:
            seq.cache, seq.prefilled = self._cached_prefix(seq.request.prompt_ids)

    def _prefill(self, seq: _Sequence, budget: int) -> int:
        """The next chunk (at most `budget` tokens) of this prompt; returns the tokens used."""
        ids = seq.request.prompt_ids
        part = ids[seq.prefilled : seq.prefilled + budget]
        with self._routed([seq.request.adapter]):
            logits = forward_tokens(self.model, seq.cache, torch.tensor([part], device=self.device))
        seq.prefilled += len(part)
        if seq.prefilled == len(ids):
            self._prefilled(seq, logits[0])
        return len(part)

    def _prefill_together(self, group: list[_Sequence]) -> None:
        """Whole new prompts in one forward, right-padded (a row's real tokens never see its padding); each row's
        cache is then cut to its own tokens."""
        lengths = [len(seq.request.prompt_ids) for seq in group]
        tokens = torch.zeros(len(group), max(lengths), dtype=torch.long)
        for row, seq in enumerate(group):
            tokens[row, : lengths[row]] = torch.tensor(seq.request.prompt_ids)
        real = torch.arange(tokens.shape[1]) < torch.tensor(lengths)[:, None]
        cache = self.model.base_model.cache_class()
        with self._routed([seq.request.adapter for seq in group]):
            logits = forward_tokens(self.model, cache, tokens.to(self.device), real.to(self.device),
                                    last=torch.tensor(lengths) - 1)  # fmt: skip
        for seq, row_cache, row_logits in zip(group, cache.split(lengths), logits):
            seq.cache, seq.prefilled = row_cache, len(seq.request.prompt_ids)
            self._prefilled(seq, row_logits)

    def _prefilled(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """The whole prompt is in `seq.cache`: keep it as a prefix, choose the first token, join at the step's end."""
        ids = seq.request.prompt_ids
        self._prefilling.remove(seq)
        self.counters["prompt_tokens_total"] += len(ids)
        if not seq.request.adapter:
            self._keep_prefix(ids, seq.cache)
        self._take_or_fail(seq, logits)
        if seq.done:
            seq.cache = None
        else:
            self._joining.append(seq)

    def _join(self) -> None:
        """Prefilled requests become rows of the running batch (one copy of the batch for all of them)."""
        if not self._joining:
            return
        caches = [seq.cache for seq in self._joining]
        self._batch = KVCache.stack(caches if self._batch is None else [self._batch, *caches])
        self._running.extend(self._joining)
        for seq in self._joining:
            seq.cache = None
        self._joining = []

    @contextlib.contextmanager
    def _preemptible(self) -> Iterator[None]:
        """Within the block (a decode step), a request that arrives is prefilled between two layers: see
        `_between_layers`. Not with tensor parallelism (every rank must run the same passes) or served adapters
        (a prefill would reroute the step's rows)."""
        layers = getattr(self.model.base_model, "layers", None)
        if self.sync is not None or self._adapters or self._compiled is not None or layers is None or len(layers) < 2:
            yield
            return
        hooks = [layer.register_forward_pre_hook(self._between_layers) for layer in layers[1:]]
        self._decoding = True
        try:
            yield
        finally:
            self._decoding = False
            for hook in hooks:
                hook.remove()

    def _between_layers(self, module: torch.nn.Module, args: tuple) -> None:
        """A forward pre-hook on layers 1.. during a decode step: admit what is waiting and prefill it now (once
        per step, `prefill_chunk` tokens at most), so a new request's first token does not wait for the step."""
        if not self._decoding or not self._waiting:  # an unlocked peek: the common case costs nothing
            return
        self._decoding = False  # once per step; also keeps the prefill's own layers from coming back here
        with self._lock:
            admitted = []
            while self._waiting and self._active() + len(admitted) < self.max_num_seqs:
                admitted.append(self._waiting.popleft())
            self._prefilling.extend(admitted)
        if admitted:
            self._prefill_for(self.prefill_chunk)

    def _routed(self, adapters: list[int]) -> contextlib.AbstractContextManager:
        """Row i of the next forward uses LoRA adapter adapters[i] (nothing to do without served adapters)."""
        return lora.route(self._adapters, adapters, self.device) if self._adapters else contextlib.nullcontext()

    def _cached_prefix(self, ids: list[int]) -> tuple[KVCache, int]:
        """A cache holding the longest kept prefix of `ids` (all but its last token at most), and its length."""
        best, length = None, 0
        for key in self._prefixes:
            n = len(os.path.commonprefix([key, tuple(ids[: len(key)])]))
            if n > length:
                best, length = key, n
        length = min(length, len(ids) - 1)
        if best is None or length < self.min_prefix:
            return self.model.base_model.cache_class(), 0
        self._prefixes.move_to_end(best)
        cache = self._prefixes[best].clone()
        cache.rewind(cache.seen - length)
        self.counters["prefix_cache_hit_tokens_total"] += length
        return cache, length

    def _keep_prefix(self, ids: list[int], cache: KVCache) -> None:
        if self.prefix_cache_size == 0 or len(ids) < self.min_prefix:
            return
        self._prefixes[tuple(ids)] = cache.clone()
        self._prefixes.move_to_end(tuple(ids))
        while len(self._prefixes) > self.prefix_cache_size:
            self._prefixes.popitem(last=False)

    def _compact(self) -> None:
        """Drop finished rows from the batch (their cache rows with them)."""
        keep = [i for i, s in enumerate(self._running) if not s.done]
        if len(keep) == len(self._running):
            return
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._batch = None
            return
        self._batch.reorder(torch.tensor(keep, device=self.device))
        self._batch.seen = int(self._batch.lengths.max())

    # ---- one token of one request -------------------------------------------------------------------
    def _take_or_fail(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """`_take`; whatever fails in one request's sampling or text (its grammar, its detokenizer) ends that
        request alone, with an error, and the batch goes on."""
        try:
            self._take(seq, logits)
        except GrammarError as err:
            self._finish(seq, "error", error=str(err))
        except Exception as err:  # noqa: BLE001 - logged; the other rows must not fail with it
            logger.exception("request %s failed while choosing its token", seq.request.request_id)
            self._finish(seq, "error", error=f"{type(err).__name__}: {err}")

    def _take(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Choose the next token from raw logits (V,), update the text, emit the event, maybe finish."""
        p = seq.request.params
        logits = logits.float()
        scores = self._processed(seq, logits)
        if seq.constraint is not None:
            scores = seq.constraint.mask(scores)
        if p.temperature == 0:
            token = int(scores.argmax())
        else:
            probs = torch.softmax(_filtered(scores / p.temperature, p.top_k, p.top_p, p.min_p), dim=-1)
            token = int(torch.multinomial(probs, 1, generator=seq.generator))
        seq.generated.append(token)
        self.counters["generation_tokens_total"] += 1
        if seq.counts is not None:
            seq.counts[token] += 1
        logprobs = None
        if p.logprobs is not None:
            lp = torch.log_softmax(logits, dim=-1)
            top = torch.topk(lp, p.logprobs) if p.logprobs else None
            logprobs = [
                {
                    "id": token,
                    "logprob": float(lp[token]),
                    "top": list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else [],
                }
            ]
        reason = None
        if token in seq.eos:
            reason, text = "stop", seq.detok.finalize()
        else:
            text = seq.detok.add(token)
            if seq.constraint is not None:
                seq.constraint.advance(token)
                if seq.constraint.done:  # the grammar is complete: nothing else may follow
                    reason, text = "stop", text + seq.detok.finalize()
            total = len(seq.request.prompt_ids) + len(seq.generated)
            if reason is None and (len(seq.generated) >= p.max_tokens or total >= self.max_model_len):
                reason, text = "length", text + seq.detok.finalize()
        text, stopped = self._stop_strings(seq, text, final=reason is not None)
        if stopped:
            reason = "stop"
        self._emit(seq, Event(seq.request.request_id, [token], text, reason, logprobs))
        if reason is not None:
            seq.done = True

    def _processed(self, seq: _Sequence, logits: torch.Tensor) -> torch.Tensor:
        p = seq.request.params
        scores = logits
        if self.text_vocab < logits.shape[-1]:
            scores = torch.cat([logits[: self.text_vocab], logits.new_full((logits.shape[-1] - self.text_vocab,),
                                                                            float("-inf"))])  # fmt: skip
        if p.logit_bias:
            index = torch.tensor(list(p.logit_bias), device=logits.device, dtype=torch.long)
            scores = scores.index_add(0, index, torch.tensor(list(p.logit_bias.values()), device=logits.device))
        if p.repetition_penalty != 1.0:  # the reference's rule, over prompt and output
            seen = torch.tensor(sorted(set(seq.request.prompt_ids) | set(seq.generated)), device=logits.device)
            picked = scores[seen]
            scores = scores.index_copy(0, seen, torch.where(picked > 0, picked / p.repetition_penalty,
                                                            picked * p.repetition_penalty))  # fmt: skip
        if p.presence_penalty or p.frequency_penalty:  # OpenAI's rule, over the output only
            if seq.counts is None:
                seq.counts = torch.zeros(logits.shape[-1], device=logits.device)
                for t in seq.generated:
                    seq.counts[t] += 1
            scores = scores - p.frequency_penalty * seq.counts - p.presence_penalty * (seq.counts > 0)
        return scores

    def _stop_strings(self, seq: _Sequence, text: str, final: bool) -> tuple[str, bool]:
        """Cut the text before the first stop string; hold back a tail that may begin one."""
        stops = seq.request.params.stop
        if not stops:
            return text, False
        pending = seq.held + text
        hits = [i for i in (pending.find(s) for s in stops) if i >= 0]
        if hits:
            seq.held = ""
            return pending[: min(hits)], True
        keep = 0 if final else max(len(s) for s in stops) - 1
        keep = min(keep, len(pending))
        cut = len(pending) - keep
        # hold back only a tail that is a prefix of some stop string
        while cut < len(pending) and not any(s.startswith(pending[cut:]) for s in stops):
            cut += 1
        seq.held = pending[cut:]
        return pending[:cut], False

    def _emit(self, seq: _Sequence, event: Event) -> None:
        event.prompt_tokens = len(seq.request.prompt_ids)
        event.completion_tokens = len(seq.generated)
        try:
            seq.request.on_event(event)
        except Exception:  # noqa: BLE001 - a broken consumer ends its own request only
            logger.exception("request %s: event callback failed; cancelling it", seq.request.request_id)
            seq.done = True

    def _finish(self, seq: _Sequence, reason: str, error: str | None = None) -> None:
        if seq.done:
            return
        seq.done = True
        self._emit(seq, Event(seq.request.request_id, [], "", reason, error=error))


def _filtered(scores: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Top-k, then top-p (nucleus), then min-p filtering of temperature-scaled scores (V,)."""
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
        drop = cumulative - torch.softmax(sorted_scores, dim=-1) > top_p  # keep the token that crosses top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(scores, dim=-1)
        scores = scores.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return scores
