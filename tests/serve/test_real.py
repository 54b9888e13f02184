"""The server on the real Scheduler and the bundled GLM model ("default:glm"), driven by the openai client:
greedy output equals `model.generate`, streams join to the plain response, seeds reproduce, usage counts
are token counts, and a client that leaves mid-stream is cancelled without disturbing the next request."""

from __future__ import annotations

import asyncio

import pytest
import torch

import glmkit
from glmkit.serve.app import create_app
from glmkit.serve.scheduler import Scheduler

from .conftest import running, wait_for

openai = pytest.importorskip("openai")

MODEL = "default:glm"
MAX_MODEL_LEN = 512
PROMPTS = ["Hello, my name is", "The capital of France", "1 2 3 4", "a"]


@pytest.fixture(scope="module")
def model():
    return glmkit.AutoModelForCausalLM.from_pretrained(MODEL).eval()


@pytest.fixture(scope="module")
def scheduler(model, tokenizer):
    try:
        engine = Scheduler(model, tokenizer, max_num_seqs=8, max_queue_len=32, max_model_len=MAX_MODEL_LEN)
    except NotImplementedError:
        pytest.skip("glmkit.serve.scheduler.Scheduler is not implemented yet")
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def url(scheduler, tokenizer):
    with running(create_app(scheduler, tokenizer, MODEL, max_model_len=MAX_MODEL_LEN)) as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    with openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as c:
        yield c


def reference(model, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[str, int, str]:
    """Greedy `model.generate`: (new text, new token count, finish_reason)."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, len(ids) :].tolist()
    eos = set(model.generation_config.eos_token_id)
    finish = "stop" if new and new[-1] in eos else "length"
    return tokenizer.decode(new, skip_special_tokens=True), len(new), finish


def test_greedy_completions_equal_generate(client, model, tokenizer):
    for prompt in PROMPTS:
        ids = tokenizer(prompt).input_ids
        text, count, finish = reference(model, tokenizer, ids, 24)
        response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0)
        assert response.choices[0].text == text, prompt
        assert response.choices[0].finish_reason == finish
        assert response.usage.prompt_tokens == len(ids) and response.usage.completion_tokens == count
        assert response.usage.total_tokens == len(ids) + count


def test_concurrent_greedy_requests_equal_generate_alone(url, model, tokenizer):
    prompts = PROMPTS * 3

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120) as aclient:
            calls = [aclient.completions.create(model=MODEL, prompt=p, max_tokens=16 + i, temperature=0)
                     for i, p in enumerate(prompts)]  # fmt: skip
            return await asyncio.gather(*calls)

    for i, (prompt, response) in enumerate(zip(prompts, asyncio.run(main()))):
        text, count, _ = reference(model, tokenizer, tokenizer(prompt).input_ids, 16 + i)
        assert (response.choices[0].text, response.usage.completion_tokens) == (text, count), prompt


def test_greedy_chat_equals_generate(client, model, tokenizer):
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Say something."}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    text, count, finish = reference(model, tokenizer, ids, 20)
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    # GLM-4's format: a reply is `<|assistant|>{metadata}\n{content}`; an empty metadata line is not content
    want = text[1:] if text.startswith("\n") else text
    assert response.choices[0].message.content == want and response.choices[0].finish_reason == finish
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), count)


def test_stop_strings_and_stop_token_ids(client, model, tokenizer):
    ids = tokenizer(PROMPTS[1]).input_ids
    text, _, _ = reference(model, tokenizer, ids, 24)
    stop = text.split()[2]  # a word the greedy text reaches
    response = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0, stop=[stop])
    assert (response.choices[0].text, response.choices[0].finish_reason) == (text[: text.index(stop)], "stop")
    tokens = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :].tolist()
    response = client.completions.create(model=MODEL, prompt=PROMPTS[1], max_tokens=24, temperature=0,
                                         extra_body={"stop_token_ids": [tokens[5]]})  # fmt: skip
    first = tokens.index(tokens[5])
    assert response.choices[0].text == tokenizer.decode(tokens[:first]) and response.choices[0].finish_reason == "stop"


def test_streams_join_to_the_plain_response(client):
    kwargs = dict(model=MODEL, prompt=PROMPTS[0], max_tokens=30, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage == whole.usage
    messages = [{"role": "user", "content": "Tell me a story."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage == whole.usage


def test_seeded_sampling_reproduces_per_choice(client):
    kwargs = dict(model=MODEL, prompt=PROMPTS[1], max_tokens=20, temperature=1.0)
    pair = client.completions.create(**kwargs, n=2, seed=1234, extra_body={"ignore_eos": True})
    again = client.completions.create(**kwargs, n=2, seed=1234, extra_body={"ignore_eos": True})
    assert [c.text for c in pair.choices] == [c.text for c in again.choices]
    assert pair.usage.completion_tokens == 40
    # choice j samples under seed + j: each equals that seed's request alone
    alone = [client.completions.create(**kwargs, seed=1234 + j, extra_body={"ignore_eos": True}) for j in range(2)]
    assert [c.text for c in pair.choices] == [a.choices[0].text for a in alone]


def test_logprobs_are_the_models(client, model, tokenizer):
    ids = tokenizer(PROMPTS[2]).input_ids
    response = client.completions.create(model=MODEL, prompt=ids, max_tokens=1, temperature=0, logprobs=3)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)
    best = logprobs.topk(3)
    got = response.choices[0].logprobs
    assert got.tokens == [tokenizer.decode([int(best.indices[0])])]
    assert got.token_logprobs[0] == pytest.approx(float(best.values[0]), abs=1e-3)
    assert sorted(got.top_logprobs[0].values(), reverse=True) == pytest.approx(best.values.tolist(), abs=1e-3)


def test_disconnect_mid_stream_cancels_and_the_server_goes_on(client, scheduler, monkeypatch):
    cancelled: list[str] = []
    original = scheduler.cancel
    monkeypatch.setattr(scheduler, "cancel", lambda request_id: (cancelled.append(request_id), original(request_id)))
    stream = client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=400, temperature=0.8,
                                       stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    for seen, _chunk in enumerate(stream):
        if seen == 2:
            break
    stream.close()
    wait_for(lambda: cancelled, "the server to cancel the request")
    wait_for(lambda: scheduler.stats()["running"] == 0 and scheduler.stats()["waiting"] == 0, "the engine to idle")
    response = client.completions.create(model=MODEL, prompt=PROMPTS[3], max_tokens=5, temperature=0,
                                         extra_body={"ignore_eos": True})  # fmt: skip
    assert response.usage.completion_tokens == 5 and response.choices[0].finish_reason == "length"


def test_engine_limits_are_400s(url):
    import httpx

    too_long = {"model": MODEL, "prompt": list(range(MAX_MODEL_LEN - 2)), "max_tokens": 10}
    assert httpx.post(f"{url}/v1/completions", json=too_long).status_code == 400
    bias = {"model": MODEL, "prompt": "x", "logit_bias": {"5000": 1.0}}
    assert httpx.post(f"{url}/v1/completions", json=bias).json()["error"]["param"] == "logit_bias"


def _metric(text: str, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} is not in /metrics")


def test_metrics_count_what_usage_reports(scheduler, tokenizer):
    """/metrics in Prometheus' format: token counters advance by the usage the responses report, one TTFT
    and (tokens - 1) inter-token latencies per request, nothing left running."""
    import httpx

    with running(create_app(scheduler, tokenizer, MODEL, max_model_len=MAX_MODEL_LEN)) as base:
        before = httpx.get(f"{base}/metrics")
        assert before.status_code == 200 and before.headers["content-type"].startswith("text/plain")
        with openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0) as client:
            usages = [client.completions.create(model=MODEL, prompt=p, max_tokens=5 + i, temperature=0).usage
                      for i, p in enumerate(PROMPTS)]  # fmt: skip
        after = httpx.get(f"{base}/metrics").text
    for name, key in [("glmkit:prompt_tokens_total", "prompt_tokens"),
                      ("glmkit:generation_tokens_total", "completion_tokens")]:  # fmt: skip
        assert _metric(after, name) - _metric(before.text, name) == sum(getattr(u, key) for u in usages)
    assert _metric(after, "glmkit:time_to_first_token_seconds_count") == len(PROMPTS)
    gaps = sum(u.completion_tokens - 1 for u in usages)
    assert _metric(after, "glmkit:time_per_output_token_seconds_count") == gaps
    assert _metric(after, "glmkit:e2e_request_latency_seconds_count") == len(PROMPTS)
    assert _metric(after, "glmkit:num_requests_running") == 0 and _metric(after, "glmkit:num_requests_waiting") == 0
