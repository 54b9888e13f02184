"""GLM-4 tool calling behind the OpenAI API: tools into the prompt, tool calls out of the model's tokens.

GLM-4 writes a call as an assistant turn whose metadata line is the function's name and whose body is
the JSON arguments: `<|assistant|>get_weather\\n{"city": "Paris"}`, ending with `<|observation|>` (an
EOS id) for the caller to answer; parallel calls are further `<|assistant|>name\\n{...}` segments. Plain
replies are `<|assistant|>\\n text` (empty metadata). The parser works on token ids, so `<|assistant|>`
separates segments however the text around it is tokenized; arguments are parsed with `json.loads` only
(the official demo `eval`s them), and a segment that does not parse stays content, never half a call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from ..generation.grammar import json_grammar, lark_grammar

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


class ToolError(ValueError):
    """A tools / tool_choice / tool_calls field the server cannot use (answered as a 400 naming `param`)."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolFormat:
    """GLM-4's role tokens in this vocabulary (None: the chat format has no tool calls)."""

    assistant: int
    observation: int

    @classmethod
    def of(cls, tokenizer: Any) -> ToolFormat | None:
        vocab = tokenizer.get_vocab()
        ids = [vocab.get(token) for token in ("<|assistant|>", "<|observation|>")]
        return None if None in ids else cls(*ids)  # type: ignore[arg-type]


def check_tools(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The request's tools by name, each checked for OpenAI's shape."""
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        param = f"tools.{i}"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise ToolError('each tool must be {"type": "function", "function": {"name": ...}}', param)
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ToolError(f"function name {name!r} must be 1-64 letters, digits, '_' or '-'",
                            f"{param}.function.name")  # fmt: skip
        if name in functions:
            raise ToolError(f"two tools are named {name!r}", f"{param}.function.name")
        if not isinstance(fn.get("parameters", {}), dict) or not isinstance(fn.get("description", ""), str):
            raise ToolError("function.parameters must be a JSON schema object, description a string", param)
        functions[name] = fn
    return functions


def forced_function(tool_choice: Any, functions: dict[str, Any]) -> str | None:
    """The function a named tool_choice forces (None for "none" / "auto" / "required")."""
    if tool_choice is None or tool_choice in ("none", "auto", "required"):
        return None
    fn = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(fn, dict) or tool_choice.get("type") != "function" or not isinstance(fn.get("name"), str):
        raise ToolError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                        '{"name": ...}}', "tool_choice")  # fmt: skip
    if fn["name"] not in functions:
        raise ToolError(f"tool_choice names {fn['name']!r}, which is not among the tools", "tool_choice")
    return fn["name"]


def glm4_messages(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """OpenAI messages in GLM-4's own shape, which both the THUDM template and glmkit's render: an assistant
    turn per tool call (metadata = name, content = arguments), tool results as observations, the tools on
    the first system message."""
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        calls = message.pop("tool_calls", None) or []
        if message["role"] == "tool":
            message = {**message, "role": "observation"}
        if message["role"] != "assistant" or not calls:
            out.append(message)
            continue
        if message.get("content"):
            out.append({**message, "metadata": ""})
        for j, call in enumerate(calls):
            name, arguments = _history_call(call, f"messages.{i}.tool_calls.{j}")
            out.append({"role": "assistant", "metadata": name, "content": arguments})
    if tools:
        system = next((m for m in out if m["role"] == "system"), None)
        if system is None:
            out.insert(0, system := {"role": "system", "content": ""})
        system["tools"] = tools
    return out


def _history_call(call: Any, param: str) -> tuple[str, str]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not isinstance(fn.get("arguments"), str):
        raise ToolError('a tool call must be {"type": "function", "function": {"name": str, "arguments": str}}', param)
    return fn["name"], fn["arguments"]


def _arguments_schema(fn: dict[str, Any]) -> dict[str, Any]:
    return fn.get("parameters") or {"type": "object"}


def arguments_grammar(fn: dict[str, Any]) -> str:
    """The arguments of one function: a JSON value of its parameters' schema."""
    return json_grammar(_arguments_schema(fn))


def required_call_grammar(functions: dict[str, dict[str, Any]], parallel: bool) -> str:
    """tool_choice "required": one call of one of the functions (more, each after `<|assistant|>`, when
    parallel), each a name line and arguments that fit that function's schema."""
    calls = " | ".join(f"{json.dumps(name + chr(10))} %json {json.dumps(_arguments_schema(fn))}"
                       for name, fn in functions.items())  # fmt: skip
    start = "start: call (<|assistant|> call)*" if parallel else "start: call"
    return lark_grammar(f"{start}\ncall: {calls}\n")


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = ""

    def __post_init__(self) -> None:
        self.id = self.id or f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """One choice's output, token by token: content text, and tool calls as each segment completes.

    `feed(token_ids, text)` takes one engine event (its ids and the new text) and returns (content, calls)
    that can be sent now; `finish()` returns what is left. With `forced` (a named tool_choice, whose name the
    prompt already holds) the whole output is that function's arguments. With no functions it still takes
    the (empty) metadata line off a reply: GLM-4 writes `\n` before its text.
    """

    def __init__(self, fmt: ToolFormat, functions: dict[str, Any], forced: str | None = None):
        self.fmt, self.functions = fmt, functions
        self._meta: str | None = forced  # None: the segment's metadata line is not complete yet
        self._text = ""  # this segment's text after the metadata line (held while it may be a call)
        self._pending = ""  # the metadata line so far
        self._forced = forced

    def feed(self, token_ids: list[int], text: str) -> tuple[str, list[ToolCall]]:
        # a separator's own text is empty: this event's text belongs to the segment it ends
        content, calls = self._add(text)
        if self.fmt.assistant in token_ids:
            more, call = self._end_segment()
            content, calls = content + more, calls + call
        return content, calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        return self._end_segment()

    def _add(self, text: str) -> tuple[str, list[ToolCall]]:
        if self._meta is None:
            self._pending += text
            if "\n" not in self._pending:
                return "", []
            self._meta, text = self._pending.split("\n", 1)
            self._pending = ""
            if not self._meta:  # a plain reply: stream it
                return text, []
        if self._meta.strip() in self.functions:
            self._text += text  # a call: held until its segment ends
            return "", []
        if self._meta:  # metadata that names no tool: the text is content, as written
            text, self._meta = f"{self._meta}\n{text}", ""
        return text, []

    def _end_segment(self) -> tuple[str, list[ToolCall]]:
        meta, body, pending = self._meta, self._text, self._pending
        self._meta, self._text, self._pending = None, "", ""
        if meta is None:  # ended inside the metadata line
            return pending, []
        if meta.strip() not in self.functions:
            return "", []
        try:
            value = json.loads(body)
        except ValueError:
            value = None
        if not isinstance(value, dict):  # not a call after all: what the model wrote is content
            return (body if meta == self._forced else f"{meta}\n{body}"), []
        return "", [ToolCall(meta.strip(), json.dumps(value, ensure_ascii=False))]
