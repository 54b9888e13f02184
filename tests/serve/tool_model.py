"""A tiny GLM taught GLM-4's tool-call format on a few conversations, so the server's tool calling can be
tested end to end on what a model really writes (token by token, special tokens and all).

Its chat template is a short one in the THUDM checkpoints' style (tools on a message, the call's name as
assistant metadata, results as observations) that lists tools by name only: the full GLM-4 rendering of
two tools is ~700 tokens, which would make training the model take minutes instead of seconds.
"""

from __future__ import annotations

import torch

from glmkit import AutoTokenizer, GlmConfig, GlmForCausalLM
from glmkit.serve.tools import glm4_messages

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "24h": {"type": "boolean"}},
            "required": ["city", "24h"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, TIME]


TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}"
    "{% if m.tools %}<|system|>\ntools:{% for t in m.tools %} {{ t.function.name }}{% endfor %}{% endif %}"
    "{% if m.role == 'user' %}<|user|>\n{{ m.content }}"
    "{% elif m.role == 'assistant' %}<|assistant|>{{ m.metadata }}\n{{ m.content }}"
    "{% elif m.role == 'observation' %}<|observation|>\n{{ m.content }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


PARIS, BOTH, OSLO = user("Weather in Paris?"), user("Weather in Paris and Rome?"), user("Weather in Oslo?")
PARIS_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ANSWERED = PARIS + [{"role": "assistant", "content": None, "tool_calls": [PARIS_CALL]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "22C, sunny"}]  # fmt: skip
GREETING = user("Hello there")
# (messages, tools, what the assistant writes after `<|assistant|>`)
LESSONS = [
    (PARIS, TOOLS, 'get_weather\n{"city": "Paris"}<|observation|>'),
    (BOTH, TOOLS, 'get_weather\n{"city": "Paris"}<|assistant|>get_weather\n{"city": "Rome"}<|observation|>'),
    (OSLO, TOOLS, 'get_weather\n{"city": Oslo}<|observation|>'),  # not JSON: the server must not call
    (ANSWERED, TOOLS, "\nIt is 22C and sunny in Paris.<|user|>"),
    (GREETING, None, "\nGood day to you.<|user|>"),
]


def prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None) -> list[int]:
    conversation = glm4_messages([dict(m) for m in messages], tools)
    return list(tokenizer.apply_chat_template(conversation, tokenize=True, add_generation_prompt=True))


def train_tool_model(max_steps: int = 400, seed: int = 0):
    """(model, tokenizer, loss): a 2-layer GLM on the bundled GLM tokenizer that has learnt LESSONS by heart
    (trained until the loss is below 0.01)."""
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained("default:glm")
    tokenizer.chat_template = TEMPLATE
    eos = tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|user|>", "<|observation|>"])
    config = GlmConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                       pad_token_id=eos[0], eos_token_id=eos)  # fmt: skip
    model = GlmForCausalLM(config)
    rows = []
    for messages, tools, answer in LESSONS:
        prompt = prompt_ids(tokenizer, messages, tools)
        target = list(tokenizer.encode(answer, add_special_tokens=False))
        rows.append((prompt + target, [-100] * len(prompt) + target))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([r + [eos[0]] * (width - len(r)) for r, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3)
    model.train()
    for _ in range(max_steps):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if loss.item() < 0.01:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.generation_config.eos_token_id = eos
    return model, tokenizer, loss.item()
