"""Chat templates: glmkit's renderer against the reference apply_chat_template, defaults, and errors."""

from __future__ import annotations

import re

import jinja2
import pytest
import torch
import transformers

from glmkit.chat import GLM4_CHAT_TEMPLATE, PERSIMMON_CHAT_TEMPLATE, ChatTemplateError, tool_schema
from glmkit.tokenization import AutoTokenizer

from .corpus import CASES, load_reference

# The template GLM-4 `-hf` checkpoints ship (tools in a system turn, metadata, observation turns).
GLM4_HF_TEMPLATE = (
    "[gMASK]<sop>{%- if tools -%}<|system|>\n# 可用工具\n{% for tool in tools %}"
    '{%- set function = tool.function if tool.get("function") else tool %}'
    "\n\n## {{ function.name }}\n\n"
    "{{ function | tojson(indent=4, ensure_ascii=False) }}"
    "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{%- endfor %}{%- endif -%}{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n"
    "{{ msg.content }}{%- endif %}{%- endfor %}{%- for message in messages if message.role != 'system' %}"
    "{%- set role = message['role'] %}{%- set content = message['content'] %}"
    '{%- set meta = message.get("metadata", "") %}{%- if role == \'user\' %}<|user|>\n{{ content }}'
    "{%- elif role == 'assistant' and not meta %}<|assistant|>\n{{ content }}"
    "{%- elif role == 'assistant' and meta %}<|assistant|>{{ meta }} \n{{ content }}"
    "{%- elif role == 'observation' %}<|observation|>\n{{ content }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# The original GLM-4 release's style: tools carried by a message.
GLM4_ORIGINAL_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}"
    "<|system|>\n你是一个名为 ChatGLM 的人工智能助手。\n\n# 可用工具{% set tools = item['tools'] %}"
    "{% for tool in tools %}{% if tool['type'] == 'function' %}\n\n## {{ tool['function']['name'] }}\n\n"
    "{{ tool['function'] | tojson(indent=4) }}\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
    "{% endif %}{% endfor %}{% endif %}{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n"
    "{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Exercises whitespace control, loop controls, namespace, tojson options, globals and special-token variables.
FEATURE_TEMPLATE = """{{ bos_token or '' }}
{%- set ns = namespace(n=0) %}
{% for m in messages %}
    {% if m.role == 'skip' %}{% continue %}{% endif %}
    {% if loop.index > 6 %}{% break %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ m.role }}> {{ m.content | trim }}
{% if m.role == 'assistant' %}{% generation %}[{{ m.content }}]{% endgeneration %}{% endif %}
{% endfor %}
{% if tools %}TOOLS {{ tools | tojson }} | {{ tools[0] | tojson(indent=2, sort_keys=True) }}{% endif %}
{{ {'ü': 'é', 'a': [1, 2]} | tojson(separators=(',', ':')) }} n={{ ns.n }} year={{ strftime_now('%Y') }}
{% if custom_var is defined %}custom={{ custom_var }}{% endif %}
{% if add_generation_prompt %}<assistant>{% endif %}"""


def get_weather(city: str, unit: str = "celsius") -> str:
    """Get the current weather in a city.

    Args:
        city: The city, e.g. 北京.
        unit: Temperature unit.
    """
    return city + unit


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "description": "搜索网页 😀",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]},
        },
    }
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "你好，世界 😀"},
        {"role": "assistant", "content": "Hi!  "},
        {"role": "user", "content": "tabs\tand\r\nCRLF  "},
    ],
    [
        {"role": "user", "content": "weather in 北京?"},
        {"role": "assistant", "metadata": "search", "content": '{"q": "x"}'},
        {"role": "observation", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny.", "metadata": ""},
    ],
    [
        {"role": "user", "content": "<|user|> special tokens written in text [gMASK]"},
        {"role": "skip", "content": "x"},
        {"role": "assistant", "content": "   padded   "},
    ],
]
CHAT_CASES = ["glm4_hf", "glm4_original", "xglm_fast", "persimmon_legacy"]


@pytest.fixture(scope="module", params=CHAT_CASES)
def chat_case(request):
    fixture, key, _, kind = CASES[request.param]
    directory = request.getfixturevalue(fixture)
    directory = directory[key] if key else directory
    ours, ref = AutoTokenizer.from_pretrained(directory), load_reference(kind, directory)
    if ref.pad_token is None:
        ref.pad_token = ours.pad_token = ref.eos_token
    return ours, ref


@pytest.mark.parametrize(
    "template",
    [GLM4_HF_TEMPLATE, GLM4_ORIGINAL_TEMPLATE, FEATURE_TEMPLATE, GLM4_CHAT_TEMPLATE, PERSIMMON_CHAT_TEMPLATE],
)
def test_rendering_matches_reference(chat_case, template):
    ours, ref = chat_case
    if template is PERSIMMON_CHAT_TEMPLATE:
        conversations = [[m for m in c if m["role"] in ("user", "assistant", "system")] for c in CONVERSATIONS]
    else:
        conversations = CONVERSATIONS
    ours.chat_template = ref.chat_template = template
    for conv in conversations:
        for tools in (None, TOOLS, [get_weather]):
            for gen in (False, True):
                kwargs = {"tools": tools, "add_generation_prompt": gen}
                try:
                    ref.apply_chat_template(conv, tokenize=False, **kwargs)
                except jinja2.TemplateError as e:  # the template rejects this conversation: so must we
                    with pytest.raises(ChatTemplateError, match=re.escape(str(e))):
                        ours.apply_chat_template(conv, tokenize=False, **kwargs)
                    continue
                assert ours.apply_chat_template(conv, tokenize=False, **kwargs) == ref.apply_chat_template(
                    conv, tokenize=False, **kwargs
                ), (conv, kwargs)
                assert ours.apply_chat_template(conv, **kwargs) == ref.apply_chat_template(conv, **kwargs)
        if conv[-1]["role"] == "assistant" and not any(m["role"] == "skip" for m in conv):
            assert ours.apply_chat_template(
                conv, tokenize=False, continue_final_message=True
            ) == ref.apply_chat_template(conv, tokenize=False, continue_final_message=True)
    extra = {"custom_var": "é"}
    assert ours.apply_chat_template(conversations[0], tokenize=False, **extra) == ref.apply_chat_template(
        conversations[0], tokenize=False, **extra
    )


def test_batched_and_tensor_outputs_match(chat_case):
    ours, ref = chat_case
    ours.chat_template = ref.chat_template = GLM4_HF_TEMPLATE
    kwargs = {"add_generation_prompt": True, "padding": True, "return_tensors": "pt", "return_dict": True}
    got, want = (
        ours.apply_chat_template(CONVERSATIONS, **kwargs),
        ref.apply_chat_template(CONVERSATIONS, **kwargs),
    )
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(got[key], want[key]), key
    assert ours.apply_chat_template(CONVERSATIONS, tokenize=False) == ref.apply_chat_template(
        CONVERSATIONS, tokenize=False
    )
    single = ours.apply_chat_template(CONVERSATIONS[1], return_tensors="pt")
    assert torch.equal(single, ref.apply_chat_template(CONVERSATIONS[1], return_tensors="pt"))


def test_tool_schema_matches_reference():
    from transformers.utils import get_json_schema

    assert tool_schema(get_weather) == get_json_schema(get_weather)


def test_template_from_files_and_saved(glm4_hf_dir, tmp_path):
    ref = transformers.AutoTokenizer.from_pretrained(glm4_hf_dir)
    ref.chat_template = GLM4_HF_TEMPLATE
    ref.save_pretrained(tmp_path / "ref")  # writes chat_template.jinja
    ours = AutoTokenizer.from_pretrained(tmp_path / "ref")
    assert ours.chat_template == GLM4_HF_TEMPLATE
    ours.save_pretrained(tmp_path / "ours")
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "ours").chat_template == GLM4_HF_TEMPLATE
    # several named templates: a "tool_use" one is picked when tools are passed
    ours.chat_template = {"default": "D{{ messages[0].content }}", "tool_use": "T{{ tools | length }}"}
    assert ours.apply_chat_template(CONVERSATIONS[0], tokenize=False) == "DHello"
    assert ours.apply_chat_template(CONVERSATIONS[0], tools=TOOLS, tokenize=False) == "T1"
    ours.save_pretrained(tmp_path / "multi")
    reloaded = transformers.AutoTokenizer.from_pretrained(tmp_path / "multi")
    assert reloaded.apply_chat_template(CONVERSATIONS[0], tools=TOOLS, tokenize=False) == "T1"


def test_glm4_default_template(glm4_hf_dir, glm4_original_dir):
    for directory in (glm4_hf_dir, glm4_original_dir):
        tok = AutoTokenizer.from_pretrained(directory)
        assert tok.chat_template is None and tok.get_chat_template() == GLM4_CHAT_TEMPLATE
        msgs = [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "天气?"},
        ]
        assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == (
            "[gMASK]<sop><|system|>\nBe brief.<|user|>\nHi<|assistant|>\nHello<|user|>\n天气?<|assistant|>"
        )
        tool_turns = [
            {"role": "user", "content": "weather in Paris?"},
            {
                "role": "assistant",
                "tool_calls": [
                    {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
                ],
            },
            {"role": "tool", "content": '{"temp": 21}'},
            {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Lyon"}'},
            {"role": "observation", "content": "rain"},
        ]
        schema = tool_schema(get_weather)["function"]
        import json

        expected = (
            "[gMASK]<sop><|system|>\n# 可用工具\n\n## get_weather\n\n"
            + json.dumps(schema, indent=4, ensure_ascii=False)
            + "\n在调用上述函数时，请使用 Json 格式表示调用的参数。"
            '<|user|>\nweather in Paris?<|assistant|>get_weather\n{"city": "Paris"}'
            '<|observation|>\n{"temp": 21}<|assistant|>get_weather\n{"city": "Lyon"}'
            "<|observation|>\nrain<|assistant|>"
        )
        got = tok.apply_chat_template(tool_turns, tools=[get_weather], tokenize=False, add_generation_prompt=True)
        assert got == expected
        # tools carried by a message (the original release's convention) render the same block
        carried = [{"role": "system", "content": "", "tools": [tool_schema(get_weather)]}] + tool_turns
        assert tok.apply_chat_template(carried, tokenize=False, add_generation_prompt=True) == expected
        ids = tok.apply_chat_template(tool_turns, tools=[get_weather], add_generation_prompt=True)
        assert tok.decode(ids).replace(" ", "") == tok.decode(tok(expected)["input_ids"]).replace(" ", "")
        assert ids == tok(expected)["input_ids"]


def test_persimmon_default_template(persimmon_dirs):
    tok = AutoTokenizer.from_pretrained(persimmon_dirs["fast"])
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == "human: What is 2+2?\n\nadept:"
    more = msgs + [{"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    assert tok.apply_chat_template(more, tokenize=False, add_generation_prompt=True) == (
        "human: What is 2+2?\n\nadept: 4\n\nhuman: And 3+3?\n\nadept:"
    )
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True)
    assert ids == tok("human: What is 2+2?\n\nadept:", add_special_tokens=False)["input_ids"]


def test_no_template_is_a_clear_error(xglm_dirs):
    tok = AutoTokenizer.from_pretrained(xglm_dirs["fast"])
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize(
    "messages, error, match",
    [
        ([{"content": "no role"}], ValueError, "message 0 has no 'role'"),
        (
            [{"role": "user", "content": "ok"}, {"role": "assistant"}],
            ValueError,
            "message 1 .* has no 'content'",
        ),
        (["just a string"], TypeError, "message 0 must be a dict"),
        ("hello", TypeError, "messages must be a list"),
    ],
)
def test_malformed_messages(glm4_hf_dir, messages, error, match):
    tok = AutoTokenizer.from_pretrained(glm4_hf_dir)
    with pytest.raises(error, match=match):
        tok.apply_chat_template(messages)


def test_template_errors(glm4_hf_dir):
    tok = AutoTokenizer.from_pretrained(glm4_hf_dir)
    msgs = [{"role": "user", "content": "hi"}]
    tok.chat_template = "{% if messages[0].role == 'user' %}{{ raise_exception('users may not speak') }}{% endif %}"
    with pytest.raises(ChatTemplateError, match="users may not speak"):
        tok.apply_chat_template(msgs)
    tok.chat_template = "{% for m in messages %}"
    with pytest.raises(ChatTemplateError, match="syntax error"):
        tok.apply_chat_template(msgs)
    tok.chat_template = "{{ messages.append(1) }}"  # the sandbox refuses mutation
    with pytest.raises(ChatTemplateError):
        tok.apply_chat_template(msgs)
    with pytest.raises(ValueError, match="continue_final_message and add_generation_prompt"):
        tok.apply_chat_template(
            msgs,
            chat_template="{{ messages[0].content }}",
            continue_final_message=True,
            add_generation_prompt=True,
        )
    with pytest.raises(ValueError, match="final message does not appear"):
        tok.apply_chat_template(msgs, chat_template="x", continue_final_message=True)
    tok.chat_template = "{{ messages[0].content + 1 }}"
    with pytest.raises(ChatTemplateError, match="TypeError"):
        tok.apply_chat_template(msgs)
    tok.chat_template = "{{ undefined_thing.attr }}"
    with pytest.raises(ChatTemplateError, match="undefined"):
        tok.apply_chat_template(msgs)
    with pytest.raises(NotImplementedError, match="return_assistant_tokens_mask"):
        tok.apply_chat_template(msgs, return_assistant_tokens_mask=True)
    with pytest.raises(ChatTemplateError, match="unknown role"):
        tok.apply_chat_template([{"role": "wizard", "content": "x"}], chat_template=GLM4_CHAT_TEMPLATE)
