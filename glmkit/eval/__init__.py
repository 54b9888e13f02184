"""Scoring and evaluation: log-likelihoods of continuations, rolling log-likelihood and perplexity of long
documents, and (glmkit.eval.harness, needs lm-eval) the lm-evaluation-harness model `glmkit`.

Text is split the way the reference harness splits it: whitespace at the end of a context moves to the
start of its continuation, and the continuation's tokens are those of context + continuation after the
context's own tokens, so a word's leading space stays with the word.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from .scoring import Pair, ProgressBar, Score, max_positions, rolling_windows, score_tokens

__all__ = ["Score", "loglikelihood_rolling", "perplexity", "rolling_windows", "score", "score_tokens"]
DEFAULT_MAX_LENGTH = 2048  # a model whose config names no limit


def text_encoder(tokenizer: Any, add_special_tokens: bool = True,
                 newlines_to_eos: bool = False) -> Callable[[str], list[int]]:  # fmt: skip
    """text -> ids. newlines_to_eos: XGLM's training convention (fairseq wrote each newline as `</s>`), so
    its few-shot prompts score best with every "\\n" encoded as the EOS token."""

    def encode(text: str) -> list[int]:
        if not newlines_to_eos:
            return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
        ids = list(tokenizer("", add_special_tokens=add_special_tokens)["input_ids"])
        for k, line in enumerate(text.split("\n")):
            if k:
                ids.append(_eos_id(tokenizer))
            if line:
                ids.extend(tokenizer(line, add_special_tokens=False)["input_ids"])
        return ids

    return encode


def _eos_id(tokenizer: Any) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id (needed for newlines_to_eos / an empty context)")
    return eos


def prefix_ids(tokenizer: Any, add_special_tokens: bool = True) -> list[int]:
    """What an empty context is scored from: the tokenizer's own leading special tokens (GLM-4's
    `[gMASK]<sop>`, XGLM's `</s>`, Persimmon's `<s>`), else BOS, else EOS."""
    ids = list(tokenizer("", add_special_tokens=True)["input_ids"]) if add_special_tokens else []
    if ids:
        return ids
    return [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _eos_id(tokenizer)]


def encode_pair(encode: Callable[[str], list[int]], prefix: list[int], context: str,
                continuation: str) -> Pair:  # fmt: skip
    """(context ids, continuation ids) as the reference harness splits them (see the module docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    context_ids = encode(context)  # an empty context: the special prefix alone, or nothing
    if not context_ids:
        return prefix, whole
    return context_ids, whole[len(context_ids) :]


def score(model: Any, tokenizer: Any, contexts: Sequence[str], continuations: Sequence[str], *,
          batch_size: int = 16, add_special_tokens: bool = True, newlines_to_eos: bool = False,
          reuse_prefix: bool = True) -> list[Score]:  # fmt: skip
    """Score each continuation given its context (contexts[i] with continuations[i]).

    Repeat a context for each of its candidates: equal contexts are prefilled once. Returns per pair the
    summed log-probability, token and byte counts (`.per_token`, `.per_byte` normalise) and whether the
    continuation is what greedy decoding gives. add_special_tokens: contexts start with the tokenizer's
    special prefix, as the model saw text in training; newlines_to_eos: see `text_encoder`.
    """
    contexts, continuations = list(contexts), list(continuations)
    if not continuations:
        raise ValueError("continuations is empty: nothing to score")
    if len(contexts) != len(continuations):
        raise ValueError(f"contexts ({len(contexts)}) and continuations ({len(continuations)}) must pair up")
    for name, texts in (("contexts", contexts), ("continuations", continuations)):
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
        if bad is not None:
            raise TypeError(f"{name}[{bad}] must be a str, got {type(texts[bad]).__name__}")
    empty = next((i for i, t in enumerate(continuations) if not t), None)
    if empty is not None:
        raise ValueError(f"continuations[{empty}] is empty: nothing to score")
    encode = text_encoder(tokenizer, add_special_tokens, newlines_to_eos)
    prefix = prefix_ids(tokenizer, add_special_tokens)
    pairs = [encode_pair(encode, prefix, c, x) for c, x in zip(contexts, continuations)]
    values = score_tokens(model, pairs, batch_size=batch_size, reuse_prefix=reuse_prefix)
    return [Score(lp, len(pair[1]), len(text.encode("utf-8")), greedy)
            for (lp, greedy), pair, text in zip(values, pairs, continuations)]  # fmt: skip


def loglikelihood_rolling(model: Any, tokenizer: Any, texts: Sequence[str], *, max_length: int | None = None,
                          stride: int | None = None, batch_size: int = 16, newlines_to_eos: bool = False,
                          progress: bool = False) -> list[Score]:  # fmt: skip
    """Log-likelihood of whole documents of any length: each is cut into windows of at most max_length
    inputs (default: the model's positions) advancing by stride tokens (default max_length: disjoint),
    every token scored once, the first from the tokenizer's special prefix (BOS)."""
    if isinstance(texts, str):
        raise TypeError("texts must be a list of documents, not one str")
    if not texts:
        raise ValueError("texts is empty: nothing to score")
    max_length = max_length or max_positions(model) or DEFAULT_MAX_LENGTH
    encode = text_encoder(tokenizer, add_special_tokens=False, newlines_to_eos=newlines_to_eos)
    prefix = prefix_ids(tokenizer)
    documents = [encode(text) for text in texts]
    windows = [rolling_windows(ids, prefix, max_length, stride) for ids in documents]
    flat = [w for doc in windows for w in doc]
    bar = ProgressBar(len(flat), "windows") if progress else None
    values = score_tokens(model, flat, batch_size=batch_size, reuse_prefix=False, progress=bar) if flat else []
    out, at = [], 0
    for text, ids, doc in zip(texts, documents, windows):
        part = values[at : at + len(doc)]
        at += len(doc)
        out.append(Score(sum(v[0] for v in part), len(ids), len(text.encode("utf-8")), all(v[1] for v in part)))
    return out


def perplexity(model: Any, tokenizer: Any, text: str, max_length: int | None = None, stride: int | None = None,
               batch_size: int = 16, progress: bool = False) -> float:  # fmt: skip
    """exp(mean negative log-likelihood per token) of `text`, from strided windows (`loglikelihood_rolling`)."""
    if not isinstance(text, str) or not text:
        raise ValueError("perplexity needs a non-empty text")
    result = loglikelihood_rolling(model, tokenizer, [text], max_length=max_length, stride=stride,
                                   batch_size=batch_size, progress=progress)[0]  # fmt: skip
    if result.num_tokens == 0:
        raise ValueError("the text encodes to no tokens")
    return math.exp(-result.per_token)
