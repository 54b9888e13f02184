"""Stop strings: a row stops when a stop string appears in its text overlapping the newest token
(the reference's rule: text already present before that token never triggers a stop)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class StopStrings:
    def __init__(self, stop_strings: str | Sequence[str], tokenizer: Any):
        if tokenizer is None:
            raise ValueError("stop_strings needs the tokenizer: pass tokenizer=... to generate()")
        self.stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not self.stops or not all(isinstance(s, str) and s for s in self.stops):
            raise ValueError(f"stop_strings must be non-empty strings, got {stop_strings!r}")
        self.tokenizer = tokenizer
        self.longest = max(len(s) for s in self.stops)
        self._piece_cache: dict[int, str] = {}

    def _piece(self, token: int) -> str:
        if token not in self._piece_cache:
            tokens = self.tokenizer.convert_ids_to_tokens([token])
            self._piece_cache[token] = self.tokenizer.convert_tokens_to_string(tokens)
        return self._piece_cache[token]

    def row_done(self, tokens: list[int]) -> bool:
        """tokens: the row so far. Joins just enough trailing token pieces to see every overlap."""
        last = self._piece(tokens[-1])
        text, i = last, len(tokens) - 1
        while len(text) - len(last) < self.longest - 1 and i > 0:
            i -= 1
            text = self._piece(tokens[i]) + text
        before = len(text) - len(last)  # characters that precede the newest token
        return any(stop in text[max(0, before - len(stop) + 1) :] for stop in self.stops)
