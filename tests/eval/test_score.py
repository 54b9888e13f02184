"""Scoring API against a direct log-softmax sum over transformers' reference model on the same checkpoint."""

from __future__ import annotations

import math

import pytest
import torch

from glmkit import AutoModelForCausalLM, AutoTokenizer
from glmkit.eval import loglikelihood_rolling, perplexity, rolling_windows, score, score_tokens, scoring

from .conftest import MAX_POSITIONS

transformers = pytest.importorskip("transformers")
CONTEXTS = ["ROMEO: what say you ", "ROMEO: what say you ", "JULIET:", "", "KING: my lord,\nthe queen"]
CONTINUATIONS = ["my lord", "to the king of all\nthe land", " O Romeo", "Hello there", " is dead."]


def reference_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """The harness's split, written out: trailing context spaces join the continuation, whole - context."""
    stripped = context.rstrip()
    continuation, context = context[len(stripped) :] + continuation, stripped
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    return context_ids, whole[len(context_ids) :]


def direct_score(logits_fn, context_ids: list[int], continuation_ids: list[int]) -> tuple[float, bool]:
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(logits_fn(ids)[0].double(), dim=-1)  # (T, V)
    rows = logprobs[len(context_ids) - 1 : -1]  # position t predicts token t + 1
    targets = torch.tensor(continuation_ids)
    return float(rows.gather(-1, targets[:, None]).sum()), bool((rows.argmax(-1) == targets).all())


def test_score_equals_reference_and_own_forward(checkpoint):
    family, directory, ref = checkpoint
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    ref_tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    got = score(model, tokenizer, CONTEXTS, CONTINUATIONS, batch_size=3)
    for context, continuation, result in zip(CONTEXTS, CONTINUATIONS, got):
        context_ids, continuation_ids = reference_pair(ref_tokenizer, context, continuation)
        assert context_ids, "the tokenizer adds a special prefix, so an empty context still has tokens"
        for logits_fn in (lambda ids: ref(ids).logits, lambda ids: model(ids).logits):
            expected, greedy = direct_score(logits_fn, context_ids, continuation_ids)
            assert result.logprob == pytest.approx(expected, rel=1e-4, abs=1e-5), (family, context, continuation)
            assert result.is_greedy == greedy
        assert result.num_tokens == len(continuation_ids)
        assert result.num_bytes == len(continuation.encode())
        assert result.per_token == pytest.approx(result.logprob / len(continuation_ids))
        assert result.per_byte == pytest.approx(result.logprob / len(continuation.encode()))


def test_prefix_reuse_batching_and_chunks_do_not_change_scores(checkpoint, monkeypatch):
    _, directory, _ = checkpoint
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    contexts = ["ROMEO: what say you"] * 4 + ["JULIET: O"] * 3
    candidates = [" my lord", " nothing", " to the king\n", "?", " Romeo, Romeo", " happy dagger", "!"]
    shared = score(model, tokenizer, contexts, candidates, batch_size=8)
    alone = score(model, tokenizer, contexts, candidates, batch_size=1, reuse_prefix=False)
    split = score(model, tokenizer, contexts, candidates, batch_size=3)  # groups split across batches
    monkeypatch.setattr(scoring, "PREFILL_CHUNK", 3)  # contexts and continuations forwarded in pieces
    chunked = score(model, tokenizer, contexts, candidates, batch_size=8)
    for a, b, c, d in zip(shared, alone, split, chunked):
        for other in (b, c, d):
            assert a.logprob == pytest.approx(other.logprob, rel=1e-5, abs=1e-5)
            assert a.is_greedy == other.is_greedy


def test_greedy_continuation_is_flagged(checkpoint):
    _, directory, ref = checkpoint
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    context_ids = tokenizer("ROMEO:")["input_ids"]
    out = ref.generate(torch.tensor([context_ids]), max_new_tokens=4, do_sample=False)[0, len(context_ids) :]
    greedy, other = out.tolist(), out.tolist()[:-1] + [(out[-1].item() + 1) % 2048]
    (g, _), (o, _) = score_tokens(model, [(context_ids, greedy), (context_ids, other)])
    assert score_tokens(model, [(context_ids, greedy)])[0][1] is True
    assert score_tokens(model, [(context_ids, other)])[0][1] is False
    assert g > o


def test_rolling_equals_direct_sum_where_the_document_fits(checkpoint):
    _, directory, ref = checkpoint
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    document = "ROMEO: But soft, what light\nthrough yonder window breaks?"
    ids = tokenizer(document, add_special_tokens=False)["input_ids"]
    prefix = tokenizer("")["input_ids"] or [tokenizer.bos_token_id or tokenizer.eos_token_id]
    assert len(prefix) + len(ids) - 1 <= MAX_POSITIONS
    expected, _ = direct_score(lambda x: ref(x).logits, prefix, ids)
    (result,) = loglikelihood_rolling(model, tokenizer, [document])
    assert result.logprob == pytest.approx(expected, rel=1e-4)
    assert result.num_tokens == len(ids)
    assert perplexity(model, tokenizer, document) == pytest.approx(math.exp(-expected / len(ids)), rel=1e-4)
    # windows shorter than the document: every token still scored exactly once, each window within max_length
    for max_length, stride in ((8, 8), (8, 3), (5, 1)):
        windows = rolling_windows(ids, prefix, max_length, stride)
        assert [t for _, cont in windows for t in cont] == ids
        assert all(len(ctx) + len(cont) - 1 <= max_length for ctx, cont in windows)
        (short,) = loglikelihood_rolling(model, tokenizer, [document], max_length=max_length, stride=stride)
        direct = sum(direct_score(lambda x: ref(x).logits, list(c), list(t))[0] for c, t in windows)
        assert short.logprob == pytest.approx(direct, rel=1e-4)


def test_rolling_windows_context_is_what_precedes():
    tokens = list(range(10, 30))
    for max_length, stride in ((6, 6), (6, 2), (4, 1), (25, 25)):
        done = 0
        for i, (context, continuation) in enumerate(rolling_windows(tokens, [0], max_length, stride)):
            assert continuation == tokens[done : done + len(continuation)]
            expected_context = [0] if i == 0 else tokens[max(0, done + len(continuation) - max_length - 1) : done]
            assert context == expected_context
            done += len(continuation)
        assert done == len(tokens)


def test_newlines_to_eos_encodes_newlines_as_eos(checkpoint):
    family, directory, ref = checkpoint
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    context, continuation = "KING: my lord,\nthe queen", " is dead.\nAlas"
    pieces = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in ("KING: my lord,", "the queen is dead.",
                                                                             "Alas")]  # fmt: skip
    eos = tokenizer.eos_token_id
    head = tokenizer("")["input_ids"]
    context_ids = head + pieces[0] + [eos] + tokenizer("the queen", add_special_tokens=False)["input_ids"]
    whole = head + pieces[0] + [eos] + pieces[1] + [eos] + pieces[2]
    (result,) = score(model, tokenizer, [context], [continuation], newlines_to_eos=True)
    expected, _ = direct_score(lambda x: ref(x).logits, context_ids, whole[len(context_ids) :])
    assert result.logprob == pytest.approx(expected, rel=1e-4)
    assert result.num_tokens == len(whole) - len(context_ids)


def test_bad_input_raises_clear_errors(checkpoint):
    _, directory, _ = checkpoint
    model, tokenizer = AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    with pytest.raises(ValueError, match="continuations is empty"):
        score(model, tokenizer, [], [])
    with pytest.raises(ValueError, match=r"contexts \(2\) and continuations \(1\)"):
        score(model, tokenizer, ["a", "b"], [" c"])
    with pytest.raises(ValueError, match=r"continuations\[1\] is empty"):
        score(model, tokenizer, ["a", "b"], [" c", ""])
    with pytest.raises(TypeError, match=r"continuations\[0\] must be a str"):
        score(model, tokenizer, ["a"], [3])
    with pytest.raises(ValueError, match=f"longer than the model's {MAX_POSITIONS} positions"):
        score(model, tokenizer, ["word " * 200], [" end"])
    with pytest.raises(ValueError, match="batch_size"):
        score(model, tokenizer, ["a"], [" b"], batch_size=0)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        score_tokens(model, [([1], [99999])])
    with pytest.raises(ValueError, match="the context has no tokens"):
        score_tokens(model, [([], [5])])
    with pytest.raises(TypeError, match="list of documents"):
        loglikelihood_rolling(model, tokenizer, "one document")
    with pytest.raises(ValueError, match="stride"):
        loglikelihood_rolling(model, tokenizer, ["text"], max_length=8, stride=9)
