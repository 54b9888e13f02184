"""Supervised fine-tuning data: chat conversations and prompt/completion pairs as (input_ids, labels).

A conversation is rendered with the checkpoint's own chat template; the loss falls on assistant tokens only.
Where an assistant turn starts and ends is read off the template itself: the rendering of the messages before
it with the generation prompt (the prompt ends there) and the rendering through it (the turn ends there).
Each boundary is the length of the token prefix that rendering shares with the whole conversation's tokens,
so a template that merges text across a boundary moves it, never misaligns it. Everything else (system,
user, tool results, the template's own markup) gets label -100.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .tokenization import Tokenizer

IGNORE = -100  # the label the loss skips


@dataclass
class Conversation:
    """One `{"messages": [...], "tools": [...]}` row; `source` is "file:line" for error messages."""

    messages: list[dict[str, Any]]
    tools: list[Any] | None
    source: str


@dataclass
class Completion:
    """One `{"prompt": ..., "completion": ...}` row: loss on the completion (and the EOS after it)."""

    prompt: str
    completion: str
    source: str


Example = tuple[list[int], list[int]]  # input_ids, labels (IGNORE where no loss)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _render(tokenizer: Tokenizer, conv: Conversation, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tools=conv.tools, tokenize=False,
                                             add_generation_prompt=generation_prompt)  # fmt: skip
    except Exception as e:  # the template is user data: any failure is this row's problem
        raise ValueError(f"{conv.source}: the chat template could not render this conversation: {e}") from None


def encode_conversation(conv: Conversation, tokenizer: Tokenizer) -> Example:
    """Token ids of the rendered conversation (EOS appended) and labels on the assistant turns only."""
    if tokenizer.chat_template is None and tokenizer.default_chat_template is None:
        raise ValueError("chat data needs a chat template, and this tokenizer has none (XGLM has none)")
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has the markers
    ids = encode(_render(tokenizer, conv, conv.messages, False))
    labels = [IGNORE] * len(ids)
    for i, message in enumerate(conv.messages):
        if message["role"] != "assistant":
            continue
        start = _common_prefix(encode(_render(tokenizer, conv, conv.messages[:i], True)), ids) if i else 0
        end = _common_prefix(encode(_render(tokenizer, conv, conv.messages[: i + 1], False)), ids)
        labels[start:end] = ids[start:end]
    return _end_with_eos(ids, labels, tokenizer, conv.messages[-1]["role"] == "assistant")


def encode_completion(row: Completion, tokenizer: Tokenizer) -> Example:
    """The prompt as the tokenizer encodes it (its special prefix included), then the completion and EOS."""
    prompt = tokenizer(row.prompt)["input_ids"]
    completion = tokenizer(row.completion, add_special_tokens=False)["input_ids"]
    return _end_with_eos(prompt + completion, [IGNORE] * len(prompt) + completion, tokenizer, True)


def encode_text(text: str, tokenizer: Tokenizer) -> Example:
    """A plain document among SFT rows: loss on all of it."""
    ids = tokenizer(text)["input_ids"]
    return _end_with_eos(ids, list(ids), tokenizer, True)


def _end_with_eos(ids: list[int], labels: list[int], tokenizer: Tokenizer, learn_it: bool) -> Example:
    """Append EOS (a label when the example ends with text to learn, so the model learns to stop)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token: examples could not be ended")
    if not ids or ids[-1] != eos:
        ids, labels = ids + [eos], labels + [eos if learn_it else IGNORE]
    return ids, labels


def encode_examples(records: list[Any], tokenizer: Tokenizer, max_length: int) -> tuple[list[Example], int]:
    """Every record as an example cut to max_length tokens; returns (examples, how many were dropped because no
    label was left within max_length)."""
    examples, dropped = [], 0
    for r in records:
        if isinstance(r, Conversation):
            ids, labels = encode_conversation(r, tokenizer)
        elif isinstance(r, Completion):
            ids, labels = encode_completion(r, tokenizer)
        else:
            ids, labels = encode_text(r, tokenizer)
        ids, labels = ids[:max_length], labels[:max_length]
        if any(label != IGNORE for label in labels[1:]):  # the first label is never predicted
            examples.append((ids, labels))
        else:
            dropped += 1
    return examples, dropped


class ExampleData:
    """Examples as batches: right-padded to the longest in the batch (pads masked out, labelled -100), or with
    `packed`, padding-free: the batch's examples end to end in one row, positions restarting at 0 at each (the
    model then keeps every example's attention to itself) and each example's first label -100 (it is never
    predicted unpacked either), so the loss is the padded batch's."""

    def __init__(self, examples: list[Example], pad_id: int, packed: bool = False):
        self.examples, self.pad_id, self.packed = examples, pad_id, packed

    def __len__(self) -> int:
        return len(self.examples)

    def targets(self, indices: torch.Tensor | list[int]) -> int:
        """Predicted tokens of the batch `indices` would make (the loss's denominator)."""
        return sum(sum(label != IGNORE for label in self.examples[int(i)][1][1:]) for i in indices)

    def batch(self, indices: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        rows = [self.examples[int(i)] for i in indices]
        if self.packed:
            return _pack(rows)
        T = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
        for b, (ids, lab) in enumerate(rows):
            input_ids[b, : len(ids)], labels[b, : len(lab)], attention_mask[b, : len(ids)] = (
                torch.tensor(ids), torch.tensor(lab), 1,
            )  # fmt: skip
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


def _pack(rows: list[Example]) -> dict[str, torch.Tensor]:
    ids = [t for r, _ in rows for t in r]
    labels = [label if j else IGNORE for _, lab in rows for j, label in enumerate(lab)]
    positions = [j for r, _ in rows for j in range(len(r))]
    return {k: torch.tensor([v]) for k, v in (("input_ids", ids), ("labels", labels), ("position_ids", positions))}


class BlockData:
    """Fixed-length blocks of a token stream (pretraining-style): every token is a label."""

    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks  # (N, T)

    def __len__(self) -> int:
        return len(self.blocks)

    def targets(self, indices: torch.Tensor | list[int]) -> int:
        return len(indices) * (self.blocks.shape[1] - 1)

    def batch(self, indices: torch.Tensor | list[int]) -> dict[str, torch.Tensor]:
        x = self.blocks[torch.as_tensor(indices)]
        return {"input_ids": x, "labels": x}


def count_targets(batch: dict[str, torch.Tensor]) -> int:
    """Predicted tokens in a batch (labels shifted by one, -100 skipped): the loss's denominator."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())
