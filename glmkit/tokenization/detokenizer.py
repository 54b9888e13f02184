"""Streaming detokenization: text as generated ids arrive, without re-decoding the text so far.

`decode` is not a concatenation of per-token strings: sentencepiece drops the first word's leading
space, byte-level BPE splits characters across tokens, byte-fallback runs decode all or nothing,
XGLM strips both ends, the slow tokenizers put spaces around added tokens. So the new text is found by
decoding a short window: the ids since the last *cut*, after one id of context (the id before the
cut), minus the context's own text. A cut goes after an id once nothing that follows can change the
text before it:

- byte-level backends (GLM-4's tiktoken vocabulary, byte-level tokenizer.json): whenever the UTF-8
  stream is between characters, tracked on the ids' bytes (so broken UTF-8 never grows the window);
- the others: after an id that is not special, not a byte-fallback piece (`<0x..>`), and decodes on
  its own to text that ends in neither whitespace nor U+FFFD.

The window is the ids since the last cut: a few, whatever the length of the text. With
clean_up_tokenization_spaces the clean-up runs on the emitted text, holding back only the last
characters a clean-up rule could still join to what follows. One decode reaches back further: the
legacy Llama one (Persimmon, kept special tokens) puts a space *before* the run of pieces ahead of a
special token, so there the run's text (decoded in windows as usual) waits until the run ends.
"""

from __future__ import annotations

import codecs
import functools
import re
from collections.abc import Iterable, Sequence
from typing import Any

from .base import SPIECE_UNDERLINE, _cleanup, _to_list

__all__ = ["StreamingDetokenizer", "streaming_detokenizer"]

_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# Every clean-up rule (" ." ... " 're") is a space and then text; only these characters can start one
# or sit inside one before its end, so text can be cleaned up to any character not among them.
_CLEANUP_JOINS = " 'nvr"


class StreamingDetokenizer:
    """Incremental `tokenizer.decode`: `add(id)` returns the text that no later id can change.

    For any ids, ``"".join(map(add, ids)) + finalize() == tokenizer.decode(ids, skip_special_tokens=...)``;
    with `prefix_ids` the same text is ``decode(prefix_ids + ids)[len(decode(prefix_ids)):]``. Partial
    UTF-8 characters are held back until complete (finalize() decodes what is left as decode does).
    Works with any tokenizer that has the reference decode API, glmkit's or a transformers one.
    """

    def __init__(
        self,
        tokenizer: Any,
        skip_special_tokens: bool = True,
        prefix_ids: Sequence[int] | None = None,
        **decode_kwargs: Any,
    ) -> None:
        clean = decode_kwargs.pop("clean_up_tokenization_spaces", None)
        if clean is None:
            clean = getattr(tokenizer, "clean_up_tokenization_spaces", False)
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.prefix_ids = [int(i) for i in _to_list(prefix_ids if prefix_ids is not None else [])]
        self._clean = bool(clean)
        self._kwargs = {"skip_special_tokens": skip_special_tokens, **decode_kwargs}
        units = getattr(tokenizer, "_stream_byte_units", None)
        self._units = units(skip_special_tokens) if units is not None else None
        self._special = set(tokenizer.all_special_ids)
        breaks = getattr(tokenizer, "_stream_run_breaks", None) or functools.partial(_run_breaks, tokenizer)
        self._breaks, self._run_ends = breaks(skip_special_tokens)
        self._alone: dict[int, str] = {}  # id -> decode([id])
        self._ends_word: dict[int, bool] = {}  # id -> may a cut follow it (non-byte-level rule)
        self.reset()

    # ---- public API ------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget all ids and text and start again (from `prefix_ids`, when given)."""
        self._context: list[int] = []
        self._context_text = ""
        self._window: list[int] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._held = ""  # final text that clean-up may still change
        self._run: list[str] = []  # (legacy Llama) the run's text, waiting to learn if a space precedes it
        self._cut_in_run = False  # whether the context id lies in that run
        self._chunks: list[str] = []
        self._to_skip = 0
        if self.prefix_ids:
            self._to_skip = len(self._decode(self.prefix_ids, clean=self._clean))
            for index in self.prefix_ids:
                self._emit(self._push(index))

    def add(self, token_id: int) -> str:
        """Take one id; return the text it made final (often "", e.g. in the middle of a character)."""
        return self._emit(self._push(int(token_id)))

    def add_many(self, ids: Iterable[int]) -> str:
        """`add` each id (a list, or a 1-D tensor); return the text they made final."""
        return "".join([self.add(i) for i in _to_list(ids)])

    def finalize(self) -> str:
        """The text held back so far, decoded as if the ids ended here; ends the stream."""
        raw = self._pending()
        self._context, self._context_text, self._window, self._run, self._cut_in_run = [], "", [], [], False
        self._utf8.reset()
        return self._emit(raw, final=True)

    def peek(self) -> str:
        """What finalize() would return now, without ending the stream."""
        raw = self._pending()
        if self._clean:
            raw = _cleanup(self._held + raw)
        return raw[self._to_skip :]

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._chunks) > 1:
            self._chunks = ["".join(self._chunks)]
        return self._chunks[0] if self._chunks else ""

    # ---- the window ------------------------------------------------------------------------------
    def _decode(self, ids: list[int], clean: bool = False) -> str:
        return self.tokenizer.decode(ids, clean_up_tokenization_spaces=clean, **self._kwargs)

    def _decode_alone(self, index: int) -> str:
        text = self._alone.get(index)
        if text is None:
            text = self._alone[index] = self._decode([index])
        return text

    def _push(self, index: int) -> str:
        """Add `index` to the window; at a cut, return the window's text (before clean-up)."""
        self._window.append(index)
        if index in self._breaks or index in self._run_ends:
            return self._end_run(space=index in self._breaks)
        if not self._may_cut_after(index):
            return ""
        text = self._decode(self._context + self._window)
        if not text.startswith(self._context_text) or (self._units is None and text.endswith("\ufffd")):
            return ""  # (the first only for a foreign decoder that context does not fix)
        new = text[len(self._context_text) :]
        self._context, self._context_text, self._window = [index], self._decode_alone(index), []
        if self._breaks:  # a special token may yet put a space in front of the run
            self._run.append(new)
            self._cut_in_run = True
            return ""
        return new

    def _end_run(self, space: bool) -> str:
        """(legacy Llama) A special token ends the run of pieces, putting a space before it when the
        run has any (`space`); a run also ends, without one, at a token that decodes apart."""
        text = self._decode(self._context + self._window)
        start = len(self._context_text)
        if space and self._cut_in_run:  # the space went before the context id: the run starts earlier
            start += 1
        new = (" " if space and self._cut_in_run else "") + "".join(self._run) + text[start:]
        # two ids of context: the one after them is then never the segment's second (whose rule differs)
        self._context = (self._context + self._window)[-2:]
        self._context_text, self._window, self._run, self._cut_in_run = self._decode(self._context), [], [], False
        return new

    def _pending(self) -> str:
        run = "".join(self._run)
        if not self._window:
            return run
        return run + self._decode(self._context + self._window)[len(self._context_text) :]

    def _may_cut_after(self, index: int) -> bool:
        if self._units is None:
            ok = self._ends_word.get(index)
            if ok is None:
                ok = self._ends_word[index] = self._ends_cleanly(index)
            return ok
        unit = self._units(index)
        if unit is None:  # adds nothing (a skipped special): the byte stream runs on through it
            return False
        if isinstance(unit, str):  # decoded on its own: it ends any byte run
            self._utf8.reset()
        else:
            self._utf8.decode(unit)
        return bool(unit) and not self._utf8.getstate()[0]

    def _ends_cleanly(self, index: int) -> bool:
        """Nothing after `index` changes the text up to it (tokenizers that are not byte-level)."""
        if index in self._special:  # skipped it adds nothing; kept, the spaces around it vary
            return False
        text = self._decode_alone(index)
        if not text or text[-1].isspace() or text[-1] == "\ufffd":
            return False
        piece = self.tokenizer.convert_ids_to_tokens(index)
        if not isinstance(piece, str):
            return True
        return not (_BYTE_PIECE.fullmatch(piece) or piece[-1:].isspace() or piece.endswith(SPIECE_UNDERLINE))

    def _emit(self, raw: str, final: bool = False) -> str:
        """Clean up (holding back what a rule could still change), drop the prefix's text, record."""
        if self._clean:
            held = self._held + raw
            end = len(held)
            while not final and end and held[end - 1] in _CLEANUP_JOINS:
                end -= 1
            self._held, raw = held[end:], _cleanup(held[:end])
        if self._to_skip and raw:
            cut = min(self._to_skip, len(raw))
            self._to_skip -= cut
            raw = raw[cut:]
        if raw:
            self._chunks.append(raw)
        return raw


def _run_breaks(tokenizer: Any, skip_special_tokens: bool) -> tuple[set[int], set[int]]:
    """`_stream_run_breaks` for transformers' slow LlamaTokenizer, whose legacy decode glmkit copies."""
    if skip_special_tokens or type(tokenizer).__name__ != "LlamaTokenizer" or not getattr(tokenizer, "legacy", 0):
        return set(), set()
    special = set(tokenizer.all_special_tokens)
    alone = (set(tokenizer.get_added_vocab()) - special) | {
        t for t in tokenizer.additional_special_tokens if tokenizer.convert_tokens_to_ids(t) >= tokenizer.vocab_size
    }
    ids = tokenizer.convert_tokens_to_ids
    return set(ids(sorted(special - alone))), set(ids(sorted(alone)))


def streaming_detokenizer(
    tokenizer: Any, skip_special_tokens: bool = True, prefix_ids: Sequence[int] | None = None, **decode_kwargs: Any
) -> StreamingDetokenizer:
    """`tokenizer.streaming_detokenizer(...)` where it has one, else a `StreamingDetokenizer` over its
    decode (e.g. for a transformers tokenizer)."""
    make = getattr(tokenizer, "streaming_detokenizer", None)
    if make is not None:
        return make(skip_special_tokens, prefix_ids, **decode_kwargs)
    return StreamingDetokenizer(tokenizer, skip_special_tokens, prefix_ids, **decode_kwargs)
