"""The reference's "slow" front end: added tokens (all special tokens among them) are split out of the
text first, each remaining chunk goes to a model-specific `_tokenize_chunk`; decoding keeps
non-special added tokens as separate pieces. Sentencepiece (XGLM, Llama) and GLM-4's tiktoken
vocabulary build on it."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Any

from .base import AddedToken, Tokenizer

logger = logging.getLogger(__name__)


class SlowTokenizer(Tokenizer):
    """Reference-style slow tokenizer: added tokens (all special tokens among them) are matched in the
    text first; each remaining chunk goes to `_tokenize_chunk`."""

    def __init__(
        self,
        *,
        added_tokens_decoder: dict[int, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.added_tokens_decoder: dict[int, AddedToken] = {
            int(i): AddedToken.coerce(t, special=False) for i, t in (added_tokens_decoder or {}).items()
        }
        self._refresh_added()
        self._register(self.all_special_tokens_extended, special=True)

    def _refresh_added(self) -> None:
        self._added_encoder = {t.content: i for i, t in sorted(self.added_tokens_decoder.items())}
        contents = sorted(self._added_encoder, key=len, reverse=True)  # longest match at a position wins
        self._added_re = re.compile("|".join(map(re.escape, contents))) if contents else None
        self._total_size = len(self.get_vocab())  # len(tok), cached as in the reference

    def _register(self, tokens: Iterable[AddedToken], special: bool) -> int:
        vocab = self.get_vocab()
        start, count = len(vocab), 0
        for tok in tokens:
            if tok.content in self._added_encoder or not tok.content:
                continue
            if special:
                tok = AddedToken(tok.content, tok.single_word, tok.lstrip, tok.rstrip, tok.normalized, True)
            if tok.content in vocab:
                index = vocab[tok.content]
            else:
                index = vocab[tok.content] = start + count
                count += 1
            if tok.special and str(tok) not in self.all_special_tokens:
                self._additional.append(tok)
            self.added_tokens_decoder[index] = tok
            self._added_encoder[tok.content] = index
        self._refresh_added()
        return count

    def _on_special_tokens_changed(self) -> int:
        return self._register(self.all_special_tokens_extended, special=True)

    def _add_special(self, tokens: list[AddedToken]) -> int:
        return self._register(tokens, special=True)

    def add_tokens(self, tokens: str | list[str], special_tokens: bool = False) -> int:
        """Add tokens (appended after the vocabulary); returns how many were new."""
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        return self._register([AddedToken.coerce(t, special=special_tokens) for t in tokens], special_tokens)

    # ---- model hooks ----------------------------------------------------------------------------
    def _tokenize_chunk(self, text: str) -> list[Any]:
        raise NotImplementedError

    def _convert_token_to_id(self, token: Any) -> int | None:
        raise NotImplementedError

    def _convert_id_to_token(self, index: int) -> Any:
        raise NotImplementedError

    def convert_tokens_to_string(self, tokens: list[Any]) -> str:
        raise NotImplementedError

    # ---- vocab ------------------------------------------------------------------------------------
    def _token_to_id(self, token: Any) -> int | None:
        if isinstance(token, str) and token in self._added_encoder:
            return self._added_encoder[token]
        return self._convert_token_to_id(token)

    def _id_to_token(self, index: int) -> Any:
        tok = self.added_tokens_decoder.get(index)
        return tok.content if tok is not None else self._convert_id_to_token(index)

    def convert_tokens_to_ids(self, tokens: Any) -> Any:
        if isinstance(tokens, (str, bytes)):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def get_vocab(self) -> dict[Any, int]:
        vocab = {self._convert_id_to_token(i): i for i in range(self.vocab_size)}
        vocab.update(getattr(self, "_added_encoder", {}))
        return vocab

    def get_added_vocab(self) -> dict[str, int]:
        return dict(self._added_encoder)

    def __len__(self) -> int:
        return self._total_size

    # ---- encoding -------------------------------------------------------------------------------
    def _split_added(self, text: str) -> list[tuple[str, bool]]:
        """Split text into (chunk, is_added_token), honouring lstrip/rstrip/single_word like the reference."""
        if self.split_special_tokens or self._added_re is None:
            return [(text, False)]
        parts: list[list[Any]] = []
        pos = 0
        for m in self._added_re.finditer(text):
            parts += [[text[pos : m.start()], False], [m.group(), True]]
            pos = m.end()
        parts.append([text[pos:], False])
        for i, (chunk, is_added) in enumerate(parts):
            if not is_added:
                continue
            tok = self.added_tokens_decoder[self._added_encoder[chunk]]
            left = parts[i - 1] if i > 0 else None
            right = parts[i + 1] if i + 1 < len(parts) else None
            if tok.rstrip and right and right[0]:
                right[0] = right[0].lstrip()
            if tok.lstrip and left and left[0]:
                left[0] = left[0].rstrip()
            if tok.single_word and left and left[0] and left[0][-1] != " ":
                left[0] += chunk
                parts[i] = ["", True]
            elif tok.single_word and right and right[0] and right[0][0] != " ":
                right[0] = chunk + right[0]
                parts[i] = ["", True]
        return [(c, a) for c, a in parts if c]

    def _tokenize_text(self, text: str) -> list[Any]:
        """Token list of `text` (added tokens as strings, the rest from the model)."""
        out: list[Any] = []
        for chunk, is_added in self._split_added(text):
            out += [chunk] if is_added else self._tokenize_chunk(chunk)
        return out

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[Any]:
        if pair is not None or add_special_tokens:
            return super().tokenize(text, pair, add_special_tokens)
        return self._tokenize_text(text)

    def _encode_text(self, text: str) -> list[int]:
        return [self._token_to_id(t) for t in self.tokenize(text)]

    def _truncate(
        self, ids: list[int], pair: list[int] | None, n: int, strategy: str
    ) -> tuple[list[int], list[int] | None]:
        left = self.truncation_side == "left"

        def cut(seq: list[int], k: int) -> list[int]:
            return seq[k:] if left else seq[:-k]

        if strategy == "only_first" or (strategy == "longest_first" and pair is None):
            if len(ids) > n:
                return cut(ids, n), pair
        elif strategy == "longest_first":
            for _ in range(n):
                if len(ids) > len(pair):
                    ids = cut(ids, 1)
                else:
                    pair = cut(pair, 1)
            return ids, pair
        elif strategy == "only_second" and pair is not None and len(pair) > n:
            return ids, cut(pair, n)
        logger.warning(
            "cannot remove %d tokens with truncation=%r: the sequence is too short; left "
            "untruncated (as the reference does)",
            n,
            strategy,
        )
        return ids, pair

    def _encode_batch(
        self,
        pairs: list[tuple[str, str | None]],
        add_special_tokens: bool,
        truncation: str,
        max_length: int | None,
        stride: int,
    ) -> list[dict[str, list[int]]]:
        out = []
        for a, b in pairs:
            ids = self._encode_text(a)
            pair = None if b is None else self._encode_text(b)
            total = (
                len(ids)
                + len(pair or [])
                + (self.num_special_tokens_to_add(pair is not None) if add_special_tokens else 0)
            )
            if truncation != "do_not_truncate" and max_length and total > max_length:
                ids, pair = self._truncate(ids, pair, total - max_length, truncation)
            if add_special_tokens:
                input_ids = self.build_inputs_with_special_tokens(ids, pair)
                types = self.create_token_type_ids_from_sequences(ids, pair)
                mask = self.get_special_tokens_mask(ids, pair)
            else:
                input_ids = ids + (pair or [])
                types = [0] * len(input_ids)
                mask = [0] * len(input_ids)
            out.append({"input_ids": input_ids, "token_type_ids": types, "special_tokens_mask": mask})
        return out

    # ---- decoding -------------------------------------------------------------------------------
    def _legacy_added(self, special: set[str]) -> set[str]:
        """Added tokens that decode as pieces of their own: the non-special ones, and the additional
        special tokens beyond the model's vocabulary."""
        return (set(self._added_encoder) - special) | {
            t for t in self.additional_special_tokens if self.convert_tokens_to_ids(t) >= self.vocab_size
        }

    def _decode(
        self,
        ids: list[int],
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool = True,
        **kwargs: Any,
    ) -> str:
        """The reference slow decode: non-special added tokens are kept as separate pieces."""
        special = set(self.all_special_tokens)
        legacy_added = self._legacy_added(special)
        pieces: list[str] = []
        current: list[Any] = []
        for token in self.convert_ids_to_tokens(ids, skip_special_tokens=skip_special_tokens):
            if skip_special_tokens and isinstance(token, str) and token in special:
                continue
            if isinstance(token, str) and token in legacy_added:
                if current:
                    piece = self.convert_tokens_to_string(current)
                    if piece:
                        pieces.append(piece)
                    current = []
                pieces.append(token)
            else:
                current.append(token)
        if current:
            pieces.append(self.convert_tokens_to_string(current))
        return (" " if spaces_between_special_tokens else "").join(pieces)
