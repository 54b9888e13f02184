"""The tokenizer.json backend (the reference's PreTrainedTokenizerFast) and its XGLM and Llama
(Persimmon) variants."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .base import AddedToken, Tokenizer, TokenizerFileError
from .glm4 import GLM4_PREFIX
from .sentencepiece import LLAMA_SPECIAL_TOKENS, XGLM_SPECIAL_TOKENS, _LlamaLayout, _with_madeup_words, _XGLMLayout


class FastTokenizer(Tokenizer):
    """A tokenizer.json tokenizer (the reference's PreTrainedTokenizerFast)."""

    model_input_names = ["input_ids", "token_type_ids", "attention_mask"]

    def __init__(
        self,
        tokenizer_file: str | os.PathLike | None = None,
        *,
        tokenizer_object: Any = None,
        added_tokens_decoder: dict[int, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        from tokenizers import Tokenizer as _Backend

        if tokenizer_object is None:
            if tokenizer_file is None or not Path(tokenizer_file).is_file():
                raise FileNotFoundError(f"tokenizer.json not found: {tokenizer_file!r}")
            try:
                tokenizer_object = _Backend.from_file(str(tokenizer_file))
            except Exception as err:  # the library's message never names the file
                raise TokenizerFileError(f"cannot read the tokenizer file {tokenizer_file}: {err}") from err
        self._tokenizer = copy.deepcopy(tokenizer_object)
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        super().__init__(**kwargs)
        self._add_missing_tokens(added_tokens_decoder or {})
        self._set_split_special_tokens(self.split_special_tokens)
        # a slow vocabulary shipped next to tokenizer.json is saved along with it (as the reference does)
        folder = Path(tokenizer_file).parent if tokenizer_file is not None else None
        self._slow_vocab_files = [
            folder / n
            for n in ("sentencepiece.bpe.model", "tokenizer.model")
            if folder is not None and (folder / n).is_file()
        ]

    def _set_split_special_tokens(self, value: bool) -> None:
        self.split_special_tokens = value
        self._tokenizer.encode_special_tokens = value

    @property
    def backend_tokenizer(self) -> Any:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tokenizer

    def _add_missing_tokens(self, added_tokens_decoder: dict[int, Any]) -> int:
        """Register configured added/special tokens the tokenizer.json does not list (as the reference)."""
        from tokenizers import AddedToken as _BackendToken

        present = {t.content for t in self._tokenizer.get_added_tokens_decoder().values()}
        special = set(self.all_special_tokens)
        todo = [AddedToken.coerce(t, special=False) for _, t in sorted(added_tokens_decoder.items())]
        todo += list(self.all_special_tokens_extended)
        count = 0
        for tok in todo:
            if tok.content in present:
                continue
            present.add(tok.content)
            is_special = tok.special or tok.content in special
            backend_tok = _BackendToken(
                tok.content,
                single_word=tok.single_word,
                lstrip=tok.lstrip,
                rstrip=tok.rstrip,
                normalized=tok.normalized and not is_special,
                special=is_special,
            )
            add = self._tokenizer.add_special_tokens if is_special else self._tokenizer.add_tokens
            count += add([backend_tok])
        return count

    def _on_special_tokens_changed(self) -> int:
        return self._add_missing_tokens({})

    def _add_special(self, tokens: list[AddedToken]) -> int:
        from tokenizers import AddedToken as _BackendToken

        return self._tokenizer.add_special_tokens(
            [
                _BackendToken(
                    t.content,
                    single_word=t.single_word,
                    lstrip=t.lstrip,
                    rstrip=t.rstrip,
                    normalized=False,
                    special=True,
                )
                for t in tokens
            ]
        )

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return {i: AddedToken.coerce(t) for i, t in sorted(self._tokenizer.get_added_tokens_decoder().items())}

    def get_added_vocab(self) -> dict[str, int]:
        return {t.content: i for i, t in self.added_tokens_decoder.items()}

    is_fast = True

    def add_tokens(self, tokens: str | list[str], special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary; returns how many were new."""
        tokens = [tokens] if isinstance(tokens, str) else list(tokens)
        if special_tokens:
            return self._tokenizer.add_special_tokens(tokens)
        return self._tokenizer.add_tokens(tokens)

    def _token_to_id(self, token: str) -> int | None:
        index = self._tokenizer.token_to_id(token)
        return self.unk_token_id if index is None and self.unk_token not in (None, token) else index

    def _id_to_token(self, index: int) -> str:
        return self._tokenizer.id_to_token(index)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        # = get_vocab_size(with_added_tokens=True) (added ids follow the base vocabulary), which costs ~0.3 ms:
        # decode checks ids against len() on every call, the streaming detokenizer once per token
        added = self._tokenizer.get_added_tokens_decoder()
        return max(self._tokenizer.get_vocab_size(with_added_tokens=False), max(added, default=-1) + 1)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def _prefix_to_dedupe(self) -> str | None:
        prefix = self._tokenizer.encode("", add_special_tokens=True).ids
        tokens = [self._tokenizer.id_to_token(i) for i in prefix]
        return GLM4_PREFIX if "".join(tokens) == GLM4_PREFIX else None

    def _encode_batch(
        self,
        pairs: list[tuple[str, str | None]],
        add_special_tokens: bool,
        truncation: str,
        max_length: int | None,
        stride: int,
    ) -> list[dict[str, list[int]]]:
        if truncation != "do_not_truncate" and max_length is not None:
            self._tokenizer.enable_truncation(
                max_length, stride=stride, strategy=truncation, direction=self.truncation_side
            )
        try:
            inputs = [(a, b) if b else a for a, b in pairs]  # an empty pair is no pair, as in the reference
            encs = self._tokenizer.encode_batch(inputs, add_special_tokens=add_special_tokens)
        except Exception as e:  # the Rust error (e.g. max_length too short) as a typed error
            raise ValueError(f"tokenization failed: {e}") from e
        finally:
            self._tokenizer.no_truncation()
        return [
            {
                "input_ids": list(e.ids),
                "token_type_ids": list(e.type_ids),
                "special_tokens_mask": list(e.special_tokens_mask),
                "offset_mapping": list(e.offsets),
            }
            for e in encs
        ]

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return self._tokenizer.num_special_tokens_to_add(pair)

    def _decode(self, ids: list[int], skip_special_tokens: bool, **kwargs: Any) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def _stream_byte_units(self, skip_special_tokens: bool) -> Callable[[int], bytes | str | None] | None:
        from tokenizers import decoders

        if not isinstance(self._tokenizer.decoder, decoders.ByteLevel):
            return None
        added = self._tokenizer.get_added_tokens_decoder()
        byte_of = {c: b for b, c in enumerate(_BYTE_LEVEL)}

        def unit(index: int) -> bytes | str | None:
            tok = added.get(index)
            if tok is not None:  # decoded apart from the byte stream; a skipped special adds nothing
                return None if skip_special_tokens and tok.special else tok.content
            piece = self._tokenizer.id_to_token(index)
            if piece is None:
                return None
            try:
                return bytes(byte_of[c] for c in piece)
            except KeyError:  # not in the byte alphabet: the decoder passes the token on as UTF-8
                return piece.encode()

        return unit

    def _save_vocab(self, directory: Path) -> list[Path]:
        path = directory / "tokenizer.json"
        self._tokenizer.save(str(path))
        copied = []
        for src in self._slow_vocab_files:
            if src.resolve() != (directory / src.name).resolve():
                shutil.copyfile(src, directory / src.name)
            copied.append(directory / src.name)
        return [path, *copied]

    @classmethod
    def _from_dir(cls, directory: Path, init: dict[str, Any]) -> Tokenizer:
        return cls(directory / "tokenizer.json", **init)


class XGLMTokenizerFast(_XGLMLayout, FastTokenizer):
    """XGLM from tokenizer.json: `</s> X`, pairs `</s> A </s> </s> B` (from the file's post-processor)."""

    model_input_names = ["input_ids", "attention_mask"]
    tokenizer_class_name = "XGLMTokenizerFast"
    default_special_tokens = XGLM_SPECIAL_TOKENS

    def __init__(self, tokenizer_file: str | os.PathLike | None = None, **kwargs: Any) -> None:
        extra = _with_madeup_words(kwargs.pop("additional_special_tokens", None))
        super().__init__(tokenizer_file, additional_special_tokens=extra, **kwargs)


class LlamaTokenizerFast(_LlamaLayout, FastTokenizer):
    """Persimmon's fast tokenizer (the reference LlamaTokenizerFast): BOS/EOS from add_bos/eos_token."""

    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    tokenizer_class_name = "LlamaTokenizerFast"
    default_special_tokens = LLAMA_SPECIAL_TOKENS

    def __init__(
        self,
        tokenizer_file: str | os.PathLike | None = None,
        *,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(tokenizer_file, **kwargs)
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token
        self._update_post_processor()

    def _update_post_processor(self) -> None:
        from tokenizers import processors

        bos, eos = self.bos_token, self.eos_token
        if (bos is None and self.add_bos_token) or (eos is None and self.add_eos_token):
            raise ValueError("add_bos_token / add_eos_token is set but the tokenizer has no such token")
        b = f"{bos}:0 " if self.add_bos_token else ""
        e = f" {eos}:0" if self.add_eos_token else ""
        single = f"{b}$A:0{e}"
        b = f"{bos}:1 " if self.add_bos_token else ""
        e = f" {eos}:1" if self.add_eos_token else ""
        pair = f"{single} {b}$B:1{e}"
        specials = [
            (t, self.convert_tokens_to_ids(t)) for t, on in ((bos, self.add_bos_token), (eos, self.add_eos_token)) if on
        ]
        self._tokenizer.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials
        )

    def _config_to_save(self) -> dict[str, Any]:
        return {
            **super()._config_to_save(),
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
        }


PreTrainedTokenizerFast = FastTokenizer


def _byte_level_str(data: bytes) -> str:
    """Bytes as the byte-level BPE alphabet spells them (GPT-2 convention, used by tokenizer.json files):
    printable Latin-1 bytes stand for themselves, the other 68 bytes map to U+0100 onwards, in order."""
    return "".join(_BYTE_LEVEL[b] for b in data)


def _byte_level_alphabet() -> list[str]:
    visible = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, extra = [], 0
    for b in range(256):
        if b in visible:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


_BYTE_LEVEL = _byte_level_alphabet()
