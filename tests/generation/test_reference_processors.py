"""The reference's other generation settings (forced / suppressed tokens, sequence bias, invalid values,
renormalisation, epsilon / eta sampling): token-identical to transformers' generate, scores equal."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DECODERS, VOCAB, reference_and_ours


@pytest.fixture(scope="module", params=sorted(TINY_DECODERS))
def pair(request, tmp_path_factory):
    ref, ours = reference_and_ours(request.param, tmp_path_factory.mktemp(request.param))
    return ref, ours


def _prompt(batch: int = 2, length: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[-1, :2] = 0  # one left-padded row
    return ids, mask


def _generate(model, ids, mask, seed: int | None = None, **kwargs):
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, eos_token_id=None, return_dict_in_generate=True,
                              output_scores=True, **kwargs)  # fmt: skip


def _assert_same(want, got):
    assert torch.equal(got.sequences, want.sequences), f"{got.sequences} != {want.sequences}"
    for w, g in zip(want.scores, got.scores):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def _greedy_tokens(pair, ids, mask) -> list[int]:
    """The tokens plain greedy decoding picks, so that suppressing / biasing them changes the output."""
    return _generate(pair[1], ids, mask, max_new_tokens=5).sequences[:, ids.shape[1]:].flatten().unique().tolist()


def _options(pair, ids, mask):
    picked = _greedy_tokens(pair, ids, mask)
    last = ids[0, -1].item()
    return [  # settings combined where they do not interfere, to keep the test short
        dict(forced_eos_token_id=[7, 9], remove_invalid_values=True),
        dict(suppress_tokens=picked[:3], renormalize_logits=True),
        dict(begin_suppress_tokens=picked[:2], sequence_bias=[[[picked[-1]], 30.0]]),
        dict(sequence_bias={(picked[0],): -50.0, (last, 11): 80.0}),
    ]


def test_greedy_settings_equal_reference(pair):
    ids, mask = _prompt()
    for option in _options(pair, ids, mask):
        want = _generate(pair[0], ids, mask, max_new_tokens=5, **option)
        got = _generate(pair[1], ids, mask, max_new_tokens=5, **option)
        _assert_same(want, got)
    plain = _generate(pair[1], ids, mask, max_new_tokens=5).sequences
    forced = _generate(pair[1], ids, mask, max_new_tokens=5, forced_eos_token_id=7).sequences
    assert (forced[:, -1] == 7).all() and not torch.equal(plain, forced)  # the setting does something


def test_forced_bos_on_a_one_token_prompt(pair):
    ids, mask = torch.tensor([[5], [9]]), torch.ones(2, 1, dtype=torch.long)
    option = dict(forced_bos_token_id=12, begin_suppress_tokens=[3, 4], max_new_tokens=4)
    want = _generate(pair[0], ids, mask, **option)
    got = _generate(pair[1], ids, mask, **option)
    _assert_same(want, got)
    assert (got.sequences[:, 1] == 12).all()


@pytest.mark.parametrize("option", [dict(epsilon_cutoff=0.02), dict(eta_cutoff=0.3, top_k=0)])
def test_truncation_sampling_equals_reference(pair, option):
    ids, mask = _prompt()
    want = _generate(pair[0], ids, mask, seed=7, do_sample=True, max_new_tokens=8, **option)
    got = _generate(pair[1], ids, mask, seed=7, do_sample=True, max_new_tokens=8, **option)
    _assert_same(want, got)


@pytest.mark.parametrize("bad", [dict(epsilon_cutoff=1.5), dict(eta_cutoff=-0.1)])
def test_truncation_cutoff_out_of_range(pair, bad):
    ids, mask = _prompt()
    with pytest.raises(ValueError, match="cutoff"):
        _generate(pair[1], ids, mask, do_sample=True, max_new_tokens=2, **bad)


def test_generate_without_input_ids_starts_from_bos(pair):
    ref, ours = pair
    with torch.no_grad():
        want = ref.generate(bos_token_id=5, max_new_tokens=4, eos_token_id=None)
        got = ours.generate(bos_token_id=5, max_new_tokens=4, eos_token_id=None)
    assert torch.equal(got, want) and got[0, 0] == 5


def test_encoder_no_repeat_ngram_size_bans_prompt_ngrams_as_reference(pair):
    ids, mask = _prompt()
    ids[:, -3:] = ids[:, :3]  # the prompt ends on its own first bigram: the next token would repeat a trigram
    for n in (3, 1):
        want = _generate(pair[0], ids, mask, max_new_tokens=5, encoder_no_repeat_ngram_size=n)
        got = _generate(pair[1], ids, mask, max_new_tokens=5, encoder_no_repeat_ngram_size=n)
        _assert_same(want, got)
    for row in range(ids.shape[0]):  # n = 1: no token of the row's prompt is generated
        assert not torch.isin(got.sequences[row, ids.shape[1]:], ids[row]).any()
