"""Logits processors: small callables (input_ids (B, L), scores (B, V)) -> scores, applied in order.

Each follows the reference's math exactly, so the filtered distributions are the same.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

LogitsProcessor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class RepetitionPenalty:
    """Divide positive / multiply negative scores of every token already present (prompt included)."""

    def __init__(self, penalty: float):
        self.penalty = penalty

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        seen = torch.gather(scores, 1, input_ids)
        seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
        return scores.scatter(1, input_ids, seen)


class NoRepeatNGram:
    """Forbid any token that would complete an n-gram already present in the row."""

    def __init__(self, ngram_size: int):
        self.n = ngram_size

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length + 1 < self.n:
            return scores
        scores = scores.clone()
        for row, tokens in enumerate(input_ids.tolist()):
            prefix = tuple(tokens[length + 1 - self.n :])
            banned = [
                tokens[i + self.n - 1]
                for i in range(length - self.n + 1)
                if tuple(tokens[i : i + self.n - 1]) == prefix
            ]
            scores[row, banned] = -math.inf
        return scores


class BadWords:
    """Forbid single tokens always, and the last token of a multi-token sequence after its prefix."""

    def __init__(self, bad_words_ids: Sequence[Sequence[int]], eos_token_ids: Sequence[int],
                 vocab_size: int | None = None):  # fmt: skip
        if not isinstance(bad_words_ids, (list, tuple)) or not all(
            isinstance(seq, (list, tuple)) and seq and all(isinstance(t, int) and t >= 0 for t in seq)
            for seq in bad_words_ids
        ):
            raise ValueError(f"`bad_words_ids` must be a list of non-empty lists of token ids, got {bad_words_ids!r}")
        outside = [t for seq in bad_words_ids for t in seq if vocab_size is not None and t >= vocab_size]
        if outside:
            raise ValueError(f"`bad_words_ids` holds token id {outside[0]}, outside the vocabulary "
                             f"(0..{vocab_size - 1})")  # fmt: skip
        seqs = [list(s) for s in bad_words_ids if not (len(s) == 1 and s[0] in eos_token_ids)]
        self.single = sorted({s[0] for s in seqs if len(s) == 1})
        self.multi = [s for s in seqs if len(s) > 1]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.clone()
        if self.single:
            scores[:, self.single] = -math.inf
        if self.multi:
            for row, tokens in enumerate(input_ids.tolist()):
                banned = [
                    s[-1]
                    for s in self.multi
                    if len(s) - 1 <= len(tokens) and tokens[len(tokens) - len(s) + 1 :] == s[:-1]
                ]
                scores[row, banned] = -math.inf
        return scores


class MinLength:
    """Forbid EOS until the sequence (min_length) or the new part (min_new_tokens) is long enough."""

    def __init__(self, min_tokens: int, eos_token_ids: Sequence[int], prompt_length: int = 0):
        self.min_tokens, self.eos, self.prompt_length = min_tokens, list(eos_token_ids), prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] - self.prompt_length < self.min_tokens:
            scores = scores.clone()
            scores[:, self.eos] = -math.inf
        return scores


class Temperature:
    def __init__(self, temperature: float):
        self.temperature = temperature

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return scores / self.temperature


class TopK:
    def __init__(self, top_k: int, min_tokens_to_keep: int = 1):
        self.top_k = max(top_k, min_tokens_to_keep)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        k = min(self.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        return scores.masked_fill(scores < kth, -math.inf)


class TopP:
    """Nucleus: drop the least likely tokens whose total probability is at most 1 - top_p."""

    def __init__(self, top_p: float, min_tokens_to_keep: int = 1):
        self.top_p, self.keep = top_p, min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        sorted_scores, order = torch.sort(scores, descending=False)
        remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - self.top_p)
        remove[..., -self.keep :] = False
        return scores.masked_fill(remove.scatter(1, order, remove), -math.inf)


class MinP:
    """Keep tokens whose probability is at least min_p times the top token's."""

    def __init__(self, min_p: float, min_tokens_to_keep: int = 1):
        self.min_p, self.keep = min_p, min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores, dim=-1)
        remove = probs < self.min_p * probs.max(dim=-1, keepdim=True)[0]
        order = torch.argsort(scores, descending=True, dim=-1)
        sorted_remove = torch.gather(remove, -1, order)
        sorted_remove[..., : self.keep] = False
        return scores.masked_fill(sorted_remove.scatter(1, order, sorted_remove), -math.inf)


class Typical:
    """Locally typical sampling: keep the tokens whose surprisal is closest to the entropy, up to `mass`."""

    def __init__(self, mass: float, min_tokens_to_keep: int = 1):
        self.mass, self.keep = mass, min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(scores, dim=-1)
        entropy = -(logp * logp.exp()).nansum(-1, keepdim=True)
        shifted, order = torch.sort((-logp - entropy).abs(), descending=False)
        cumulative = scores.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < self.mass).sum(dim=1).clamp_(max=shifted.shape[-1] - 1)
        remove = shifted > shifted.gather(1, last.view(-1, 1))
        remove[..., : self.keep] = False
        return scores.masked_fill(remove.scatter(1, order, remove), -math.inf)


def build_processors(config, prompt_length: int, eos_token_ids: Sequence[int],
                     vocab_size: int | None = None) -> list[LogitsProcessor]:  # fmt: skip
    """The processor chain for a GenerationConfig, in the reference's order (penalties, then warpers)."""
    chain: list[LogitsProcessor] = []
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        chain.append(RepetitionPenalty(config.repetition_penalty))
    if config.no_repeat_ngram_size is not None and config.no_repeat_ngram_size > 0:  # <= 0: off, as in the reference
        chain.append(NoRepeatNGram(config.no_repeat_ngram_size))
    if config.bad_words_ids is not None:
        chain.append(BadWords(config.bad_words_ids, eos_token_ids, vocab_size))
    if eos_token_ids and config.min_length:
        chain.append(MinLength(config.min_length, eos_token_ids))
    if eos_token_ids and config.min_new_tokens:
        chain.append(MinLength(config.min_new_tokens, eos_token_ids, prompt_length))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            chain.append(Temperature(config.temperature))
        if config.top_k:
            chain.append(TopK(config.top_k))
        if config.top_p is not None and config.top_p < 1.0:
            chain.append(TopP(config.top_p))
        if config.min_p is not None:
            chain.append(MinP(config.min_p))
        if config.typical_p is not None and config.typical_p < 1.0:
            chain.append(Typical(config.typical_p))
    return chain
