"""GLM-4's original tokenizer: the tiktoken-format `tokenizer.model` (base64 token + rank per line),
implemented without tiktoken and without checkpoint code, and its conversion to a tokenizer.json.

The GLM-4 special tokens are defined here, once; the chat template (chat.py) and the loaders use them.
"""

from __future__ import annotations

import base64
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import chat as _chat
from .base import AddedToken, Tokenizer, TokenizerFileError
from .slow import SlowTokenizer

if TYPE_CHECKING:
    from .fast import FastTokenizer

GLM4_EOS_TOKEN = "<|endoftext|>"
GLM4_GMASK, GLM4_SOP = "[gMASK]", "<sop>"
GLM4_PREFIX = GLM4_GMASK + GLM4_SOP  # starts every GLM-4 input; add_special_tokens adds it once
GLM4_ROLE_TOKENS = {
    "system": "<|system|>",
    "user": "<|user|>",
    "assistant": "<|assistant|>",
    "observation": "<|observation|>",
}
# all of them, in id order: they follow the BPE ranks in the original vocabulary
GLM4_SPECIAL_TOKENS = (
    GLM4_EOS_TOKEN, "[MASK]", GLM4_GMASK, "[sMASK]", GLM4_SOP, "<eop>", *GLM4_ROLE_TOKENS.values(),
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
)  # fmt: skip
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class _GLM4Template:
    """The built-in GLM-4 chat template, read from chat.py on use (chat.py imports this module)."""

    def __get__(self, obj: Any, owner: type | None = None) -> str:
        return _chat.GLM4_CHAT_TEMPLATE


def _is_tiktoken_file(path: Path) -> bool:
    """True for a GLM-4 style vocabulary: text lines of `base64-token rank`."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        head = f.read(256)
    line = head.split(b"\n", 1)[0].strip()
    return re.fullmatch(rb"[A-Za-z0-9+/=]+ \d+", line) is not None


class ChatGLM4Tokenizer(SlowTokenizer):
    """The original GLM-4 vocabulary (`tokenizer.model`: base64 token + rank per line, tiktoken format).

    Byte-level BPE with tiktoken's merge rule (lowest rank first, leftmost on ties), the GLM-4
    pre-tokenizer regex, the 14 special tokens after the ranks, and `[gMASK]<sop>` prepended by
    `add_special_tokens` (once: not again when the text already starts with it).
    """

    model_input_names = ["input_ids", "attention_mask", "position_ids"]
    padding_side = "left"
    tokenizer_class_name = "ChatGLM4Tokenizer"
    default_chat_template = _GLM4Template()
    vocab_file_name = "tokenizer.model"
    default_special_tokens = {"eos_token": GLM4_EOS_TOKEN, "pad_token": GLM4_EOS_TOKEN}

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

    def _stream_byte_units(self, skip_special_tokens: bool) -> Callable[[int], bytes | str | None]:
        skipped = set(self.all_special_ids) if skip_special_tokens else set()
        return lambda index: None if index in skipped else self._id_to_token(index)

    def _prefix_to_dedupe(self) -> str:
        return GLM4_PREFIX

    def _prefix_ids(self) -> list[int]:
        return [self._added_encoder[GLM4_GMASK], self._added_encoder[GLM4_SOP]]

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

        from .fast import FastTokenizer
        from .fast import _byte_level_str as as_str

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
        prefix = f"{GLM4_GMASK}:0 {GLM4_SOP}:0"
        backend.post_processor = processors.TemplateProcessing(
            single=f"{prefix} $A:0", pair=f"{prefix} $A:0 $B:1", special_tokens=[(GLM4_GMASK, gmask), (GLM4_SOP, sop)]
        )
        roles = {role: str(tok) for role, tok in self._special.items() if tok is not None}
        return FastTokenizer(
            tokenizer_object=backend, **roles, additional_special_tokens=[str(t) for t in self._additional],
            padding_side=self.padding_side, model_input_names=["input_ids", "attention_mask"],
            clean_up_tokenization_spaces=False, model_max_length=self.model_max_length,
            chat_template=self.chat_template or self.default_chat_template,
        )  # fmt: skip


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
                raise TokenizerFileError(f"{path}:{n}: expected 'base64-token rank', got {line[:80]!r}") from e
    return ranks
