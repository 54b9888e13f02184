"""Sentencepiece tokenizers: XGLM's (fairseq id offset, `<madeupword{i}>` tokens) and the Llama
convention Persimmon uses (legacy and non-legacy), plus the special-token layouts that their
tokenizer.json variants in fast.py share."""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

from .base import SPIECE_UNDERLINE, Tokenizer, TokenizerFileError
from .slow import SlowTokenizer

XGLM_SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "sep_token": "</s>",
    "cls_token": "<s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
}
LLAMA_SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _with_madeup_words(additional: Any) -> list[Any]:
    """XGLM's additional special tokens: the given ones, then the seven `<madeupword{i}>` not among them."""
    extra = list(additional or [])
    return extra + [w for w in (f"<madeupword{i}>" for i in range(7)) if w not in map(str, extra)]


class _XGLMLayout:
    """XGLM's special-token layout: `</s> X` and `</s> A </s> </s> B`."""

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        sep = [self.sep_token_id]
        return sep + token_ids_0 if token_ids_1 is None else sep + token_ids_0 + sep + sep + token_ids_1

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return Tokenizer.get_special_tokens_mask(self, token_ids_0, token_ids_1, True)
        if token_ids_1 is None:
            return [1] + [0] * len(token_ids_0)
        return [1] + [0] * len(token_ids_0) + [1, 1] + [0] * len(token_ids_1)

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """XGLM does not use segment ids: all zeros."""
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))


class _LlamaLayout:
    """Llama/Persimmon layout: optional BOS before and EOS after each sequence."""

    def _bos_eos(self, mark_bos: Any, mark_eos: Any) -> tuple[list[Any], list[Any]]:
        return ([mark_bos] if self.add_bos_token else []), ([mark_eos] if self.add_eos_token else [])

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos, eos = self._bos_eos(self.bos_token_id, self.eos_token_id)
        out = bos + token_ids_0 + eos
        return out if token_ids_1 is None else out + bos + token_ids_1 + eos

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return Tokenizer.get_special_tokens_mask(self, token_ids_0, token_ids_1, True)
        bos, eos = self._bos_eos(1, 1)
        out = bos + [0] * len(token_ids_0) + eos
        return out if token_ids_1 is None else out + bos + [0] * len(token_ids_1) + eos

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos, eos = self._bos_eos(0, 0)
        out = [0] * len(bos + token_ids_0 + eos)
        return out if token_ids_1 is None else out + [1] * len(bos + token_ids_1 + eos)


class _SentencePieceTokenizer(SlowTokenizer):
    """Shared loading/saving of a sentencepiece `.model` file."""

    vocab_file_name = "tokenizer.model"

    def __init__(
        self, vocab_file: str | os.PathLike, *, sp_model_kwargs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        import sentencepiece as spm

        if not Path(vocab_file).is_file():
            raise FileNotFoundError(f"sentencepiece model not found: {str(vocab_file)!r}")
        self.vocab_file = str(vocab_file)
        self.sp_model_kwargs = dict(sp_model_kwargs or {})
        self._proto = Path(vocab_file).read_bytes()
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        try:
            self.sp_model.LoadFromSerializedProto(self._sp_proto(self._proto))
        except Exception as err:  # sentencepiece says only "ParseFromArray failed"
            raise TokenizerFileError(f"cannot read the sentencepiece model {vocab_file}: {err}") from err
        super().__init__(sp_model_kwargs=self.sp_model_kwargs, **kwargs)

    def _sp_proto(self, proto: bytes) -> bytes:
        return proto

    def _save_vocab(self, directory: Path) -> list[Path]:
        path = directory / self.vocab_file_name
        path.write_bytes(self._proto)
        return [path]

    @classmethod
    def _from_dir(cls, directory: Path, init: dict[str, Any]) -> Tokenizer:
        return cls(directory / cls.vocab_file_name, **init)


class XGLMTokenizer(_XGLMLayout, _SentencePieceTokenizer):
    """XGLM's sentencepiece tokenizer: fairseq id offset of 1 and seven `<madeupword{i}>` tokens."""

    vocab_file_name = "sentencepiece.bpe.model"
    tokenizer_class_name = "XGLMTokenizer"
    default_special_tokens = XGLM_SPECIAL_TOKENS
    fairseq_offset = 1

    def __init__(self, vocab_file: str | os.PathLike, **kwargs: Any) -> None:
        extra = _with_madeup_words(kwargs.pop("additional_special_tokens", None))
        self._fairseq: dict[str, int] = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
        super().__init__(vocab_file, additional_special_tokens=extra, **kwargs)

    @functools.cached_property
    def _fairseq_tokens(self) -> dict[str, int]:
        """The fixed fairseq ids: <s> <pad> </s> <unk> first, the madeup words after the pieces."""
        n = self.sp_model.get_piece_size()
        return {**self._fairseq, **{f"<madeupword{i}>": n + i + self.fairseq_offset for i in range(7)}}

    @functools.cached_property
    def _fairseq_ids(self) -> dict[int, str]:
        return {i: t for t, i in self._fairseq_tokens.items()}

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size() + self.fairseq_offset + 7

    def _tokenize_chunk(self, text: str) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        fixed = self._fairseq_tokens
        if token in fixed:
            return fixed[token]
        sp_id = self.sp_model.piece_to_id(token)
        return sp_id + self.fairseq_offset if sp_id else self.unk_token_id

    def _convert_id_to_token(self, index: int) -> str:
        if index in self._fairseq_ids:
            return self._fairseq_ids[index]
        return self.sp_model.id_to_piece(index - self.fairseq_offset)

    def get_vocab(self) -> dict[str, int]:
        n = self.sp_model.get_piece_size()
        vocab = {self.sp_model.id_to_piece(i): i + self.fairseq_offset for i in range(n)}
        vocab.update(self._fairseq_tokens)
        vocab.update(getattr(self, "_added_encoder", {}))
        return vocab

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return "".join(tokens).replace(SPIECE_UNDERLINE, " ").strip()


class LlamaTokenizer(_LlamaLayout, _SentencePieceTokenizer):
    """Persimmon's sentencepiece tokenizer (the reference LlamaTokenizer, `legacy` and non-legacy)."""

    tokenizer_class_name = "LlamaTokenizer"
    default_special_tokens = LLAMA_SPECIAL_TOKENS

    def __init__(
        self,
        vocab_file: str | os.PathLike,
        *,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: bool | None = None,
        add_prefix_space: bool = True,
        **kwargs: Any,
    ) -> None:
        # (spaces_between_special_tokens=False is only recorded in the saved config: the reference's
        # decode does not read it either)
        kwargs.setdefault("spaces_between_special_tokens", False)
        self.legacy = True if legacy is None else bool(legacy)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self.add_prefix_space = add_prefix_space
        super().__init__(
            vocab_file,
            legacy=legacy,
            add_prefix_space=add_prefix_space,
            **kwargs,
        )
        self._unk_len = len(self.sp_model.encode(str(self.unk_token))) if self.unk_token else 0

    def _sp_proto(self, proto: bytes) -> bytes:
        if self.legacy:
            return proto
        # Non-legacy turns sentencepiece's dummy prefix off: append a NormalizerSpec (field 3) holding
        # add_dummy_prefix (field 3) = false; protobuf merges repeated sub-messages, so no parser is needed.
        return proto + b"\x1a\x02\x18\x00"

    def _config_to_save(self) -> dict[str, Any]:
        return {
            **super()._config_to_save(),
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "legacy": self.legacy,
            "add_prefix_space": self.add_prefix_space,
        }

    @property
    def vocab_size(self) -> int:
        return self.sp_model.get_piece_size()

    def _tokenize_text(self, text: str) -> list[str]:
        if self.legacy or not text:
            return super()._tokenize_text(text)
        text = text.replace(SPIECE_UNDERLINE, " ")
        if self.add_prefix_space:
            text = SPIECE_UNDERLINE + text
        tokens = super()._tokenize_text(text)
        if len(tokens) > 1 and tokens[0] == SPIECE_UNDERLINE and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def _stream_run_breaks(self, skip_special_tokens: bool) -> tuple[set[int], set[int]]:
        if not self.legacy or skip_special_tokens:
            return set(), set()
        special = set(self.all_special_tokens)
        alone = self._legacy_added(special)
        return {self._token_to_id(t) for t in special - alone}, {self._token_to_id(t) for t in alone}

    def _tokenize_chunk(self, text: str) -> list[str]:
        if self.legacy or not text.startswith((SPIECE_UNDERLINE, " ")):
            return self.sp_model.encode(text, out_type=str)
        tokens = self.sp_model.encode(str(self.unk_token) + text, out_type=str)
        return tokens[self._unk_len :] if len(tokens) >= self._unk_len else tokens

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        tokens = list(tokens)
        if tokens and tokens[0].startswith(SPIECE_UNDERLINE) and self.add_prefix_space:
            tokens[0] = tokens[0][1:]
        special = set(self.all_special_tokens)
        out, current, prev_special = "", [], False
        for i, token in enumerate(tokens):
            if token in special:
                if not prev_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp_model.decode(current) + token
                prev_special, current = True, []
            else:
                if prev_special and i == 1 and self.add_prefix_space and not token.startswith(SPIECE_UNDERLINE):
                    out += " "
                current.append(token)
                prev_special = False
        return out + self.sp_model.decode(current)
