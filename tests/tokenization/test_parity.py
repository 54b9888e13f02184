"""glmkit tokenizers against the reference tokenizers, on tiny vocabularies trained in conftest."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import transformers

from glmkit.tokenization import (
    AutoTokenizer,
    ChatGLM4Tokenizer,
    LlamaTokenizer,
    LlamaTokenizerFast,
    XGLMTokenizer,
    XGLMTokenizerFast,
)

from .corpus import CASES, GLM4_SPECIALS, PREFIXED, SLOW_SP_CASES, STRINGS, load_reference


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
    fixture, key, cls, kind = CASES[request.param]
    directory = request.getfixturevalue(fixture)
    directory = directory[key] if key else directory
    ours = AutoTokenizer.from_pretrained(directory)
    assert type(ours) is cls
    return request.param, ours, load_reference(kind, directory), directory


def test_ids_match(case):
    name, ours, ref, _ = case
    for s in STRINGS:
        for add in (True, False):
            if add and name.startswith("glm4") and s in PREFIXED:
                continue
            assert ours(s, add_special_tokens=add)["input_ids"] == ref(s, add_special_tokens=add)["input_ids"], s
        assert ours.encode(s) == ref.encode(s) if s not in PREFIXED or not name.startswith("glm4") else True
        assert ours.tokenize(s) == ref.tokenize(s), s


def test_pairs_match(case):
    _, ours, ref, _ = case
    rng = random.Random(1)
    for s in STRINGS[:60]:
        other = rng.choice(STRINGS)
        ours_out = ours(s, other, return_token_type_ids=True, return_special_tokens_mask=True)
        ref_out = ref(s, other, return_token_type_ids=True, return_special_tokens_mask=True)
        assert ours_out["input_ids"] == ref_out["input_ids"], (s, other)
        if not isinstance(ours, ChatGLM4Tokenizer):  # the remote code's mask / type ids have the wrong length
            assert ours_out["token_type_ids"] == ref_out["token_type_ids"], (s, other)
            assert ours_out["special_tokens_mask"] == ref_out["special_tokens_mask"], (s, other)
    batch = [(a, b) for a, b in zip(STRINGS[:8], STRINGS[8:16])]
    assert ours(batch)["input_ids"] == ref(batch)["input_ids"]


def test_decode_matches(case):
    _, ours, ref, _ = case
    all_ids = [ref(s)["input_ids"] for s in STRINGS]
    for ids in all_ids:
        for skip in (True, False):
            for clean in (None, True, False):
                got = ours.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean)
                assert got == ref.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=clean), ids
    assert ours.batch_decode(all_ids[:10], skip_special_tokens=True) == ref.batch_decode(
        all_ids[:10], skip_special_tokens=True
    )
    tensor = torch.tensor(all_ids[7])
    assert ours.decode(tensor) == ref.decode(tensor)
    assert ours.decode(int(all_ids[7][-1])) == ref.decode(int(all_ids[7][-1]))


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding(case, side):
    name, ours, ref, _ = case
    if ref.pad_token is None:
        ref.pad_token = ours.pad_token = ref.eos_token
    if name == "glm4_original" and side == "right":
        pytest.skip("the remote-code tokenizer only pads on the left")
    texts = [s for s in STRINGS[:30] if s not in PREFIXED]
    variants = [
        {"padding": True},
        {"padding": "longest", "padding_side": side},
        {"padding": "max_length", "max_length": 48, "truncation": True},
        {"padding": True, "pad_to_multiple_of": 8},
    ]
    if name != "glm4_original":  # the remote code always returns an attention mask
        variants.append({"padding": True, "return_attention_mask": False})
    for kwargs in variants:
        ours.padding_side = ref.padding_side = side
        got, want = ours(texts, **kwargs), ref(texts, **kwargs)
        assert dict(got) == dict(want), kwargs
    got, want = ours(texts, padding=True, return_tensors="pt"), ref(texts, padding=True, return_tensors="pt")
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]) and got[key].dtype == want[key].dtype, key
    got, want = ours(texts[3], return_tensors="np"), ref(texts[3], return_tensors="np")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


@pytest.mark.parametrize("side", ["left", "right"])
def test_truncation(case, side):
    name, ours, ref, _ = case
    ours.truncation_side = ref.truncation_side = side
    texts = [s for s in STRINGS[10:40] if s not in PREFIXED]
    for max_length in (1, 3, 5, 9, 17):
        for strategy in (True, "only_first"):
            assert (
                ours(texts, truncation=strategy, max_length=max_length)["input_ids"]
                == ref(texts, truncation=strategy, max_length=max_length)["input_ids"]
            ), (max_length, strategy)
        for a, b in zip(texts[:10], texts[10:20]):
            for strategy in ("longest_first", "only_second"):
                try:
                    want = ref(a, b, truncation=strategy, max_length=max_length)["input_ids"]
                except Exception:
                    with pytest.raises(ValueError):
                        ours(a, b, truncation=strategy, max_length=max_length)
                    continue
                if (
                    name.startswith(("glm4_hf", "xglm_fast", "persimmon_fast"))
                    or strategy == "only_second"
                    or max_length > 3
                ):
                    got = ours(a, b, truncation=strategy, max_length=max_length)["input_ids"]
                    assert got == want, (a, b, max_length, strategy)
    # max_length alone truncates, as in the reference
    assert ours(texts[0], max_length=4)["input_ids"] == ref(texts[0], max_length=4)["input_ids"]


def test_vocab_and_special_tokens(case):
    name, ours, ref, _ = case
    assert len(ours) == len(ref)
    assert ours.vocab_size == ref.vocab_size
    assert ours.get_vocab() == ref.get_vocab()
    ids = list(range(len(ref)))
    assert ours.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert ours.convert_ids_to_tokens(ids, skip_special_tokens=True) == ref.convert_ids_to_tokens(
        ids, skip_special_tokens=True
    )
    tokens = [t for t in ref.convert_ids_to_tokens(ids) if isinstance(t, str)]
    assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
    assert ours.special_tokens_map == ref.special_tokens_map
    assert ours.all_special_tokens == ref.all_special_tokens
    assert ours.all_special_ids == ref.all_special_ids
    for role in ("bos", "eos", "unk", "sep", "pad", "cls", "mask"):
        assert getattr(ours, f"{role}_token") == getattr(ref, f"{role}_token"), role
        assert getattr(ours, f"{role}_token_id") == getattr(ref, f"{role}_token_id"), role
    assert ours.padding_side == ref.padding_side
    assert ours.model_max_length == ref.model_max_length
    ids = ref("some text 你好", add_special_tokens=False)["input_ids"]
    assert ours.num_special_tokens_to_add() == ref.num_special_tokens_to_add()
    if name in SLOW_SP_CASES:
        # (fast reference tokenizers refuse this call; the GLM-4 remote code keeps a wrong-length base mask)
        assert ours.get_special_tokens_mask(ids) == ref.get_special_tokens_mask(ids)
        assert ours.get_special_tokens_mask(ids, ids) == ref.get_special_tokens_mask(ids, ids)
    full = ref("some text")["input_ids"]
    assert ours.get_special_tokens_mask(full, already_has_special_tokens=True) == ref.get_special_tokens_mask(
        full, already_has_special_tokens=True
    )
    if name in SLOW_SP_CASES:
        assert ours.build_inputs_with_special_tokens(ids, ids) == ref.build_inputs_with_special_tokens(ids, ids)
        assert ours.create_token_type_ids_from_sequences(ids, ids) == ref.create_token_type_ids_from_sequences(ids, ids)


def test_save_pretrained_loads_in_reference(case, tmp_path):
    name, ours, ref, _ = case
    ours.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert type(again) is type(ours)
    reloaded = load_reference(CASES[name][3], tmp_path)
    for s in STRINGS[:40]:
        if s in PREFIXED:
            continue
        want = ref(s)["input_ids"]
        assert again(s)["input_ids"] == want, s
        assert reloaded(s)["input_ids"] == want, s
    assert reloaded.special_tokens_map == ref.special_tokens_map
    assert reloaded.padding_side == ref.padding_side


def test_reference_save_loads_in_glmkit(case, tmp_path):
    name, ours, ref, _ = case
    ref.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for s in STRINGS[:40]:
        if s not in PREFIXED:
            assert again(s)["input_ids"] == ref(s)["input_ids"], s


def test_batch_encoding_api(case):
    _, ours, _, _ = case
    if ours.pad_token is None:
        ours.pad_token = ours.eos_token
    batch = ours(["hello world", "你好"], padding=True, return_tensors="pt")
    assert batch.input_ids is batch["input_ids"]
    moved = batch.to("cpu")
    assert moved is batch and batch["input_ids"].device.type == "cpu"
    assert batch.input_ids.shape == batch.attention_mask.shape
    with pytest.raises(AttributeError):
        batch.no_such_key  # noqa: B018
    single = ours("hello", return_tensors="pt")
    assert single["input_ids"].dim() == 2 and single["input_ids"].shape[0] == 1


def test_sentencepiece_only_dir_is_slow_and_json_wins(xglm_dirs, persimmon_dirs):
    assert type(AutoTokenizer.from_pretrained(xglm_dirs["slow"])) is XGLMTokenizer
    assert type(AutoTokenizer.from_pretrained(xglm_dirs["fast"])) is XGLMTokenizerFast  # both files present
    assert type(AutoTokenizer.from_pretrained(xglm_dirs["fast"], use_fast=False)) is XGLMTokenizer
    assert type(AutoTokenizer.from_pretrained(persimmon_dirs["fast"])) is LlamaTokenizerFast


def test_xglm_layout(xglm_dirs):
    for key in ("slow", "fast"):
        tok = AutoTokenizer.from_pretrained(xglm_dirs[key])
        a = tok("hello", add_special_tokens=False)["input_ids"]
        b = tok("world", add_special_tokens=False)["input_ids"]
        eos = tok.convert_tokens_to_ids("</s>")
        assert tok("hello")["input_ids"] == [eos] + a
        assert tok("hello", "world")["input_ids"] == [eos] + a + [eos, eos] + b
        madeup = [tok.convert_tokens_to_ids(f"<madeupword{i}>") for i in range(7)]
        assert madeup == list(range(len(tok) - 7, len(tok)))
        assert [f"<madeupword{i}>" for i in range(7)] == tok.additional_special_tokens
    slow = AutoTokenizer.from_pretrained(xglm_dirs["slow"])
    assert slow.create_token_type_ids_from_sequences([5, 6], [7]) == [0] * 6
    assert slow.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]  # fairseq order


def test_glm4_tiktoken_matches_tiktoken(glm4_original_dir, glm4_ranks):
    """The pure-Python BPE against the real tiktoken on the same ranks and pattern."""
    tiktoken = pytest.importorskip("tiktoken")
    from .glm4_reference import PAT_STR

    enc = tiktoken.Encoding(name="t", pat_str=PAT_STR, mergeable_ranks=glm4_ranks, special_tokens={})
    ours = ChatGLM4Tokenizer.from_pretrained(glm4_original_dir)
    rng = random.Random(3)
    alphabet = "abAB ab\n\t'sé你😀1 ,."
    texts = STRINGS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for t in texts:
        assert (
            ours(t, add_special_tokens=False, split_special_tokens=False)["input_ids"]
            == enc.encode(t, disallowed_special=())
            if not any(s in t for s in GLM4_SPECIALS)
            else True
        ), t


def test_glm4_prefix_added_once(glm4_original_dir, glm4_hf_dir):
    for directory in (glm4_original_dir, glm4_hf_dir):
        tok = AutoTokenizer.from_pretrained(directory)
        prefix = tok.convert_tokens_to_ids(["[gMASK]", "<sop>"])
        body = tok("<|user|>\nhi", add_special_tokens=False)["input_ids"]
        assert tok("<|user|>\nhi")["input_ids"] == prefix + body
        assert tok("[gMASK]<sop><|user|>\nhi")["input_ids"] == prefix + body
        assert tok(["[gMASK]<sop>x", "x"])["input_ids"] == [prefix + tok.encode("x", add_special_tokens=False)] * 2
        messages = [{"role": "user", "content": "hi"}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.startswith("[gMASK]<sop>") and text.count("[gMASK]") == 1
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        assert ids[:2] == prefix and ids[2:4] != prefix
        assert tok(text)["input_ids"] == ids  # re-tokenizing the rendered text does not double it


def test_glm4_position_ids_from_original(glm4_original_dir):
    tok = AutoTokenizer.from_pretrained(glm4_original_dir)
    out = tok(["a b c", "a"], padding=True)
    assert out["position_ids"][1][-1] == 2 and out["position_ids"][1][0] == 0
    assert tok.padding_side == "left"


def test_offsets_mapping_fast(glm4_hf_dir, xglm_dirs):
    for directory in (glm4_hf_dir, xglm_dirs["fast"]):
        ours, ref = AutoTokenizer.from_pretrained(directory), transformers.AutoTokenizer.from_pretrained(directory)
        texts = ["héllo wörld 你好", "a"]
        got = ours(texts, padding=True, return_offsets_mapping=True)
        want = ref(texts, padding=True, return_offsets_mapping=True)
        assert [list(map(tuple, o)) for o in got["offset_mapping"]] == want["offset_mapping"]
        got = ours(texts, padding=True, return_offsets_mapping=True, return_tensors="pt")
        assert torch.equal(
            got["offset_mapping"],
            ref(texts, padding=True, return_offsets_mapping=True, return_tensors="pt")["offset_mapping"],
        )
    with pytest.raises(NotImplementedError, match="fast"):
        AutoTokenizer.from_pretrained(xglm_dirs["slow"])("a", return_offsets_mapping=True)


def test_glm4_original_matches_tokenizer_json_from_same_ranks(glm4_original_dir, glm4_hf_dir):
    """No tiktoken needed: the original-format tokenizer equals the reference PreTrainedTokenizerFast
    built from the same ranks (the `-hf` conversion) on ids, and on decoding of ordinary text."""
    ours = AutoTokenizer.from_pretrained(glm4_original_dir)
    ref = transformers.AutoTokenizer.from_pretrained(glm4_hf_dir)
    rng = random.Random(5)
    alphabet = "abAB ab\n\t'sé你😀1 ,.\r"
    texts = STRINGS + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))) for _ in range(300)]
    for t in texts:
        ids = ours(t, add_special_tokens=False)["input_ids"]
        assert ids == ref(t, add_special_tokens=False)["input_ids"], t
        if t not in PREFIXED:
            assert ours(t)["input_ids"] == ref(t)["input_ids"], t
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), t


@pytest.mark.parametrize("key", ["legacy", "fast"])
def test_adding_special_tokens(persimmon_dirs, key):
    ours = AutoTokenizer.from_pretrained(persimmon_dirs[key])
    ref = load_reference("auto" if key == "fast" else "slow", persimmon_dirs[key])
    new = {"pad_token": "[PAD]", "additional_special_tokens": ["<tool>", "|ENDOFTEXT|"]}
    assert ours.add_special_tokens(new) == ref.add_special_tokens(new)
    assert ours.add_tokens(["newword", "hello"]) == ref.add_tokens(["newword", "hello"])
    assert len(ours) == len(ref) and ours.is_fast == ref.is_fast
    assert ours.special_tokens_map == ref.special_tokens_map
    text = "[PAD] x<tool>newword hello |ENDOFTEXT|"
    assert ours(text)["input_ids"] == ref(text)["input_ids"]
    ids = ref(text)["input_ids"]
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert ours(["a", "b c d"], padding=True)["input_ids"] == ref(["a", "b c d"], padding=True)["input_ids"]
    assert ours.get_added_vocab() == ref.get_added_vocab()


def test_class_from_bare_files_and_model_type(tmp_path, glm4_original_dir, xglm_dirs, persimmon_dirs):
    """Without tokenizer_config.json the files and config.json's model_type decide, with the defaults."""
    import json
    import shutil

    layouts = {
        "glm": (glm4_original_dir, "tokenizer.model", None, ChatGLM4Tokenizer),
        "xglm": (xglm_dirs["slow"], "sentencepiece.bpe.model", "xglm", XGLMTokenizer),
        "persimmon": (persimmon_dirs["legacy"], "tokenizer.model", "persimmon", LlamaTokenizer),
    }
    for name, (source, vocab, model_type, cls) in layouts.items():
        bare = tmp_path / name
        bare.mkdir()
        shutil.copy(source / vocab, bare / vocab)
        if model_type:
            (bare / "config.json").write_text(json.dumps({"model_type": model_type}))
        tok, full = AutoTokenizer.from_pretrained(bare), AutoTokenizer.from_pretrained(source)
        assert type(tok) is cls
        for s in STRINGS[:30]:
            assert tok(s)["input_ids"] == full(s)["input_ids"], (name, s)
        assert tok.special_tokens_map == full.special_tokens_map
