"""Continuous batching (glmkit.serve.scheduler): batched requests equal the same requests run alone."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from glmkit import AutoModelForCausalLM, AutoTokenizer
from glmkit.serve.scheduler import QueueFull, Request, RequestError, SamplingParams, Scheduler

PROMPTS = ["ROMEO:", "JULIET: O Romeo, Romeo", "First Citizen:\nBefore we proceed any further, hear me speak.",
           "KING", "To be, or not to be, that is the question"]  # fmt: skip


@pytest.fixture(scope="module", params=["glm", "xglm", "persimmon"])
def bundled(request):
    name = f"default:{request.param}"
    return AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)


class Collector:
    """Gathers every request's events; `wait()` until all have finished."""

    def __init__(self, n: int):
        self.events: dict[str, list] = {}
        self.left, self.done = n, threading.Event()

    def __call__(self, event) -> None:
        self.events.setdefault(event.request_id, []).append(event)
        if event.finish_reason is not None:
            self.left -= 1
            if self.left == 0:
                self.done.set()

    def wait(self) -> None:
        assert self.done.wait(120), f"{self.left} requests never finished"

    def tokens(self, rid: str) -> list[int]:
        return [t for e in self.events[rid] for t in e.token_ids]

    def text(self, rid: str) -> str:
        return "".join(e.text for e in self.events[rid])

    def reason(self, rid: str) -> str:
        return self.events[rid][-1].finish_reason


def run(model, tokenizer, requests, **scheduler_kwargs) -> Collector:
    """requests: (prompt ids, SamplingParams); returns the collector after all finished."""
    return serve(Scheduler(model, tokenizer, **scheduler_kwargs), requests)


def serve(scheduler: Scheduler, requests) -> Collector:
    collect = Collector(len(requests))
    scheduler.start()
    try:
        for i, (ids, params) in enumerate(requests):
            scheduler.submit(Request(ids, params, collect, request_id=str(i)))
        collect.wait()
    finally:
        scheduler.stop()
    return collect


@pytest.mark.parametrize("prefill_chunk", [8, 512])
def test_batched_greedy_equals_generate_alone(bundled, prefill_chunk):
    """10 requests of different lengths through 4 rows, prompts prefilled in 8-token chunks between decode
    steps (or, with 512, whole prompts of different lengths right-padded into one forward): each request's
    tokens and text equal `generate` on it alone."""
    model, tokenizer = bundled
    requests = [(tokenizer(p).input_ids, SamplingParams(max_tokens=12 + 5 * i, temperature=0.0, ignore_eos=True))
                for i, p in enumerate(PROMPTS * 2)]  # fmt: skip
    got = run(model, tokenizer, requests, max_num_seqs=4, prefill_chunk=prefill_chunk)
    for i, (ids, params) in enumerate(requests):
        want = model.generate(torch.tensor([ids]), max_new_tokens=params.max_tokens, eos_token_id=None)
        want = want[0, len(ids) :].tolist()
        assert got.tokens(str(i)) == want, f"request {i}"
        # the text continues the prompt: sentencepiece's leading space stays
        context = tokenizer.decode(ids[-4:], skip_special_tokens=True)
        assert got.text(str(i)) == tokenizer.decode(ids[-4:] + want, skip_special_tokens=True)[len(context) :]
        assert got.reason(str(i)) == "length"
        assert got.events[str(i)][-1].completion_tokens == params.max_tokens


def test_a_request_arriving_during_a_step_is_prefilled_inside_it(bundled):
    """B is submitted when A's first token arrives, i.e. just before A's first decode step: B's prompt is
    prefilled between that step's layers, so B's first token comes before A's second (without preemption it
    would wait for the step to end). Both still equal `generate` alone."""
    model, tokenizer = bundled
    a, b = tokenizer(PROMPTS[2]).input_ids, tokenizer(PROMPTS[4]).input_ids
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    order, collect = [], Collector(2)
    scheduler = Scheduler(model, tokenizer, max_num_seqs=4)

    def on_event(event) -> None:
        order.append((event.request_id, len(event.token_ids)))
        if event.request_id == "a" and len(order) == 1:
            scheduler.submit(Request(b, params, on_event, request_id="b"))
        collect(event)

    scheduler.start()
    try:
        scheduler.submit(Request(a, params, on_event, request_id="a"))
        collect.wait()
    finally:
        scheduler.stop()
    assert order[:3] == [("a", 1), ("b", 1), ("a", 1)]
    for rid, ids in (("a", a), ("b", b)):
        want = model.generate(torch.tensor([ids]), max_new_tokens=6, eos_token_id=None)[0, len(ids) :].tolist()
        assert collect.tokens(rid) == want


def test_seeded_sampling_independent_of_the_batch(bundled):
    model, tokenizer = bundled
    params = dict(max_tokens=20, temperature=0.9, top_k=40, top_p=0.95, ignore_eos=True)
    ids = tokenizer(PROMPTS[1]).input_ids
    alone = run(model, tokenizer, [(ids, SamplingParams(seed=7, **params))], max_num_seqs=1)
    others = [(tokenizer(p).input_ids, SamplingParams(**params)) for p in PROMPTS]
    crowded = run(model, tokenizer, [*others, (ids, SamplingParams(seed=7, **params))], max_num_seqs=8)
    assert crowded.tokens(str(len(others))) == alone.tokens("0")
    other_seed = run(model, tokenizer, [(ids, SamplingParams(seed=8, **params))])
    assert other_seed.tokens("0") != alone.tokens("0")


def test_stop_strings_and_stop_ids(bundled):
    model, tokenizer = bundled
    ids = tokenizer(PROMPTS[0]).input_ids
    free = run(model, tokenizer, [(ids, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))])
    text, tokens = free.text("0"), free.tokens("0")
    stop = text[8:11]
    assert len(stop) == 3
    stopped = run(model, tokenizer, [
        (ids, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop, "\u2603never"])),
        (ids, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=[tokens[5]])),
    ])  # fmt: skip
    assert stopped.text("0") == text[: text.index(stop)] and stopped.reason("0") == "stop"
    assert stopped.tokens("1") == tokens[: tokens.index(tokens[5]) + 1] and stopped.reason("1") == "stop"


def test_logprobs_are_the_models(bundled):
    model, tokenizer = bundled
    ids = tokenizer(PROMPTS[2]).input_ids
    got = run(model, tokenizer, [(ids, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True))])
    out = model.generate(torch.tensor([ids]), max_new_tokens=6, eos_token_id=None, return_dict_in_generate=True,
                         output_logits=True)  # fmt: skip
    for event, logits in zip(got.events["0"], out.logits):
        lp = torch.log_softmax(logits[0], -1)
        (entry,) = event.logprobs
        assert entry["id"] == int(lp.argmax())
        assert entry["logprob"] == pytest.approx(float(lp.max()), abs=1e-4)
        assert [i for i, _ in entry["top"]] == torch.topk(lp, 3).indices.tolist()


def test_cancel_frees_the_row_and_others_go_on(bundled):
    model, tokenizer = bundled
    scheduler = Scheduler(model, tokenizer, max_num_seqs=2)
    collect = Collector(3)
    first = threading.Event()

    def on_event(event):
        collect(event)
        if event.request_id == "long":
            first.set()

    scheduler.start()
    try:
        ids = tokenizer(PROMPTS[0]).input_ids
        scheduler.submit(Request(ids, SamplingParams(max_tokens=1000, ignore_eos=True), on_event, request_id="long"))
        assert first.wait(60)
        scheduler.cancel("long")
        for rid in ("a", "b"):
            scheduler.submit(Request(ids, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), on_event,
                                     request_id=rid))  # fmt: skip
        collect.wait()
    finally:
        scheduler.stop()
    assert collect.reason("long") == "abort" and len(collect.tokens("long")) < 1000
    assert collect.reason("a") == collect.reason("b") == "length" and collect.tokens("a") == collect.tokens("b")


def test_a_broken_callback_ends_only_its_request(bundled):
    model, tokenizer = bundled
    collect = Collector(1)

    def broken(event):
        raise RuntimeError("consumer gone")

    scheduler = Scheduler(model, tokenizer)
    scheduler.start()
    try:
        ids = tokenizer(PROMPTS[0]).input_ids
        scheduler.submit(Request(ids, SamplingParams(max_tokens=50), broken, request_id="bad"))
        scheduler.submit(Request(ids, SamplingParams(max_tokens=5, ignore_eos=True), collect, request_id="good"))
        collect.wait()
    finally:
        scheduler.stop()
    assert collect.reason("good") == "length"


def test_bad_requests_and_a_full_queue(bundled):
    model, tokenizer = bundled
    scheduler = Scheduler(model, tokenizer, max_num_seqs=1, max_queue_len=1, max_model_len=64)
    ok = SamplingParams(max_tokens=4)
    with pytest.raises(RequestError, match="exceeds the model's context of 64"):
        scheduler.submit(Request([5] * 61, ok, print))
    with pytest.raises(RequestError, match="outside"):
        scheduler.submit(Request([5, 10**6], ok, print))
    with pytest.raises(RequestError, match="max_tokens"):
        scheduler.submit(Request([5], SamplingParams(max_tokens=0), print))
    with pytest.raises(RequestError, match="empty"):
        scheduler.submit(Request([], ok, print))
    with pytest.raises(RequestError, match="logit_bias"):
        scheduler.submit(Request([5], SamplingParams(logit_bias={-1: 1.0}), print))
    scheduler.submit(Request([5], ok, print))  # not started: one takes the free row, one waits
    scheduler.submit(Request([5], ok, print))
    with pytest.raises(QueueFull):
        scheduler.submit(Request([5], ok, print))
    scheduler.stop()


def test_prefix_cache_reuses_a_shared_prompt(bundled):
    """A second prompt that starts with the first one's tokens reuses their KV: same output as alone."""
    model, tokenizer = bundled
    system = tokenizer("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\n").input_ids
    prompts = [system, system + tokenizer(" Speak, speak.").input_ids[1:]]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    scheduler = Scheduler(model, tokenizer, max_num_seqs=1, min_prefix=4)
    scheduler.start()
    try:
        for i, ids in enumerate(prompts):
            collect = Collector(1)
            scheduler.submit(Request(ids, params, collect, request_id=str(i)))
            collect.wait()
            want = model.generate(torch.tensor([ids]), max_new_tokens=10, eos_token_id=None)[0, len(ids) :]
            assert collect.tokens(str(i)) == want.tolist()
    finally:
        scheduler.stop()
    assert scheduler.stats()["prefix_cache_hit_tokens_total"] == len(system)


SCHEMA = {"type": "object", "properties": {"act": {"type": "integer"}, "scene": {"type": "string", "maxLength": 12}},
          "required": ["act", "scene"], "additionalProperties": False}  # fmt: skip


def test_a_json_schema_grammar_shapes_one_request_only():
    """A grammar-constrained request yields JSON that parses and fits the schema (the same prompt without
    it does not), while an unconstrained request in the same batch still equals generate() alone."""
    pytest.importorskip("llguidance")
    from glmkit.generation.grammar import json_grammar

    model, tokenizer = AutoModelForCausalLM.from_pretrained("default:glm"), AutoTokenizer.from_pretrained("default:glm")
    ids = tokenizer("ROMEO:").input_ids
    free = SamplingParams(max_tokens=150, temperature=0.0)
    shaped = SamplingParams(max_tokens=150, temperature=0.0, grammar=json_grammar(SCHEMA))
    got = run(model, tokenizer, [(ids, shaped), (ids, free)], max_num_seqs=2)
    value = json.loads(got.text("0"))
    assert set(value) == {"act", "scene"} and isinstance(value["act"], int) and len(value["scene"]) <= 12
    assert got.reason("0") == "stop"
    with pytest.raises(json.JSONDecodeError):
        json.loads(got.text("1"))
    want = model.generate(torch.tensor([ids]), max_new_tokens=150)[0, len(ids) :].tolist()
    assert got.tokens("1") == want


def test_a_grammar_that_cannot_compile_or_be_spelled():
    pytest.importorskip("llguidance")
    from glmkit.generation.grammar import json_grammar, lark_grammar

    model = AutoModelForCausalLM.from_pretrained("default:xglm")
    tokenizer = AutoTokenizer.from_pretrained("default:xglm")
    scheduler = Scheduler(model, tokenizer)
    with pytest.raises(RequestError, match="grammar"):
        scheduler.submit(Request([2, 100], SamplingParams(grammar=lark_grammar("start: missing_rule")), print))
    # the bundled XGLM's vocabulary has no "{": that request ends with an error, its neighbour goes on
    ids = tokenizer("ROMEO:").input_ids
    requests = [(ids, SamplingParams(max_tokens=8, grammar=json_grammar())), (ids, SamplingParams(max_tokens=8))]
    got = run(model, tokenizer, requests, max_num_seqs=2)
    assert got.reason("0") == "error" and "stuck" in got.events["0"][-1].error
    assert got.reason("1") == "length" and len(got.tokens("1")) == 8


def test_padded_vocabulary_rows_are_never_sampled():
    """A model with more output rows than the tokenizer has tokens (GLM-4 pads 151343 tokens to 151552 rows):
    the rows past the tokenizer are not text, so even a +100 logit_bias on one never picks it."""
    from glmkit import GlmConfig, GlmForCausalLM

    tokenizer = AutoTokenizer.from_pretrained("default:glm")
    torch.manual_seed(0)
    config = GlmConfig(vocab_size=len(tokenizer) + 256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                       eos_token_id=2)  # fmt: skip
    model = GlmForCausalLM(config).eval()
    padded = len(tokenizer) + 7
    params = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True, logit_bias={padded: 100.0})
              for s in range(3)]  # fmt: skip
    got = run(model, tokenizer, [(tokenizer("ROMEO:").input_ids, p) for p in params])
    for i in range(3):
        assert got.reason(str(i)) == "length" and len(got.tokens(str(i))) == 12
        assert all(t < len(tokenizer) for t in got.tokens(str(i)))


def test_a_compiled_decode_step_compiles_once_and_equals_generate_alone():
    """Scheduler(compile=True): a batch of aligned rows (three equal prompts), then rows joining and leaving at
    different lengths (and a single row left, which runs eagerly) are served by the one graph `warm_up` compiled;
    every request's greedy tokens equal `generate` alone. Two rows run past the cache's first 256 slots, where its
    keys are reallocated."""
    from torch._dynamo.utils import counters

    model, tokenizer = AutoModelForCausalLM.from_pretrained("default:glm"), AutoTokenizer.from_pretrained("default:glm")
    requests = [(tokenizer(p).input_ids, SamplingParams(max_tokens=260 if i < 2 else 4 + 7 * i, temperature=0.0,
                                                        ignore_eos=True))
                for i, p in enumerate(PROMPTS[1:2] * 3 + PROMPTS[2:])]  # fmt: skip
    scheduler = Scheduler(model, tokenizer, max_num_seqs=3, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    scheduler.warm_up()
    assert counters["stats"]["unique_graphs"] == graphs + 1
    collect = serve(scheduler, requests)
    assert counters["stats"]["unique_graphs"] == graphs + 1, "the server's step was compiled again"
    for i, (ids, params) in enumerate(requests):
        want = model.generate(torch.tensor([ids]), max_new_tokens=params.max_tokens, eos_token_id=None)
        assert collect.tokens(str(i)) == want[0, len(ids) :].tolist(), f"request {i}"


def test_compile_refuses_served_adapters(bundled, monkeypatch):
    from glmkit import lora

    model, tokenizer = bundled
    monkeypatch.setattr(lora, "multi_lora_modules", lambda model: [object()])  # as once adapters are loaded
    with pytest.raises(ValueError, match="LoRA"):
        Scheduler(model, tokenizer, compile=True)
