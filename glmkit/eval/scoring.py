"""Log-likelihood scoring: the numbers few-shot evaluation is made of.

`score_tokens` is the one computation under everything here (the harness model included): for pairs of
token lists (context, continuation) it returns the continuation's summed log-probability and whether
greedy decoding would have produced it. Pairs that share a context are prefilled once: the context's KV
is computed for one row and the cache's rows are then repeated, one per candidate (`KVCache.reorder`),
so a four-way multiple-choice question costs one context forward plus four short continuation forwards.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..generation.engine import PREFILL_CHUNK, forward_tokens
from ..modeling import check_token_ids

Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)
Progress = Callable[[int], None]  # called with the number of pairs just finished


@dataclass(frozen=True)
class Score:
    """One continuation's score: its summed log-probability (nats) given the context, how many tokens and
    UTF-8 bytes it has, and whether greedy decoding from the context would have produced exactly it."""

    logprob: float
    num_tokens: int
    num_bytes: int
    is_greedy: bool

    @property
    def per_token(self) -> float:
        """Log-probability per token (length-normalised ranking of candidates of different lengths)."""
        return self.logprob / self.num_tokens

    @property
    def per_byte(self) -> float:
        """Log-probability per UTF-8 byte: comparable across tokenizers (nan for an empty text)."""
        return self.logprob / self.num_bytes if self.num_bytes else math.nan


def max_positions(model: Any) -> int | None:
    """How many positions the model takes (config.max_position_embeddings), None if unbounded."""
    return getattr(model.config, "max_position_embeddings", None)


# ---- the computation --------------------------------------------------------------------------------
@torch.no_grad()
def score_tokens(model: Any, pairs: Sequence[Pair], batch_size: int = 16, reuse_prefix: bool = True,
                 progress: Progress | None = None) -> list[tuple[float, bool]]:  # fmt: skip
    """(summed log-probability, is_greedy) of each continuation given its context, in input order.

    Every context needs at least one token (the one the first continuation token is predicted from) and
    context + continuation must fit the model: len(context) + len(continuation) - 1 <= max positions.
    batch_size bounds the candidate rows of one forward pass. With reuse_prefix, pairs whose contexts are
    equal share one context prefill; without it each pair is computed on its own row (the same numbers).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    _check_pairs(pairs, max_positions(model), model.base_model.embed_tokens.num_embeddings)
    groups: dict[tuple, list[int]] = {}
    for i, (context, _) in enumerate(pairs):
        groups.setdefault(tuple(context) if reuse_prefix else (i,), []).append(i)
    # longest first, as the reference harness orders requests: a batch that does not fit fails at once
    order = sorted(groups.values(), key=lambda idx: -max(len(pairs[i][0]) + len(pairs[i][1]) for i in idx))
    results: list[tuple[float, bool] | None] = [None] * len(pairs)
    for batch in _batches(order, batch_size):
        contexts = [list(pairs[idx[0]][0]) for idx in batch]
        rows = [(g, i) for g, idx in enumerate(batch) for i in idx]
        scores = _score_batch(model, contexts, [g for g, _ in rows], [list(pairs[i][1]) for _, i in rows])
        for (_, i), value in zip(rows, scores):
            results[i] = value
        if progress is not None:
            progress(len(rows))
    return results  # type: ignore[return-value]


def _check_pairs(pairs: Sequence[Pair], limit: int | None, vocab_size: int) -> None:
    if not pairs:
        raise ValueError("nothing to score: the list of (context, continuation) pairs is empty")
    for i, (context, continuation) in enumerate(pairs):
        if not context:
            raise ValueError(f"pair {i}: the context has no tokens (give at least a BOS/EOS token)")
        if not continuation:
            raise ValueError(f"pair {i}: the continuation has no tokens")
        if limit is not None and len(context) + len(continuation) - 1 > limit:
            raise ValueError(f"pair {i}: context ({len(context)} tokens) + continuation ({len(continuation)}) "
                             f"is longer than the model's {limit} positions")  # fmt: skip
    check_token_ids(torch.tensor([t for pair in pairs for part in pair for t in part]), vocab_size)


def _batches(groups: list[list[int]], batch_size: int) -> Iterator[list[list[int]]]:
    """Consecutive context groups whose candidates fill at most batch_size rows (a bigger group alone)."""
    batch: list[list[int]] = []
    rows = 0
    for group in groups:
        if batch and rows + len(group) > batch_size:
            yield batch
            batch, rows = [], 0
        batch.append(group)
        rows += len(group)
    if batch:
        yield batch


def _score_batch(model: Any, contexts: list[list[int]], row_context: list[int],
                 continuations: list[list[int]]) -> list[tuple[float, bool]]:  # fmt: skip
    """Prefill the G contexts (left-padded, so each one's last token is the last column), repeat each
    context's cache row for its candidates, then run the N continuations (minus their last token, which
    predicts nothing) right-padded. Token t of a continuation is predicted by the logits before it."""
    device = model.device
    cache = model.base_model.cache_class()
    ids, mask = _padded(contexts, device, left=True)  # (G, Lc)
    for start in range(0, ids.shape[1], PREFILL_CHUNK):
        part = None if mask is None else mask[:, start : start + PREFILL_CHUNK]
        last = forward_tokens(model, cache, ids[:, start : start + PREFILL_CHUNK], part)  # (G, V)
    index = torch.tensor(row_context, device=device)
    cache.reorder(index)  # (N rows) one per candidate
    targets, target_mask = _padded(continuations, device, left=False)  # (N, Lmax)
    if target_mask is None:
        target_mask = torch.ones_like(targets, dtype=torch.bool)
    logprob, greedy = _token_scores(last.index_select(0, index)[:, None], targets[:, :1])  # first tokens
    inputs, input_mask = targets[:, :-1], target_mask[:, 1:]  # (N, Lmax - 1): input j predicts target j + 1
    for start in range(0, inputs.shape[1], PREFILL_CHUNK):
        end = start + PREFILL_CHUNK
        part = input_mask[:, start:end]
        logits = forward_tokens(model, cache, inputs[:, start:end], None if bool(part.all()) else part,
                                last_only=False)  # (N, t, V) fmt: skip
        lp, gr = _token_scores(logits, targets[:, start + 1 : end + 1])
        logprob = torch.cat([logprob, lp], dim=1)
        greedy = torch.cat([greedy, gr], dim=1)
    total = logprob.masked_fill(~target_mask, 0.0).sum(dim=1)
    all_greedy = (greedy | ~target_mask).all(dim=1)
    return list(zip(total.tolist(), all_greedy.tolist()))


def _token_scores(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (N, T, V), targets (N, T) -> log-probability of each target and whether it is the argmax."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return logprobs.gather(-1, targets[..., None])[..., 0], logits.argmax(dim=-1) == targets


def _padded(rows: list[list[int]], device: torch.device, left: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Token lists -> ids (B, L) padded with 0 and a mask of the real tokens (None when none is padded)."""
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, r in enumerate(rows):
        span = slice(width - len(r), width) if left else slice(0, len(r))
        ids[b, span] = torch.tensor(r, dtype=torch.long)
        mask[b, span] = True
    return ids.to(device), (None if bool(mask.all()) else mask.to(device))


# ---- rolling windows --------------------------------------------------------------------------------
def rolling_windows(tokens: Sequence[int], prefix: Sequence[int], max_length: int,
                    stride: int | None = None) -> list[Pair]:  # fmt: skip
    """Cut a document into (context, continuation) pairs that together score every token exactly once.

    The first window predicts the first tokens from `prefix` (e.g. BOS); each later one predicts the next
    `stride` tokens (default max_length: disjoint windows) from as many preceding tokens as fit in
    max_length inputs. With stride == max_length these are the reference harness's windows
    (lm_eval's get_rolling_token_windows with context_len 1, made disjoint).
    """
    stride = max_length if stride is None else stride
    if max_length < 1 or not 1 <= stride <= max_length:
        raise ValueError(f"need 1 <= stride <= max_length, got stride {stride}, max_length {max_length}")
    if not 1 <= len(prefix) <= max_length:
        raise ValueError(f"rolling windows need a prefix of 1..{max_length} tokens to predict the first token from")
    tokens = list(tokens)
    first = min(max_length + 1 - len(prefix), len(tokens))
    windows: list[Pair] = [(list(prefix), tokens[:first])] if tokens else []
    done = first
    while done < len(tokens):
        end = min(done + stride, len(tokens))
        windows.append((tokens[max(0, end - max_length - 1) : done], tokens[done:end]))
        done = end
    return windows


# ---- progress on stderr -----------------------------------------------------------------------------
class ProgressBar:
    """`desc: done/total [rate/s]` redrawn on one stderr line; no dependency."""

    def __init__(self, total: int, desc: str, stream: Any = None):
        import time

        self.total, self.desc, self.done, self.stream = total, desc, 0, stream or sys.stderr
        self._clock, self._start = time.perf_counter, time.perf_counter()

    def __call__(self, n: int) -> None:
        self.done += n
        rate = self.done / max(self._clock() - self._start, 1e-9)
        end = "\n" if self.done >= self.total else ""
        print(f"\r{self.desc}: {self.done}/{self.total} [{rate:.1f}/s]", end=end, file=self.stream, flush=True)
