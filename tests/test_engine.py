"""The decode engine: per-row cache state, cache reuse, speculative decoding (same tokens as greedy)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DECODERS, VOCAB, reference_and_ours

from glmkit.cache import KVCache
from glmkit.generation import engine

FAMILIES = TINY_DECODERS


def build(family: str, tmp_path_factory, seed: int = 0):
    return reference_and_ours(family, tmp_path_factory.mktemp(f"{family}{seed}"), seed)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    return build(request.param, tmp_path_factory)


def rand_ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_rows_at_different_positions_equal_each_row_alone(pair):
    """Rows prefilled separately to different lengths, one of them left-padded, then decoded together in
    one batch (each row writes its own next slot, sees its own keys): every row's logits equal that row
    decoded alone, over several steps."""
    ours = pair[1]
    prompts = [rand_ids(n, seed) for n, seed in ((5, 1), (11, 2), (8, 3))]
    masks = [None, None, torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]])]
    alone, caches, logits = [], [], []
    for ids, mask in zip(prompts, masks):
        row = engine.Decoder(ours, 64)
        logits.append(row.prefill(ids, mask))
        alone.append(row)
        single = engine.Decoder(ours, 64)
        single.prefill(ids, mask)
        caches.append(single.cache)
    batch = KVCache.stack(caches)
    assert not batch.uniform and batch.lengths.tolist() == [5, 11, 8]
    tokens = torch.stack([lg.argmax(-1) for lg in logits], dim=0)  # (3, 1)
    for _ in range(4):
        together = engine.forward_tokens(ours, batch, tokens)
        for r, row in enumerate(alone):
            torch.testing.assert_close(together[r : r + 1], row.step(tokens[r : r + 1]), rtol=1e-4, atol=1e-5)
        tokens = together.argmax(-1)[:, None]
    assert batch.lengths.tolist() == [9, 15, 12]


@torch.no_grad()
@pytest.mark.parametrize("mode", ["plain", "static"])
def test_cache_reused_across_calls(pair, mode):
    """A decoder's cache carries on where it stopped: a prompt fed in two calls (a chat's next turn)
    gives the logits of the whole prompt fed at once, and of the reference's full forward."""
    ref, ours = pair
    ids = rand_ids(14, 4)
    whole = engine.Decoder(ours, 32, mode).prefill(ids)
    split = engine.Decoder(ours, 32, mode)
    split.prefill(ids[:, :9])
    again = split.prefill(ids[:, 9:])
    torch.testing.assert_close(again, whole, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(again, ref(ids).logits[:, -1].float(), rtol=1e-4, atol=1e-4)
    assert split.cache.get_seq_length() == 14


def test_cache_errors_are_clear():
    cache = KVCache(capacity=4)
    with pytest.raises(RuntimeError, match="before begin"):
        cache.update(0, torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    cache.begin(1, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="holds 4 positions, 6 requested"):
        cache.begin(1, 3, torch.device("cpu"))
    with pytest.raises(ValueError, match="holds 1 rows"):
        KVCache.stack([cache]).begin(2, 1, torch.device("cpu"))
    with pytest.raises(ValueError, match="needs a capacity"):
        KVCache(static=True)


def passage_prompt(length: int = 60) -> torch.Tensor:
    """A passage, a separator, then its first tokens again: the continuation copies the passage."""
    passage = rand_ids(length, 9)
    return torch.cat([passage, torch.tensor([[2]]), passage[:, :6]], dim=1)


def test_prompt_lookup_identical_to_greedy(pair):
    ours = pair[1]
    ids = passage_prompt()
    kwargs = dict(max_new_tokens=40, eos_token_id=None, return_dict_in_generate=True, output_logits=True)
    plain = ours.generate(ids, **kwargs)
    got = ours.generate(ids, prompt_lookup_num_tokens=8, **kwargs)
    assert torch.equal(got.sequences, plain.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(plain.logits), rtol=1e-4, atol=1e-4)
    # with EOS: stops where greedy stops
    eos = int(plain.sequences[0, ids.shape[1] + 17])
    want = ours.generate(ids, max_new_tokens=40, eos_token_id=eos)
    assert torch.equal(ours.generate(ids, max_new_tokens=40, eos_token_id=eos, prompt_lookup_num_tokens=5), want)


def test_prompt_lookup_proposals():
    """The n-gram index proposes what followed the most recent earlier occurrence of the last n-gram,
    preferring the longest n-gram, and nothing when there is none."""
    from glmkit.generation.speculative import PromptLookup

    lookup = PromptLookup(max_tokens=3, max_ngram=2)
    seq = [5, 6, 7, 8, 9, 5, 6, 1, 2, 5, 6]
    assert lookup.propose(torch.tensor([seq]), 3).tolist() == [[1, 2, 5]]  # "5 6": its latest continuation
    seq += [4, 4, 9]
    assert lookup.propose(torch.tensor([seq]), 2).tolist() == [[5, 6]]  # "4 9" unseen; "9" was followed by 5 6
    assert PromptLookup(3).propose(torch.tensor([[1, 2, 3]]), 3).shape == (1, 0)


def test_verification_keeps_right_drafts(pair, monkeypatch):
    """With the model itself as the assistant every draft is right: 40 tokens take a few verify passes."""
    ours = pair[1]
    ids = passage_prompt(20)
    calls = []
    verify = engine.Decoder.verify
    monkeypatch.setattr(engine.Decoder, "verify", lambda self, t: calls.append(t.shape[1]) or verify(self, t))
    plain = ours.generate(ids, max_new_tokens=40, eos_token_id=None)
    got = ours.generate(ids, max_new_tokens=40, eos_token_id=None, assistant_model=ours, num_assistant_tokens=10,
                        assistant_confidence_threshold=None)  # fmt: skip
    assert torch.equal(got, plain)
    assert calls == [11, 11, 11, 6], calls  # 1 + 10 drafts, 11 tokens kept per pass; 40 = 1 + 3 * 11 + 6


def test_prompt_lookup_sampling_same_draws(pair):
    """Sampling: each kept token is drawn as the plain loop draws it, so a seed gives the same text."""
    ours = pair[1]
    ids = passage_prompt()
    out = []
    for extra in ({}, {"prompt_lookup_num_tokens": 6}):
        torch.manual_seed(3)
        out.append(ours.generate(ids, do_sample=True, top_k=5, max_new_tokens=30, eos_token_id=None, **extra))
    assert torch.equal(out[0], out[1])


def test_assistant_model_identical_to_greedy(pair, tmp_path_factory):
    ref, ours = pair
    family = next(f for f, spec in FAMILIES.items() if type(ours).__name__ == spec[1])
    _, small = build(family, tmp_path_factory, seed=5)  # another model with the same vocabulary
    ids = passage_prompt(20)
    plain = ours.generate(ids, max_new_tokens=30, eos_token_id=None)
    for assistant in (small, ours):  # itself as assistant: every draft is kept
        got = ours.generate(ids, max_new_tokens=30, eos_token_id=None, assistant_model=assistant)
        assert torch.equal(got, plain)
    with torch.no_grad():
        assert torch.equal(ref.generate(ids, max_new_tokens=30, eos_token_id=None, assistant_model=ref), plain)


def test_speculative_errors(pair):
    ours = pair[1]
    ids = rand_ids(6, 1)
    with pytest.raises(ValueError, match="batch size 1"):
        ours.generate(ids.repeat(2, 1), max_new_tokens=4, prompt_lookup_num_tokens=3)
    with pytest.raises(ValueError, match="beam search"):
        ours.generate(ids, max_new_tokens=4, prompt_lookup_num_tokens=3, num_beams=2)
    with pytest.raises(ValueError, match="not both"):
        ours.generate(ids, max_new_tokens=4, prompt_lookup_num_tokens=3, assistant_model=ours)
    with pytest.raises(ValueError, match=">= 1"):
        ours.generate(ids, max_new_tokens=4, prompt_lookup_num_tokens=0)
    with pytest.warns(UserWarning, match="speculative decoding runs on the plain"):
        ours.generate(ids, max_new_tokens=4, prompt_lookup_num_tokens=3, cache_implementation="static")


def test_default_path_syncs_rarely(pair, monkeypatch):
    """No host sync per token on the default path: the prompt's ids are checked once, and "all rows
    finished" is read every CHECK_EVERY steps (counted: tensor -> Python conversions during generate)."""
    ours = pair[1]
    ids = rand_ids(5, 2)
    reads = []
    for name in ("__bool__", "__int__", "__float__", "item", "tolist"):
        real = getattr(torch.Tensor, name)
        counted = lambda self, *a, _real=real, **k: reads.append(1) or _real(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, counted)
    ours.generate(ids, max_new_tokens=64, eos_token_id=[1])
    monkeypatch.undo()
    assert 0 < len(reads) <= 64 // engine.CHECK_EVERY + 6, f"{len(reads)} host reads for 64 tokens"
