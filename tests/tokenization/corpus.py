"""Shared test data: text to train tiny vocabularies on, strings to compare on, the test cases."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from glmkit.tokenization import (
    ChatGLM4Tokenizer,
    FastTokenizer,
    LlamaTokenizer,
    LlamaTokenizerFast,
    XGLMTokenizer,
    XGLMTokenizerFast,
)

GLM4_SPECIALS = [
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
]
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

WORDS = {
    "en": "the quick brown fox jumps over lazy dog it's we're they've I'm you'll she'd model token "
    "language hello world attention transformer layer cache padding".split(),
    "zh": "你好 世界 语言 模型 人工智能 训练 数据 中文 分词 我们 今天 天气 很好 北京 清华".split(),
    "fr": "café naïve déjà élève garçon où très façade crème brûlée noël".split(),
    "de": "über straße groß müde schön fräulein".split(),
    "ar": "مرحبا بالعالم اللغة العربية نموذج".split(),
    "he": "שלום עולם שפה מודל".split(),
    "ru": "привет мир язык модель данные".split(),
    "ja": "こんにちは 世界 日本語 カタカナ".split(),
    "emoji": "😀 🎉 👍🏽 🇫🇷 👨‍👩‍👧 ❤️ 🚀".split(),
    "code": [
        "def",
        "f(x):",
        "return",
        "x**2",
        "{",
        "}",
        "[1,",
        "2,",
        "3]",
        "if",
        "x",
        "==",
        "0:",
        "//",
        "#include",
        "<stdio.h>",
        'printf("%d\\n",',
        "i);",
        "->",
        "&&",
        "||",
        "0x1F",
        "3.14159",
        "2024",
    ],
}
SEPARATORS = [" ", " ", " ", "  ", "\t", "\n", "\r\n", "\n\n", "   ", " \t "]

TEST_STRINGS = [
    "",
    " ",
    "  ",
    "\n",
    "\t",
    "\r\n",
    "a",
    "Hello world",
    "Hello  world",
    " leading space",
    "trailing space ",
    "Hello, world! How are you?",
    "It's a test; we're sure they'll pass.",
    "I'M SHOUTING 'S 'T",
    "你好，世界！今天天气很好。",
    "我们训练语言模型",
    "中文English混合text",
    "café naïve déjà",
    "e\u0301 composed vs é precomposed",
    "Straße und Größe",
    "مرحبا بالعالم",
    "שלום עולם",
    "привет мир",
    "こんにちは世界",
    "😀🎉 emoji 👍🏽 and 👨‍👩‍👧 family",
    "🇫🇷🇩🇪",
    "tabs\tand\t\ttabs",
    "crlf\r\nline\r\n",
    "multiple\n\n\nnewlines",
    "   many    spaces    here   ",
    "def f(x):\n    return x**2\n",
    '#include <stdio.h>\nint main() { printf("%d\\n", 42); }',
    "numbers 1234567 3.14159 0x1F 2024-01-01",
    "special <|endoftext|> in text",
    "[gMASK]<sop>prefix in text",
    "<s> and </s> written",
    "<unk> <pad> <mask>",
    "<madeupword0> x <madeupword6>",
    "<|user|>\nhi<|assistant|>",
    "mixed\u00a0nbsp\u2003em space",
    "zero\u200bwidth",
    "ﬁ ligature ① ™ ½",
    "ALL CAPS WORDS",
    "a" * 50,
    "ab" * 30,
    "🚀" * 5,
    "x\ty\nz\r\nw",
    "end with newline\n",
    "\u0000 nul and \u007f del",
    "quotes “curly” ‘single’ «guillemets»",
    "math ∑ ∫ √ ≤ ≥ ≠",
    "URL https://example.com/a?b=c&d=e",
    "email someone@example.org",
    "ẞ Ǆ ǅ ǆ dz",
    "한국어 텍스트",
    "ไทย ภาษา",
    "हिन्दी भाषा",
    "Ελληνικά κείμενο",
]


SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def random_lines(n_lines: int, seed: int = 0) -> list[str]:
    """Deterministic mixed-script lines: words of many scripts joined by odd whitespace."""
    rng = random.Random(seed)
    groups = list(WORDS)
    lines = []
    for _ in range(n_lines):
        parts = []
        for _ in range(rng.randint(3, 16)):
            word = rng.choice(WORDS[rng.choice(groups)])
            if rng.random() < 0.1:
                word = word.capitalize()
            parts.append(word + rng.choice(SEPARATORS))
        lines.append("".join(parts))
    return lines


def generate_corpus() -> list[str]:
    """Training text for the tiny vocabularies (plus English prose from ../shared/data when it is
    there; nothing depends on it)."""
    lines = random_lines(3000) + TEST_STRINGS
    prose = SHARED_DATA / "tinyshakespeare.txt"
    if prose.is_file():
        lines += prose.read_text(encoding="utf-8", errors="replace").splitlines()[:2000]
    return lines


# ---------------------------------------------------------------- the compared tokenizers
# name -> (fixture, key in the fixture's dict, expected glmkit class, how the reference loads)
CASES = {
    "glm4_original": ("glm4_original_dir", None, ChatGLM4Tokenizer, "remote"),
    "glm4_hf": ("glm4_hf_dir", None, FastTokenizer, "auto"),
    "xglm_slow": ("xglm_dirs", "slow", XGLMTokenizer, "slow"),
    "xglm_fast": ("xglm_dirs", "fast", XGLMTokenizerFast, "auto"),
    "persimmon_legacy": ("persimmon_dirs", "legacy", LlamaTokenizer, "slow"),
    "persimmon_nonlegacy": ("persimmon_dirs", "nonlegacy", LlamaTokenizer, "slow"),
    "persimmon_endoftext": ("persimmon_dirs", "endoftext", LlamaTokenizer, "slow"),
    "persimmon_fast": ("persimmon_dirs", "fast", LlamaTokenizerFast, "auto"),
    "persimmon_fast_endoftext": ("persimmon_dirs", "fast_endoftext", LlamaTokenizerFast, "auto"),
}
# Texts that start with [gMASK]<sop> get the prefix once in glmkit (the reference adds it twice).
PREFIXED = {s for s in TEST_STRINGS if s.startswith("[gMASK]<sop>")}
EXTRA = random_lines(40, seed=7)  # unseen random lines as well
STRINGS = TEST_STRINGS + EXTRA
SLOW_SP_CASES = {"xglm_slow", "persimmon_legacy", "persimmon_nonlegacy", "persimmon_endoftext"}


def load_reference(kind: str, directory):
    """The reference tokenizer for a case: transformers' slow/fast class, or the GLM-4 remote code."""
    import transformers

    if kind == "remote":
        pytest.importorskip("tiktoken")  # the remote code runs on tiktoken (a test-only extra)
        from .glm4_reference import RefChatGLM4Tokenizer

        return RefChatGLM4Tokenizer.from_pretrained(directory)
    return transformers.AutoTokenizer.from_pretrained(directory, use_fast=kind == "auto")
