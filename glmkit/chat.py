"""Chat templates: jinja2 rendering with the reference's semantics, and built-in default templates.

The environment matches the reference: sandboxed, `trim_blocks` and `lstrip_blocks`, loop controls,
a `tojson` filter that does not escape HTML, `raise_exception` and `strftime_now` globals, and a
`{% generation %}` block tag (rendered as its body).
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import re
import threading
import time
import types
import typing
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

from .tokenization.glm4 import GLM4_PREFIX, GLM4_ROLE_TOKENS

__all__ = [
    "ChatTemplateError",
    "compile_template",
    "GLM4_CHAT_TEMPLATE",
    "PERSIMMON_CHAT_TEMPLATE",
    "default_template_for",
    "render",
    "select_template",
    "tool_schema",
]


class ChatTemplateError(jinja2.TemplateError, ValueError):
    """The chat template is malformed, or it rejected the messages (`raise_exception`)."""


# GLM-4's chat format (special tokens from tokenization/glm4.py): `[gMASK]<sop>`, an optional tool
# list in a system turn, then `<|role|>{metadata}\n{content}` turns; function calls are
# `<|assistant|>{name}\n{arguments}` and their results `<|observation|>\n{result}`. Tools come from
# `tools=` or a message's `tools` key.
_SYSTEM, _USER, _ASSISTANT, _OBSERVATION = (GLM4_ROLE_TOKENS[r] for r in ("system", "user", "assistant", "observation"))
GLM4_CHAT_TEMPLATE = (
    GLM4_PREFIX + "{%- set ns = namespace(tools=tools or []) -%}"
    "{%- for m in messages if m.tools is defined and m.tools %}"
    "{% set ns.tools = ns.tools + m.tools %}{% endfor -%}"
    "{%- if ns.tools -%}" + _SYSTEM + "\n# 可用工具"
    "{%- for tool in ns.tools %}{% set fn = tool.function if tool.function is defined else tool %}"
    "{{ '\\n\\n## ' }}"  # (a newline right after a tag would be eaten by trim_blocks)
    "{%- if tool.type is defined and tool.type != 'function' and fn is not mapping %}{{ tool.type }}"
    "{%- else %}{{ fn.name }}\n\n{{ fn | tojson(indent=4, ensure_ascii=False) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。{% endif %}"
    "{%- endfor %}{%- endif -%}"
    "{%- for m in messages if m.role == 'system' and m.content %}" + _SYSTEM + "\n{{ m.content }}{% endfor -%}"
    "{%- for m in messages if m.role != 'system' %}"
    "{%- set meta = m.metadata if m.metadata is defined and m.metadata else '' %}"
    "{%- if m.role == 'user' %}" + _USER + "{{ meta }}\n{{ m.content }}"
    "{%- elif m.role == 'assistant' %}"
    "{%- if m.content or not m.tool_calls %}" + _ASSISTANT + "{{ meta }}\n{{ m.content or '' }}{% endif %}"
    "{%- for call in (m.tool_calls or []) %}"
    "{% set fn = call.function if call.function is defined else call %}" + _ASSISTANT + "{{ fn.name }}\n"
    "{{ fn.arguments if fn.arguments is string else fn.arguments | tojson(ensure_ascii=False) }}"
    "{%- endfor %}"
    "{%- elif m.role in ('observation', 'tool') %}" + _OBSERVATION + "{{ meta }}\n{{ m.content }}"
    "{%- else %}{{ raise_exception('GLM-4 chat: unknown role ' ~ m.role ~ "
    "'; use system, user, assistant, observation or tool') }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}" + _ASSISTANT + "{% endif %}"
)

# Persimmon (adept) chat format: `human: {prompt}\n\nadept:`.
PERSIMMON_CHAT_TEMPLATE = (
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}{{ m.content + '\n\n' }}"
    "{%- elif m.role == 'user' %}{{ 'human: ' + m.content + '\n\n' }}"
    "{%- elif m.role == 'assistant' %}{{ 'adept: ' + m.content + '\n\n' }}"
    "{%- else %}{{ raise_exception('Persimmon chat: unknown role ' ~ m.role) }}{% endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ 'adept:' }}{% endif %}"
)

_DEFAULTS = {"glm4": GLM4_CHAT_TEMPLATE, "persimmon": PERSIMMON_CHAT_TEMPLATE}


def default_template_for(family: str | None) -> str | None:
    """The built-in template of a model family ("glm4", "persimmon"), or None."""
    return _DEFAULTS.get(family or "")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text; here it renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# a template from a checkpoint is code we did not write: rendering one gets this many loop steps and
# seconds, and no repetition producing a value longer than _MAX_VALUE
MAX_TEMPLATE_STEPS = 1_000_000
MAX_TEMPLATE_SECONDS = 10.0
_MAX_VALUE = 10_000_000
_budget = threading.local()


def _tick() -> None:
    """One loop step of the template being rendered (this thread's): raise once over the limits."""
    _budget.steps = getattr(_budget, "steps", 0) + 1
    if _budget.steps > MAX_TEMPLATE_STEPS:
        raise ChatTemplateError(f"the chat template ran more than {MAX_TEMPLATE_STEPS:,} loop steps; it does not "
                                "terminate in reasonable time (a loop over a huge range?)")  # fmt: skip
    if _budget.steps % 1024 == 0 and time.monotonic() > getattr(_budget, "deadline", math.inf):
        raise ChatTemplateError(f"the chat template took more than {MAX_TEMPLATE_SECONDS:g}s to render")


class _CountedRange:
    """`range` for templates: sandbox-sized, and every step counted against the render's budget."""

    def __init__(self, *args: int):
        self._range = safe_range(*args)

    def __len__(self) -> int:
        return len(self._range)

    def __iter__(self) -> Any:
        for value in self._range:
            _tick()
            yield value


class _LimitedSandbox(ImmutableSandboxedEnvironment):
    """The reference's sandbox, with `**` and `*` refusing results too large to be a chat prompt
    (`10 ** 10 ** 10` or `'x' * 10 ** 9` would hang or exhaust memory)."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1 and right > 0:
            if right * math.log10(abs(left)) > 70:  # more than 70 digits is no prompt's business
                raise ChatTemplateError(f"the chat template computes {left} ** {right}, too large a number")
        if operator == "*":
            count, seq = (right, left) if isinstance(right, int) else (left, right)
            if isinstance(count, int) and isinstance(seq, (str, list, tuple)) and count * len(seq) > _MAX_VALUE:
                raise ChatTemplateError(f"the chat template repeats a value {count} times, too large a result")
        return super().call_binop(context, operator, left, right)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in the reference's sandboxed environment (cached)."""
    env = _LimitedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, "jinja2.ext.loopcontrols"]
    )
    env.globals["range"] = _CountedRange
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template has a syntax error at line {e.lineno}: {e.message}") from e


def select_template(
    own: str | dict[str, str] | None, requested: str | None = None, tools: list[Any] | None = None
) -> str:
    """Choose the template: an explicit template string, a named one, or the tokenizer's default."""
    if isinstance(own, dict):
        if requested is not None and requested in own:
            return own[requested]
        if requested is None:
            if tools is not None and "tool_use" in own:
                return own["tool_use"]
            if "default" in own:
                return own["default"]
            raise ValueError(
                f"the tokenizer has several chat templates and no 'default'; pass chat_template= one of {sorted(own)}"
            )
    if requested is not None:
        return requested
    if own is None:
        raise ValueError(
            "this tokenizer has no chat template (none in its files and no built-in default for "
            "the model); pass chat_template=... or set tokenizer.chat_template"
        )
    return own


def is_batch(conversation: Any) -> bool:
    """True for a list of conversations rather than one list of messages."""
    return (
        isinstance(conversation, (list, tuple))
        and len(conversation) > 0
        and (isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
    )


def validate_messages(messages: Any) -> list[Any]:
    """Check the message list shape; raise a TypeError/ValueError that names the bad message."""
    if hasattr(messages, "messages"):
        messages = messages.messages
    if not isinstance(messages, (list, tuple)):
        raise TypeError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}"
        )
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}")
        if not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} has no 'role' (a string such as 'user' or 'assistant'): {dict(m)!r}")
        if "content" not in m and not m.get("tool_calls"):
            raise ValueError(f"message {i} (role {m['role']!r}) has no 'content'")
    return list(messages)


_JSON_TYPES: dict[Any, dict[str, Any]] = {
    int: {"type": "integer"},
    float: {"type": "number"},
    str: {"type": "string"},
    bool: {"type": "boolean"},
    type(None): {"type": "null"},
    Any: {},
}


def _json_type(hint: Any) -> dict[str, Any]:
    """JSON schema of a type hint, with the reference's conventions (nullable, enum, prefixItems...)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is None:
        return dict(_JSON_TYPES.get(hint, {"type": "object"}))
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        subs = [_json_type(a) for a in args if a is not type(None)]
        if len(subs) == 1:
            out = subs[0]
        elif all(isinstance(t.get("type"), str) for t in subs):
            out = {"type": sorted(t["type"] for t in subs)}
        else:
            out = {"anyOf": subs}
        if type(None) in args:
            out["nullable"] = True
        return out
    if origin is typing.Literal and args:
        kinds = list(dict.fromkeys(_JSON_TYPES[type(a)]["type"] for a in args))
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "enum": list(args)}
    if origin is list:
        return {"type": "array", "items": _json_type(args[0])} if args else {"type": "array"}
    if origin is tuple:
        if len(args) == 1 or ... in args:
            raise ValueError(f"tool type hint {hint}: use list[...] for variable-length inputs")
        return {"type": "array", "prefixItems": [_json_type(a) for a in args]} if args else {"type": "array"}
    if origin is dict:
        return {"type": "object", "additionalProperties": _json_type(args[1])} if len(args) == 2 else {"type": "object"}
    raise ValueError(f"cannot describe the tool type hint {hint!r} in JSON schema")


def _parse_docstring(doc: str) -> tuple[str, dict[str, str], str | None]:
    """(description, {argument: description}, returns) from a Google-style docstring."""
    description = re.search(r"^(.*?)[\n\s]*(Args:|Returns:|Raises:|\Z)", doc, re.S).group(1).strip()
    block = re.search(r"\n\s*Args:\n\s*(.*?)[\n\s]*(Returns:|Raises:|\Z)", doc, re.S)
    returns = re.search(r"\n\s*Returns:\n\s*(.*?)[\n\s]*(Raises:|\Z)", doc, re.S)
    args: dict[str, str] = {}
    if block:
        lines = "\n".join(line for line in block.group(1).strip().split("\n") if line.strip())
        for name, text in re.findall(r"(?:^|\n)\s*(\w+):\s*(.*?)\s*(?=\n\s*\w+:|\Z)", lines, re.S):
            args[name] = re.sub(r"\s*\n+\s*", " ", text.strip())
    return description, args, returns.group(1).strip() if returns else None


def tool_schema(func: Callable[..., Any]) -> dict[str, Any]:
    """A JSON schema for a Python function from its type hints and Google-style docstring
    (the same schema as the reference's `get_json_schema`)."""
    doc = (inspect.getdoc(func) or "").strip()
    if not doc:
        raise ValueError(f"tool {func.__name__!r} needs a docstring to describe it")
    description, arg_docs, returns = _parse_docstring(doc)
    required = []
    for name, param in inspect.signature(func).parameters.items():
        if param.annotation is inspect.Parameter.empty:
            raise ValueError(f"tool {func.__name__!r}: argument {name!r} needs a type hint")
        if param.default is inspect.Parameter.empty:
            required.append(name)
    properties = {name: _json_type(hint) for name, hint in typing.get_type_hints(func).items()}
    returned = properties.pop("return", None)
    if returned is not None and returns is not None:
        returned["description"] = returns
    for name, schema in properties.items():
        if name not in arg_docs:
            raise ValueError(f"tool {func.__name__!r}: the docstring has no description for argument {name!r}")
        text = arg_docs[name]
        choices = re.search(r"\(choices:\s*(.*?)\)\s*$", text, flags=re.IGNORECASE)
        if choices:
            schema["enum"] = [c.strip() for c in json.loads(choices.group(1))]
            text = text[: choices.start()].strip()
        schema["description"] = text
    parameters: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    out: dict[str, Any] = {"name": func.__name__, "description": description, "parameters": parameters}
    if returned is not None:
        out["return"] = returned
    return {"type": "function", "function": out}


def _tool_schemas(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    out = []
    for tool in tools:
        if isinstance(tool, Mapping):
            out.append(dict(tool))
        elif callable(tool):
            out.append(tool_schema(tool))
        else:
            raise TypeError(f"tools must be JSON-schema dicts or documented functions, got {type(tool).__name__}")
    return out


def _trim_to_final_message(rendered: str, messages: list[Any]) -> str:
    """continue_final_message: cut the rendering right after the last message's text."""
    final = messages[-1].get("content") if messages else None
    if isinstance(final, (list, tuple)):
        texts = [block["text"] for block in final if isinstance(block, Mapping) and "text" in block]
        if not texts:
            raise ValueError("continue_final_message is set but the final message has no text to continue")
        final = texts[-1]
    if not isinstance(final, str) or final.strip() not in rendered:
        raise ValueError(
            "continue_final_message is set but the final message does not appear in the rendered "
            "chat (the template changed or dropped it)"
        )
    start = rendered.rindex(final.strip())
    if rendered[start : start + len(final.lstrip())] == final:
        return rendered[: start + len(final.lstrip())]
    return rendered[: start + len(final.strip())]


_CONTENT_TYPE_TEST = re.compile(r"content\s+is\s+(not\s+)?(string|iterable|sequence|mapping)|visible_text"
                                r"|(\.type|\[['\"]type['\"]\])\s*==\s*['\"](text|image)")


def _reads_content_parts(template: str) -> bool:
    """Whether a template looks at the type of `content` (multimodal templates do: `content is string`,
    `item.type == 'text'`); those get list contents as they are."""
    return _CONTENT_TYPE_TEST.search(template) is not None


def _renderable(message: Mapping[str, Any], i: int, parts_ok: bool) -> Mapping[str, Any]:
    """A message whose content the template can render: a list of text parts joined as the reference's GLM
    templates join them (`visible_text`), None only beside tool calls; anything else raises, naming it."""
    content = message.get("content")
    if content is None:
        if "content" in message and not message.get("tool_calls"):
            raise ValueError(f"message {i} (role {message['role']!r}) has content None; give it a string "
                             "(or tool_calls for an assistant turn)")  # fmt: skip
        return message
    if isinstance(content, str) or parts_ok:
        return message
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"message {i} (role {message['role']!r}): content must be a string or a list of "
                        f"{{'type': 'text', 'text': ...}} parts, got {type(content).__name__}")  # fmt: skip
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type", "text") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ValueError(f"message {i} (role {message['role']!r}) has a content part of type {kind!r}: this "
                             "chat template renders text only")  # fmt: skip
    return {**message, "content": "".join(texts)}


def render(
    template: str,
    messages: Any,
    tools: list[Any] | None = None,
    documents: list[Any] | None = None,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    **context: Any,
) -> str:
    """Render one conversation with `template` (extra keyword arguments are template variables)."""
    messages = validate_messages(messages)
    if continue_final_message and add_generation_prompt:
        raise ValueError(
            "continue_final_message and add_generation_prompt cannot both be set: the first "
            "continues the last message, the second starts a new assistant turn"
        )
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise TypeError("documents must be a list of dicts (with 'title' and 'text')")
    compiled = compile_template(template)
    messages = [_renderable(m, i, _reads_content_parts(template)) for i, m in enumerate(messages)]
    _budget.steps, _budget.deadline = 0, time.monotonic() + MAX_TEMPLATE_SECONDS
    try:
        rendered = compiled.render(
            messages=messages,
            tools=_tool_schemas(tools),
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **context,
        )
    except ChatTemplateError:
        raise
    except Exception as e:  # e.g. an undefined variable, `'a' + 1` or endless recursion inside the template
        raise ChatTemplateError(f"the chat template failed: {type(e).__name__}: {str(e)[:300]}") from e
    finally:
        _budget.deadline = math.inf
    if continue_final_message:
        rendered = _trim_to_final_message(rendered, messages)
    return rendered
