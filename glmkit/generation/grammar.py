"""Constrained decoding with llguidance: a grammar (JSON schema or Lark) decides which tokens may come next.

The grammar engine sees the vocabulary as bytes: every token's bytes (byte-level BPE and tiktoken
vocabularies as they are, sentencepiece pieces with `▁` as a space and `<0xNN>` as that byte) and the
special tokens as b"\\xff" + their text, llguidance's mark for a special token, so a Lark grammar can name
`<|assistant|>`. Each request gets its own `Constraint`; the vocabulary is converted once per tokenizer.
"""

from __future__ import annotations

import json
import re
import weakref
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["Constraint", "GrammarError", "grammar_tokenizer", "json_grammar", "lark_grammar", "token_bytes"]

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_SPECIAL_MARK = b"\xff"
# JSON a model writes may break lines and indent; bounded so a grammar cannot loop on whitespace
_WHITESPACE = r"( ?|\n {0,16})"  # one space, or a line break and an indent
_TOKENIZERS: weakref.WeakKeyDictionary[Any, dict[int, Any]] = weakref.WeakKeyDictionary()


class GrammarError(ValueError):
    """A grammar that does not compile, or output the grammar cannot accept."""


def _llguidance() -> Any:
    try:
        import llguidance
    except ImportError as err:
        raise ImportError("constrained decoding needs llguidance: pip install 'glmkit[grammar]'") from err
    return llguidance


def token_bytes(tokenizer: Any, vocab_size: int) -> list[bytes]:
    """The bytes of every id below `vocab_size` as the grammar engine needs them (see the module doc)."""
    special = {int(i) for i in getattr(tokenizer, "all_special_ids", [])}
    units = getattr(tokenizer, "_stream_byte_units", None)
    unit = units(False) if units is not None else None
    out = []
    for index in range(vocab_size):
        piece = unit(index) if unit is not None else _piece_bytes(tokenizer, index, index in special)
        if isinstance(piece, str):  # an added token, decoded apart from the byte stream
            piece = _SPECIAL_MARK + piece.encode() if index in special else piece.encode()
        elif index in special and piece is not None:
            piece = _SPECIAL_MARK + piece
        out.append(piece or b"")
    return out


def _piece_bytes(tokenizer: Any, index: int, special: bool) -> bytes | str | None:
    """A sentencepiece-style token's bytes; a special token's text as str."""
    piece = tokenizer.convert_ids_to_tokens(index)
    if piece is None:
        return None
    if special:
        return piece
    byte = _BYTE_PIECE.fullmatch(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return piece.replace("\u2581", " ").encode()


class _Vocabulary:
    """The glmkit tokenizer as llguidance's TokenizerWrapper expects it (tokens, eos, encode)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.tokens = token_bytes(tokenizer, vocab_size)
        self.eos_token_id = int(eos_ids[0]) if eos_ids else int(tokenizer.eos_token_id)
        self.bos_token_id = getattr(tokenizer, "bos_token_id", None)
        self.special_token_ids = sorted(i for i in getattr(tokenizer, "all_special_ids", []) if i < vocab_size)
        self._by_bytes = {t: i for i, t in enumerate(self.tokens) if t and not t.startswith(_SPECIAL_MARK)}
        self._longest = max((len(t) for t in self._by_bytes), default=1)

    def __call__(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if b"".join(self.tokens[i] for i in ids if i < len(self.tokens)) == text.encode():
            return list(ids)
        return self._greedy(text.encode())  # e.g. sentencepiece adds a leading space the text lacks

    def _greedy(self, data: bytes) -> list[int]:
        ids, start = [], 0
        while start < len(data):
            for end in range(min(len(data), start + self._longest), start, -1):
                index = self._by_bytes.get(data[start:end])
                if index is not None:
                    ids.append(index)
                    start = end
                    break
            else:
                raise GrammarError(f"the vocabulary cannot spell byte {data[start:start + 1]!r}")
        return ids


def grammar_tokenizer(tokenizer: Any, vocab_size: int, eos_ids: Sequence[int]) -> Any:
    """llguidance's tokenizer for this one (built once per tokenizer and vocabulary size)."""
    llg = _llguidance()
    by_size = _TOKENIZERS.setdefault(tokenizer, {})
    if vocab_size not in by_size:
        vocabulary = _Vocabulary(tokenizer, vocab_size, list(eos_ids))
        by_size[vocab_size] = llg.LLTokenizer(llg.TokenizerWrapper(vocabulary), n_vocab=vocab_size,
                                              eos_token=sorted(eos_ids) or None)  # fmt: skip
    return by_size[vocab_size]


def json_grammar(schema: dict[str, Any] | None = None, prefix: str = "") -> str:
    """A grammar for one JSON value (an object when `schema` is None, as OpenAI's json_object), after
    the literal `prefix`."""
    llg = _llguidance()
    schema = dict(schema) if schema is not None else {"type": "object"}
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    options = {"whitespace_pattern": _WHITESPACE}
    if not prefix:
        try:
            return llg.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except ValueError as err:
            raise GrammarError(f"invalid JSON schema: {err}") from err
    schema["x-guidance"] = options
    return lark_grammar(f"start: {json.dumps(prefix)} %json {json.dumps(schema)}")


def lark_grammar(lark: str) -> str:
    """A grammar from Lark source (llguidance's dialect: `%json {...}`, special tokens as `<|name|>`)."""
    return _llguidance().LLMatcher.grammar_from_lark(lark)


class Constraint:
    """One request's grammar state: which tokens may come next, and the tokens taken so far."""

    def __init__(self, grammar: str, tokenizer: Any) -> None:
        llg = _llguidance()
        problem = llg.LLMatcher.validate_grammar(grammar, tokenizer)
        if problem and not problem.startswith("WARNING"):
            raise GrammarError(f"the grammar does not compile: {problem}")
        self._matcher = llg.LLMatcher(tokenizer, grammar, log_level=0)
        self._vocab_size = tokenizer.vocab_size
        self._mask = torch.empty((self._vocab_size + 31) // 32, dtype=torch.int32)
        self._bits = torch.arange(32, dtype=torch.int32)

    @property
    def done(self) -> bool:
        """The grammar is complete and accepts nothing more (only EOS may follow)."""
        return self._matcher.is_stopped()

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens the grammar accepts next."""
        self._matcher.unsafe_compute_mask_ptr(self._mask.data_ptr(), self._mask.numel() * 4)
        bits = (self._mask.unsqueeze(1) >> self._bits) & 1  # (words, 32)
        return bits.flatten()[: self._vocab_size].bool()

    def mask(self, scores: torch.Tensor) -> torch.Tensor:
        """scores (V',) with every token the grammar rejects set to -inf (ids past its vocabulary too).
        Raises GrammarError when no token can continue (e.g. the vocabulary cannot spell what must come)."""
        allowed = self.allowed()
        if self._matcher.is_error() or not bool(allowed.any()):
            raise GrammarError(f"constrained decoding is stuck: {self._problem()}")
        allowed = allowed.to(scores.device)
        if scores.shape[-1] > allowed.shape[0]:
            allowed = torch.cat([allowed, allowed.new_zeros(scores.shape[-1] - allowed.shape[0])])
        return scores.masked_fill(~allowed[: scores.shape[-1]], float("-inf"))

    def advance(self, token: int) -> None:
        """Take a token; one the grammar rejects raises GrammarError."""
        if not self._matcher.consume_token(int(token)):
            raise GrammarError(f"token {token} breaks the grammar: {self._problem()}")

    def _problem(self) -> str:
        """The matcher's error in a line (an error raised in our vocabulary comes back inside a panic dump)."""
        error = self._matcher.get_error()
        if not error:
            return "no token of the vocabulary can continue the grammar"
        ours = re.search(r'GrammarError\("(.*?)"\)', error)
        return ours.group(1) if ours else error.splitlines()[0][:300]
