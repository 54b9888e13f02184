"""Constraints for constrained beam search: words (token sequences) the output must contain.

The protocol is the reference's, so its own constraint objects work here unchanged: `advance()` (the token,
or list of tokens, that makes progress), `does_advance(t)`, `update(t) -> (stepped, completed, reset)`,
`reset()`, `remaining()`, `copy(stateful)`, and the attributes `seqlen` and `completed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

CONSTRAINT_METHODS = ("advance", "does_advance", "update", "reset", "remaining", "copy")


def _is_token_list(value: Any) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value))  # fmt: skip


class PhrasalConstraint:
    """The output must contain `token_ids`, contiguous and in order."""

    def __init__(self, token_ids: list[int]):
        if not _is_token_list(token_ids):
            raise ValueError(f"`token_ids` has to be a non-empty list of non-negative token ids, got {token_ids!r}")
        self.token_ids = token_ids
        self.seqlen = len(token_ids)
        self.fulfilled = -1  # index of the last matched token
        self.completed = False

    def advance(self) -> int | None:
        return None if self.completed else self.token_ids[self.fulfilled + 1]

    def does_advance(self, token_id: int) -> bool:
        return not self.completed and token_id == self.token_ids[self.fulfilled + 1]

    def update(self, token_id: int) -> tuple[bool, bool, bool]:
        if not self.does_advance(token_id):
            self.reset()
            return False, False, True
        self.fulfilled += 1
        self.completed = self.fulfilled == self.seqlen - 1
        return True, self.completed, False

    def reset(self) -> None:
        self.fulfilled, self.completed = -1, False

    def remaining(self) -> int:
        return self.seqlen - (self.fulfilled + 1)

    def copy(self, stateful: bool = False) -> PhrasalConstraint:
        new = PhrasalConstraint(self.token_ids)
        if stateful:
            new.fulfilled, new.completed = self.fulfilled, self.completed
        return new


class DisjunctiveConstraint:
    """The output must contain one of `nested_token_ids` (e.g. the spellings of one word). No option may be a
    prefix of another."""

    def __init__(self, nested_token_ids: list[list[int]]):
        if (not isinstance(nested_token_ids, list) or not nested_token_ids
                or not all(_is_token_list(ids) for ids in nested_token_ids)):  # fmt: skip
            raise ValueError("`nested_token_ids` has to be a non-empty list of non-empty lists of non-negative token "
                             f"ids, got {nested_token_ids!r}")  # fmt: skip
        self.trie: dict[int, dict] = {}
        for ids in nested_token_ids:
            node = self.trie
            for token in ids:
                node = node.setdefault(token, {})
        if _count_leaves(self.trie) != len(nested_token_ids):
            raise ValueError(
                f"no list in `nested_token_ids` may repeat or be a prefix of another: {nested_token_ids!r}"
            )
        self.token_ids = nested_token_ids
        self.seqlen = max(len(ids) for ids in nested_token_ids)
        self.current_seq: list[int] = []
        self.completed = False

    def _next_tokens(self) -> list[int]:
        node = self.trie
        for token in self.current_seq:
            node = node[token]
        return list(node)

    def advance(self) -> list[int] | None:
        return self._next_tokens() or None

    def does_advance(self, token_id: int) -> bool:
        return token_id in self._next_tokens()

    def update(self, token_id: int) -> tuple[bool, bool, bool]:
        stepped = self.does_advance(token_id)
        if stepped:
            self.current_seq.append(token_id)  # in place: stateful copies share this list (see `copy`)
        else:
            self.reset()
        self.completed = not self._next_tokens()
        return stepped, self.completed, not stepped

    def reset(self) -> None:
        self.current_seq, self.completed = [], False

    def remaining(self) -> int:
        return 0 if self.completed else self.seqlen - len(self.current_seq)

    def copy(self, stateful: bool = False) -> DisjunctiveConstraint:
        new = DisjunctiveConstraint(self.token_ids)
        if stateful:
            # the progress list is shared, not copied, as in the reference: when a beam branches inside a word,
            # each branch's step also lands in its siblings' list, and the reference's bank ranking (which beams
            # survive) depends on that
            new.current_seq, new.completed = self.current_seq, self.completed
        return new


def _count_leaves(node: dict) -> int:
    return sum(_count_leaves(child) for child in node.values()) if node else 1


class ConstraintProgress:
    """How far one hypothesis is through all constraints: done ones, the one in progress, the pending ones.
    `bank()` (constraint tokens produced so far) ranks beams in constrained beam search."""

    def __init__(self, constraints: Sequence[Any]):
        self.constraints = constraints
        self.max_seqlen = max(c.seqlen for c in constraints)
        self.completed = False
        self._start()

    def _start(self) -> None:
        self.done: list[Any] = []
        self.in_progress: Any = None
        self.pending = [c.copy(stateful=False) for c in self.constraints]

    def bank(self) -> int:
        partial = self.max_seqlen - self.in_progress.remaining() if self.in_progress is not None else 0
        return len(self.done) * self.max_seqlen + partial

    def advance(self) -> list[int]:
        """Tokens that make progress: the in-progress constraint's next, else every pending one's first."""
        tokens: list[int] = []
        for constraint in [self.in_progress] if self.in_progress is not None else self.pending:
            step = constraint.advance()
            tokens += step if isinstance(step, list) else [] if step is None else [step]
        return tokens

    def reset(self, token_ids: Sequence[int]) -> None:
        """The progress after `token_ids` (the whole row: prompt words count)."""
        self._start()
        for token in token_ids:
            self.add(token)
            if self.completed:
                break

    def add(self, token_id: int) -> None:
        if self.completed:
            return
        if self.in_progress is not None:
            # a token that breaks the word in progress starts nothing new (the reference's rule)
            _, complete, reset = self.in_progress.update(token_id)
            if reset:
                self.pending.append(self.in_progress.copy(stateful=False))
                self.in_progress = None
            elif complete:
                self.done.append(self.in_progress)
                self.in_progress = None
                self.completed = not self.pending
            return
        for i, constraint in enumerate(self.pending):
            if constraint.does_advance(token_id):
                _, complete, _ = constraint.update(token_id)
                if complete:
                    self.done.append(constraint)
                else:
                    self.in_progress = constraint
                del self.pending[i]
                self.completed = not self.pending and self.in_progress is None
                return

    def copy(self) -> ConstraintProgress:
        new = ConstraintProgress(self.constraints)
        new.done = [c.copy(stateful=True) for c in self.done]
        new.in_progress = self.in_progress.copy(stateful=True) if self.in_progress is not None else None
        new.pending = [c.copy() for c in self.pending]
        return new


def build_constraints(force_words_ids: Any, constraints: Any) -> list[Any]:
    """`constraints` (objects with the constraint protocol) followed by one constraint per `force_words_ids`
    entry: a list of ids is a phrase, a list of lists of ids a choice between phrases. Raises on malformed input."""
    built = []
    if constraints is not None:
        if not isinstance(constraints, (list, tuple)) or not constraints:
            raise ValueError(f"`constraints` has to be a non-empty list of constraints, got {constraints!r}")
        for c in constraints:
            missing = [m for m in (*CONSTRAINT_METHODS, "seqlen") if not hasattr(c, m)]
            if missing:
                raise TypeError(f"`constraints` entry {c!r} is not a constraint: it lacks {', '.join(missing)}")
        built += list(constraints)
    if force_words_ids is not None:
        malformed = ValueError("`force_words_ids` has to be a non-empty list[list[int]] or list[list[list[int]]] of "
                               f"non-negative token ids, got {force_words_ids!r}")  # fmt: skip
        if not isinstance(force_words_ids, list) or not force_words_ids:
            raise malformed
        for word in force_words_ids:
            if not isinstance(word, list) or not word:
                raise malformed
            try:
                built.append(DisjunctiveConstraint(word) if isinstance(word[0], list) else PhrasalConstraint(word))
            except ValueError as err:
                raise ValueError(f"{malformed} ({err})") from err
    return built
