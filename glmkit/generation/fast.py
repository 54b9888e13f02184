"""The fast decode path: a static KV cache, fixed-shape steps and optional torch.compile (DESIGN rules 4-5).

`generate(..., cache_implementation="static")` or `generate(..., compile=True)` take this path (`compile`
may also be a dict of torch.compile arguments, e.g. {"backend": "eager"}); the plain `decode_steps` stays
the default. Same tokens, different mechanics:

* the cache capacity is the prompt + max_new_tokens rounded up to a bucket, allocated once; every step
  writes at a position tensor and attends over the whole buffer, so the decode step always has the
  shapes (B, 1) -> (B, V) and a compiled step is reused across steps and across calls of a bucket;
* the attention mask is built once for the whole run (future slots are hidden by causality); positions
  are tensors; the model gets embeddings, so no per-token id check (a host sync) runs;
* logits are computed for the last position only; sampling stays on the device;
* "every row finished?" is asked only every `check_every` steps; `generate` trims the extra all-pad
  steps, so the result is what the plain path returns.

The model itself is untouched: compile and CUDA graphs are applied from outside, as a wrapper.
"""

from __future__ import annotations

import os
import types
import warnings
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..cache import StaticKVCache
from .utils import Plan, Step, choose_tokens

CAPACITY_BUCKET = 128  # cache capacity granularity: bounds the number of compiled decode graphs
CHECK_EVERY = 8  # decode steps between host syncs for "all rows finished"
MAX_GRAPHS = 64  # compiled graphs kept per model ((batch, bucket) pairs); dynamo's default of 8 falls back to
# eager once a chat's history has grown by 8 buckets
_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"  # < 2.7

_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {options: (signature, step)}


def bucket(length: int, quantum: int = CAPACITY_BUCKET) -> int:
    """`length` rounded up to a multiple of `quantum`."""
    return -(-length // quantum) * quantum


def cpu_threads() -> int:
    """Cores this process may run on (affinity / cgroup aware where the OS tells us)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def configure_cpu_threads(threads: int | None = None) -> int:
    """Use one intra-op thread per available core (oversubscription hurts bandwidth-bound decode)."""
    threads = threads or cpu_threads()
    torch.set_num_threads(threads)
    return threads


def forward_step(model: Any, cache: StaticKVCache, tokens: torch.Tensor, position_ids: torch.Tensor,
                 cache_position: torch.Tensor, mask: torch.Tensor,
                 length: int | None = None) -> torch.Tensor:  # fmt: skip
    """One forward pass at fixed shapes: tokens (B, T) at positions (B, T) written to cache slots (T,);
    mask (B, S) over the whole cache, attended whole unless `length` limits it to the first slots (a
    prefill chunk). Returns fp32 logits (B, V) of the last position only."""
    cache.bind(cache_position, length)
    embeds = model.get_input_embeddings()(tokens)  # (B, T, C); skips the id range check's host sync
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                cache_position=cache_position, use_cache=True, logits_to_keep=1, return_dict=True)  # fmt: skip
    return out.logits[:, -1].float()


def compile_options(options: dict[str, Any] | None, cuda: bool) -> dict[str, Any]:
    """torch.compile arguments: the caller's, else inductor with CUDA graphs on GPU (what mode
    "reduce-overhead" sets) and `emulate_precision_casts`, which rounds bf16/fp16 intermediates where eager
    does: without it the fused kernels keep them in fp32 and greedy bf16 tokens drift from the eager path's.
    The per-call stride checks are dropped: the step's inputs are built here, and on CPU the checks cost
    about as much as the small fused kernels."""
    options = dict(options or {})
    if not {"mode", "options", "backend"} & set(options):
        options["options"] = {"emulate_precision_casts": True, "size_asserts": False, "alignment_asserts": False,
                              **({"triton.cudagraphs": True} if cuda else {})}  # fmt: skip
        skip_model_guards = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)  # torch >= 2.8
        if skip_model_guards is not None:  # see `model_signature`
            options["options"]["guard_filter_fn"] = skip_model_guards
    return {"dynamic": False, **options}


def model_signature(model: Any) -> tuple:
    """What a compiled step is specialised on besides its tensor arguments. Dynamo's guards on the model
    are skipped (they cost ~30 us per layer per step: 1.2 ms of host time per token at 40 layers), so a
    change here (dtype, device, parameters replaced, train/eval, config) gets a fresh compile instead."""
    tensors = tuple((id(t), t.dtype, t.device, t.shape) for t in (*model.parameters(), *model.buffers()))
    return tensors, model.training, repr(sorted(vars(model.config).items()))


def compiled_step(model: Any, options: dict[str, Any] | None = None) -> Callable[..., torch.Tensor] | None:
    """`forward_step` under torch.compile (see `compile_options`), made once per model, options and
    `model_signature`; None where torch.compile is unavailable (the caller then runs eagerly)."""
    options = compile_options(options, next(model.parameters()).device.type == "cuda")
    key = repr(sorted(options.items()))
    per_model = _COMPILED.setdefault(model, {})
    signature = model_signature(model)
    if key not in per_model or per_model[key][0] != signature:
        # a code object of its own: dynamo caches graphs per code object, so no two models (or signatures)
        # ever share one through the guards skipped above
        step = types.FunctionType(forward_step.__code__.replace(), forward_step.__globals__, "forward_step",
                                  forward_step.__defaults__)
        try:
            fresh = {k: dict(v) if isinstance(v, dict) else v for k, v in options.items()}  # compile pops from it
            per_model[key] = (signature, torch.compile(step, **fresh))
        except Exception as err:  # noqa: BLE001 - unsupported platform / Python: run eagerly
            warnings.warn(f"torch.compile unavailable ({err}); decoding eagerly", stacklevel=3)
            per_model[key] = (signature, None)
    return per_model[key][1]


class _Stepper:
    """Calls the compiled step, falling back to eager (with a warning) if compiling fails."""

    def __init__(self, model: Any, compile: bool | dict[str, Any]):
        self.model = model
        self.compiled = compiled_step(model, compile if isinstance(compile, dict) else None) if compile else None
        # on GPU the buffers must keep their addresses and outputs be copied before the next replay
        self.on_gpu = self.compiled is not None and next(model.parameters()).device.type == "cuda"

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        if self.compiled is not None:
            try:
                with torch._dynamo.config.patch({_LIMIT: MAX_GRAPHS}):
                    logits = self.compiled(self.model, *args)
                return logits.clone() if self.on_gpu else logits  # CUDA graph outputs are overwritten
            except Exception as err:  # noqa: BLE001 - e.g. no C++ compiler for inductor on CPU
                warnings.warn(f"torch.compile failed ({type(err).__name__}: {err}); decoding eagerly",
                              stacklevel=2)  # fmt: skip
                self.compiled = None
        return forward_step(self.model, *args)


@torch.no_grad()
def static_decode_steps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: Plan,
                        compile: bool | dict[str, Any] = False, check_every: int = CHECK_EVERY,
                        prefill_chunk: int = 512) -> Iterator[Step]:  # fmt: skip
    """Like `decode_steps`, on a static cache. May yield up to check_every - 1 steps after every row has
    finished (all pad tokens); `Step.finished` tells the caller where the plain path would have stopped."""
    B, P = input_ids.shape
    total = P + plan.max_new_tokens
    S = bucket(total)
    dev = input_ids.device
    ids = input_ids.new_full((B, total), plan.pad if plan.pad is not None else 0)
    ids[:, :P] = input_ids
    mask = attention_mask.new_ones((B, S))  # built once: causality hides the slots not yet written
    mask[:, :P] = attention_mask
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)  # pads get a dummy position
    cache = StaticKVCache(S)
    for start in range(0, P, prefill_chunk):  # prefill: eager, attends to the slots written so far only
        end = min(P, start + prefill_chunk)
        slots = torch.arange(start, end, device=dev)
        logits = forward_step(model, cache, ids[:, start:end], positions[:, start:end], slots, mask, end)
    step_fn = _Stepper(model, compile)
    if step_fn.on_gpu:
        cache.mark_static()
    slot = torch.tensor([P], device=dev)  # (1,) the cache slot of the token being fed
    eos = torch.tensor(plan.eos, device=dev) if plan.eos else None
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    for step in range(plan.max_new_tokens):
        cur = P + step
        tokens, scores, stopped = choose_tokens(plan, ids, cur, logits, finished, eos)
        stopped_now = stopped & ~finished
        finished = finished | stopped
        yield Step(tokens, logits, scores, finished, stopped_now)
        if step + 1 == plan.max_new_tokens or ((step + 1) % check_every == 0 and bool(finished.all())):
            return
        # fresh (B, 1) inputs, not views of the (B, total) buffers: their strides would tie a compiled
        # graph to one total length
        logits = step_fn(cache, tokens[:, None], positions[:, cur : cur + 1], slot, mask)
        slot = slot + 1
