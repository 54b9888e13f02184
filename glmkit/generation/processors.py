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


class HammingDiversity:
    """Group beam search: lower each token's score by `penalty` times the number of earlier groups' beams (of
    the same prompt) that chose it at this step. The search sets `earlier_tokens` (B, beams so far) per group."""

    def __init__(self, penalty: float, group_size: int):
        self.penalty, self.group_size = penalty, group_size
        self.earlier_tokens: torch.Tensor | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        earlier = self.earlier_tokens
        if earlier is None or earlier.shape[1] == 0:
            return scores
        counts = torch.zeros(earlier.shape[0], scores.shape[-1], device=scores.device)  # (B, V)
        counts.scatter_add_(1, earlier, torch.ones_like(earlier, dtype=counts.dtype))
        penalty = (self.penalty * counts).repeat_interleave(self.group_size, dim=0)  # (B * group_size, V)
        return scores - penalty


class NoRepeatNGram:
    """Forbid any token that would complete an n-gram already present in the row (or, with `source_length`, in
    its first source_length tokens: the prompt, for the reference's encoder_no_repeat_ngram_size)."""

    def __init__(self, ngram_size: int, source_length: int | None = None):
        self.n, self.source_length = ngram_size, source_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length + 1 < self.n:
            return scores
        scores = scores.clone()
        for row, tokens in enumerate(input_ids.tolist()):
            prefix = tuple(tokens[length + 1 - self.n :])
            source = tokens if self.source_length is None else tokens[: self.source_length]
            banned = [
                source[i + self.n - 1]
                for i in range(len(source) - self.n + 1)
                if tuple(source[i : i + self.n - 1]) == prefix
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


def build_processors(config, prompt_length: int, eos_token_ids: Sequence[int], vocab_size: int | None = None,
                     max_length: int | None = None) -> list[LogitsProcessor]:  # fmt: skip
    """The processor chain for a GenerationConfig, in the reference's order (biases and penalties, forced and
    suppressed tokens, then warpers, then renormalisation). `max_length` is prompt + new tokens."""
    chain: list[LogitsProcessor] = []
    if config.sequence_bias:
        chain.append(SequenceBias(config.sequence_bias))
    if config.diversity_penalty and config.num_beams > 1:
        chain.append(HammingDiversity(config.diversity_penalty, config.num_beams // config.num_beam_groups))
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        chain.append(RepetitionPenalty(config.repetition_penalty))
    if config.no_repeat_ngram_size is not None and config.no_repeat_ngram_size > 0:  # <= 0: off, as in the reference
        chain.append(NoRepeatNGram(config.no_repeat_ngram_size))
    if config.encoder_no_repeat_ngram_size:  # a decoder-only model's "encoder input" is its prompt
        chain.append(NoRepeatNGram(config.encoder_no_repeat_ngram_size, source_length=prompt_length))
    if config.bad_words_ids is not None:
        chain.append(BadWords(config.bad_words_ids, eos_token_ids, vocab_size))
    if eos_token_ids and config.min_length:
        chain.append(MinLength(config.min_length, eos_token_ids))
    if eos_token_ids and config.min_new_tokens:
        chain.append(MinLength(config.min_new_tokens, eos_token_ids, prompt_length))
    chain += forcing_processors(config, prompt_length, eos_token_ids, max_length)
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
        if config.epsilon_cutoff:
            chain.append(EpsilonCutoff(config.epsilon_cutoff))
        if config.eta_cutoff:
            chain.append(EtaCutoff(config.eta_cutoff))
    if config.renormalize_logits:
        chain.append(lambda input_ids, scores: scores.log_softmax(dim=-1))
    return chain


def forcing_processors(config, prompt_length: int, eos_token_ids: Sequence[int],
                       max_length: int | None) -> list[LogitsProcessor]:  # fmt: skip
    """Forced first / last tokens, non-finite scores made finite, suppressed tokens (the reference's order)."""
    chain: list[LogitsProcessor] = []
    if config.forced_bos_token_id is not None:
        chain.append(ForceTokenAt(lambda length: length == 1, [config.forced_bos_token_id]))
    if config.forced_eos_token_id is not None and max_length is not None:
        forced = config.forced_eos_token_id
        chain.append(ForceTokenAt(lambda length: length == max_length - 1, forced if isinstance(forced, list)
                                  else [forced]))  # fmt: skip
    if config.remove_invalid_values:
        chain.append(remove_invalid_values)
    if config.suppress_tokens:
        chain.append(Suppress(config.suppress_tokens))
    if config.begin_suppress_tokens:
        # the first generated token (one later when a forced BOS takes a one-token prompt's first step)
        begin = prompt_length if prompt_length > 1 or config.forced_bos_token_id is None else prompt_length + 1
        chain.append(Suppress(config.begin_suppress_tokens, at_length=begin))
    return chain


class ForceTokenAt:
    """At the step where `when(input length)` holds, only `token_ids` may be chosen (score 0, others -inf)."""

    def __init__(self, when: Callable[[int], bool], token_ids: Sequence[int]):
        self.when, self.token_ids = when, list(token_ids)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if not self.when(input_ids.shape[-1]):
            return scores
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.token_ids] = 0
        return forced


def remove_invalid_values(input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """NaN -> 0 and +-inf -> the dtype's largest finite values, so sampling cannot fail."""
    info = torch.finfo(scores.dtype)
    return torch.nan_to_num(scores, nan=0.0, posinf=info.max, neginf=info.min)


class Suppress:
    """`token_ids` never chosen (at every step, or only when the input is `at_length` long)."""

    def __init__(self, token_ids: int | Sequence[int], at_length: int | None = None):
        self.token_ids = [token_ids] if isinstance(token_ids, int) else list(token_ids)
        self.at_length = at_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.at_length is not None and input_ids.shape[-1] != self.at_length:
            return scores
        scores = scores.clone()
        scores[:, self.token_ids] = -math.inf
        return scores


class SequenceBias:
    """Add a bias to a token's score when it would complete one of the given sequences: {(ids...): bias} or
    [[[ids...], bias], ...] as the reference takes it. A one-token sequence is biased at every step."""

    def __init__(self, sequence_bias: dict | list):
        items = sequence_bias.items() if isinstance(sequence_bias, dict) else sequence_bias
        self.biases = [(list(ids), float(bias)) for ids, bias in items]
        for ids, _ in self.biases:
            if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(f"sequence_bias keys must be non-empty sequences of token ids, got {ids!r}")

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        bias = torch.zeros_like(scores)
        for ids, value in self.biases:
            *prefix, last = ids
            if len(prefix) >= input_ids.shape[1]:
                continue  # the sequence cannot end on the next token yet
            if prefix:
                rows = (input_ids[:, -len(prefix):] == torch.tensor(prefix, device=input_ids.device)).all(-1)
                bias[:, last] += rows.to(scores.dtype) * value
            else:
                bias[:, last] += value
        return scores + bias


class EpsilonCutoff:
    """Truncation sampling: drop tokens whose probability is below epsilon (the most likely always stays)."""

    def __init__(self, epsilon: float, min_tokens_to_keep: int = 1):
        if not 0 < epsilon < 1:
            raise ValueError(f"`epsilon_cutoff` has to be a float > 0 and < 1, but is {epsilon}")
        self.epsilon, self.keep = epsilon, min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return _drop_below(scores, self.epsilon, self.keep)


class EtaCutoff:
    """Eta sampling: the cutoff is min(eta, sqrt(eta) * exp(-entropy)) of the row's distribution."""

    def __init__(self, eta: float, min_tokens_to_keep: int = 1):
        if not 0 < eta < 1:
            raise ValueError(f"`eta_cutoff` has to be a float > 0 and < 1, but is {eta}")
        self.eta, self.keep = eta, min_tokens_to_keep

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        entropy = torch.distributions.Categorical(logits=scores).entropy()
        cutoff = torch.min(torch.tensor(self.eta, device=scores.device), math.sqrt(self.eta) * torch.exp(-entropy))
        return _drop_below(scores, cutoff[..., None], self.keep)


def _drop_below(scores: torch.Tensor, cutoff: float | torch.Tensor, keep: int) -> torch.Tensor:
    """-inf where the probability is below `cutoff`, except the `keep` highest scores."""
    remove = scores.softmax(dim=-1) < cutoff
    kth_best = torch.topk(scores, min(keep, scores.shape[-1]))[0][..., -1, None]
    return scores.masked_fill(remove & (scores < kth_best), -math.inf)
