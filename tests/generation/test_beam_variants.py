"""Group (diverse) and constrained beam search against the reference's generate on tiny models of every family."""

from __future__ import annotations

import random

import pytest
import torch
import transformers
from conftest import TINY_DECODERS, VOCAB, reference_and_ours
from transformers.generation import beam_constraints as hf_constraints

from glmkit import DisjunctiveConstraint, GenerationConfig, PhrasalConstraint
from glmkit.generation.constraints import ConstraintProgress

transformers.logging.set_verbosity_error()  # the reference warns that these modes move to the Hub
P, NEW = 7, 12


@pytest.fixture(scope="module", params=sorted(TINY_DECODERS))
def pair(request, tmp_path_factory):
    return reference_and_ours(request.param, tmp_path_factory.mktemp(request.param) / "model")


def prompts(padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, P), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    if padded:
        ids[-1, :2], mask[-1, :2] = 0, 0
    return ids, mask


def free_run(pair, ids, mask) -> list[list[int]]:
    """Tokens beam-free greedy decoding picks: words to force and EOS ids that some beams will hit."""
    return pair[1].generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None)[:, P:].tolist()


def eos_hits(free: list[list[int]]) -> list[int]:
    # the model config's EOS (1) is listed too: glmkit adds it to the EOS ids, the reference would not
    return list(dict.fromkeys([free[0][4], free[1][6], 1]))


def compare(pair, ids, mask, all_rows: bool, **kwargs):
    kwargs = dict(max_new_tokens=NEW, return_dict_in_generate=True, output_scores=True, output_logits=True, **kwargs)
    want = pair[0].generate(ids, attention_mask=mask, **kwargs)
    got = pair[1].generate(ids, attention_mask=mask, **kwargs)
    assert got.sequences.tolist() == want.sequences.tolist()
    torch.testing.assert_close(got.sequences_scores, want.sequences_scores, rtol=1e-5, atol=1e-5)
    assert len(got.scores) == len(want.scores) == len(got.logits)
    # a prompt whose beams are all done keeps decoding from batch row 0's beams in the reference (scores nobody
    # reads); with padding those rows' positions differ, so only prompt 0's rows are compared there
    rows = slice(None) if all_rows else slice(0, kwargs["num_beams"])
    for step, (g, w) in enumerate(zip(got.scores, want.scores)):
        torch.testing.assert_close(g[rows], w[rows], rtol=1e-5, atol=2e-5, msg=f"scores at step {step}")
    for g, w in zip(got.logits, want.logits):
        torch.testing.assert_close(g[rows], w[rows], rtol=1e-5, atol=2e-5)
    return want


LAYOUTS = [(False, False), (False, True), (True, True)]  # (left padding, EOS ids that some beams hit)
GROUP_OPTIONS = [
    dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0),
    dict(num_beams=6, num_beam_groups=3, diversity_penalty=0.5, num_return_sequences=3, length_penalty=0.7),
    dict(num_beams=4, num_beam_groups=4, diversity_penalty=2.0, early_stopping=True, num_return_sequences=4),
    dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.5, early_stopping="never", repetition_penalty=1.3),
]


@pytest.mark.parametrize("padded,stops", LAYOUTS, ids=["aligned-no-eos", "aligned-eos", "left-padded-eos"])
@pytest.mark.parametrize("option", GROUP_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_group_beam_search_identical(pair, option, stops, padded):
    ids, mask = prompts(padded)
    eos = eos_hits(free_run(pair, ids, mask)) if stops else None
    compare(pair, ids, mask, all_rows=not padded, eos_token_id=eos, **option)


def test_group_beam_search_groups_differ(pair):
    """The diversity penalty is what makes groups differ: the best beams of two groups must not coincide."""
    ids, mask = prompts(False)
    out = pair[1].generate(ids, attention_mask=mask, max_new_tokens=NEW, num_beams=4, num_beam_groups=4,
                           diversity_penalty=5.0, num_return_sequences=4, eos_token_id=None)  # fmt: skip
    first_tokens = out[:4, P].tolist()
    assert len(set(first_tokens)) == 4, first_tokens


def constrained_options(free: list[list[int]]) -> list[dict]:
    a, b = free
    return [
        dict(num_beams=3, force_words_ids=[[a[8]]]),
        # met by no beam within NEW tokens: the reference then returns unconstrained beams too
        dict(num_beams=4, force_words_ids=[[50, 51], [[60, 61], [60, 62, 63]]], num_return_sequences=2),
        dict(num_beams=4, force_words_ids=[[[60, 61], [60, 62]]], early_stopping="never", length_penalty=2.0),
        dict(num_beams=3, force_words_ids=[[a[1]], [b[2], b[3]]]),
        dict(num_beams=4, force_words_ids=[[a[1]]], early_stopping=True, num_return_sequences=2),
        dict(num_beams=5, force_words_ids=[[[a[2], 7], [a[2], 9, 10], [b[0]]]], num_return_sequences=2),
    ]


@pytest.mark.parametrize("padded,stops", LAYOUTS, ids=["aligned-no-eos", "aligned-eos", "left-padded-eos"])
@pytest.mark.parametrize("case", range(6))
def test_constrained_beam_search_identical(pair, case, stops, padded):
    ids, mask = prompts(padded)
    free = free_run(pair, ids, mask)
    option = constrained_options(free)[case]
    want = compare(pair, ids, mask, all_rows=not padded, eos_token_id=eos_hits(free) if stops else None, **option)
    met = [all(_contains(row, word) for word in option["force_words_ids"]) for row in want.sequences.tolist()]
    assert any(met) or case == 1  # the test is meaningful: the forced words are there


def _contains(row: list[int], word: list) -> bool:
    spellings = word if isinstance(word[0], list) else [word]
    return any(row[i : i + len(w)] == w for w in spellings for i in range(len(row)))


def test_constrained_beam_search_too_few_complete(pair):
    """A word too long to fit: no beam completes it, the reference then returns the unconstrained beams."""
    ids, mask = prompts(True)
    kwargs = dict(max_new_tokens=3, num_beams=3, num_return_sequences=2, force_words_ids=[[40, 41, 42, 43]])
    want = pair[0].generate(ids, attention_mask=mask, **kwargs)
    assert pair[1].generate(ids, attention_mask=mask, **kwargs).tolist() == want.tolist()


def test_constraint_objects_ours_and_the_references(pair):
    """constraints=[...] with glmkit's classes, and with the reference's own objects (duck typing)."""
    ids, mask = prompts(True)
    free = free_run(pair, ids, mask)
    words, choice = [free[0][3], free[0][4]], [[free[1][2]], [70, 71]]
    kwargs = dict(max_new_tokens=NEW, num_beams=4, num_return_sequences=2, eos_token_id=eos_hits(free))
    theirs = [hf_constraints.PhrasalConstraint(words), hf_constraints.DisjunctiveConstraint(choice)]
    want = pair[0].generate(ids, attention_mask=mask, constraints=theirs, **kwargs).tolist()
    ours = [PhrasalConstraint(words), DisjunctiveConstraint(choice)]
    assert pair[1].generate(ids, attention_mask=mask, constraints=ours, **kwargs).tolist() == want
    theirs = [hf_constraints.PhrasalConstraint(words), hf_constraints.DisjunctiveConstraint(choice)]
    assert pair[1].generate(ids, attention_mask=mask, constraints=theirs, **kwargs).tolist() == want


@pytest.mark.parametrize("seed", range(20))
def test_constraint_progress_matches_reference(seed):
    """Banks, completion and next tokens along random token streams, including the reference's branching
    inside a disjunctive word (stateful copies share progress) that constrained beam search ranks by."""
    rng = random.Random(seed)
    phrase, choices = [3, 4, 3, 5], [[6, 7], [6, 8, 9], [3, 9]]

    def both(cls):
        return cls.ConstraintListState([cls.PhrasalConstraint(phrase), cls.DisjunctiveConstraint(choices)])

    ref = both(hf_constraints)
    ours = ConstraintProgress([PhrasalConstraint(phrase), DisjunctiveConstraint(choices)])
    stream = [rng.choice([3, 4, 5, 6, 7, 8, 9, 10]) for _ in range(30)]
    ref.reset(stream[:10])
    ours.reset(stream[:10])
    for token in stream[10:]:
        assert (ours.bank(), ours.completed, ours.advance()) == (ref.get_bank(), ref.completed, ref.advance() or [])
        if not ref.completed:
            for nxt in ref.advance() or []:  # what _rank_by_bank does: a stateful copy per advancing token
                ref_copy, our_copy = ref.copy(stateful=True), ours.copy()
                ref_copy.add(nxt)
                our_copy.add(nxt)
                assert our_copy.bank() == ref_copy.get_bank()
        ref.add(token)
        ours.add(token)


@pytest.mark.parametrize("kwargs,match", [
    (dict(num_beams=4, num_beam_groups=3, diversity_penalty=1.0), "divisible by `num_beam_groups`"),
    (dict(num_beams=4, num_beam_groups=2), "`diversity_penalty` should be greater than `0.0`"),
    (dict(num_beams=4, diversity_penalty=1.0), "`num_beam_groups` should be an integer strictly larger than 1"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=1.0, do_sample=True), "`do_sample` must be set"),
    (dict(num_beams=1, diversity_penalty=1.0), "needs group beam search"),
    (dict(num_beams=4, num_beam_groups=2, diversity_penalty=-1.0), "diversity_penalty"),
    (dict(num_beams=4, force_words_ids=[[5]], do_sample=True), "do_sample"),
    (dict(num_beams=4, force_words_ids=[[5]], num_beam_groups=2, diversity_penalty=1.0), "num_beam_groups"),
    (dict(num_beams=1, force_words_ids=[[5]]), "`num_beams` > 1"),
    (dict(num_beams=4, force_words_ids=[5]), "force_words_ids"),
    (dict(num_beams=4, force_words_ids=[]), "force_words_ids"),
    (dict(num_beams=4, force_words_ids=[[]]), "force_words_ids"),
    (dict(num_beams=4, force_words_ids=[[5, -1]]), "force_words_ids"),
    (dict(num_beams=4, force_words_ids=[[[5, 6], [5]]]), "prefix of another"),
    (dict(num_beams=4, force_words_ids=[[VOCAB + 3]]), "outside the model's vocabulary"),
    (dict(num_beams=4, constraints=[]), "`constraints`"),
])  # fmt: skip
def test_invalid_arguments(pair, kwargs, match):
    ids, mask = prompts(False)
    with pytest.raises(ValueError, match=match):
        pair[1].generate(ids, attention_mask=mask, max_new_tokens=3, **kwargs)


def test_constraint_that_is_not_one():
    with pytest.raises(TypeError, match="is not a constraint"):
        GenerationConfig(num_beams=2, constraints=[[5, 6]]).validate()


@pytest.mark.parametrize("extra", [dict(output_attentions=True), dict(output_hidden_states=True), "embeds"])
@pytest.mark.parametrize("mode", [dict(num_beam_groups=2, diversity_penalty=1.0), dict(force_words_ids=[[5]])])
def test_variants_refuse_what_they_do_not_implement(pair, mode, extra):
    ids, mask = prompts(False)
    ours = pair[1]
    inputs = dict(inputs_embeds=ours.get_input_embeddings()(ids)) if extra == "embeds" else dict(input_ids=ids, **extra)
    with pytest.raises(NotImplementedError, match="group / constrained beam search take input_ids only"):
        ours.generate(attention_mask=mask, max_new_tokens=3, num_beams=2, return_dict_in_generate=True,
                      **inputs, **mode)  # fmt: skip
