"""The HTTP app over FakeScheduler, driven by the official openai client and raw httpx: request handling,
response and stream shapes, errors, cancellation. (The real scheduler and model: test_real.py.)"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

openai = pytest.importorskip("openai")

from .conftest import KEY, MAX_MODEL_LEN, MODEL, wait_for  # noqa: E402
from .fake import fake_tokens  # noqa: E402


def client(url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def expected_text(tokenizer, prompt_ids: list[int], count: int, seed=None, temperature=0.0) -> str:
    return tokenizer.decode(fake_tokens(prompt_ids, seed, temperature, count), skip_special_tokens=True)


def sse_events(response: httpx.Response) -> list[str]:
    """The data fields of an SSE body, checking its framing."""
    body = response.text
    assert body.endswith("data: [DONE]\n\n")
    blocks = body.split("\n\n")[:-1]
    assert all(block.startswith("data: ") for block in blocks), body
    return [block[len("data: ") :] for block in blocks]


# ---- completions ----------------------------------------------------------------------------------------
def test_completion_matches_engine_output_and_usage(fake_url, fake, tokenizer):
    response = client(fake_url).completions.create(model=MODEL, prompt="Hello there", max_tokens=7, temperature=0)
    ids = tokenizer("Hello there").input_ids
    assert response.id.startswith("cmpl-") and response.object == "text_completion" and response.model == MODEL
    assert response.created > 1_600_000_000
    (choice,) = response.choices
    assert choice.text == expected_text(tokenizer, ids, 7) and choice.finish_reason == "length"
    assert response.usage.prompt_tokens == len(ids) and response.usage.completion_tokens == 7
    assert response.usage.total_tokens == len(ids) + 7
    (request,) = fake.submitted
    assert request.prompt_ids == ids and request.params.max_tokens == 7 and request.params.temperature == 0


def test_completion_default_max_tokens_is_16(fake_url, fake):
    client(fake_url).completions.create(model=MODEL, prompt="hi")
    assert fake.submitted[0].params.max_tokens == 16


def test_sampling_fields_reach_the_engine(fake_url, fake):
    client(fake_url).completions.create(
        model=MODEL, prompt="x", max_tokens=3, temperature=0.7, top_p=0.9, stop=["\n", "END"], seed=5,
        presence_penalty=0.5, frequency_penalty=-0.5, logit_bias={"17": 5.0, "3": -100}, user="u1",
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "stop_token_ids": [2038],
                    "ignore_eos": True, "some_unknown_field": {"x": 1}},
    )  # fmt: skip
    p = fake.submitted[0].params
    assert (p.temperature, p.top_p, p.top_k, p.min_p, p.seed) == (0.7, 0.9, 40, 0.05, 5)
    assert p.stop == ["\n", "END"] and p.stop_token_ids == [2038] and p.ignore_eos
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty) == (0.5, -0.5, 1.1)
    assert p.logit_bias == {17: 5.0, 3: -100.0} and p.logprobs is None


def test_stop_token_finishes_with_stop(fake_url, fake, tokenizer):
    ids = tokenizer("stop here").input_ids
    tokens = fake_tokens(ids, None, 0.0, 10)
    response = client(fake_url).completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0,
                                                   extra_body={"stop_token_ids": [tokens[3]]})  # fmt: skip
    assert response.choices[0].finish_reason == "stop"
    assert response.choices[0].text == tokenizer.decode(tokens[:3])
    assert response.usage.completion_tokens == 3


def test_token_id_prompts_batches_echo_and_n(fake_url, fake, tokenizer):
    a, b = tokenizer("first").input_ids, tokenizer("second one").input_ids
    response = client(fake_url).completions.create(model=MODEL, prompt=[a, b], max_tokens=4, n=2, echo=True, seed=3)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    prompts = [a, a, b, b]
    for choice, prompt, seed in zip(response.choices, prompts, [3, 4, 3, 4]):
        assert choice.text == tokenizer.decode(prompt) + expected_text(tokenizer, prompt, 4, seed, 1.0)
    assert [r.params.seed for r in fake.submitted] == [3, 4, 3, 4]
    assert response.usage.prompt_tokens == len(a) + len(b) and response.usage.completion_tokens == 16


def test_string_list_prompt_and_echo(fake_url, tokenizer):
    response = client(fake_url).completions.create(model=MODEL, prompt=["one", "two"], max_tokens=2, echo=True,
                                                   temperature=0)  # fmt: skip
    for choice, prompt in zip(response.choices, ["one", "two"]):
        assert choice.text == prompt + expected_text(tokenizer, tokenizer(prompt).input_ids, 2)


def test_completion_stream_joins_to_the_text(fake_url, tokenizer):
    openai_client = client(fake_url)
    whole = openai_client.completions.create(model=MODEL, prompt="stream me", max_tokens=12, temperature=0)
    chunks = list(openai_client.completions.create(model=MODEL, prompt="stream me", max_tokens=12, temperature=0,
                                                   stream=True, stream_options={"include_usage": True}))  # fmt: skip
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert all(c.id == chunks[0].id and c.id.startswith("cmpl-") for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completion_logprobs(fake_url, tokenizer):
    response = client(fake_url).completions.create(model=MODEL, prompt="lp", max_tokens=3, temperature=0, logprobs=2)
    logprobs = response.choices[0].logprobs
    tokens = fake_tokens(tokenizer("lp").input_ids, None, 0.0, 3)
    assert logprobs.tokens == [tokenizer.decode([t]) for t in tokens]
    assert logprobs.token_logprobs == [-0.25] * 3
    assert [len(top) for top in logprobs.top_logprobs] == [2, 2, 2]
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset[1] == len(logprobs.tokens[0])


def test_async_client_concurrent_requests(fake_url, tokenizer):
    async def main():
        async with openai.AsyncOpenAI(base_url=f"{fake_url}/v1", api_key="none", max_retries=0) as aclient:
            prompts = [f"prompt number {i}" for i in range(6)]
            plain = [aclient.completions.create(model=MODEL, prompt=p, max_tokens=5, temperature=0) for p in prompts]
            results = await asyncio.gather(*plain)
            stream = await aclient.chat.completions.create(model=MODEL, stream=True, max_tokens=5, temperature=0,
                                                           messages=[{"role": "user", "content": "hi"}])  # fmt: skip
            streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            return prompts, results, streamed

    prompts, results, streamed = asyncio.run(main())
    for prompt, result in zip(prompts, results):
        assert result.choices[0].text == expected_text(tokenizer, tokenizer(prompt).input_ids, 5)
    chat_ids = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert streamed == expected_text(tokenizer, chat_ids, 5)


# ---- chat -----------------------------------------------------------------------------------------------
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "text", "text": "GLM?"}]},
    {"role": "assistant", "content": "A model."},
    {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    {"role": "user", "content": "More."},
]


def test_chat_uses_the_chat_template(fake_url, fake, tokenizer):
    response = client(fake_url).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=0)
    rendered = [dict(m, content="What is\nGLM?") if i == 1 else m for i, m in enumerate(MESSAGES)]
    ids = tokenizer.apply_chat_template(rendered, add_generation_prompt=True, tokenize=True)
    assert fake.submitted[0].prompt_ids == ids
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content == expected_text(tokenizer, ids, 6)
    assert choice.finish_reason == "length" and choice.logprobs is None
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(ids), 6)


def test_chat_default_max_tokens_fills_the_context(fake_url, fake, tokenizer):
    client(fake_url).chat.completions.create(model=MODEL, messages=MESSAGES[-1:], max_completion_tokens=None)
    ids = fake.submitted[0].prompt_ids
    assert fake.submitted[0].params.max_tokens == MAX_MODEL_LEN - len(ids)


def test_chat_max_completion_tokens_and_template_kwargs(fake_url, fake, tokenizer):
    client(fake_url).chat.completions.create(model=MODEL, messages=MESSAGES[-1:], max_completion_tokens=3,
                                             extra_body={"chat_template_kwargs": {"unused_flag": True}})  # fmt: skip
    assert fake.submitted[0].params.max_tokens == 3


def test_chat_stream_deltas_usage_and_n(fake_url, tokenizer):
    openai_client = client(fake_url)
    kwargs = dict(model=MODEL, messages=MESSAGES[-1:], max_tokens=8, n=2, seed=11)
    whole = openai_client.chat.completions.create(**kwargs)
    chunks = list(openai_client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    for i in range(2):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert mine[0].delta.role == "assistant"
        assert "".join(c.delta.content or "" for c in mine) == whole.choices[i].message.content
        assert mine[-1].finish_reason == "length"
    assert whole.choices[0].message.content != whole.choices[1].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens == 16
    assert all(c.object == "chat.completion.chunk" and c.id.startswith("chatcmpl-") for c in chunks)


def test_seeded_n_is_reproducible(fake_url):
    openai_client = client(fake_url)
    runs = [openai_client.chat.completions.create(model=MODEL, messages=MESSAGES[-1:], max_tokens=5, n=2, seed=7)
            for _ in range(2)]  # fmt: skip
    assert [c.message.content for c in runs[0].choices] == [c.message.content for c in runs[1].choices]


def test_chat_logprobs(fake_url, tokenizer):
    response = client(fake_url).chat.completions.create(model=MODEL, messages=MESSAGES[-1:], max_tokens=2,
                                                        temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    content = response.choices[0].logprobs.content
    assert len(content) == 2 and all(len(item.top_logprobs) == 3 for item in content)
    assert content[0].bytes == list(content[0].token.encode()) and content[0].logprob == -0.25
    chunks = list(client(fake_url).chat.completions.create(model=MODEL, messages=MESSAGES[-1:], max_tokens=2,
                                                           temperature=0, logprobs=True, stream=True))  # fmt: skip
    streamed = [item for c in chunks if c.choices and c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert [item.token for item in streamed] == [item.token for item in content]


def test_raw_sse_framing(fake_url):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True}
    response = httpx.post(f"{fake_url}/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    data = [json.loads(d) for d in sse_events(response)[:-1]]
    assert data[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert data[-1]["choices"][0]["finish_reason"] == "length"
    assert all(d["choices"][0]["finish_reason"] is None for d in data[:-1])


# ---- other endpoints ------------------------------------------------------------------------------------
def test_models_health_tokenize_detokenize(fake_url, tokenizer):
    models = client(fake_url).models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "glmkit"
    assert client(fake_url).models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{fake_url}/health").status_code == 200
    tokens = httpx.post(f"{fake_url}/tokenize", json={"model": MODEL, "prompt": "hello world"}).json()
    assert tokens["tokens"] == tokenizer("hello world").input_ids and tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == MAX_MODEL_LEN and tokens["token_strs"] is None
    bare = httpx.post(f"{fake_url}/tokenize", json={"prompt": "hello world", "add_special_tokens": False,
                                                    "return_token_strs": True}).json()  # fmt: skip
    assert bare["tokens"] == tokenizer("hello world", add_special_tokens=False).input_ids
    assert bare["token_strs"] == tokenizer.convert_ids_to_tokens(bare["tokens"])
    chat = httpx.post(f"{fake_url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tokenizer.apply_chat_template([{"role": "user", "content": "hi"}],
                                                           add_generation_prompt=True)  # fmt: skip
    text = httpx.post(f"{fake_url}/detokenize", json={"model": MODEL, "tokens": tokens["tokens"]}).json()
    assert text == {"prompt": tokenizer.decode(tokens["tokens"])}


# ---- errors ---------------------------------------------------------------------------------------------
def assert_error(response: httpx.Response, status: int, param: str | None = None, contains: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert contains.lower() in error["message"].lower(), error
    if param is not None:
        assert error["param"] == param, error


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
CMPL = {"model": MODEL, "prompt": "x"}
NOT_YET = "not supported yet"
IMAGE = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]
CALL = {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
TOOLS = [{"type": "function", "function": {"name": "f"}}]
FN = lambda name: {"type": "function", "function": {"name": name}}  # a tool, and a named tool_choice
BAD_HISTORY_CALL = [{"role": "assistant", "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {}}}]}]


@pytest.mark.parametrize(
    "path, body, param, contains",
    [
        ("/v1/completions", {**CMPL, "max_tokens": 0}, "max_tokens", ""),
        ("/v1/completions", {**CMPL, "max_tokens": "5"}, "max_tokens", "integer"),
        ("/v1/completions", {**CMPL, "max_tokens": MAX_MODEL_LEN}, "max_tokens", "context"),
        ("/v1/completions", {**CMPL, "prompt": list(range(MAX_MODEL_LEN))}, "prompt", "context"),
        ("/v1/completions", {**CMPL, "prompt": [5, 99999]}, "prompt", "vocabulary"),
        ("/v1/completions", {**CMPL, "prompt": []}, "prompt", "empty"),
        ("/v1/completions", {**CMPL, "prompt": 5}, "prompt", ""),
        ("/v1/completions", {"model": MODEL}, "prompt", "required"),
        ("/v1/completions", {**CMPL, "n": 17}, "n", ""),
        ("/v1/completions", {**CMPL, "temperature": 3}, "temperature", ""),
        ("/v1/completions", {**CMPL, "logit_bias": {"99999": 1}}, "logit_bias", ""),
        ("/v1/completions", {**CMPL, "logit_bias": {"abc": 1}}, "logit_bias", ""),
        ("/v1/completions", {**CMPL, "stop_token_ids": [-1]}, "stop_token_ids", ""),
        ("/v1/completions", {**CMPL, "stream_options": {"include_usage": True}}, "stream_options", "stream"),
        ("/v1/completions", {**CMPL, "suffix": "y"}, "suffix", NOT_YET),
        ("/v1/completions", {**CMPL, "best_of": 3}, "best_of", NOT_YET),
        ("/v1/completions", {**CMPL, "echo": True, "logprobs": 1}, "logprobs", NOT_YET),
        ("/v1/chat/completions", {**CHAT, "messages": []}, "messages", ""),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, "messages", ""),
        ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 3}]}, "messages", ""),
        ("/v1/chat/completions", {**CHAT, "messages": IMAGE}, "messages.0.content", NOT_YET),
        ("/v1/chat/completions", {**CHAT, "tool_choice": "required"}, "tool_choice", "needs tools"),
        ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, "tools.0", "function"),
        ("/v1/chat/completions", {**CHAT, "tools": [FN("no spaces")]}, "tools.0.function.name", "no spaces"),
        ("/v1/chat/completions", {**CHAT, "tools": [FN("f"), FN("f")]}, "tools.1.function.name", "two tools"),
        ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": FN("g")}, "tool_choice", "'g'"),
        ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": {"type": "function"}}, "tool_choice", ""),
        ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", ""),
        ("/v1/chat/completions", {**CHAT, "messages": BAD_HISTORY_CALL}, "messages.0.tool_calls.0", "arguments"),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, "response_format", ""),
        ("/v1/chat/completions", {**CHAT, "response_format": {"type": "json_schema"}}, "response_format", "schema"),
        ("/v1/chat/completions", {**CHAT, "tools": TOOLS, "response_format": {"type": "json_object"}},
         "response_format", NOT_YET),
        ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions", NOT_YET),
        ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "logprobs"),
        ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs", ""),
        ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"chat_template": "x"}}, "chat_template_kwargs", ""),
        ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -1}, "max_completion_tokens", ""),
        ("/detokenize", {"tokens": [1, 99999]}, "tokens", "vocabulary"),
        ("/tokenize", {"prompt": 3}, "prompt", ""),
        ("/tokenize", {**CHAT, "add_special_tokens": True}, "add_special_tokens", NOT_YET),
    ],
)
def test_bad_requests_get_400(fake_url, fake, path, body, param, contains):
    assert_error(httpx.post(f"{fake_url}{path}", json=body), 400, param, contains)
    assert fake.submitted == []


def test_tools_with_tool_choice_none_and_text_format_are_fine(fake_url, fake):
    body = {**CHAT, "tools": TOOLS, "tool_choice": "none", "response_format": {"type": "text"}, "max_tokens": 2}
    assert httpx.post(f"{fake_url}/v1/chat/completions", json=body).status_code == 200


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b"", b'"text"'])
def test_malformed_bodies_get_400(fake_url, content):
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        response = httpx.post(f"{fake_url}{path}", content=content, headers={"content-type": "application/json"})
        assert_error(response, 400)


def test_unknown_model_and_route_get_404(fake_url):
    assert_error(httpx.post(f"{fake_url}/v1/completions", json={"model": "gpt-4", "prompt": "x"}), 404, "model")
    assert_error(httpx.post(f"{fake_url}/v1/chat/completions", json={**CHAT, "model": "gpt-4"}), 404, "model")
    assert_error(httpx.get(f"{fake_url}/v1/models/gpt-4"), 404, "model")
    assert_error(httpx.get(f"{fake_url}/v1/nothing-here"), 404)
    assert_error(httpx.get(f"{fake_url}/v1/completions"), 405)
    with pytest.raises(openai.NotFoundError):
        client(fake_url).completions.create(model="gpt-4", prompt="x")


def test_api_key(keyed_url):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 1}
    assert_error(httpx.post(f"{keyed_url}/v1/completions", json=body), 401)
    assert_error(httpx.post(f"{keyed_url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}), 401)
    assert_error(httpx.post(f"{keyed_url}/v1/completions", content=b"{bad", headers={"Authorization": "x"}), 401)
    assert_error(httpx.get(f"{keyed_url}/v1/models"), 401)
    assert_error(httpx.post(f"{keyed_url}/tokenize", json={"prompt": "x"}), 401)
    assert httpx.get(f"{keyed_url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        client(keyed_url, "wrong").completions.create(**body)
    assert client(keyed_url, KEY).completions.create(**body).usage.completion_tokens == 1


def test_full_queue_gets_429(fake_url, fake):
    fake.hold()

    async def main():
        async with httpx.AsyncClient(base_url=fake_url, timeout=60) as http:
            waiting = [asyncio.ensure_future(http.post("/v1/completions", json={"model": MODEL, "prompt": f"p{i}"}))
                       for i in range(fake.max_queue_len)]  # fmt: skip
            await asyncio.to_thread(wait_for, lambda: len(fake.active) == fake.max_queue_len, "the queue to fill")
            refused = await http.post("/v1/completions", json={"model": MODEL, "prompt": "one more", "n": 2})
            fake.release()
            return refused, await asyncio.gather(*waiting)

    refused, served = asyncio.run(main())
    assert_error(refused, 429)
    assert refused.json()["error"]["code"] == "queue_full"
    assert [r.status_code for r in served] == [200] * fake.max_queue_len


def test_queue_full_mid_n_cancels_the_choices_already_in(fake_url, fake):
    fake.hold()
    fake.max_queue_len = 3
    response = httpx.post(f"{fake_url}/v1/completions", json={"model": MODEL, "prompt": "x", "n": 5})
    assert_error(response, 429)
    assert len(fake.submitted) == 3 and sorted(fake.cancelled) == sorted(r.request_id for r in fake.submitted)
    with pytest.raises(openai.RateLimitError):
        client(fake_url).completions.create(model=MODEL, prompt="x", n=5)


def test_engine_refusal_is_a_400(fake_url, fake, monkeypatch):
    from glmkit.serve.scheduler import RequestError

    def refuse(request):
        raise RequestError("the engine says no")

    monkeypatch.setattr(fake, "submit", refuse)
    assert_error(httpx.post(f"{fake_url}/v1/completions", json={"model": MODEL, "prompt": "x"}), 400, None, "says no")


def test_unexpected_error_is_a_500_json(fake_url, fake, monkeypatch):
    def broken(request):
        raise KeyError("boom")

    monkeypatch.setattr(fake, "submit", broken)
    assert_error(httpx.post(f"{fake_url}/v1/completions", json={"model": MODEL, "prompt": "x"}), 500)
    monkeypatch.undo()
    assert httpx.post(f"{fake_url}/v1/completions", json={"model": MODEL, "prompt": "x"}).status_code == 200


# ---- disconnects ----------------------------------------------------------------------------------------
def test_stream_disconnect_cancels_and_server_goes_on(fake_url, fake):
    fake.hold_after = 3
    body = {"model": MODEL, "prompt": "long", "max_tokens": 200, "stream": True}
    with httpx.stream("POST", f"{fake_url}/v1/completions", json=body) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
        assert json.loads(first[len("data: ") :])["choices"][0]["finish_reason"] is None
    wait_for(lambda: len(fake.cancelled) == 1, "the request to be cancelled")
    assert fake.done[fake.cancelled[0]] == 3
    fake.release()
    assert fake.cancelled == [fake.submitted[0].request_id] and fake.active == {}
    assert client(fake_url).completions.create(model=MODEL, prompt="next", max_tokens=2).usage.completion_tokens == 2


def test_stream_disconnect_before_any_token_cancels(fake_url, fake):
    fake.hold()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True, "n": 3}
    with httpx.stream("POST", f"{fake_url}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        next(response.iter_lines())
    wait_for(lambda: len(fake.cancelled) == 3, "all three choices to be cancelled")
    fake.release()
    assert client(fake_url).completions.create(model=MODEL, prompt="next", max_tokens=2).usage.completion_tokens == 2


def test_non_streaming_disconnect_cancels(fake_url, fake):
    fake.hold()

    async def main():
        async with httpx.AsyncClient(base_url=fake_url, timeout=60) as http:
            task = asyncio.ensure_future(http.post("/v1/completions", json={"model": MODEL, "prompt": "x"}))
            await asyncio.to_thread(wait_for, lambda: len(fake.submitted) == 1, "the request to arrive")
            task.cancel()  # closes the connection
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    wait_for(lambda: len(fake.cancelled) == 1, "the request to be cancelled")
    fake.release()
    assert client(fake_url).completions.create(model=MODEL, prompt="next", max_tokens=2).usage.completion_tokens == 2
