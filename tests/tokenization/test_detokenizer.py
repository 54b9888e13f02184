"""The streaming detokenizer on every tokenizer class: what it emits joins up to `decode` for any ids
(random, special, partial UTF-8, encoded multilingual text), with and without prompt context, and the
ids it re-decodes per token do not grow with the text."""

from __future__ import annotations

import functools

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmkit.tokenization import AutoTokenizer, StreamingDetokenizer, Tokenizer

from .corpus import CASES, STRINGS

BUNDLED = ["default:glm", "default:xglm", "default:persimmon"]
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", params=list(CASES) + BUNDLED)
def tok(request):
    if request.param in BUNDLED:
        return AutoTokenizer.from_pretrained(request.param)
    fixture, key, cls, _ = CASES[request.param]
    directory = request.getfixturevalue(fixture)
    tokenizer = AutoTokenizer.from_pretrained(directory[key] if key else directory)
    assert type(tokenizer) is cls
    return tokenizer


@functools.cache
def _pools(tok) -> dict[str, list]:
    """Ids worth drawing: specials, ids that decode to U+FFFD alone (parts of multi-byte characters,
    byte-fallback pieces), and encoded text (CJK, emoji, code, odd whitespace)."""
    partial = [i for i in range(len(tok)) if "\ufffd" in tok.decode([i])]
    texts = [tok.encode(s, add_special_tokens=False) for s in STRINGS if s.strip()]
    assert all(texts)
    return {"special": sorted(set(tok.all_special_ids)), "partial": partial, "texts": texts}


def _ids(data, tok) -> list[int]:
    pools = _pools(tok)
    kinds = [st.integers(0, len(tok) - 1), st.sampled_from(pools["special"])]
    one = st.one_of(*kinds, *([st.sampled_from(pools["partial"])] if pools["partial"] else []))
    text = st.lists(st.sampled_from(pools["texts"]), min_size=1, max_size=3).map(lambda ts: sum(ts, []))
    kind = data.draw(st.sampled_from(["random", "text", "mixed"]))
    if kind == "random":
        return data.draw(st.lists(one, max_size=40))
    ids = data.draw(text)
    if kind == "mixed":  # text with stray ids spliced in
        for i in data.draw(st.lists(one, max_size=6)):
            at = data.draw(st.integers(0, len(ids)))
            ids = ids[:at] + [i] + ids[at:]
    return ids


@SETTINGS
@given(data=st.data())
def test_stream_joins_up_to_decode(tok, data):
    ids = _ids(data, tok)
    kwargs = {"skip_special_tokens": data.draw(st.booleans()), "clean_up_tokenization_spaces": data.draw(st.booleans())}
    detok = tok.streaming_detokenizer(**kwargs)
    pieces = []
    for k, i in enumerate(ids):
        pieces.append(detok.add(i))
        # what was emitted is final; what is held back is what decode would show now
        assert detok.text + detok.peek() == tok.decode(ids[: k + 1], **kwargs)
    assert detok.text == "".join(pieces)
    assert "".join(pieces) + detok.finalize() == tok.decode(ids, **kwargs)


@SETTINGS
@given(data=st.data())
def test_prefix_ids_give_the_text_after_the_prompt(tok, data):
    ids, skip = _ids(data, tok), data.draw(st.booleans())
    cut = data.draw(st.integers(0, len(ids)))
    prompt, generated = ids[:cut], ids[cut:]
    detok = tok.streaming_detokenizer(skip_special_tokens=skip, prefix_ids=prompt)
    got = "".join(detok.add(i) for i in generated) + detok.finalize()
    want = tok.decode(prompt + generated, skip_special_tokens=skip)[len(tok.decode(prompt, skip_special_tokens=skip)) :]
    assert got == want
    detok.reset()  # starts over, from the prompt again
    assert detok.add_many(generated) + detok.finalize() == want


def test_first_word_keeps_its_space_after_a_prompt(tok):
    ids = tok.encode("Hello world, again", add_special_tokens=False)
    cut = next(k for k in range(len(ids)) if tok.decode(ids[:k]) == "Hello")
    prompt, generated = ids[:cut], ids[cut:]
    detok = tok.streaming_detokenizer(prefix_ids=prompt)
    assert detok.add_many(generated) + detok.finalize() == " world, again"
    alone = tok.streaming_detokenizer()  # without context: exactly what decode shows
    assert alone.add_many(generated) + alone.finalize() == tok.decode(generated, skip_special_tokens=True)


def test_special_tokens_are_skipped_or_kept(tok):
    ids = tok.encode("Hello world", add_special_tokens=False)
    eos = tok.eos_token_id
    for skip in (True, False):
        detok = tok.streaming_detokenizer(skip_special_tokens=skip)
        text = detok.add_many(ids + [eos]) + detok.finalize()
        assert text == tok.decode(ids + [eos], skip_special_tokens=skip)
        assert (tok.eos_token in text) is not skip


def test_partial_characters_are_held_back(tok):
    text = "你好😀👨‍👩‍👧 é"
    ids = tok.encode(text, add_special_tokens=False)
    detok = tok.streaming_detokenizer()
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.finalize() == tok.decode(ids, skip_special_tokens=True)
    # an incomplete character at the end comes out as decode writes it, on finalize
    broken = tok.streaming_detokenizer()
    tail = [i for i in _pools(tok)["partial"] if tok.decode([i]) == "\ufffd"][:1]  # (none in XGLM's vocabulary)
    assert broken.add_many(ids + tail) + broken.finalize() == tok.decode(ids + tail, skip_special_tokens=True)


def test_cost_per_token_does_not_grow_with_the_text(tok, monkeypatch):
    sizes: list[int] = []
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: sizes.append(len(ids)) or decode(ids, **kw))
    ids = tok.encode(" ".join(STRINGS), add_special_tokens=False)

    def cost(repeat: int) -> tuple[int, float]:
        sizes.clear()
        detok = tok.streaming_detokenizer(skip_special_tokens=False)
        for i in ids * repeat:
            detok.add(i)
        detok.finalize()
        return max(sizes), sum(sizes) / (len(ids) * repeat)

    (short_max, short_mean), (long_max, long_mean) = cost(2), cost(8)
    assert long_max == short_max < len(ids) / 4  # the window: ids since the last cut, never the text
    assert long_mean <= short_mean + 0.01 and short_mean < 4


class _Chars:
    """A tokenizer whose ids are code points: every clean-up rule can fall across a cut."""

    all_special_ids: list[int] = []
    clean_up_tokenization_spaces = True

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=True):
        text = "".join(map(chr, ids))
        return Tokenizer.clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def convert_ids_to_tokens(self, index):
        return chr(index)


@settings(max_examples=500, deadline=None)
@given(text=st.lists(st.sampled_from([*" .?!,'ntmsvreNx\n", " n't", " 're", " 've", " 's", " 'm", " ' "])).map("".join))
def test_clean_up_follows_the_whole_text(text):
    detok = StreamingDetokenizer(_Chars())
    ids = [ord(c) for c in text]
    assert detok.add_many(ids) + detok.finalize() == Tokenizer.clean_up_tokenization(text)
