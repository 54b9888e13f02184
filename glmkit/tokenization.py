"""Tokenizers for GLM-4, XGLM and Persimmon with the Hugging Face call API.

Three backends share one front end (`Tokenizer`): special tokens, batching, truncation, padding,
tensors, decoding, chat templates and saving.

- `FastTokenizer` wraps a `tokenizers` tokenizer.json (GLM-4 ``-hf``, XGLM fast, Persimmon fast).
- `SlowTokenizer` reproduces the reference "slow" tokenizers: added tokens are split out of the
  text first, the rest goes to a model-specific `_tokenize_chunk`. Subclasses: `XGLMTokenizer` and
  `LlamaTokenizer` (sentencepiece) and `ChatGLM4Tokenizer` (the original GLM-4 tiktoken-format
  ``tokenizer.model``, implemented here without tiktoken and without checkpoint code).

`AutoTokenizer.from_pretrained(dir)` picks the class from the files and the configs.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from glmkit import chat as _chat

__all__ = [
    "AddedToken",
    "AutoTokenizer",
    "BatchEncoding",
    "ChatGLM4Tokenizer",
    "FastTokenizer",
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "PreTrainedTokenizerFast",
    "SlowTokenizer",
    "Tokenizer",
    "XGLMTokenizer",
    "XGLMTokenizerFast",
]

logger = logging.getLogger(__name__)
VERY_LARGE_INTEGER = int(1e30)  # the reference's "no limit" model_max_length
SPIECE_UNDERLINE = "▁"
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
GLM4_SPECIAL_TOKENS = tuple(
    "<|endoftext|> [MASK] [gMASK] [sMASK] <sop> <eop> <|system|> <|user|> <|assistant|> <|observation|> "
    "<|begin_of_image|> <|end_of_image|> <|begin_of_video|> <|end_of_video|>".split()
)
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GLM4_PREFIX = "[gMASK]<sop>"
# clean_up_tokenization_spaces: (before, after) replacements, as in the reference
_CLEANUPS = [(" " + p, p) for p in (".", "?", "!", ",", "' ", "n't", "'m", "'s", "'ve", "'re")]
_CLEANUPS[4] = (" ' ", "'")  # the only replacement that also drops the trailing space


@dataclass
class AddedToken:
    """A token matched verbatim in the text before the model's own tokenization."""

    content: str
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = True
    special: bool = False

    def __str__(self) -> str:
        return self.content

    @classmethod
    def coerce(cls, value: Any, special: bool = True) -> AddedToken | None:
        """Build from a string or a (saved) dict; `None` stays `None`."""
        if value is None or isinstance(value, AddedToken):
            return value
        if isinstance(value, str):
            return cls(value, normalized=not special, special=special)
        if isinstance(value, dict) and "content" in value:
            fields = {k: v for k, v in value.items() if k in cls.__dataclass_fields__}
            return cls(**{"special": special, **fields})
        if hasattr(value, "content"):  # a tokenizers.AddedToken
            return cls(value.content, value.single_word, value.lstrip, value.rstrip, value.normalized, value.special)
        raise TypeError(f"cannot use {value!r} as a token: expected a str or a dict with 'content'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class BatchEncoding(dict):
    """The tokenizer's output: a dict with attribute access, tensor conversion and `.to(device)`."""

    def __init__(
        self,
        data: dict[str, Any] | None = None,
        tensor_type: str | None = None,
        prepend_batch_axis: bool = False,
    ) -> None:
        super().__init__(data or {})
        self.convert_to_tensors(tensor_type, prepend_batch_axis)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no key {name!r}; keys: {list(self)}") from None

    def __getstate__(self) -> dict[str, Any]:
        return dict(self)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.update(state)

    @property
    def data(self) -> dict[str, Any]:
        return dict(self)

    def convert_to_tensors(self, tensor_type: str | None = None, prepend_batch_axis: bool = False) -> BatchEncoding:
        """Turn the lists into "pt" (torch) or "np" (numpy) arrays in place."""
        if tensor_type is None:
            return self
        tensor_type = getattr(tensor_type, "value", tensor_type)
        if tensor_type not in ("pt", "np"):
            raise ValueError(f"return_tensors must be 'pt', 'np' or None, got {tensor_type!r}")
        for key, value in self.items():
            if prepend_batch_axis:
                value = [value]
            if isinstance(value, list) and value and isinstance(value[0], list):
                if len({len(v) for v in value}) > 1:
                    raise ValueError(
                        f"cannot make a tensor of {key!r}: the sequences have different lengths "
                        f"({sorted({len(v) for v in value})}); pass padding=True and/or truncation=True"
                    )
            if tensor_type == "pt":
                import torch

                self[key] = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            else:
                self[key] = np.asarray(value)
        return self

    def to(self, device: Any) -> BatchEncoding:
        """Move every tensor to `device` (str, int or torch.device); returns self."""
        for key, value in self.items():
            if hasattr(value, "to"):
                self[key] = value.to(device=device)
        return self


# --------------------------------------------------------------------------------------------------
# files and configs


def _resolve_dir(name_or_path: str | os.PathLike, **kwargs: Any) -> Path:
    """Map a checkpoint name or path to a local directory (hub ids through the hub cache)."""
    from .hub import resolve_checkpoint_dir

    path = Path(name_or_path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"expected a checkpoint directory, got the file {str(path)!r}")
    return resolve_checkpoint_dir(name_or_path, **kwargs)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _load_init_kwargs(directory: Path) -> dict[str, Any]:
    """Merge tokenizer_config.json, special_tokens_map.json and chat_template.jinja like the reference."""
    kwargs = _read_json(directory / "tokenizer_config.json")
    for key, value in _read_json(directory / "special_tokens_map.json").items():
        kwargs.setdefault(key, value)
    template_file = directory / "chat_template.jinja"
    if template_file.is_file():
        kwargs["chat_template"] = template_file.read_text(encoding="utf-8")
    extra_dir = directory / "additional_chat_templates"
    if extra_dir.is_dir():
        templates = kwargs.get("chat_template")
        templates = {"default": templates} if isinstance(templates, str) else dict(templates or {})
        for f in sorted(extra_dir.glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
        kwargs["chat_template"] = templates
    if isinstance(kwargs.get("chat_template"), list):
        kwargs["chat_template"] = {t["name"]: t["template"] for t in kwargs["chat_template"]}
    decoder = kwargs.get("added_tokens_decoder") or {}
    kwargs["added_tokens_decoder"] = {int(i): AddedToken.coerce(t, special=False) for i, t in decoder.items()}
    for key in ("auto_map", "name_or_path", "tokenizer_file", "vocab_file", "init_inputs"):
        kwargs.pop(key, None)
    return kwargs


def _is_tiktoken_file(path: Path) -> bool:
    """True for a GLM-4 style vocabulary: text lines of `base64-token rank`."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(256)
    line = head.split(b"\n", 1)[0].strip()
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", line) is not None


def _cleanup(text: str) -> str:
    for a, b in _CLEANUPS:
        text = text.replace(a, b)
    return text


def _as_pairs(text: Any, text_pair: Any) -> tuple[list[tuple[str, str | None]], bool]:
    """Normalise the text arguments to [(first, second or None)] and say whether it was a batch."""
    if text is None:
        raise ValueError("pass the text to tokenize (a str, a list of str, or pairs)")
    batched = isinstance(text, (list, tuple))
    if not batched:
        pairs = [(text, text_pair)]
    elif text_pair is None and text and all(isinstance(t, (list, tuple)) and len(t) == 2 for t in text):
        pairs = [(a, b) for a, b in text]
    elif text_pair is None:
        pairs = [(t, None) for t in text]
    elif isinstance(text_pair, (list, tuple)) and len(text_pair) == len(text):
        pairs = list(zip(text, text_pair))
    else:
        raise ValueError("text_pair must be a list as long as text")
    for a, b in pairs:
        if not isinstance(a, str) or not (b is None or isinstance(b, str)):
            second = "" if b is None else " / " + type(b).__name__
            raise TypeError(f"text must be str, list[str] or pairs of str; got {type(a).__name__}{second}")
    return pairs, batched


def _to_list(ids: Any) -> Any:
    if hasattr(ids, "tolist"):
        return ids.tolist()
    return ids


# --------------------------------------------------------------------------------------------------
# the shared front end


class Tokenizer:
    """Base class: the reference call API on top of a backend that turns text into ids.

    Subclasses implement `_encode_batch` (ids with special tokens and truncation), `_decode`,
    `convert_tokens_to_ids` / `convert_ids_to_tokens`, `get_vocab`, `__len__` and `_save_vocab`.
    """

    model_input_names: list[str] = ["input_ids", "attention_mask"]
    is_fast = False
    padding_side: str = "right"
    truncation_side: str = "right"
    default_chat_template: str | None = None
    default_special_tokens: dict[str, str] = {}

    def __init__(
        self,
        *,
        model_max_length: int | None = None,
        padding_side: str | None = None,
        truncation_side: str | None = None,
        clean_up_tokenization_spaces: bool = False,
        chat_template: str | dict[str, str] | None = None,
        model_input_names: list[str] | None = None,
        additional_special_tokens: Sequence[Any] | None = None,
        split_special_tokens: bool = False,
        **kwargs: Any,
    ) -> None:
        self.init_kwargs = copy.deepcopy({k: v for k, v in kwargs.items() if k not in SPECIAL_ROLES})
        self.model_max_length = VERY_LARGE_INTEGER if model_max_length is None else int(model_max_length)
        self.padding_side = padding_side or type(self).padding_side
        self.truncation_side = truncation_side or type(self).truncation_side
        for side in (self.padding_side, self.truncation_side):
            if side not in ("left", "right"):
                raise ValueError(f"padding_side / truncation_side must be 'left' or 'right', got {side!r}")
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.chat_template = chat_template
        self.split_special_tokens = split_special_tokens
        if model_input_names is not None:
            self.model_input_names = list(model_input_names)
        self._special: dict[str, AddedToken | None] = {}
        for role in SPECIAL_ROLES:
            self._special[role] = AddedToken.coerce(kwargs.get(role, self.default_special_tokens.get(role)))
        self._additional = [AddedToken.coerce(t) for t in additional_special_tokens or []]
        self.name_or_path = ""

    # ---- special tokens -------------------------------------------------------------------------
    @property
    def special_tokens_map(self) -> dict[str, Any]:
        """Role -> token string for the roles that are set (plus `additional_special_tokens`)."""
        out: dict[str, Any] = {r: str(t) for r, t in self._special.items() if t is not None}
        if self._additional:
            out["additional_special_tokens"] = [str(t) for t in self._additional]
        return out

    @property
    def additional_special_tokens(self) -> list[str]:
        return [str(t) for t in self._additional]

    @property
    def additional_special_tokens_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(str(t)) for t in self._additional]

    @property
    def all_special_tokens_extended(self) -> list[AddedToken]:
        seen: dict[str, AddedToken] = {}
        for tok in [t for t in self._special.values() if t is not None] + self._additional:
            seen.setdefault(str(tok), tok)
        return list(seen.values())

    @property
    def all_special_tokens(self) -> list[str]:
        return [str(t) for t in self.all_special_tokens_extended]

    @property
    def all_special_ids(self) -> list[int]:
        return [self.convert_tokens_to_ids(t) for t in self.all_special_tokens]

    def _on_special_tokens_changed(self) -> int:
        """Hook: special tokens were reassigned; registers them, returns how many were added."""
        return 0

    def add_special_tokens(
        self, special_tokens_dict: dict[str, Any], replace_additional_special_tokens: bool = True
    ) -> int:
        """Set special tokens by role (`pad_token`, ..., `additional_special_tokens`); tokens new to the
        vocabulary are appended. Returns how many were added (counted as the reference counts)."""
        given: list[AddedToken] = []
        for key, value in special_tokens_dict.items():
            if key == "additional_special_tokens":
                new = [AddedToken.coerce(t) for t in value]
                kept = [] if replace_additional_special_tokens else self._additional
                new = [t for t in new if str(t) not in map(str, kept)]
                self._additional = kept + new
                given += new
            elif key in SPECIAL_ROLES:
                self._special[key] = AddedToken.coerce(value)
                given.append(self._special[key])
            else:
                raise ValueError(f"unknown special token role {key!r}; use one of {SPECIAL_ROLES}")
        return self._add_special(given)

    def _add_special(self, tokens: list[AddedToken]) -> int:
        raise NotImplementedError

    def _special_id(self, role: str) -> int | None:
        tok = self._special[role]
        return None if tok is None else self.convert_tokens_to_ids(str(tok))

    pad_token_type_id = 0

    # ---- vocab interface (backend) --------------------------------------------------------------
    def convert_tokens_to_ids(self, tokens: str | Iterable[str]) -> int | list[int]:
        """Token string(s) to id(s); unknown tokens map to the unk id (None without one)."""
        if isinstance(tokens, str):
            return self._token_to_id(tokens)
        return [self._token_to_id(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str | list[str]:
        """Id(s) to token string(s)."""
        ids = _to_list(ids)
        if isinstance(ids, int):
            return self._id_to_token(ids)
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._id_to_token(i) for i in ids if i not in special]

    def _token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def _id_to_token(self, index: int) -> str:
        raise NotImplementedError

    def get_vocab(self) -> dict[str, int]:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        """Split text into token strings."""
        ids = self.encode(text, pair, add_special_tokens=add_special_tokens)
        return self.convert_ids_to_tokens(ids)

    # ---- encoding -------------------------------------------------------------------------------
    def _prefix_to_dedupe(self) -> str | None:
        """Text of a prefix that the template may already contain (GLM-4's `[gMASK]<sop>`)."""
        return None

    def _encode_batch(
        self,
        pairs: list[tuple[str, str | None]],
        add_special_tokens: bool,
        truncation: str,
        max_length: int | None,
        stride: int,
    ) -> list[dict[str, list[int]]]:
        raise NotImplementedError

    def _dedupe(
        self,
        pairs: list[tuple[str, str | None]],
        add_special_tokens: bool,
        truncation: str,
        max_length: int | None,
        stride: int,
    ) -> list[dict[str, list[int]]]:
        """Encode, adding the GLM-4 prefix only where the text does not start with it already."""
        prefix = self._prefix_to_dedupe() if add_special_tokens else None
        if prefix is None:
            return self._encode_batch(pairs, add_special_tokens, truncation, max_length, stride)
        has = [p[1] is None and p[0].startswith(prefix) for p in pairs]
        out: list[dict[str, list[int]]] = [{}] * len(pairs)
        for flag in (False, True):
            idx = [i for i, h in enumerate(has) if h == flag]
            if idx:
                enc = self._encode_batch([pairs[i] for i in idx], not flag, truncation, max_length, stride)
                for i, e in zip(idx, enc):
                    out[i] = e
        return out

    def _strategies(
        self, padding: Any, truncation: Any, max_length: int | None, pad_to_multiple_of: int | None
    ) -> tuple[str, str, int | None]:
        """Normalise padding/truncation arguments the way the reference does."""
        if max_length is not None and padding is False and truncation is None:
            truncation = "longest_first"  # the reference truncates when only max_length is given
        pad = {True: "longest", False: "do_not_pad", None: "do_not_pad"}.get(padding, padding)
        pad = getattr(pad, "value", pad)
        if pad not in ("longest", "max_length", "do_not_pad"):
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        trunc = {True: "longest_first", False: "do_not_truncate", None: "do_not_truncate"}.get(truncation, truncation)
        trunc = getattr(trunc, "value", trunc)
        if trunc not in ("longest_first", "only_first", "only_second", "do_not_truncate"):
            raise ValueError(
                f"truncation must be a bool or 'longest_first', 'only_first', 'only_second', "
                f"'do_not_truncate', got {truncation!r}"
            )
        if max_length is None:
            limit = self.model_max_length if self.model_max_length < VERY_LARGE_INTEGER else None
            if pad == "max_length":
                pad = "max_length" if limit is not None else "do_not_pad"
            if trunc != "do_not_truncate" and limit is None:
                trunc = "do_not_truncate"
            max_length = limit
        if pad != "do_not_pad" and (self.pad_token is None or self.pad_token_id is None or self.pad_token_id < 0):
            raise ValueError(
                "asked to pad but the tokenizer has no pad_token; set tokenizer.pad_token "
                "(e.g. tokenizer.pad_token = tokenizer.eos_token)"
            )
        if (
            trunc != "do_not_truncate"
            and pad != "do_not_pad"
            and pad_to_multiple_of
            and max_length
            and max_length % pad_to_multiple_of
        ):
            raise ValueError(
                f"truncation and padding need max_length ({max_length}) to be a multiple of "
                f"pad_to_multiple_of ({pad_to_multiple_of})"
            )
        return pad, trunc, max_length

    def __call__(
        self,
        text: str | list[str] | None = None,
        text_pair: str | list[str] | None = None,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        stride: int = 0,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_token_type_ids: bool | None = None,
        return_attention_mask: bool | None = None,
        return_special_tokens_mask: bool = False,
        return_length: bool = False,
        return_offsets_mapping: bool = False,
        is_split_into_words: bool = False,
        split_special_tokens: bool | None = None,
        **kwargs: Any,
    ) -> BatchEncoding:
        """Tokenize a string, a list of strings, or (lists of) pairs; see the reference `__call__`."""
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if is_split_into_words:
            raise NotImplementedError("is_split_into_words is not supported")
        pairs, batched = _as_pairs(text, text_pair)
        pad, trunc, max_length = self._strategies(padding, truncation, max_length, pad_to_multiple_of)
        with self._special_splitting(split_special_tokens):
            encoded = self._dedupe(pairs, add_special_tokens, trunc, max_length, stride)
        target = max((len(e["input_ids"]) for e in encoded), default=0) if pad == "longest" and batched else None
        if pad == "max_length":
            target = max_length
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        side = padding_side or self.padding_side
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        wanted = {
            "token_type_ids": "token_type_ids" in self.model_input_names
            if return_token_type_ids is None
            else return_token_type_ids,
            "attention_mask": "attention_mask" in self.model_input_names
            if return_attention_mask is None
            else return_attention_mask,
            "special_tokens_mask": return_special_tokens_mask,
            "offset_mapping": return_offsets_mapping,
            "position_ids": "position_ids" in self.model_input_names,
        }
        if return_offsets_mapping and not self.is_fast:
            raise NotImplementedError("return_offsets_mapping needs a tokenizer.json (fast) tokenizer")
        for e in encoded:
            e["attention_mask"] = [1] * len(e["input_ids"])
            e["position_ids"] = list(range(len(e["input_ids"])))
            if target is not None:
                self._pad_one(e, target, side)
            for key, keep in wanted.items():
                if not keep:
                    e.pop(key, None)
            if return_length:
                e["length"] = len(e["input_ids"])
        if not batched:
            return BatchEncoding(encoded[0], return_tensors, prepend_batch_axis=return_tensors is not None)
        keys = list(encoded[0]) if encoded else ["input_ids", "attention_mask"]
        return BatchEncoding({k: [e[k] for e in encoded] for k in keys}, return_tensors)

    @contextlib.contextmanager
    def _special_splitting(self, split: bool | None) -> Iterator[None]:
        """Temporarily treat special tokens written in the text as plain text (split_special_tokens)."""
        saved = self.split_special_tokens
        if split is not None:
            self._set_split_special_tokens(split)
        try:
            yield
        finally:
            self._set_split_special_tokens(saved)

    def _set_split_special_tokens(self, value: bool) -> None:
        self.split_special_tokens = value

    def _pad_one(self, enc: dict[str, Any], length: int, side: str) -> None:
        n = length - len(enc["input_ids"])
        if n <= 0:
            return
        fill = {
            "input_ids": self.pad_token_id,
            "attention_mask": 0,
            "token_type_ids": self.pad_token_type_id,
            "special_tokens_mask": 1,
            "position_ids": 0,
            "offset_mapping": (0, 0),
        }
        for key, value in enc.items():
            if key in fill:
                enc[key] = [fill[key]] * n + value if side == "left" else value + [fill[key]] * n

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True, **kwargs: Any) -> Any:
        """Token ids of one text (or pair): a list, or a (1, T) tensor with return_tensors."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        out = self(text, text_pair, add_special_tokens=add_special_tokens, **kwargs)
        return out["input_ids"]

    def encode_plus(self, text: str, text_pair: str | None = None, **kwargs: Any) -> BatchEncoding:
        return self(text, text_pair, **kwargs)

    def batch_encode_plus(self, texts: list[Any], **kwargs: Any) -> BatchEncoding:
        return self(list(texts), **kwargs)

    def pad(
        self,
        encoded: Any,
        padding: bool | str = True,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_attention_mask: bool | None = None,
        return_tensors: str | None = None,
    ) -> BatchEncoding:
        """Pad already-tokenized inputs (a BatchEncoding, a dict of lists, or a list of dicts)."""
        if isinstance(encoded, (list, tuple)):
            encoded = {k: [_to_list(e[k]) for e in encoded] for k in encoded[0]}
        encoded = {k: _to_list(v) for k, v in dict(encoded).items()}
        batched = bool(encoded["input_ids"]) and isinstance(encoded["input_ids"][0], list)
        rows = [dict(zip(encoded, vals)) for vals in zip(*encoded.values())] if batched else [encoded]
        pad, _, max_length = self._strategies(padding, False, max_length, pad_to_multiple_of)
        target = max(len(r["input_ids"]) for r in rows) if pad == "longest" else max_length
        if target is not None and pad_to_multiple_of:
            target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
        for r in rows:
            if return_attention_mask is not False and "attention_mask" not in r:
                r["attention_mask"] = [1] * len(r["input_ids"])
            if pad != "do_not_pad" and target is not None:
                self._pad_one(r, target, padding_side or self.padding_side)
        if batched:
            return BatchEncoding({k: [r[k] for r in rows] for k in rows[0]}, return_tensors)
        return BatchEncoding(rows[0], return_tensors, prepend_batch_axis=return_tensors is not None)

    # ---- special-token layout (slow-style helpers, also used by the truncation budget) ----------
    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """Add the model's special tokens around one sequence or a pair."""
        return token_ids_0 + (token_ids_1 or [])

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        """1 where `build_inputs_with_special_tokens` puts a special token, 0 elsewhere."""
        if already_has_special_tokens:
            if token_ids_1 is not None:
                raise ValueError("with already_has_special_tokens=True pass one sequence of ids")
            special = set(self.all_special_ids)
            return [1 if i in special else 0 for i in token_ids_0]
        return [0] * (len(token_ids_0) + len(token_ids_1 or []))

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        """Segment ids: 0 for the first sequence, 1 for the second."""
        if token_ids_1 is None:
            return [0] * len(self.build_inputs_with_special_tokens(token_ids_0))
        return [0] * len(token_ids_0) + [1] * len(token_ids_1)

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        return len(self.build_inputs_with_special_tokens([], [] if pair else None))

    # ---- decoding -------------------------------------------------------------------------------
    def _decode(self, ids: list[int], skip_special_tokens: bool, **kwargs: Any) -> str:
        raise NotImplementedError

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> str:
        """Ids (list, int, tensor or array) back to text."""
        ids = _to_list(token_ids)
        if isinstance(ids, int):
            ids = [ids]
        if ids and isinstance(ids[0], list):
            raise TypeError("decode takes one sequence of ids; use batch_decode for a batch")
        text = self._decode(ids, skip_special_tokens, **kwargs)
        clean = (
            self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        )
        return _cleanup(text) if clean else text

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Decode each sequence of a batch."""
        return [
            self.decode(s, skip_special_tokens, clean_up_tokenization_spaces, **kwargs) for s in _to_list(sequences)
        ]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._decode(self.convert_tokens_to_ids(tokens), False)

    clean_up_tokenization = staticmethod(_cleanup)

    # ---- chat templates -------------------------------------------------------------------------
    def get_chat_template(self, chat_template: str | None = None, tools: list[Any] | None = None) -> str:
        """The template string apply_chat_template will use (a name picks one of several)."""
        return _chat.select_template(self.chat_template or self.default_chat_template, chat_template, tools)

    def apply_chat_template(
        self,
        conversation: Any,
        tools: list[Any] | None = None,
        documents: list[dict[str, str]] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        return_assistant_tokens_mask: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Render messages with the chat template (jinja2, the reference's semantics); optionally tokenize.

        Returns text (tokenize=False), ids, or a BatchEncoding (return_dict=True). A list of
        conversations renders a batch. Extra keyword arguments become template variables.
        """
        if return_assistant_tokens_mask:
            raise NotImplementedError("return_assistant_tokens_mask is not supported yet")
        template = self.get_chat_template(chat_template, tools)
        batched = _chat.is_batch(conversation)
        conversations = conversation if batched else [conversation]
        context = {**self.special_tokens_map, **kwargs}
        rendered = [
            _chat.render(
                template,
                c,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                **context,
            )
            for c in conversations
        ]
        if not tokenize:
            return rendered if batched else rendered[0]
        out = self(
            rendered if batched else rendered[0],
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            add_special_tokens=False,
            return_tensors=return_tensors,
            **(tokenizer_kwargs or {}),
        )
        return out if return_dict else out["input_ids"]

    # ---- saving ---------------------------------------------------------------------------------
    tokenizer_class_name = "PreTrainedTokenizerFast"

    def _config_to_save(self) -> dict[str, Any]:
        cfg: dict[str, Any] = dict(self.init_kwargs)
        cfg.update(
            {
                "model_max_length": self.model_max_length,
                "padding_side": self.padding_side,
                "truncation_side": self.truncation_side,
                "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
                "model_input_names": self.model_input_names,
                "tokenizer_class": self.tokenizer_class_name,
                "split_special_tokens": self.split_special_tokens,
            }
        )
        for role, tok in self._special.items():
            cfg[role] = None if tok is None else str(tok)
        cfg["additional_special_tokens"] = [str(t) for t in self._additional]
        cfg.pop("added_tokens_decoder", None)
        return cfg

    def _save_vocab(self, directory: Path) -> list[Path]:
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> tuple[str, ...]:
        """Write tokenizer_config.json, special_tokens_map.json, chat_template.jinja and the vocabulary."""
        directory = Path(save_directory)
        if directory.is_file():
            raise NotADirectoryError(f"save_pretrained needs a directory, {directory} is a file")
        directory.mkdir(parents=True, exist_ok=True)
        cfg = self._config_to_save()
        files = self._save_vocab(directory)
        added = getattr(self, "added_tokens_decoder", {})
        cfg["added_tokens_decoder"] = {str(i): t.to_dict() for i, t in sorted(added.items())}
        if isinstance(self.chat_template, str):
            (directory / "chat_template.jinja").write_text(self.chat_template, encoding="utf-8")
            files.append(directory / "chat_template.jinja")
        elif isinstance(self.chat_template, dict):
            cfg["chat_template"] = [{"name": k, "template": v} for k, v in self.chat_template.items()]
        config_file, map_file = directory / "tokenizer_config.json", directory / "special_tokens_map.json"
        config_file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        map_file.write_text(json.dumps(self.special_tokens_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return tuple(str(p) for p in [config_file, map_file, *files])

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs: Any) -> Tokenizer:
        """Load this class from a checkpoint directory (AutoTokenizer picks the class for you)."""
        return _load(cls, pretrained_model_name_or_path, kwargs)

    @classmethod
    def _from_dir(cls, directory: Path, init: dict[str, Any]) -> Tokenizer:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={len(self)}, "
            f"padding_side={self.padding_side!r}, special_tokens={self.special_tokens_map})"
        )


def _special_role_properties(role: str) -> tuple[property, property]:
    def get_token(self: Tokenizer) -> str | None:
        tok = self._special[role]
        return None if tok is None else str(tok)

    def set_token(self: Tokenizer, value: Any) -> None:
        self._special[role] = AddedToken.coerce(value)
        self._on_special_tokens_changed()

    def get_id(self: Tokenizer) -> int | None:
        return self._special_id(role)

    def set_id(self: Tokenizer, value: int | None) -> None:
        set_token(self, None if value is None else self.convert_ids_to_tokens(value))

    return property(get_token, set_token, doc=f"The {role} string."), property(get_id, set_id)


for _role in SPECIAL_ROLES:
    _tok_prop, _id_prop = _special_role_properties(_role)
    setattr(Tokenizer, _role, _tok_prop)
    setattr(Tokenizer, _role + "_id", _id_prop)


# --------------------------------------------------------------------------------------------------
# tokenizer.json backend


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
            tokenizer_object = _Backend.from_file(str(tokenizer_file))
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
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

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


class XGLMTokenizerFast(_XGLMLayout, FastTokenizer):
    """XGLM from tokenizer.json: `</s> X`, pairs `</s> A </s> </s> B` (from the file's post-processor)."""

    model_input_names = ["input_ids", "attention_mask"]
    tokenizer_class_name = "XGLMTokenizerFast"
    default_special_tokens = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "sep_token": "</s>",
        "cls_token": "<s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
    }

    def __init__(self, tokenizer_file: str | os.PathLike | None = None, **kwargs: Any) -> None:
        extra = list(kwargs.pop("additional_special_tokens", None) or [])
        extra += [w for w in (f"<madeupword{i}>" for i in range(7)) if w not in map(str, extra)]
        super().__init__(tokenizer_file, additional_special_tokens=extra, **kwargs)


class LlamaTokenizerFast(_LlamaLayout, FastTokenizer):
    """Persimmon's fast tokenizer (the reference LlamaTokenizerFast): BOS/EOS from add_bos/eos_token."""

    model_input_names = ["input_ids", "attention_mask"]
    padding_side = "left"
    tokenizer_class_name = "LlamaTokenizerFast"
    default_special_tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

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


# --------------------------------------------------------------------------------------------------
# "slow" backends: added tokens are split out first, then a model-specific tokenizer runs


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
    def _decode(
        self,
        ids: list[int],
        skip_special_tokens: bool,
        spaces_between_special_tokens: bool = True,
        **kwargs: Any,
    ) -> str:
        """The reference slow decode: non-special added tokens are kept as separate pieces."""
        special = set(self.all_special_tokens)
        legacy_added = (set(self._added_encoder) - special) | {
            t for t in self.additional_special_tokens if self.convert_tokens_to_ids(t) >= self.vocab_size
        }
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
        self.sp_model.LoadFromSerializedProto(self._sp_proto(self._proto))
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
    default_special_tokens = XGLMTokenizerFast.default_special_tokens
    fairseq_offset = 1

    def __init__(self, vocab_file: str | os.PathLike, **kwargs: Any) -> None:
        extra = list(kwargs.pop("additional_special_tokens", None) or [])
        extra += [w for w in (f"<madeupword{i}>" for i in range(7)) if w not in map(str, extra)]
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
    default_special_tokens = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

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


class ChatGLM4Tokenizer(SlowTokenizer):
    """The original GLM-4 vocabulary (`tokenizer.model`: base64 token + rank per line, tiktoken format).

    Byte-level BPE with tiktoken's merge rule (lowest rank first, leftmost on ties), the GLM-4
    pre-tokenizer regex, the 14 special tokens after the ranks, and `[gMASK]<sop>` prepended by
    `add_special_tokens` (once: not again when the text already starts with it).
    """

    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"
    tokenizer_class_name = "ChatGLM4Tokenizer"
    default_chat_template = _chat.GLM4_CHAT_TEMPLATE
    vocab_file_name = "tokenizer.model"
    default_special_tokens = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}

    def __init__(self, vocab_file: str | os.PathLike, *, encode_special_tokens: bool = False, **kwargs: Any) -> None:
        from tokenizers import Regex
        from tokenizers.pre_tokenizers import Split

        self.vocab_file = str(vocab_file)
        self.ranks = _read_tiktoken_ranks(Path(vocab_file))
        self.decoder = {rank: token for token, rank in self.ranks.items()}
        self._split = Split(Regex(GLM4_PATTERN), behavior="isolated")
        self._bpe_cache: dict[bytes, list[int]] = {}
        kwargs.setdefault("additional_special_tokens", list(GLM4_SPECIAL_TOKENS))
        n = len(self.ranks)
        decoder = kwargs.pop("added_tokens_decoder", None) or {
            n + i: AddedToken(t, normalized=False, special=True) for i, t in enumerate(GLM4_SPECIAL_TOKENS)
        }
        kwargs.setdefault("clean_up_tokenization_spaces", False)
        # encode_special_tokens is accepted and saved but, as in the remote code, changes nothing
        super().__init__(added_tokens_decoder=decoder, encode_special_tokens=encode_special_tokens, **kwargs)

    @property
    def vocab_size(self) -> int:
        return len(self.ranks)

    def _bpe(self, piece: bytes) -> list[int]:
        parts = [piece[i : i + 1] for i in range(len(piece))]
        ranks = self.ranks
        while len(parts) > 1:
            best, where = None, -1
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + parts[i + 1])
                if rank is not None and (best is None or rank < best):
                    best, where = rank, i
            if best is None:
                break
            parts[where : where + 2] = [parts[where] + parts[where + 1]]
        try:
            return [ranks[p] for p in parts]
        except KeyError as e:
            raise ValueError(f"byte {e.args[0]!r} is missing from the vocabulary {self.vocab_file}") from None

    def _encode_ordinary(self, text: str) -> list[int]:
        out: list[int] = []
        for piece, _ in self._split.pre_tokenize_str(text):
            data = piece.encode("utf-8")
            rank = self.ranks.get(data)
            if rank is not None:
                out.append(rank)
                continue
            cached = self._bpe_cache.get(data)
            if cached is None:
                if len(self._bpe_cache) > 100_000:
                    self._bpe_cache.clear()
                cached = self._bpe_cache[data] = self._bpe(data)
            out += cached
        return out

    def _tokenize_chunk(self, text: str) -> list[bytes]:
        return [self.decoder[i] for i in self._encode_ordinary(text)]

    def _encode_text(self, text: str) -> list[int]:
        out: list[int] = []
        for chunk, is_added in self._split_added(text):
            out += [self._added_encoder[chunk]] if is_added else self._encode_ordinary(chunk)
        return out

    def _convert_token_to_id(self, token: Any) -> int | None:
        return self.ranks.get(token.encode("utf-8") if isinstance(token, str) else token)

    def _convert_id_to_token(self, index: int) -> Any:
        return self.decoder.get(index, "")

    def convert_tokens_to_string(self, tokens: list[Any]) -> str:
        """Byte tokens are joined and decoded together (invalid UTF-8 -> U+FFFD); str tokens verbatim."""
        parts: list[str] = []
        buf = bytearray()
        for t in tokens:
            if isinstance(t, int):
                t = chr(t)
            if isinstance(t, str):
                if buf:
                    parts.append(buf.decode("utf-8", errors="replace"))
                    buf.clear()
                parts.append(t)
            elif isinstance(t, bytes):
                buf += t
            else:
                raise TypeError(f"token should be str or bytes, got {type(t).__name__}")
        if buf:
            parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def _prefix_to_dedupe(self) -> str:
        return GLM4_PREFIX

    def _prefix_ids(self) -> list[int]:
        return [self._added_encoder["[gMASK]"], self._added_encoder["<sop>"]]

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        out = self._prefix_ids() + token_ids_0
        return out if token_ids_1 is None else out + token_ids_1 + [self.eos_token_id]

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, True)
        out = [1, 1] + [0] * len(token_ids_0)
        return out if token_ids_1 is None else out + [0] * len(token_ids_1) + [1]

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def _save_vocab(self, directory: Path) -> list[Path]:
        path = directory / self.vocab_file_name
        lines = (f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(self.ranks.items(), key=lambda x: x[1]))
        path.write_text("".join(lines), encoding="ascii")
        return [path]

    @classmethod
    def _from_dir(cls, directory: Path, init: dict[str, Any]) -> Tokenizer:
        return cls(directory / cls.vocab_file_name, **init)

    def to_fast(self) -> FastTokenizer:
        """The same tokenizer as a tokenizer.json one (the `-hf` release layout, which transformers loads
        without remote code): byte-level BPE whose merges are read off the ranks, so that it merges
        exactly as tiktoken does (the lowest-ranked adjacent pair first); specials keep their ids."""
        from tokenizers import AddedToken as _BackendToken
        from tokenizers import Regex, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as _Backend

        as_str = _byte_level_str
        merges = []  # every split of a token into two vocabulary tokens, prioritised by the token's rank
        for token, rank in self.ranks.items():
            splits = [(token[:i], token[i:]) for i in range(1, len(token))]
            splits = [(a, b) for a, b in splits if a in self.ranks and b in self.ranks]
            merges += [(rank, self.ranks[a], self.ranks[b], as_str(a), as_str(b)) for a, b in splits]
        merges.sort()
        vocab = {as_str(t): r for t, r in self.ranks.items()}
        backend = _Backend(models.BPE(vocab, [(a, b) for *_, a, b in merges], ignore_merges=True))
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])  # fmt: skip
        backend.decoder = decoders.ByteLevel()
        added = sorted(self.added_tokens_decoder.items())
        if [i for i, _ in added] != list(range(len(self.ranks), len(self.ranks) + len(added))):
            raise ValueError("to_fast needs the added tokens to follow the ranks without gaps")
        backend.add_special_tokens([_BackendToken(str(t), special=True, normalized=False) for _, t in added])
        gmask, sop = self._prefix_ids()
        backend.post_processor = processors.TemplateProcessing(
            single="[gMASK]:0 <sop>:0 $A:0", pair="[gMASK]:0 <sop>:0 $A:0 $B:1",
            special_tokens=[("[gMASK]", gmask), ("<sop>", sop)],
        )  # fmt: skip
        roles = {role: str(tok) for role, tok in self._special.items() if tok is not None}
        return FastTokenizer(
            tokenizer_object=backend, **roles, additional_special_tokens=[str(t) for t in self._additional],
            padding_side=self.padding_side, model_input_names=["input_ids", "attention_mask"],
            clean_up_tokenization_spaces=False, model_max_length=self.model_max_length,
            chat_template=self.chat_template or self.default_chat_template,
        )  # fmt: skip


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


def _read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    """Parse `base64-token rank` lines."""
    if not path.is_file():
        raise FileNotFoundError(f"GLM-4 vocabulary not found: {str(path)!r}")
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: expected 'base64-token rank', got {line[:80]!r}") from e
    return ranks


# --------------------------------------------------------------------------------------------------
# AutoTokenizer

_SLOW_CLASSES: dict[str, type[Tokenizer]] = {
    "XGLMTokenizer": XGLMTokenizer,
    "LlamaTokenizer": LlamaTokenizer,
    "ChatGLM4Tokenizer": ChatGLM4Tokenizer,
}
_FAST_CLASSES: dict[str, type[Tokenizer]] = {
    "XGLMTokenizer": XGLMTokenizerFast,
    "LlamaTokenizer": LlamaTokenizerFast,
    "PreTrainedTokenizer": FastTokenizer,
    "ChatGLM4Tokenizer": FastTokenizer,
    "ChatGLMTokenizer": FastTokenizer,
}
_MODEL_TYPE_TO_CLASS = {
    "xglm": "XGLMTokenizer",
    "persimmon": "LlamaTokenizer",
    "glm": "ChatGLM4Tokenizer",
    "glm4": "ChatGLM4Tokenizer",
    "chatglm": "ChatGLM4Tokenizer",
}


class AutoTokenizer:
    """Pick and load the right tokenizer class from a checkpoint directory."""

    def __init__(self) -> None:
        raise TypeError("use AutoTokenizer.from_pretrained(path)")

    @staticmethod
    def from_pretrained(
        pretrained_model_name_or_path: str | os.PathLike, *, use_fast: bool = True, **kwargs: Any
    ) -> Tokenizer:
        """Load the tokenizer shipped in `pretrained_model_name_or_path`.

        tokenizer.json wins when present (unless use_fast=False and a slow vocabulary exists);
        otherwise the sentencepiece model or the GLM-4 tiktoken-format `tokenizer.model` is used.
        """
        return _load(None, pretrained_model_name_or_path, kwargs, use_fast)


_LOADING_KWARGS = (
    "trust_remote_code",
    "revision",
    "cache_dir",
    "local_files_only",
    "token",
    "force_download",
)


def _load(cls: type[Tokenizer] | None, name_or_path: Any, kwargs: dict[str, Any], use_fast: bool = True) -> Any:
    """Read the configs in the checkpoint directory, pick the class (unless given) and build it."""
    directory = _resolve_dir(name_or_path, **kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in _LOADING_KWARGS}
    init = {**_load_init_kwargs(directory), **kwargs}
    cls = cls or _pick_class(directory, init, use_fast)
    init.pop("tokenizer_class", None)
    tok = cls._from_dir(directory, init)
    tok.name_or_path = str(name_or_path)
    family = _family(directory, tok)
    if family is not None:
        tok.default_chat_template = _chat.default_template_for(family)
    return tok


def _family(directory: Path, tok: Tokenizer) -> str | None:
    """The model family whose built-in chat template applies ("glm4", "persimmon"), if known."""
    model_type = _read_json(directory / "config.json").get("model_type")
    if model_type in _MODEL_TYPE_TO_CLASS:
        return {"xglm": "xglm", "persimmon": "persimmon"}.get(model_type, "glm4")
    if isinstance(tok, ChatGLM4Tokenizer) or tok.convert_tokens_to_ids("[gMASK]") not in (
        None,
        tok.unk_token_id,
    ):
        return "glm4"
    if isinstance(tok, (LlamaTokenizer, LlamaTokenizerFast)):
        return "persimmon"
    return None


def _pick_class(directory: Path, init: dict[str, Any], use_fast: bool) -> type[Tokenizer]:
    name = str(init.get("tokenizer_class") or "")
    base = name[:-4] if name.endswith("Fast") else name
    if not base:
        base = _MODEL_TYPE_TO_CLASS.get(_read_json(directory / "config.json").get("model_type"), "")
    has_json = (directory / "tokenizer.json").is_file()
    tiktoken_vocab = _is_tiktoken_file(directory / "tokenizer.model")
    slow = _SLOW_CLASSES.get(base)
    if slow is None and tiktoken_vocab:
        slow = ChatGLM4Tokenizer
    if slow is XGLMTokenizer and not (directory / XGLMTokenizer.vocab_file_name).is_file():
        slow = None
    if slow is LlamaTokenizer and (tiktoken_vocab or not (directory / "tokenizer.model").is_file()):
        slow = None
    if slow is ChatGLM4Tokenizer and not tiktoken_vocab:
        slow = None
    if has_json and (use_fast or slow is None):
        return _FAST_CLASSES.get(base, FastTokenizer)
    if slow is not None:
        return slow
    if name and base not in _SLOW_CLASSES and base not in _FAST_CLASSES and name != "PreTrainedTokenizerFast":
        raise ValueError(f"unsupported tokenizer_class {name!r} in {directory}")
    found = sorted(p.name for p in directory.iterdir())
    raise FileNotFoundError(
        f"no usable tokenizer files in {directory}: need tokenizer.json, a sentencepiece model "
        f"(sentencepiece.bpe.model / tokenizer.model) or a GLM-4 tokenizer.model; found {found}"
    )


PreTrainedTokenizerFast = FastTokenizer
