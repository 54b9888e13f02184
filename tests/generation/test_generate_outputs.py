"""generate()'s inputs_embeds, per-step attentions / hidden states, beam_indices and past_key_values (returned and
continued) against the reference's generate, on tiny random models of every family with the same weights."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import TINY_DECODERS, VOCAB, assert_close, reference_and_ours

import glmkit.generation.engine as gen_engine
from glmkit.modeling import InputError


@pytest.fixture(scope="module", params=sorted(TINY_DECODERS))
def pair(request, tmp_path_factory):
    ref, ours = reference_and_ours(request.param, tmp_path_factory.mktemp(request.param))
    ref.set_attn_implementation("eager")  # the reference returns attention weights on its eager path only
    return ref, ours


def prompt(batch=2, length=6, left_pad=2, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[-1, :left_pad] = 0
    ids[-1, :left_pad] = 0
    return ids, mask


def embeddings(model, ids, noise=1.0, seed=5):
    """The ids' embeddings moved far enough that generation from them differs from generation from the ids."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        base = model.get_input_embeddings()(ids)
    return base + noise * torch.randn(base.shape, generator=gen) * base.std()


def run_both(pair, seed=None, **kwargs):
    out = []
    for model in pair:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # glmkit's sdpa model computes attention weights eagerly, and says so
            out.append(model.generate(**kwargs))
    return out


def assert_same(want, got, what="sequences"):
    assert got.shape == want.shape, f"{what}: {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(got, want), f"{what}: first difference at {(got != want).nonzero()[0].tolist()}"


def assert_steps_close(want, got, real):
    """Per step, per layer tensors in the same layout and within 1e-5. The first step covers the prompt, whose
    padding queries attend differently (glmkit lets a query with nothing to attend see everything): real ones only."""
    assert got is not None and len(got) == len(want) > 1
    for step, (w_layers, g_layers) in enumerate(zip(want, got)):
        assert isinstance(g_layers, tuple) and len(g_layers) == len(w_layers)
        for w, g in zip(w_layers, g_layers):
            assert g.shape == w.shape, f"step {step}: {tuple(g.shape)} != {tuple(w.shape)}"
            if step == 0:  # attentions (N, H, T, K) -> (N, T, H, K); hidden states (N, T, C)
                w, g = (w.transpose(1, 2), g.transpose(1, 2)) if w.dim() == 4 else (w, g)
                w, g = w[real], g[real]
            assert_close(g, w, rtol=1e-5, what=f"step {step}")


def assert_same_cache(want, got, real):
    """glmkit's returned cache holds what the reference's DynamicCache holds (keys of real tokens)."""
    assert got.get_seq_length() == want.get_seq_length()
    n = want.get_seq_length()
    for layer, (w, g) in enumerate(zip(want.layers, got.to_legacy())):
        for w_t, g_t in ((w.keys, g[0]), (w.values, g[1])):
            assert g_t.shape == w_t.shape
            assert_close(g_t.transpose(1, 2)[real[:, :n]], w_t.transpose(1, 2)[real[:, :n]], rtol=1e-5,
                         what=f"cache layer {layer}")  # fmt: skip


# ---- inputs_embeds -------------------------------------------------------------------------------------


@pytest.mark.parametrize("option", [
    dict(max_new_tokens=10, eos_token_id=None),
    dict(eos_token_id=None),  # the default max_length counts the embedded prompt: 20 - 6 new tokens
    dict(max_length=16, min_length=12),  # min_length counts it too
    dict(max_new_tokens=12, min_new_tokens=8, repetition_penalty=1.5, no_repeat_ngram_size=2),
])  # fmt: skip
def test_inputs_embeds_alone_greedy(pair, option):
    ids, mask = prompt(3, left_pad=3)
    embeds = embeddings(pair[0], ids)
    want, got = run_both(pair, inputs_embeds=embeds, attention_mask=mask, **option)
    assert_same(want, got)  # the new tokens only, as the reference returns them
    if "max_length" not in option and "max_new_tokens" not in option:
        assert got.shape[1] == 20 - ids.shape[1]


def test_inputs_embeds_alone_sampling(pair):
    ids, mask = prompt(2)
    embeds = embeddings(pair[0], ids)
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, do_sample=True, top_k=20, max_new_tokens=12,
                  num_return_sequences=2, eos_token_id=None)  # fmt: skip
    want, got = run_both(pair, seed=7, **kwargs)
    assert_same(want, got)
    assert got.shape == (4, 12)


@pytest.mark.parametrize("do_sample", [False, True])
def test_inputs_embeds_with_input_ids(pair, do_sample):
    """The embeddings run in place of the ids' in the first step; the sequences start with the ids."""
    ids, mask = prompt(3, left_pad=2)
    embeds = embeddings(pair[0], ids)
    kwargs = dict(attention_mask=mask, do_sample=do_sample, max_new_tokens=12, eos_token_id=None)
    want, got = run_both(pair, seed=3, input_ids=ids, inputs_embeds=embeds, **kwargs)
    assert_same(want, got)
    assert torch.equal(got[:, : ids.shape[1]], ids)
    (from_ids,) = run_both(pair[1:], seed=3, input_ids=ids, **kwargs)
    assert not torch.equal(got, from_ids)  # the embeddings were used


@pytest.mark.parametrize("with_ids", [False, True])
def test_beam_search_with_inputs_embeds(pair, with_ids):
    ids, mask = prompt(2)
    embeds = embeddings(pair[0], ids)
    kwargs = dict(inputs_embeds=embeds, attention_mask=mask, num_beams=3, num_return_sequences=2, max_new_tokens=10,
                  eos_token_id=None, return_dict_in_generate=True, output_scores=True)  # fmt: skip
    want, got = run_both(pair, **kwargs, **(dict(input_ids=ids) if with_ids else {}))
    assert_same(want.sequences, got.sequences)
    assert_same(want.beam_indices, got.beam_indices, "beam_indices")
    assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5)


# ---- attentions, hidden states, beam_indices ------------------------------------------------------------


@pytest.mark.parametrize("embedded", [False, True])
def test_attentions_and_hidden_states_greedy(pair, embedded):
    ids, mask = prompt(2, left_pad=2)
    inputs = dict(inputs_embeds=embeddings(pair[0], ids)) if embedded else dict(input_ids=ids)
    kwargs = dict(attention_mask=mask, max_new_tokens=5, eos_token_id=None, return_dict_in_generate=True,
                  output_attentions=True, output_hidden_states=True, output_scores=True,
                  output_logits=True)  # fmt: skip
    want, got = run_both(pair, **inputs, **kwargs)
    assert list(got.keys()) == list(want.keys())
    assert_same(want.sequences, got.sequences)
    real = mask.bool()
    assert_steps_close(want.attentions, got.attentions, real)
    assert_steps_close(want.hidden_states, got.hidden_states, real)
    assert len(got.hidden_states[0]) == pair[0].config.num_hidden_layers + 1  # the embeddings, then every layer
    for w, g in zip(want.scores + want.logits, got.scores + got.logits):
        assert_close(g, w, rtol=1e-5)


def test_attentions_hidden_states_and_beam_indices_beam_search(pair):
    ids, mask = prompt(2, left_pad=2)
    (free,) = run_both(pair[1:], input_ids=ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    eos = [int(free[0, ids.shape[1] + 4]), int(free[1, ids.shape[1] + 6])]  # some beams finish early
    kwargs = dict(input_ids=ids, attention_mask=mask, num_beams=3, num_return_sequences=2, max_new_tokens=12,
                  eos_token_id=eos + [1], return_dict_in_generate=True, output_attentions=True,
                  output_hidden_states=True, output_scores=True)  # fmt: skip
    want, got = run_both(pair, **kwargs)
    assert list(got.keys()) == list(want.keys())
    assert_same(want.sequences, got.sequences)
    assert_same(want.beam_indices, got.beam_indices, "beam_indices")
    real = mask.repeat_interleave(3, dim=0).bool()
    assert_steps_close(want.attentions, got.attentions, real)
    assert_steps_close(want.hidden_states, got.hidden_states, real)
    assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5)
    assert got.past_key_values.get_seq_length() == want.past_key_values.get_seq_length()


def test_per_layer_outputs_cost_nothing_unless_asked(pair, monkeypatch):
    """The model is asked for per-layer outputs only with return_dict_in_generate and output_attentions /
    output_hidden_states (as the reference, which returns them only in the dict)."""
    ours = pair[1]
    ids, mask = prompt(2)

    def refuse(**kwargs):
        raise AssertionError("per-layer outputs were collected")

    monkeypatch.setattr(gen_engine, "LayerTrace", refuse)
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None, output_attentions=True)
    out = ours.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True)
    assert torch.equal(plain, out.sequences) and out.attentions is None and out.hidden_states is None
    beams = ours.generate(ids, attention_mask=mask, max_new_tokens=4, num_beams=2, return_dict_in_generate=True)
    assert beams.attentions is None
    with pytest.raises(AssertionError, match="per-layer"):
        ours.generate(ids, max_new_tokens=4, return_dict_in_generate=True, output_hidden_states=True)


def test_per_layer_outputs_run_on_the_plain_path(pair):
    ours = pair[1]
    ids, mask = prompt(2)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, eos_token_id=None, return_dict_in_generate=True,
                  output_attentions=True)  # fmt: skip
    with pytest.warns(UserWarning, match="output_attentions / output_hidden_states runs on the plain decode path"):
        static = ours.generate(ids, cache_implementation="static", **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = ours.generate(ids, **kwargs)
    assert torch.equal(static.sequences, plain.sequences)
    for s, p in zip(static.attentions, plain.attentions):
        assert all(torch.equal(a, b) for a, b in zip(s, p))


# ---- past_key_values: returned, continued ----------------------------------------------------------------


def test_returned_cache_holds_what_the_reference_holds(pair):
    """Every token of the sequences but the last, also when every row stops early (glmkit's decode loop checks
    for that every few steps and may have run past it)."""
    ids, mask = prompt(2, left_pad=2)
    (free,) = run_both(pair[1:], input_ids=ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None)
    eos = [int(free[0, ids.shape[1] + 2]), int(free[1, ids.shape[1] + 1]), 1]
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=16, eos_token_id=eos, pad_token_id=0,
                  return_dict_in_generate=True)  # fmt: skip
    want, got = run_both(pair, **kwargs)
    assert_same(want.sequences, got.sequences)
    assert got.sequences.shape[1] < ids.shape[1] + 16
    full_mask = torch.cat([mask, torch.ones_like(got.sequences[:, ids.shape[1] :])], dim=1)
    assert_same_cache(want.past_key_values, got.past_key_values, full_mask.bool())


@pytest.mark.parametrize("source", ["glmkit", "reference", "forward"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_continue_from_cache(pair, source, do_sample):
    """generate(previous sequences + new ids, past_key_values=the cache) runs only what the cache lacks and
    gives the reference's tokens: those of a generation from scratch on the whole sequence (greedy), of the
    reference's own continuation (sampling, same seed). A reference DynamicCache is accepted too, and so is the
    cache of a forward pass over a shorter prefix (whose positions ignore the padding, in both libraries)."""
    ref, ours = pair
    ids, mask = prompt(2, left_pad=2)
    first = dict(attention_mask=mask, max_new_tokens=5, eos_token_id=None, return_dict_in_generate=True)
    want_first, got_first = run_both(pair, input_ids=ids, **first)
    assert_same(want_first.sequences, got_first.sequences)
    follow = torch.randint(3, VOCAB, (2, 3), generator=torch.Generator().manual_seed(9))
    longer = torch.cat([got_first.sequences, follow], dim=1)
    longer_mask = torch.cat([mask, torch.ones(2, longer.shape[1] - ids.shape[1], dtype=torch.long)], dim=1)
    kwargs = dict(attention_mask=longer_mask, max_new_tokens=6, eos_token_id=None, do_sample=do_sample)
    with torch.no_grad():
        if source == "forward":
            prefix = dict(input_ids=longer[:, :-2], attention_mask=longer_mask[:, :-2], use_cache=True)
            cache, ref_cache = ours(**prefix).past_key_values, ref(**prefix).past_key_values
        else:
            ref_cache = copy.deepcopy(want_first.past_key_values)
            cache = got_first.past_key_values if source == "glmkit" else copy.deepcopy(ref_cache)
        torch.manual_seed(4)
        got = ours.generate(longer, past_key_values=cache, return_dict_in_generate=True, **kwargs)
        torch.manual_seed(4)
        want = ref.generate(longer, past_key_values=ref_cache, **kwargs)
        if not do_sample and source != "forward":
            assert_same(ref.generate(longer, **kwargs), want)  # the reference's own semantics, checked
    assert_same(want, got.sequences)
    if source == "forward":
        return
    # and once more from the cache just returned (it grows past what the first call reserved)
    again = torch.cat([got.sequences, follow], dim=1)
    again_mask = torch.cat([longer_mask, torch.ones(2, again.shape[1] - longer.shape[1], dtype=torch.long)], dim=1)
    kwargs.update(attention_mask=again_mask, max_new_tokens=20)
    torch.manual_seed(5)
    with torch.no_grad():
        got = ours.generate(again, past_key_values=got.past_key_values, **kwargs)
        torch.manual_seed(5)
        want = ref.generate(again, **kwargs) if not do_sample else got  # sampling: checked above
    assert_same(want, got)


# ---- what is refused, clearly ----------------------------------------------------------------------------


def _cache_of(model, ids, n):
    return model.generate(ids[:, :n], max_new_tokens=1, eos_token_id=None, return_dict_in_generate=True).past_key_values


@pytest.mark.parametrize("case,error,match", [
    ("cache covers input", ValueError, "past_key_values holds 5 tokens and input_ids has 5"),
    ("cache rows", ValueError, "past_key_values holds 2 rows, the generation 4"),
    ("cache with beams", NotImplementedError, "beam search with past_key_values"),
    ("cache with static", ValueError, "either cache_implementation or past_key_values"),
    ("cache with embeds", NotImplementedError, "inputs_embeds"),
    ("embeds with lookup", NotImplementedError, "speculative decoding"),
    ("attentions with lookup", NotImplementedError, "output_attentions"),
    ("embeds length", InputError, "input_ids .* and inputs_embeds .* must have the same"),
    ("embeds width", InputError, "inputs_embeds must have shape"),
    ("embeds ints", TypeError, "inputs_embeds must be a floating-point"),
    ("embeds mask", InputError, "attention_mask must have shape"),
    ("embeds too long", ValueError, "Input length of inputs_embeds is 6, but `max_length` is set to 5"),
    ("attentions not bool", TypeError, "output_attentions"),
    ("no cache", ValueError, "use_cache=False"),
])  # fmt: skip
def test_unsupported_combinations_raise(pair, case, error, match):
    ours = pair[1]
    ids, mask = prompt(2, left_pad=0)
    embeds = embeddings(pair[0], ids)
    seven = torch.cat([ids, ids[:, :1]], dim=1)
    calls = {
        "cache covers input": lambda: ours.generate(ids[:, :5], past_key_values=_cache_of(ours, ids, 5)),
        "cache rows": lambda: ours.generate(seven, past_key_values=_cache_of(ours, ids, 5), max_new_tokens=2,
                                            do_sample=True, num_return_sequences=2),
        "cache with beams": lambda: ours.generate(seven, past_key_values=_cache_of(ours, ids, 5), num_beams=2),
        "cache with static": lambda: ours.generate(seven, past_key_values=_cache_of(ours, ids, 5),
                                                   cache_implementation="static"),
        "cache with embeds": lambda: ours.generate(inputs_embeds=embeds, past_key_values=_cache_of(ours, ids, 3)),
        "embeds with lookup": lambda: ours.generate(inputs_embeds=embeds[:1], prompt_lookup_num_tokens=2),
        "attentions with lookup": lambda: ours.generate(ids[:1], prompt_lookup_num_tokens=2, output_attentions=True,
                                                        return_dict_in_generate=True),
        "embeds length": lambda: ours.generate(ids[:, :4], inputs_embeds=embeds),
        "embeds width": lambda: ours.generate(inputs_embeds=embeds[..., :-1]),
        "embeds ints": lambda: ours.generate(inputs_embeds=ids[..., None]),
        "embeds mask": lambda: ours.generate(inputs_embeds=embeds, attention_mask=mask[:, :4]),
        "embeds too long": lambda: ours.generate(inputs_embeds=embeds, max_length=5),
        "attentions not bool": lambda: ours.generate(ids, output_attentions="yes"),
        "no cache": lambda: ours.generate(inputs_embeds=embeds, use_cache=False),
    }  # fmt: skip
    with pytest.raises(error, match=match):
        calls[case]()
