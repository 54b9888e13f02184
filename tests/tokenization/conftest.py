"""Tiny vocabularies trained once per session, saved the way checkpoints ship them, plus references.

Nothing is downloaded: the training text is generated here (multilingual, emoji, code, odd whitespace).
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from .corpus import GLM4_PATTERN, GLM4_SPECIALS, generate_corpus

transformers = pytest.importorskip("transformers")
spm = pytest.importorskip("sentencepiece")


@pytest.fixture(scope="session")
def corpus() -> list[str]:
    return generate_corpus()


# ---------------------------------------------------------------- GLM-4


def _train_glm4_ranks(corpus: list[str], vocab_size: int = 1200) -> dict[bytes, int]:
    """Byte-level BPE with the GLM-4 pre-tokenizer; ranks in merge order (a valid tiktoken vocabulary)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    return {bytes(byte_decoder[c] for c in token): rank for rank, (token, _) in enumerate(vocab)}


def glm4_tokenizer_config(n: int) -> dict:
    """tokenizer_config.json as the original GLM-4 release ships it (remote-code class)."""
    return {
        "added_tokens_decoder": {
            str(n + i): {
                "content": t,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in enumerate(GLM4_SPECIALS)
        },
        "additional_special_tokens": GLM4_SPECIALS,
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]},
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "model_max_length": 128000,
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "remove_space": False,
        "tokenizer_class": "ChatGLM4Tokenizer",
    }


@pytest.fixture(scope="session")
def glm4_ranks(corpus) -> dict[bytes, int]:
    return _train_glm4_ranks(corpus)


@pytest.fixture(scope="session")
def glm4_original_dir(tmp_path_factory, glm4_ranks) -> Path:
    """The original release's layout: tiktoken-format tokenizer.model + tokenizer_config.json."""
    d = tmp_path_factory.mktemp("glm4_original")
    lines = [f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(glm4_ranks.items(), key=lambda x: x[1])]
    (d / "tokenizer.model").write_text("".join(lines))
    (d / "tokenizer_config.json").write_text(json.dumps(glm4_tokenizer_config(len(glm4_ranks)), indent=2))
    (d / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    return d


def tokenizer_json_from_ranks(ranks: dict[bytes, int]):
    """A byte-level BPE `tokenizers.Tokenizer` from tiktoken ranks: merges derived from the ranks as the
    reference's TikTokenConverter does (written out here so that tiktoken is not needed)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    byte_encoder = bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    merges = []
    for token, rank in ranks.items():
        local = [
            (token[:i], token[i:], rank) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks
        ]
        merges += sorted(local, key=lambda m: (ranks[m[0]], ranks[m[1]]))
    merges.sort(key=lambda m: m[2])
    vocab = {as_str(t): r for t, r in ranks.items()}
    tok = Tokenizer(models.BPE(vocab, [(as_str(a), as_str(b)) for a, b, _ in merges], ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


@pytest.fixture(scope="session")
def glm4_hf_dir(tmp_path_factory, glm4_ranks) -> Path:
    """The `-hf` layout: tokenizer.json converted from the same ranks, saved by PreTrainedTokenizerFast."""
    from tokenizers import AddedToken, processors
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer_json_from_ranks(glm4_ranks)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GLM4_SPECIALS])
    gmask, sop = backend.token_to_id("[gMASK]"), backend.token_to_id("<sop>")
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK]:0 <sop>:0 $A:0",
        pair="[gMASK]:0 <sop>:0 $A:0 $B:1",
        special_tokens=[("[gMASK]", gmask), ("<sop>", sop)],
    )
    ref = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=GLM4_SPECIALS,
        padding_side="left",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
    )
    d = tmp_path_factory.mktemp("glm4_hf")
    ref.save_pretrained(d)
    (d / "config.json").write_text(json.dumps({"model_type": "glm"}))
    return d


# ---------------------------------------------------------------- XGLM


@pytest.fixture(scope="session")
def xglm_dirs(tmp_path_factory, corpus) -> dict[str, Path]:
    """Sentencepiece BPE saved with XGLMTokenizer ("slow") and converted with XGLMTokenizerFast ("fast")."""
    from transformers import XGLMTokenizer, XGLMTokenizerFast

    work = tmp_path_factory.mktemp("xglm_train")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(work / "sp"),
        model_type="bpe",
        vocab_size=900,
        character_coverage=1.0,
        minloglevel=2,
    )
    slow_dir, fast_dir = tmp_path_factory.mktemp("xglm_slow"), tmp_path_factory.mktemp("xglm_fast")
    XGLMTokenizer(str(work / "sp.model")).save_pretrained(slow_dir)
    XGLMTokenizerFast.from_pretrained(slow_dir).save_pretrained(fast_dir)
    for d in (slow_dir, fast_dir):
        (d / "config.json").write_text(json.dumps({"model_type": "xglm"}))
    return {"slow": slow_dir, "fast": fast_dir}


# ---------------------------------------------------------------- Persimmon (Llama convention)


@pytest.fixture(scope="session")
def persimmon_sp_model(tmp_path_factory, corpus) -> Path:
    work = tmp_path_factory.mktemp("persimmon_train")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=str(work / "sp"),
        model_type="unigram",
        vocab_size=800,
        byte_fallback=True,
        hard_vocab_limit=False,
        character_coverage=0.9995,
        split_digits=True,
        minloglevel=2,
        user_defined_symbols=["|ENDOFTEXT|"],
    )
    return work / "sp.model"


@pytest.fixture(scope="session")
def persimmon_dirs(tmp_path_factory, persimmon_sp_model) -> dict[str, Path]:
    """LlamaTokenizer saves (legacy and non-legacy) and a LlamaTokenizerFast conversion."""
    from transformers import LlamaTokenizer, LlamaTokenizerFast

    dirs = {}
    for name, kwargs in {
        "legacy": {"legacy": True},
        "nonlegacy": {"legacy": False},
        "endoftext": {
            "legacy": True,
            "bos_token": "|ENDOFTEXT|",
            "eos_token": "|ENDOFTEXT|",
            "add_eos_token": True,
        },
    }.items():
        d = tmp_path_factory.mktemp(f"persimmon_{name}")
        LlamaTokenizer(str(persimmon_sp_model), **kwargs).save_pretrained(d)
        (d / "config.json").write_text(json.dumps({"model_type": "persimmon"}))
        dirs[name] = d
    for name, source in (("fast", "legacy"), ("fast_endoftext", "endoftext")):
        fast = tmp_path_factory.mktemp(f"persimmon_{name}")
        LlamaTokenizerFast.from_pretrained(dirs[source]).save_pretrained(fast)
        (fast / "config.json").write_text(json.dumps({"model_type": "persimmon"}))
        dirs[name] = fast
    return dirs
