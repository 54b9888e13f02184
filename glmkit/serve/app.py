"""The OpenAI-compatible HTTP app on a `Scheduler`: /v1/completions, /v1/chat/completions, /v1/models,
/tokenize, /detokenize and /health.

Each HTTP request becomes one engine `Request` per choice. The engine thread delivers their events with
`loop.call_soon_threadsafe` onto one asyncio queue per HTTP request; however the handler ends (done, error,
client gone) it cancels what is still running, so a disconnect frees the rows at once.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..generation.grammar import json_grammar
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ServerMetrics
from .protocol import (
    APIError,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
    ChatLogprob,
    ChatLogprobs,
    ChatResponseMessage,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    DetokenizeRequest,
    DetokenizeResponse,
    FunctionCall,
    FunctionCallDelta,
    ModelCard,
    ModelList,
    SamplingRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    ToolCallDelta,
    ToolCallOut,
    TopLogprob,
    UsageInfo,
    unsupported,
)
from .scheduler import Event, QueueFull, RequestError, SamplingParams
from .scheduler import Request as EngineRequest
from .tools import (
    ToolCall,
    ToolCallParser,
    ToolError,
    ToolFormat,
    arguments_grammar,
    check_tools,
    forced_function,
    glm4_messages,
    required_call_grammar,
)

logger = logging.getLogger("glmkit.serve")
T = TypeVar("T", bound=BaseModel)
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context


# ---- engine requests behind one HTTP request ------------------------------------------------------------
@dataclass
class ChatPlan:
    """How a chat request runs: its prompt, the grammar and stop ids its tool_choice / response_format
    need, and the functions whose calls the output is parsed for (none: plain text)."""

    prompt: list[int]
    functions: dict[str, dict[str, Any]] = field(default_factory=dict)
    forced: str | None = None  # a named tool_choice: the prompt ends with its name line
    grammar: str | None = None
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass
class Output:
    """What one choice has produced so far (with a parser: its content and tool calls apart)."""

    parser: ToolCallParser | None = None
    text: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None

    def add(self, event: Event) -> tuple[str, list[ToolCall]]:
        """Take an event; returns the content and the tool calls it completes."""
        text, calls = event.text, []
        if self.parser is not None:
            text, calls = self.parser.feed(event.token_ids, event.text)
            if event.finish_reason is not None:
                more, last = self.parser.finish()
                text, calls = text + more, calls + last
        self.text += text
        self.calls += calls
        self.token_ids += event.token_ids
        self.logprobs += event.logprobs or []
        self.completion_tokens = event.completion_tokens
        self.finish_reason = event.finish_reason
        if event.finish_reason == "stop" and self.calls:
            self.finish_reason = "tool_calls"
        return text, calls


def _failure(event: Event) -> APIError | None:
    """The error an engine event reports, if any ("abort" reaches a live handler only when the engine stops)."""
    if event.finish_reason == "error":
        return APIError(500, f"generation failed: {event.error}", type="server_error", code="engine_error")
    if event.finish_reason == "abort":
        return APIError(503, "the request was aborted: the server is shutting down", type="server_error")
    return None


class Generation:
    """The engine requests of one HTTP request (choice i is the i-th), their events on one asyncio queue."""

    def __init__(self, scheduler: Any, loop: asyncio.AbstractEventLoop, make_output: Any = Output,
                 metrics: ServerMetrics | None = None):  # fmt: skip
        self.scheduler, self.loop, self.make_output, self.metrics = scheduler, loop, make_output, metrics
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.index: dict[str, int] = {}  # engine request id -> choice index
        self.running: set[str] = set()

    def _on_event(self, event: Event) -> None:  # engine thread
        if self.metrics is not None:
            self.metrics.on_event(event.request_id, len(event.token_ids), event.finish_reason)
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: the server has gone; the engine must not fail for it
            pass

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], base_id: str, adapter: int = 0) -> None:
        """Submit choice i as (prompts[i], params[i]); on a refusal cancel the ones already in."""
        for i, (prompt, sampling) in enumerate(zip(prompts, params, strict=True)):
            request = EngineRequest(prompt, sampling, self._on_event, request_id=f"{base_id}-{i}", adapter=adapter)
            if self.metrics is not None:
                self.metrics.on_submit(request.request_id)
            try:
                request_id = self.scheduler.submit(request)
            except QueueFull as err:
                self.cancel()
                raise APIError(429, f"the server is busy ({err}); retry later", type="rate_limit_error",
                               code="queue_full") from err  # fmt: skip
            except RequestError as err:
                self.cancel()
                raise APIError(400, str(err)) from err
            self.index[request_id] = i
            self.running.add(request_id)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice has finished."""
        while self.running:
            event = await self.queue.get()
            if event.request_id not in self.running:
                continue
            if event.finish_reason is not None:
                self.running.discard(event.request_id)
            yield self.index[event.request_id], event

    async def collect(self) -> list[Output]:
        outputs = [self.make_output() for _ in self.index]
        async for i, event in self.events():
            error = _failure(event)
            if error is not None:
                raise error
            outputs[i].add(event)
        return outputs

    def cancel(self) -> None:
        """Cancel every choice still running (a no-op once all have finished)."""
        for request_id in self.running:
            self.scheduler.cancel(request_id)
        self.running.clear()


class EventStream(StreamingResponse):
    """An SSE response whose engine requests are cancelled however it ends: done, failed or client gone
    (also when the client leaves before the body generator has started)."""

    def __init__(self, body: AsyncIterator[str], generation: Generation):
        super().__init__(_guarded(body), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.generation = generation

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.cancel()


async def _guarded(body: AsyncIterator[str]) -> AsyncIterator[str]:
    """The SSE body; an unexpected error is logged and reported in the stream (the 200 is out already)."""
    try:
        async for piece in body:
            yield piece
    except Exception as err:  # noqa: BLE001
        logger.exception("unexpected error while streaming")
        yield sse(APIError(500, f"internal server error: {type(err).__name__}", type="server_error").body())
        yield SSE_DONE


def sse(payload: BaseModel | dict[str, Any]) -> str:
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body is read already, so only http.disconnect is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """`await work`, or None as soon as the client disconnects (then `work` is cancelled): vLLM's
    with_cancellation for non-streaming requests."""
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    return task.result() if task in done else None


# ---- the app ---------------------------------------------------------------------------------------------
class Server:
    """The endpoints, over one scheduler and tokenizer serving one model name. Until `attach` gives it
    them (the model is loading) every endpoint but /health and /metrics answers 503."""

    def __init__(self, model_name: str, adapters: dict[str, int] | None = None):
        self.model_name = model_name
        self.adapters = adapters or {}  # served LoRA adapter name -> its engine id (glmkit.lora.load_adapters)
        self.metrics = ServerMetrics(model_name)
        self.scheduler: Any = None

    def attach(self, scheduler: Any, tokenizer: Any, max_model_len: int) -> None:
        """Start serving: the model is loaded and its scheduler started."""
        self.tokenizer, self.max_model_len = tokenizer, max_model_len
        self.vocab_size = len(tokenizer)
        self.tool_format = ToolFormat.of(tokenizer)  # None: the chat format has no tool calls
        self._token_strs: dict[int, str] = {}
        # request-supplied template variables must not override apply_chat_template's own arguments
        self._reserved = set(inspect.signature(tokenizer.apply_chat_template).parameters) - {"kwargs", "self"}
        self._reserved |= {"messages", "chat_template"}
        self.scheduler = self.metrics.scheduler = scheduler

    async def check_ready(self) -> None:
        if self.scheduler is None:
            raise APIError(503, "the model is still loading; retry shortly", type="server_error", code="loading")

    # -- helpers
    def check_model(self, name: str | None) -> int:
        """The engine's adapter id for a requested model name (0: the base model)."""
        if name is None or name == self.model_name:
            return 0
        if name in self.adapters:
            return self.adapters[name]
        served = ", ".join(f"`{n}`" for n in [self.model_name, *self.adapters])
        raise APIError(404, f"The model `{name}` does not exist (this server serves {served})", param="model",
                       code="model_not_found")  # fmt: skip

    def check_ids(self, ids: list[int], param: str) -> None:
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {self.vocab_size})", param=param)

    def token_str(self, token: int) -> str:
        if token not in self._token_strs:
            self._token_strs[token] = self.tokenizer.decode([token])
        return self._token_strs[token]

    def conversation(self, messages: list[Any], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """The messages as the chat template takes them (GLM-4's shape where the format has tool calls)."""
        conversation = [m.for_template(i) for i, m in enumerate(messages)]
        if self.tool_format is not None:
            try:
                return glm4_messages(conversation, tools)
            except ToolError as err:
                raise APIError(400, str(err), param=err.param) from err
        for i, message in enumerate(conversation):
            if message.get("tool_calls"):
                raise unsupported(f"messages.{i}.tool_calls", "tool calls with this model's chat format")
        return conversation

    def chat_ids(self, messages: list[Any], kwargs: dict[str, Any] | None, tools: list[dict[str, Any]] | None = None,
                 **options: Any) -> list[int]:  # fmt: skip
        reserved = sorted(self._reserved & set(kwargs or {}))
        if reserved:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}", param="chat_template_kwargs")
        conversation = self.conversation(messages, tools)
        try:
            ids = self.tokenizer.apply_chat_template(conversation, tokenize=True, **options, **(kwargs or {}))
        except ValueError as err:  # ChatTemplateError: the template rejected the messages
            raise APIError(400, f"chat template: {err}", param="messages") from err
        return list(ids)

    def chat_plan(self, body: ChatCompletionRequest) -> ChatPlan:
        """The prompt, grammar and tool parsing of a chat request (tools / tool_choice / response_format)."""
        try:
            plan = self._chat_plan(body)
        except ToolError as err:
            raise APIError(400, str(err), param=err.param) from err
        except ImportError as err:  # llguidance missing: constrained decoding is off
            raise APIError(400, str(err), param="tool_choice" if body.tools else "response_format",
                           code="unsupported") from err  # fmt: skip
        self.check_ids(plan.prompt, "messages")
        return plan

    def _chat_plan(self, body: ChatCompletionRequest) -> ChatPlan:
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if body.tools else "none")
        functions = check_tools(body.tools) if body.tools else {}
        forced = forced_function(choice, functions)
        if choice == "none":  # as vLLM: the tools stay out of the prompt, nothing is parsed
            functions = {}
        if functions and self.tool_format is None:
            raise unsupported("tools", "tool calling with this model's chat format (GLM-4's has it)")
        tools = [{"type": "function", "function": fn} for fn in functions.values()] or None
        prompt = self.chat_ids(body.messages, body.chat_template_kwargs, tools=tools, add_generation_prompt=True)
        plan = ChatPlan(prompt, functions, forced)
        if forced:  # the name line is given: the model writes arguments that fit the function's schema
            plan.prompt = prompt + list(self.tokenizer.encode(f"{forced}\n", add_special_tokens=False))
            plan.grammar = arguments_grammar(functions[forced])
        elif choice == "required":
            plan.grammar = required_call_grammar(functions, parallel=body.parallel_tool_calls is not False)
        elif functions and body.parallel_tool_calls is False:  # the first call ends the turn
            plan.stop_token_ids = [self.tool_format.assistant]  # type: ignore[union-attr]
        if body.json_mode:  # GLM-4 content follows the (empty) metadata line
            plan.grammar = json_grammar(body.json_schema, prefix="\n" if self.tool_format else "")
        return plan

    def max_tokens(self, prompt: list[int], requested: int | None, default: int | None) -> int:
        """The completion budget: the request's, else `default`, else the rest of the context."""
        room = self.max_model_len - len(prompt)
        if room <= 0 or (requested or 0) > room:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the prompt "
                           f"has {len(prompt)} and {requested or 1} more were requested for the completion",
                           param="max_tokens" if room > 0 else "prompt", code="context_length_exceeded")  # fmt: skip
        return requested or min(default or room, room)

    def start(self, body: SamplingRequest, prompts: list[list[int]], max_tokens: int | None, default: int | None,
              logprobs: int | None, prefix: str, plan: ChatPlan | None = None) -> tuple[Generation, str]:  # fmt: skip
        """Submit n choices per prompt (choice index = prompt index * n + j); returns (generation, id)."""
        request_id = f"{prefix}-{uuid.uuid4().hex}"
        ids, params = [], []
        for prompt in prompts:
            per_choice = body.sampling_params(self.max_tokens(prompt, max_tokens, default), self.vocab_size, logprobs)
            ids += [prompt] * len(per_choice)
            params += per_choice
        if plan is not None:
            for sampling in params:
                sampling.grammar = plan.grammar
                sampling.stop_token_ids += plan.stop_token_ids
        generation = Generation(self.scheduler, asyncio.get_running_loop(), self.output_maker(plan), self.metrics)
        generation.submit(ids, params, request_id, self.check_model(body.model))
        return generation, request_id

    def output_maker(self, plan: ChatPlan | None) -> Any:
        """Builds each choice's Output: with GLM-4's parser (metadata line, tool calls) where the format is GLM-4's."""
        if plan is None or self.tool_format is None:
            return Output
        fmt, functions, forced = self.tool_format, plan.functions, plan.forced
        return lambda: Output(parser=ToolCallParser(fmt, functions, forced))  # type: ignore[arg-type]

    def completion_logprobs(self, entries: list[dict[str, Any]], offset: int) -> CompletionLogprobs:
        out = CompletionLogprobs()
        for entry in entries:
            token = self.token_str(entry["id"])
            out.tokens.append(token)
            out.token_logprobs.append(entry["logprob"])
            out.top_logprobs.append({self.token_str(t): lp for t, lp in entry.get("top", [])})
            out.text_offset.append(offset)
            offset += len(token)
        return out

    def chat_logprobs(self, entries: list[dict[str, Any]]) -> ChatLogprobs:
        def item(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_str(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        content = [
            ChatLogprob(**item(e["id"], e["logprob"]), top_logprobs=[TopLogprob(**item(*t)) for t in e.get("top", [])])
            for e in entries
        ]
        return ChatLogprobs(content=content)

    # -- endpoints
    async def health(self) -> Response:
        if self.scheduler is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    async def models(self) -> ModelList:
        return ModelList(data=[self.model_card(name) for name in [self.model_name, *self.adapters]])

    async def model(self, model_id: str) -> ModelCard:
        self.check_model(model_id)
        return self.model_card(model_id)

    def model_card(self, name: str) -> ModelCard:
        """A served name: the base model, or a LoRA adapter on it (its root and parent are the base)."""
        parent = self.model_name if name != self.model_name else None
        return ModelCard(id=name, root=self.model_name, parent=parent, max_model_len=self.max_model_len)

    async def completions(self, request: Request) -> Response:
        body = await parse(request, CompletionRequest)
        self.check_model(body.model)
        body.check_supported()
        prompts, texts = self.completion_prompts(body.prompt)
        generation, request_id = self.start(body, prompts, body.max_tokens, COMPLETION_MAX_TOKENS, body.logprobs,
                                            "cmpl")  # fmt: skip
        echoes = [texts[i // body.choices] if body.echo else "" for i in range(len(prompts) * body.choices)]
        head = {"id": request_id, "created": int(time.time()), "model": body.model or self.model_name}
        if body.stream:
            chunks = self.completion_chunks(generation, head, echoes, body, sum(map(len, prompts)))
            return EventStream(chunks, generation)
        try:
            outputs = await unless_disconnected(request, generation.collect())
        finally:
            generation.cancel()
        if outputs is None:  # the client has gone
            return Response(status_code=499)
        choices = [
            CompletionChoice(index=i, text=echoes[i] + out.text, finish_reason=out.finish_reason,
                             logprobs=None if body.logprobs is None else self.completion_logprobs(out.logprobs, 0))
            for i, out in enumerate(outputs)
        ]  # fmt: skip
        usage = _usage(sum(map(len, prompts)), sum(out.completion_tokens for out in outputs))
        return JSONResponse(CompletionResponse(**head, choices=choices, usage=usage).model_dump(mode="json"))

    def completion_prompts(self, prompt: str | list[Any]) -> tuple[list[list[int]], list[str]]:
        """The prompt(s) as token ids, and as text (for echo)."""
        batch = prompt if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) else [prompt]
        ids, texts = [], []
        for item in batch:
            if isinstance(item, str):
                ids.append(list(self.tokenizer(item).input_ids))
                texts.append(item)
            else:
                self.check_ids(item, "prompt")
                ids.append(list(item))
                texts.append(self.tokenizer.decode(item))
            if not ids[-1]:
                raise APIError(400, "the prompt is empty", param="prompt")
        return ids, texts

    async def completion_chunks(self, generation: Generation, head: dict[str, Any], echoes: list[str],
                                body: CompletionRequest, prompt_tokens: int) -> AsyncIterator[str]:  # fmt: skip
        def chunk(i: int, text: str, **fields: Any) -> str:
            return sse(CompletionResponse(**head, choices=[CompletionChoice(index=i, text=text, **fields)]))

        for i, echo in enumerate(echoes):
            if echo:
                yield chunk(i, echo)
        completion_tokens, offsets = [0] * len(echoes), [0] * len(echoes)
        async for i, event in generation.events():
            error = _failure(event)
            if error is not None:
                yield sse(error.body())
                break
            completion_tokens[i] = event.completion_tokens
            logprobs = None
            if body.logprobs is not None:
                logprobs = self.completion_logprobs(event.logprobs or [], offsets[i])
                offsets[i] += sum(map(len, logprobs.tokens))
            if event.text or event.finish_reason or logprobs is not None:
                yield chunk(i, event.text, logprobs=logprobs, finish_reason=event.finish_reason)
        else:
            if body.include_usage:
                yield sse(CompletionResponse(**head, choices=[], usage=_usage(prompt_tokens, sum(completion_tokens))))
        yield SSE_DONE

    async def chat_completions(self, request: Request) -> Response:
        body = await parse(request, ChatCompletionRequest)
        self.check_model(body.model)
        body.check_supported()
        plan = self.chat_plan(body)
        prompt = plan.prompt
        generation, request_id = self.start(body, [prompt], body.max_completion_tokens or body.max_tokens, None,
                                            body.logprobs_k, "chatcmpl", plan)  # fmt: skip
        head = {"id": request_id, "created": int(time.time()), "model": body.model or self.model_name}
        if body.stream:
            return EventStream(self.chat_chunks(generation, head, body, len(prompt)), generation)
        try:
            outputs = await unless_disconnected(request, generation.collect())
        finally:
            generation.cancel()
        if outputs is None:
            return Response(status_code=499)
        choices = [
            ChatChoice(index=i, message=_message(out), finish_reason=out.finish_reason,
                       logprobs=self.chat_logprobs(out.logprobs) if body.logprobs else None)
            for i, out in enumerate(outputs)
        ]  # fmt: skip
        usage = _usage(len(prompt), sum(out.completion_tokens for out in outputs))
        return JSONResponse(ChatCompletionResponse(**head, choices=choices, usage=usage).model_dump(mode="json"))

    async def chat_chunks(self, generation: Generation, head: dict[str, Any], body: ChatCompletionRequest,
                          prompt_tokens: int) -> AsyncIterator[str]:  # fmt: skip
        chunk = lambda **kw: sse(ChatCompletionStreamResponse(**head, choices=[ChatStreamChoice(**kw)]))
        for i in range(body.choices):
            yield chunk(index=i, delta=DeltaMessage(role="assistant", content=""))
        outputs = [generation.make_output() for _ in range(body.choices)]
        async for i, event in generation.events():
            error = _failure(event)
            if error is not None:
                yield sse(error.body())
                break
            out = outputs[i]
            text, calls = out.add(event)
            logprobs = self.chat_logprobs(event.logprobs or []) if body.logprobs else None
            finish = out.finish_reason if not calls else None
            if text or finish or logprobs is not None:
                yield chunk(index=i, delta=DeltaMessage(content=text or None), logprobs=logprobs, finish_reason=finish)
            for call in calls:  # OpenAI's shape: id and name first, then the arguments
                k = out.calls.index(call)
                head_delta = ToolCallDelta(index=k, id=call.id, type="function",
                                           function=FunctionCallDelta(name=call.name, arguments=""))  # fmt: skip
                yield chunk(index=i, delta=DeltaMessage(tool_calls=[head_delta]))
                args = ToolCallDelta(index=k, function=FunctionCallDelta(arguments=call.arguments))
                yield chunk(index=i, delta=DeltaMessage(tool_calls=[args]))
            if calls and out.finish_reason:
                yield chunk(index=i, delta=DeltaMessage(), finish_reason=out.finish_reason)
        else:
            if body.include_usage:
                usage = _usage(prompt_tokens, sum(out.completion_tokens for out in outputs))
                yield sse(ChatCompletionStreamResponse(**head, choices=[], usage=usage))
        yield SSE_DONE

    async def tokenize(self, request: Request) -> TokenizeResponse:
        raw = await request.body()
        chat = _is_object_with(raw, "messages")
        body = await parse(request, TokenizeChatRequest if chat else TokenizeCompletionRequest)
        self.check_model(body.model)
        if isinstance(body, TokenizeChatRequest):
            if body.add_special_tokens:
                raise unsupported("add_special_tokens", "add_special_tokens with messages")
            tokens = self.chat_ids(body.messages, body.chat_template_kwargs,
                                   add_generation_prompt=body.add_generation_prompt,
                                   continue_final_message=body.continue_final_message)  # fmt: skip
        else:
            tokens = list(self.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids)
        strs = self.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return TokenizeResponse(count=len(tokens), max_model_len=self.max_model_len, tokens=tokens, token_strs=strs)

    async def detokenize(self, request: Request) -> DetokenizeResponse:
        body = await parse(request, DetokenizeRequest)
        self.check_model(body.model)
        self.check_ids(body.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))


def _message(out: Output) -> ChatResponseMessage:
    calls = [ToolCallOut(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in out.calls]
    return ChatResponseMessage(content=out.text or (None if calls else ""), tool_calls=calls or None)


def _usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                     total_tokens=prompt_tokens + completion_tokens)  # fmt: skip


def _is_object_with(raw: bytes, key: str) -> bool:
    try:
        data = json.loads(raw)
    except ValueError:
        return False
    return isinstance(data, dict) and key in data


async def parse(request: Request, model: type[T]) -> T:
    """The JSON body as `model`; a malformed body or a wrong type is a 400 naming the field."""
    try:
        return model.model_validate_json(await request.body())
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(part) for part in first["loc"]]
        where = ".".join(loc) or "body"
        raise APIError(400, f"{where}: {first['msg']}", param=loc[0] if loc else None) from err


def _bearer(api_key: str) -> Any:
    expected = f"Bearer {api_key}".encode()

    async def check(request: Request) -> None:
        given = request.headers.get("authorization", "").encode()
        if not hmac.compare_digest(given, expected):
            raise APIError(401, "Incorrect or missing API key (send `Authorization: Bearer KEY`)",
                           type="authentication_error", code="invalid_api_key")  # fmt: skip

    return Depends(check)


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


async def _api_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, APIError)
    return _error_response(error)


async def _http_error(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, StarletteHTTPException)
    kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
    return _error_response(APIError(error.status_code, str(error.detail), type=kind))


async def _internal_error(request: Request, error: Exception) -> JSONResponse:
    logger.exception("unexpected error in %s %s", request.method, request.url.path, exc_info=error)
    return _error_response(APIError(500, f"internal server error: {type(error).__name__}", type="server_error"))


def create_app(scheduler: Any, tokenizer: Any, model_name: str, api_key: str | None = None, *,
               max_model_len: int | None, adapters: dict[str, int] | None = None) -> FastAPI:  # fmt: skip
    """The OpenAI-compatible app over a started `Scheduler` (which it does not own: start and stop it around
    the server). `api_key` set: every endpoint but /health and /metrics wants `Authorization: Bearer
    <api_key>`. With `scheduler` None the app serves while the model loads (503s, /health "loading")
    until `app.state.server.attach(scheduler, tokenizer, max_model_len)`. `adapters`: LoRA adapter names
    served beside `model_name` (name -> the id glmkit.lora.load_adapters gave it)."""
    server = Server(model_name, adapters)
    if scheduler is not None:
        if max_model_len is None:
            raise ValueError("create_app needs max_model_len with a scheduler")
        server.attach(scheduler, tokenizer, max_model_len)
    app = FastAPI(title="glmkit", summary="OpenAI-compatible server", docs_url=None, redoc_url=None)
    app.state.server = server
    keyed = [*([_bearer(api_key)] if api_key else []), Depends(server.check_ready)]
    routes = [
        ("GET", "/health", server.health, []),
        ("GET", "/metrics", server.prometheus, []),
        ("GET", "/v1/models", server.models, keyed),
        ("GET", "/v1/models/{model_id:path}", server.model, keyed),
        ("POST", "/v1/completions", server.completions, keyed),
        ("POST", "/v1/chat/completions", server.chat_completions, keyed),
        ("POST", "/tokenize", server.tokenize, keyed),
        ("POST", "/detokenize", server.detokenize, keyed),
    ]
    for method, path, endpoint, dependencies in routes:
        app.add_api_route(path, endpoint, methods=[method], dependencies=dependencies)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
    return app
