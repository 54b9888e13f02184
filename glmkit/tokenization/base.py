"""The shared front end: `Tokenizer` (the reference call API over a backend), `AddedToken`,
`BatchEncoding`, and the config/file helpers every backend uses."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import chat as _chat

if TYPE_CHECKING:
    from .detokenizer import StreamingDetokenizer

VERY_LARGE_INTEGER = int(1e30)  # the reference's "no limit" model_max_length
SPIECE_UNDERLINE = "▁"
SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
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
    from ..hub import resolve_checkpoint_dir

    path = Path(name_or_path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"expected a checkpoint directory, got the file {str(path)!r}")
    return resolve_checkpoint_dir(name_or_path, **kwargs)


class TokenizerFileError(ValueError):
    """A tokenizer file (tokenizer.json, a sentencepiece or tiktoken model, a config) is corrupt or truncated."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerFileError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerFileError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


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
        self._check_ids(ids)
        text = self._decode(ids, skip_special_tokens, **kwargs)
        clean = (
            self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        )
        return _cleanup(text) if clean else text

    def _check_ids(self, ids: list[Any]) -> None:
        """Every id an integer in [0, len(self)): the backends would return "" or raise from inside."""
        size = len(self)
        for i in ids:
            if not isinstance(i, int) or isinstance(i, bool):
                raise TypeError(f"decode takes integer token ids, got {i!r} ({type(i).__name__})")
            if not 0 <= i < size:
                raise ValueError(f"token id {i} is outside the vocabulary (valid ids are 0..{size - 1})")

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

    # ---- streaming ------------------------------------------------------------------------------
    def streaming_detokenizer(
        self, skip_special_tokens: bool = True, prefix_ids: list[int] | None = None, **decode_kwargs: Any
    ) -> StreamingDetokenizer:
        """An incremental decoder for generated ids: `add(id)` returns the text that is now final, at a
        cost per token independent of the text length.

        What it emits joins up to `decode(ids)`; with `prefix_ids` (the last prompt ids) it is
        `decode(prefix_ids + ids)[len(decode(prefix_ids)):]`, so a first word keeps its leading space.
        """
        from .detokenizer import StreamingDetokenizer

        return StreamingDetokenizer(self, skip_special_tokens, prefix_ids, **decode_kwargs)

    def _stream_byte_units(self, skip_special_tokens: bool) -> Callable[[int], bytes | str | None] | None:
        """Byte-level backends: id -> the bytes it adds to the UTF-8 stream (a str for a token decoded
        apart, which ends a byte run; None for one that adds nothing). None when not byte-level."""
        return None

    def _stream_run_breaks(self, skip_special_tokens: bool) -> tuple[set[int], set[int]]:
        """For a decode that puts a space *before* the run of pieces ahead of a special token (the
        legacy Llama quirk): (ids of the specials that do, ids that end a run without one)."""
        return set(), set()

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
        from .auto import _load

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
