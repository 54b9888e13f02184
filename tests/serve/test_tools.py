"""GLM-4 tool calling and JSON output end to end: a model taught the format, the real scheduler and app,
the openai client. The server's answers are checked against what the model was taught to write."""

from __future__ import annotations

import asyncio
import json

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("llguidance")

from glmkit.serve.app import create_app  # noqa: E402
from glmkit.serve.scheduler import Scheduler  # noqa: E402

from .conftest import running  # noqa: E402
from .tool_model import ANSWERED, BOTH, GREETING, OSLO, PARIS, TOOLS, train_tool_model  # noqa: E402

NAME = "tool-glm"


@pytest.fixture(scope="module")
def url():
    model, tokenizer, loss = train_tool_model()
    assert loss < 0.01, f"the tool model did not learn its lessons (loss {loss:.3f})"
    scheduler = Scheduler(model, tokenizer, max_num_seqs=4, max_model_len=1024)
    scheduler.start()
    try:
        with running(create_app(scheduler, tokenizer, NAME, max_model_len=1024)) as base:
            yield base
    finally:
        scheduler.stop()


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


def chat(client, messages, max_tokens=80, **kw):
    return client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=max_tokens, **kw)


def calls_of(choice) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]


def streamed(client, messages, **kw) -> tuple[str, list[tuple[str, dict]], str, set[str]]:
    """(content, calls, finish_reason, call ids) accumulated from the stream's deltas."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=80,
                                                stream=True, **kw):  # fmt: skip
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
        finish = choice.finish_reason or finish
    ordered = [calls[i] for i in sorted(calls)]
    return content, [(c["name"], json.loads(c["arguments"])) for c in ordered], finish, {c["id"] for c in ordered}


def test_a_call_is_parsed(client):
    choice = chat(client, PARIS, tools=TOOLS).choices[0]
    assert calls_of(choice) == [("get_weather", {"city": "Paris"})]
    assert choice.message.content is None and choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls[0].id.startswith("call_") and choice.message.tool_calls[0].type == "function"


def test_a_streamed_call_accumulates_to_the_same(client):
    content, calls, finish, ids = streamed(client, PARIS, tools=TOOLS)
    assert (content, calls, finish) == ("", [("get_weather", {"city": "Paris"})], "tool_calls")
    assert all(i and i.startswith("call_") for i in ids)


def test_parallel_calls_and_parallel_tool_calls_false(client):
    both = [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]
    choice = chat(client, BOTH, tools=TOOLS).choices[0]
    assert calls_of(choice) == both and choice.finish_reason == "tool_calls"
    assert len({c.id for c in choice.message.tool_calls}) == 2
    assert streamed(client, BOTH, tools=TOOLS)[1:3] == (both, "tool_calls")
    one = chat(client, BOTH, tools=TOOLS, parallel_tool_calls=False).choices[0]
    assert calls_of(one) == both[:1] and one.finish_reason == "tool_calls"


def test_malformed_arguments_stay_content(client):
    """The model writes `{"city": Oslo}`: not JSON, so no call (never half a call, never eval)."""
    choice = chat(client, OSLO, tools=TOOLS).choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"
    assert choice.message.content == 'get_weather\n{"city": Oslo}'
    assert streamed(client, OSLO, tools=TOOLS)[:3] == ('get_weather\n{"city": Oslo}', [], "stop")


def test_the_tool_result_is_answered(client):
    choice = chat(client, ANSWERED, tools=TOOLS).choices[0]
    assert choice.message.content == "It is 22C and sunny in Paris."
    assert choice.message.tool_calls is None and choice.finish_reason == "stop"


def test_required_forces_a_valid_call(client):
    """On the prompt where the model writes broken JSON, "required" constrains it to a real call."""
    for parallel in (True, False):
        choice = chat(client, OSLO, tools=TOOLS, tool_choice="required", parallel_tool_calls=parallel).choices[0]
        calls = calls_of(choice)
        assert len(calls) >= 1 and choice.finish_reason == "tool_calls"
        for name, args in calls:
            assert name in ("get_weather", "get_time") and isinstance(args["city"], str)


def test_a_named_choice_forces_that_function(client):
    """get_time was never taught: its arguments come from its schema alone (city a string, 24h a boolean)."""
    choice = chat(client, PARIS, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}})
    ((name, args),) = calls_of(choice.choices[0])
    assert name == "get_time" and set(args) == {"city", "24h"}
    assert isinstance(args["city"], str) and isinstance(args["24h"], bool)


def test_tool_choice_none_calls_nothing(client):
    choice = chat(client, PARIS, tools=TOOLS, tool_choice="none").choices[0]
    assert choice.message.tool_calls is None and choice.finish_reason in ("stop", "length")


SCHEMA = {"type": "object", "required": ["mood", "n"], "additionalProperties": False,
          "properties": {"mood": {"enum": ["glad", "sad"]}, "n": {"type": "integer", "minimum": 0, "maximum": 99}}}


def test_response_format_json(client):
    plain = chat(client, GREETING).choices[0].message.content
    assert plain == "Good day to you."
    shaped = chat(client, GREETING, response_format={"type": "json_schema", "json_schema": {"name": "m",
                                                                                            "schema": SCHEMA}})
    value = json.loads(shaped.choices[0].message.content)
    assert set(value) == {"mood", "n"} and value["mood"] in ("glad", "sad") and 0 <= value["n"] <= 99
    anything = chat(client, GREETING, response_format={"type": "json_object"}, max_tokens=200)
    assert isinstance(json.loads(anything.choices[0].message.content), dict)


def test_an_invalid_schema_is_a_400(client):
    bad = {"type": "json_schema", "json_schema": {"name": "m", "schema": {"type": "object", "required": 3}}}
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, GREETING, response_format=bad)
    assert "schema" in str(err.value).lower() or "grammar" in str(err.value).lower()


def test_async_streaming_clients_together(url):
    """Four async streams at once (calls, parallel calls, content) each get their own answer."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)

    async def one(messages):
        stream = await client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, temperature=0,
                                                      max_tokens=80, stream=True)  # fmt: skip
        names, content = [], ""
        async for chunk in stream:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            names += [c.function.name for c in delta.tool_calls or [] if c.function.name]
        return names, content

    async def main():
        return await asyncio.gather(one(PARIS), one(BOTH), one(ANSWERED), one(OSLO))

    paris, both, answered, oslo = asyncio.run(main())
    assert paris == (["get_weather"], "") and both == (["get_weather"] * 2, "")
    assert answered == ([], "It is 22C and sunny in Paris.") and oslo[0] == []
