"""generate() against the reference's generate on tiny random models of every family."""

from __future__ import annotations

import contextlib
import importlib
import io
import threading

import pytest
import torch
import transformers
from conftest import scale_weights
from tokenizers import Tokenizer, decoders, models, trainers
from transformers.generation import logits_process as hf

import glmkit.generation.engine as gen_engine
import glmkit.generation.utils as gen_utils
from glmkit import AutoTokenizer
from glmkit.generation import GenerationConfig, TextIteratorStreamer, TextStreamer
from glmkit.generation.processors import build_processors

VOCAB = 96
FAMILIES = {
    "glm": ("GlmConfig", "GlmForCausalLM", "glmkit.models.glm", dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, pad_token_id=0, eos_token_id=1,
    )),
    "xglm": ("XGLMConfig", "XGLMForCausalLM", "glmkit.models.xglm", dict(
        d_model=48, ffn_dim=80, num_layers=2, attention_heads=4, pad_token_id=0, bos_token_id=2, eos_token_id=1,
        dropout=0.0, attention_dropout=0.0,
    )),
    "persimmon": ("PersimmonConfig", "PersimmonForCausalLM", "glmkit.models.persimmon", dict(
        hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, pad_token_id=0,
        eos_token_id=1, bos_token_id=2,
    )),
}  # fmt: skip


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(reference model, glmkit model) with the same weights, loaded through the real loader."""
    config_name, model_name, module_name, kwargs = FAMILIES[request.param]
    module = importlib.import_module(module_name)
    torch.manual_seed(0)
    ref = getattr(transformers, model_name)(getattr(transformers, config_name)(vocab_size=VOCAB, **kwargs)).eval()
    scale_weights(ref, factor=6.0)
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path)
    return ref, getattr(module, model_name).from_pretrained(path)


def prompts(batch=1, length=7, left_pad=0, seed=3):
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if left_pad:
        mask[-1, :left_pad] = 0
        ids[-1, :left_pad] = 0
    return ids, mask


def both(pair, ids, mask, **kwargs):
    """Same call to both. glmkit stops on the union of the argument's and the config's EOS ids (GLM-4
    needs all of its three), the reference on the argument's alone: hand the reference the union."""
    ref, ours = pair
    ref_kwargs = dict(kwargs)
    if kwargs.get("eos_token_id") is not None:
        config_eos = ref.generation_config.eos_token_id
        config_eos = [config_eos] if isinstance(config_eos, int) else list(config_eos or [])
        ref_kwargs["eos_token_id"] = list(dict.fromkeys(list(kwargs["eos_token_id"]) + config_eos))
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, **ref_kwargs)
        got = ours.generate(ids, attention_mask=mask, **kwargs)
    return want, got


def assert_same_tokens(want, got):
    assert got.shape == want.shape, f"{tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(got, want), f"first difference at {(got != want).nonzero()[0].tolist()}"


@pytest.mark.parametrize("batch,left_pad", [(1, 0), (3, 4)])
def test_greedy_identical(pair, batch, left_pad):
    ids, mask = prompts(batch, left_pad=left_pad)
    want, got = both(pair, ids, mask, max_new_tokens=36, do_sample=False, eos_token_id=None)
    assert got.shape[1] == ids.shape[1] + 36
    assert_same_tokens(want, got)


def test_left_padded_rows_equal_alone(pair):
    ids, mask = prompts(2, left_pad=3)
    _, batched = both(pair, ids, mask, max_new_tokens=20, eos_token_id=None)
    alone = pair[1].generate(ids[1:, 3:], max_new_tokens=20, eos_token_id=None)
    assert torch.equal(batched[1, 3:], alone[0])


@pytest.mark.parametrize("option", [
    dict(repetition_penalty=1.3), dict(no_repeat_ngram_size=2), dict(bad_words_ids=[[5], [7, 8], [9, 10, 11]]),
    dict(min_new_tokens=12), dict(max_length=19),
])  # fmt: skip
def test_greedy_processors_identical(pair, option):
    ids, mask = prompts(2, left_pad=2)
    kwargs = {"max_new_tokens": 32, **option}
    if "max_length" in option:
        del kwargs["max_new_tokens"]
    want, got = both(pair, ids, mask, **kwargs)
    assert_same_tokens(want, got)


def test_multi_eos_stopping_and_padding(pair):
    ids, mask = prompts(3, left_pad=2)
    free = pair[1].generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=None)[:, ids.shape[1] :]
    eos = [int(free[0, 3]), int(free[1, 6]), int(free[2, 9])]  # tokens each row will produce early
    want, got = both(pair, ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=0)
    assert_same_tokens(want, got)
    assert got.shape[1] < ids.shape[1] + 24 or (got[:, ids.shape[1] :] == 0).any()


def test_scores_and_logits_returned(pair):
    ids, mask = prompts(2, left_pad=1)
    kwargs = dict(max_new_tokens=6, return_dict_in_generate=True, output_scores=True, output_logits=True,
                  repetition_penalty=1.2, eos_token_id=None)  # fmt: skip
    want, got = both(pair, ids, mask, **kwargs)
    assert_same_tokens(want.sequences, got.sequences)
    assert len(got.scores) == len(want.scores) == 6
    for w, g in zip(want.scores + want.logits, got.scores + got.logits):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("option", [
    dict(), dict(temperature=0.7), dict(top_k=5), dict(top_p=0.8, top_k=0), dict(min_p=0.1), dict(typical_p=0.7),
])  # fmt: skip
def test_sampling_reproducible_and_equal_to_reference(pair, option):
    ids, mask = prompts(2, left_pad=2)
    kwargs = dict(do_sample=True, max_new_tokens=24, eos_token_id=None, **option)
    ref, ours = pair
    with torch.no_grad():
        torch.manual_seed(11)
        want = ref.generate(ids, attention_mask=mask, **kwargs)
        torch.manual_seed(11)
        got = ours.generate(ids, attention_mask=mask, **kwargs)
        torch.manual_seed(11)
        again = ours.generate(ids, attention_mask=mask, **kwargs)
    assert torch.equal(got, again)
    assert_same_tokens(want, got)


def test_num_return_sequences(pair):
    ids, mask = prompts(2)
    ref, ours = pair
    kwargs = dict(do_sample=True, max_new_tokens=8, num_return_sequences=3, eos_token_id=None)
    torch.manual_seed(5)
    want = ref.generate(ids, attention_mask=mask, **kwargs)
    torch.manual_seed(5)
    assert_same_tokens(want, ours.generate(ids, attention_mask=mask, **kwargs))


def test_chunked_prefill_same_tokens(pair, monkeypatch):
    ids, mask = prompts(2, length=21, left_pad=5)
    whole = pair[1].generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    monkeypatch.setattr(gen_engine, "PREFILL_CHUNK", 4)
    chunked = pair[1].generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(whole, chunked)


# ---- processors on the same logits --------------------------------------------------------------


@pytest.mark.parametrize("option,reference", [
    (dict(temperature=0.6), [hf.TemperatureLogitsWarper(0.6), hf.TopKLogitsWarper(50)]),
    (dict(top_k=7), [hf.TopKLogitsWarper(7)]),
    (dict(top_p=0.85, top_k=0), [hf.TopPLogitsWarper(0.85)]),
    (dict(min_p=0.05, top_k=0), [hf.MinPLogitsWarper(0.05)]),
    (dict(typical_p=0.6, top_k=0), [hf.TypicalLogitsWarper(0.6)]),
    (dict(temperature=1.4, top_k=20, top_p=0.9, min_p=0.02, typical_p=0.95), [
        hf.TemperatureLogitsWarper(1.4), hf.TopKLogitsWarper(20), hf.TopPLogitsWarper(0.9),
        hf.MinPLogitsWarper(0.02), hf.TypicalLogitsWarper(0.95)]),
])  # fmt: skip
def test_sampling_processors_same_distribution(option, reference):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 300, generator=gen) * 3
    ids = torch.randint(0, 300, (4, 5), generator=gen)
    want = scores.clone()
    for p in reference:
        want = p(ids, want)
    got = scores.clone()
    for p in build_processors(GenerationConfig(do_sample=True, **option), 5, [1]):
        got = p(ids, got)
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    torch.testing.assert_close(got.softmax(-1), want.softmax(-1))


# ---- tokenizer-dependent: stop strings, streamers -------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    """A reference fast tokenizer: BPE over letters and spaces, pieces glued back without separators."""
    gen = torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz "
    text = ["".join(letters[i] for i in torch.randint(0, 27, (200,), generator=gen).tolist()) for _ in range(50)]
    tok = Tokenizer(models.BPE())
    tok.decoder = decoders.Fuse()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<pad>", "<eos>", "<bos>"], initial_alphabet=list(letters)
    )
    tok.train_from_iterator(text, trainer)
    assert tok.get_vocab_size() == VOCAB
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>"
    )


@pytest.fixture(scope="module")
def our_tokenizer(tokenizer, tmp_path_factory):
    """The same tokenizer, saved by the reference and loaded by glmkit."""
    path = tmp_path_factory.mktemp("tok")
    tokenizer.save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def test_stop_strings_stop_where_reference_stops(pair, tokenizer, our_tokenizer):
    ids, mask = prompts(2, left_pad=2)
    free = pair[1].generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=None)[:, ids.shape[1] :]
    text0 = tokenizer.decode(free[0, 5:8])
    text1 = tokenizer.decode(free[1, 9:11])
    stops = [text0[1:4], text1[-3:]]  # span token boundaries in each row
    want, got = both(pair, ids, mask, max_new_tokens=20, eos_token_id=None, stop_strings=stops, tokenizer=tokenizer)
    assert_same_tokens(want, got)
    assert got.shape[1] < ids.shape[1] + 20
    kwargs = dict(max_new_tokens=20, eos_token_id=None, stop_strings=stops, tokenizer=our_tokenizer)
    assert_same_tokens(want, pair[1].generate(ids, attention_mask=mask, **kwargs))


def test_text_streamer_same_output(pair, tokenizer, our_tokenizer):
    ids, mask = prompts(1)
    ref, ours = pair
    outputs = []
    for model, make in ((ref, transformers.TextStreamer), (ours, TextStreamer)):
        streamer = make(tokenizer if model is ref else our_tokenizer, skip_prompt=True)
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            model.generate(ids, max_new_tokens=20, eos_token_id=None, streamer=streamer)
        outputs.append(buf.getvalue())
    assert outputs[0] == outputs[1] and len(outputs[1]) > 10


def test_text_iterator_streamer(pair, tokenizer):
    ids, _ = prompts(1)
    ref, ours = pair
    pieces = []
    for model, streamer_cls in ((ref, transformers.TextIteratorStreamer), (ours, TextIteratorStreamer)):
        streamer = streamer_cls(tokenizer, skip_prompt=True, timeout=60)
        kwargs = dict(max_new_tokens=16, eos_token_id=None, streamer=streamer)
        thread = threading.Thread(target=model.generate, args=(ids,), kwargs=kwargs)
        thread.start()
        pieces.append(list(streamer))
        thread.join()
    assert pieces[0] == pieces[1] and "".join(pieces[1])


def test_stream_api_finish_reasons(pair, tokenizer):
    ids, mask = prompts(2, left_pad=2)
    ours = pair[1]
    full = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)[:, ids.shape[1] :]
    eos = int(full[0, 4])
    chunks = list(ours.stream(ids, mask, tokenizer=tokenizer, max_new_tokens=12, eos_token_id=[eos], pad_token_id=0))
    reasons = [next(c.finish_reason[r] for c in chunks if c.finish_reason[r]) for r in range(2)]
    tokens = [[t for c in chunks for t in c.token_ids[r]] for r in range(2)]
    assert reasons[0] == "stop" and tokens[0][-1] == eos and len(tokens[0]) == full[0].tolist().index(eos) + 1
    expected = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[eos], pad_token_id=0)
    for r in range(2):
        row = expected[r, ids.shape[1] :].tolist()[: len(tokens[r])]
        assert tokens[r] == row
        text = "".join(c.text[r] for c in chunks)
        assert text == tokenizer.decode(tokens[r], skip_special_tokens=True)
        assert reasons[r] in ("stop", "length")


# ---- configuration ---------------------------------------------------------------------------------


def test_generation_config_json_and_eos_union(tmp_path):
    from glmkit import GlmConfig, GlmForCausalLM

    torch.manual_seed(0)
    model = GlmForCausalLM(GlmConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                     eos_token_id=[5, 6], pad_token_id=0))  # fmt: skip
    model.generation_config = GenerationConfig(eos_token_id=[7], max_new_tokens=9, my_custom_key=1)
    model.save_pretrained(tmp_path)
    ref_cfg = transformers.GenerationConfig.from_pretrained(tmp_path)
    assert ref_cfg.max_new_tokens == 9
    loaded = GlmForCausalLM.from_pretrained(tmp_path)
    assert loaded.generation_config.max_new_tokens == 9 and loaded.generation_config.my_custom_key == 1
    plan = gen_utils.plan_generation(loaded, 4, None, None, eos_token_id=8)
    assert plan.eos == [8, 7, 5, 6] and plan.max_new_tokens == 9


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(do_sample=True, temperature=0.0), ValueError, "strictly positive float"),
    (dict(num_beams=2, num_return_sequences=3), ValueError, "smaller or equal to `num_beams`"),
    (dict(num_beams=2, early_stopping="sometimes"), ValueError, "early_stopping"),
    (dict(num_return_sequences=2), ValueError, "num_return_sequences"),
    (dict(top_p=1.5, do_sample=True), ValueError, "top_p"),
    (dict(bad_words_ids=[5]), ValueError, "bad_words_ids"),
    (dict(max_new_tokens=3, not_an_option=True), TypeError, "not_an_option"),
    (dict(stop_strings=["x"]), ValueError, "needs the tokenizer"),
])  # fmt: skip
def test_invalid_generation_arguments(pair, kwargs, error, match):
    ids, _ = prompts(1)
    with pytest.raises(error, match=match):
        pair[1].generate(ids, **kwargs)


@pytest.mark.parametrize("option", [
    dict(num_beams=3),
    dict(num_beams=4, length_penalty=0.5, num_return_sequences=2),
    dict(num_beams=3, early_stopping=True, length_penalty=2.0),
    dict(num_beams=4, early_stopping="never", num_return_sequences=4),
])  # fmt: skip
def test_beam_search_identical(pair, option):
    ids, mask = prompts(2, left_pad=2)
    free = pair[1].generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None)[:, ids.shape[1] :]
    eos = [int(free[0, 5]), int(free[1, 8])]  # make some beams finish early
    kwargs = dict(max_new_tokens=16, eos_token_id=eos, return_dict_in_generate=True, output_scores=True, **option)
    want, got = both(pair, ids, mask, **kwargs)
    assert_same_tokens(want.sequences, got.sequences)
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-4, atol=1e-4)
