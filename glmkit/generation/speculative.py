"""Draft proposers for speculative decoding (the verification is `engine._speculative_steps`).

`PromptLookup` copies what followed the latest earlier occurrence of the text's last n-gram (prompt
lookup decoding: strong when the output repeats or edits the input); `AssistantDrafter` lets a smaller
model with the same vocabulary propose greedily. Either way the main model checks every proposed token
in one forward pass, so the output is the main model's own.
"""

from __future__ import annotations

from typing import Any

import torch

from .engine import Decoder, forward_tokens


class PromptLookup:
    """Propose up to `max_tokens` ids that followed the most recent earlier occurrence of the sequence's
    last n-gram (n from `max_ngram` down to 1). An index of n-gram -> continuation keeps each proposal
    O(1) in the sequence length."""

    def __init__(self, max_tokens: int, max_ngram: int = 2):
        if max_tokens < 1 or max_ngram < 1:
            raise ValueError(f"prompt_lookup_num_tokens and max_matching_ngram_size must be >= 1, got "
                             f"{max_tokens} and {max_ngram}")  # fmt: skip
        self.max_tokens, self.max_ngram = max_tokens, max_ngram
        self.history: list[int] = []
        self.index: list[dict[tuple[int, ...], int]] = [{} for _ in range(max_ngram + 1)]

    def _extend(self, ids: torch.Tensor) -> None:
        hist = self.history
        if len(hist) > ids.shape[1] or (hist and hist[-1] != int(ids[0, len(hist) - 1])):
            raise RuntimeError("prompt lookup history diverged from the sequence")  # the loop only appends
        for token in ids[0, len(hist) :].tolist():
            p = len(hist)  # `token` is the continuation of every n-gram ending at p - 1
            for n in range(1, min(self.max_ngram, p) + 1):
                self.index[n][tuple(hist[p - n : p])] = p
            hist.append(token)

    def propose(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        self._extend(ids)
        hist = self.history
        for n in range(min(self.max_ngram, len(hist)), 0, -1):
            start = self.index[n].get(tuple(hist[-n:]))
            if start is not None:
                return ids.new_tensor([hist[start : start + k]])
        return ids.new_empty((1, 0))

    def accepted(self, kept: int, proposed: int) -> None:
        pass


class AssistantDrafter:
    """A smaller model drafts greedily on a cache of its own, stopping early where it is unsure (its
    top probability under `confidence`). Its cache is rewound to what the main model kept."""

    def __init__(self, assistant: Any, capacity: int, max_tokens: int = 20, confidence: float | None = 0.4,
                 schedule: str = "constant"):  # fmt: skip
        if schedule not in ("constant", "heuristic"):
            raise ValueError(f"num_assistant_tokens_schedule must be 'constant' or 'heuristic', got {schedule!r}")
        self.decoder = Decoder(assistant, capacity)
        self.max_tokens, self.confidence, self.schedule = max_tokens, confidence, schedule
        self.fed = torch.empty(1, 0, dtype=torch.long)  # the ids in the assistant's cache

    def propose(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        n = min(self.fed.shape[1], ids.shape[1])
        same = int((self.fed[:, :n].to(ids.device) == ids[:, :n]).long().cumprod(-1).sum()) if n else 0
        same = min(same, ids.shape[1] - 1)  # feed at least one token: its logits start the draft
        self.decoder.cache.rewind(self.fed.shape[1] - same)
        model = self.decoder.model
        logits = forward_tokens(model, self.decoder.cache, ids[:, same:])
        self.fed = ids.clone()
        draft: list[torch.Tensor] = []
        for i in range(k):
            token = logits.argmax(-1)  # (1,)
            draft.append(token)
            if i + 1 == k or (self.confidence is not None
                              and float(torch.softmax(logits, -1).max()) < self.confidence):  # fmt: skip
                break
            logits = forward_tokens(model, self.decoder.cache, token[:, None])
            self.fed = torch.cat([self.fed, token[:, None]], dim=1)
        return torch.stack(draft, dim=1) if draft else ids.new_empty((1, 0))

    def accepted(self, kept: int, proposed: int) -> None:
        if self.schedule == "heuristic":
            self.max_tokens = self.max_tokens + 2 if kept == proposed else max(1, self.max_tokens - 1)
