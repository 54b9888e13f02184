"""Property-based checks: ids and decoding equal the reference on arbitrary text, and decode(encode(s))
round-trips wherever the reference round-trips."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmkit.tokenization import AutoTokenizer

from .corpus import CASES, GLM4_SPECIALS, load_reference

INTERESTING = list("aAbBzZ eé你好世界😀👍🏽🇫🇷\u200b\u00a0\t\n\r'sd0129.,;:!?()[]{}<>|/\\\"#@&*-_=+~`^%$") + [
    "\u0301",
    "\u05e9",
    "\u0645",
    "ﬁ",
    "ß",
    "İ",
    "\u3000",
    "\U0001f468\u200d\U0001f469",
    "  ",
    "\r\n",
    "hello",
    " world",
    "<|user|>",
    "</s>",
    "<s>",
    "[gMASK]",
    "<unk>",
    "▁",
]
TEXT = st.one_of(
    st.lists(st.sampled_from(INTERESTING), max_size=30).map("".join),
    st.text(max_size=30),  # any unicode scalar value
)
PROPERTY_CASES = [
    "glm4_original",
    "glm4_hf",
    "xglm_slow",
    "xglm_fast",
    "persimmon_legacy",
    "persimmon_nonlegacy",
    "persimmon_fast",
]
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", params=PROPERTY_CASES)
def prop_case(request):
    fixture, key, _, kind = CASES[request.param]
    directory = request.getfixturevalue(fixture)
    directory = directory[key] if key else directory
    return request.param, AutoTokenizer.from_pretrained(directory), load_reference(kind, directory)


@SETTINGS
@given(text=TEXT)
def test_matches_reference_on_arbitrary_text(prop_case, text):
    name, ours, ref = prop_case
    ids = ours(text, add_special_tokens=False)["input_ids"]
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    if not text.startswith("[gMASK]<sop>"):
        assert ours(text)["input_ids"] == ref(text)["input_ids"]
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)


@SETTINGS
@given(text=TEXT)
def test_round_trip_where_reference_does(prop_case, text):
    name, ours, ref = prop_case
    ref_ids = ref(text, add_special_tokens=False)["input_ids"]
    if ref.decode(ref_ids) == text:
        assert ours.decode(ours(text, add_special_tokens=False)["input_ids"]) == text


@SETTINGS
@given(text=TEXT)
def test_glm4_byte_level_always_round_trips(prop_case, text):
    name, ours, _ = prop_case
    if not name.startswith("glm4") or any(s in text for s in GLM4_SPECIALS):
        return
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == text
