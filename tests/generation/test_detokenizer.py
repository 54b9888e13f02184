"""Streaming detokenization in the generation layer: TextStreamer / TextIteratorStreamer print the
reference's chunks (transformers' own streamers over the same tokenizer are the oracle) without
re-decoding all the ids at each put, and the detokenizer also runs over transformers tokenizers."""

from __future__ import annotations

import functools

import pytest
import torch
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmkit import AutoTokenizer
from glmkit.generation import TextIteratorStreamer, TextStreamer
from glmkit.tokenization import StreamingDetokenizer, streaming_detokenizer

BUNDLED = ["glm", "xglm", "persimmon"]
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXTS = [
    "Hello world, how are you?\nFine.",
    "你好，世界！今天天气很好。",
    "mixed 中文 and English words\n\n  indented line",
    "emoji 😀🎉 👍🏽 and a family 👨‍👩‍👧 here",
    "def f(x):\n    return x**2\n",
    "café naïve déjà vu   spaces   ",
    "привет мир\tи\tтабы",
]


@pytest.fixture(scope="module", params=BUNDLED)
def tok(request):
    return AutoTokenizer.from_pretrained(f"default:{request.param}")


@functools.cache
def _texts(tok) -> list[list[int]]:
    return [tok.encode(t, add_special_tokens=False) for t in TEXTS]


def _draw_ids(data, tok) -> list[int]:
    one = st.one_of(st.integers(0, len(tok) - 1), st.sampled_from(sorted(set(tok.all_special_ids))))
    ids = sum(data.draw(st.lists(st.sampled_from(_texts(tok)), min_size=1, max_size=3)), [])
    for i in data.draw(st.lists(one, max_size=4)):  # stray ids: specials, random pieces
        at = data.draw(st.integers(0, len(ids)))
        ids = ids[:at] + [i] + ids[at:]
    return ids


def _chunks(streamer_cls, tokenizer, puts, **kwargs) -> list[tuple[str, bool]]:
    got: list[tuple[str, bool]] = []

    class Collect(streamer_cls):
        def on_finalized_text(self, text, stream_end=False):
            got.append((text, stream_end))

    streamer = Collect(tokenizer, **kwargs)
    for _ in range(2):  # a streamer is reused across generate calls
        for value in puts:
            streamer.put(value)
        streamer.end()
    return got


@SETTINGS
@given(data=st.data())
def test_text_streamer_prints_the_reference_chunks(tok, data):
    ids = _draw_ids(data, tok)
    prompt = data.draw(st.integers(0, len(ids)))
    puts = [torch.tensor([ids[:prompt]])] + [torch.tensor([i]) for i in ids[prompt:]]  # as generate puts
    kwargs = {"skip_prompt": data.draw(st.booleans())}
    if data.draw(st.booleans()):
        kwargs["skip_special_tokens"] = True
    want = _chunks(transformers.TextStreamer, tok, puts, **kwargs)
    assert _chunks(TextStreamer, tok, puts, **kwargs) == want


def test_text_iterator_streamer_queues_the_reference_chunks(tok):
    ids = sum(_texts(tok), [])
    chunks = []
    for cls in (transformers.TextIteratorStreamer, TextIteratorStreamer):
        streamer = cls(tok, skip_prompt=True)
        for value in [torch.tensor([ids[:3]])] + [torch.tensor([i]) for i in ids[3:]]:
            streamer.put(value)
        streamer.end()
        chunks.append(list(streamer))
    assert chunks[0] == chunks[1] and len(chunks[1]) > 10


def test_text_streamer_does_not_redecode_the_text(tok, monkeypatch, capsys):
    sizes: list[int] = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: sizes.append(len(ids)) or decode(ids, **kw))
    ids = tok.encode(" ".join(TEXTS).replace("\n", " "), add_special_tokens=False)  # one long line

    def largest_decode(repeat: int) -> int:
        sizes.clear()
        streamer = TextStreamer(tok)
        for i in ids * repeat:
            streamer.put(torch.tensor([i]))
        streamer.end()
        return max(sizes)

    assert largest_decode(8) == largest_decode(2) < len(ids) / 4
    assert capsys.readouterr().out.count("emoji") == 2 + 8


# ---- the generic window, over transformers tokenizers (what the streamers use for them) ------------


@pytest.fixture(scope="module", params=BUNDLED)
def foreign(request):
    """The bundled vocabularies loaded by transformers: byte-level BPE, XGLM and legacy Llama (slow)."""
    from glmkit.bundled import path

    root = path(request.param)
    if request.param == "glm":
        return transformers.PreTrainedTokenizerFast(
            tokenizer_file=str(root / "tokenizer.json"), eos_token="<|endoftext|>"
        )
    if request.param == "xglm":
        return transformers.XGLMTokenizer(str(root / "sentencepiece.bpe.model"))
    return transformers.LlamaTokenizer(str(root / "tokenizer.model"), legacy=True)


@SETTINGS
@given(data=st.data())
def test_generic_window_over_a_transformers_tokenizer(foreign, data):
    n = len(foreign)
    ids = data.draw(st.lists(st.one_of(st.integers(0, n - 1), st.sampled_from(foreign.all_special_ids)), max_size=30))
    skip = data.draw(st.booleans())
    detok = streaming_detokenizer(foreign, skip_special_tokens=skip)
    assert type(detok) is StreamingDetokenizer
    assert detok.add_many(ids) + detok.finalize() == foreign.decode(ids, skip_special_tokens=skip)
    cut = data.draw(st.integers(0, len(ids)))
    detok = streaming_detokenizer(foreign, skip_special_tokens=skip, prefix_ids=ids[:cut])
    full, head = foreign.decode(ids, skip_special_tokens=skip), foreign.decode(ids[:cut], skip_special_tokens=skip)
    assert detok.add_many(ids[cut:]) + detok.finalize() == full[len(head) :]
