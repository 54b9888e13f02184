"""The lm-evaluation-harness model `glmkit` (needs `pip install 'glmkit[eval]'`).

`--model glmkit --model_args pretrained=PATH,dtype=float32` evaluates a checkpoint through glmkit with the
numbers of the harness's own `hf` backend: its tokenisation (TemplateLM's context/continuation split,
`tok_encode`'s special-token rule), left truncation to `max_length`, rolling windows (prefix token, disjoint
windows of max_length) and stop rules (EOS joins `until`, text cut at the first stop string). What differs is
the speed: candidates sharing a context prefill it once (`glmkit.eval.score_tokens`).

Importing this module registers the model with the harness (its built-in models first: the harness only
loads those while its registry is empty). Nothing else in glmkit imports it, so glmkit works without lm_eval.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

import lm_eval.models  # noqa: F401  (see the module docstring)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
    resolve_max_length,
)
from tqdm import tqdm

from ..auto import AutoModelForCausalLM
from ..tokenization import AutoTokenizer
from . import text_encoder
from .scoring import Pair, rolling_windows, score_tokens

logger = logging.getLogger("glmkit")
AUTO_BATCH_SIZE = 16  # rows per forward when the harness asks for "auto" (no search for the largest)


def parse_batch_size(batch_size: int | str) -> int:
    """The harness passes an int or the CLI's string ("8", "auto", "auto:4")."""
    if isinstance(batch_size, int) and not isinstance(batch_size, bool):
        value = batch_size
    elif isinstance(batch_size, str) and batch_size.strip().isdigit():
        value = int(batch_size)
    elif isinstance(batch_size, str) and batch_size.startswith("auto"):
        logger.warning("glmkit: batch_size=%s is taken as %d rows per forward pass", batch_size, AUTO_BATCH_SIZE)
        return AUTO_BATCH_SIZE
    else:
        raise ValueError(f"batch_size must be a positive integer or 'auto', got {batch_size!r}")
    if value < 1:
        raise ValueError(f"batch_size must be at least 1, got {value}")
    return value


@register_model("glmkit")
class GlmkitLM(TemplateLM):
    """lm_eval model over a glmkit checkpoint; model_args mirror the `hf` backend's where they mean the same."""

    def __init__(self, pretrained: str = "default:glm", dtype: str = "auto", device: str | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 revision: str | None = None, reuse_prefix: bool = True, newlines_to_eos: bool = False,
                 chat_template_args: dict | None = None, **unknown: Any):  # fmt: skip
        super().__init__()
        if unknown:
            raise TypeError(f"glmkit model got unknown model_args: {', '.join(sorted(unknown))}")
        hub = {"revision": revision} if revision else {}
        self._model = AutoModelForCausalLM.from_pretrained(pretrained, dtype=dtype, device_map=device or "auto", **hub)
        self.tokenizer = AutoTokenizer.from_pretrained(pretrained, **hub)
        self.pretrained = str(pretrained)
        self.batch_size_per_gpu = parse_batch_size(batch_size)
        self._max_length, self._max_gen_toks = max_length, int(max_gen_toks)
        self.add_bos_token, self.custom_prefix_token_id = add_bos_token, prefix_token_id
        self.reuse_prefix, self.newlines_to_eos = bool(reuse_prefix), bool(newlines_to_eos)
        self.chat_template_args = chat_template_args or {}
        self._special_prefix = list(self.tokenizer("", add_special_tokens=True)["input_ids"])

    # ---- what the harness reads ---------------------------------------------------------------------
    @property
    def model(self) -> Any:
        return self._model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context (and each rolling document) is scored from: as `hf`, BOS else EOS."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        return self._max_length or resolve_max_length(self._model.config, self.tokenizer)

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> Any:
        return self._model.device

    @property
    def tokenizer_name(self) -> str:
        return self.pretrained.replace("/", "__")

    # ---- tokenisation, as the hf backend does it ------------------------------------------------------
    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:  # fmt: skip
        """The tokenizer's default special tokens unless told (add_bos_token), none when the text already starts
        with the prefix token's text (a chat-templated prompt)."""
        special = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode([self.prefix_token_id])):
            special = False
        ids = self._encode(string, special is not False)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _encode(self, text: str, special: bool) -> list[int]:
        """With special tokens: the tokenizer's special prefix before the text's ids even where the text starts
        with it already (a GLM-4 chat prompt), as transformers' tokenizers and so the hf backend do; glmkit's
        own tokenizer would add it once."""
        ids = text_encoder(self.tokenizer, add_special_tokens=False, newlines_to_eos=self.newlines_to_eos)(text)
        return self._special_prefix + ids if special else ids

    def tok_decode(self, tokens: Sequence[int] | int, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt,
                                                  **self.chat_template_args)  # fmt: skip

    # ---- log-likelihoods --------------------------------------------------------------------------------
    def _fit(self, context: list[int], continuation: list[int]) -> Pair:
        """Truncate the context from the left so that context + continuation is max_length inputs (as `hf`)."""
        if len(continuation) > self.max_length:
            raise ValueError(f"a continuation of {len(continuation)} tokens is longer than max_length "
                             f"{self.max_length}")  # fmt: skip
        keep = self.max_length + 1 - len(continuation)
        return (context[-keep:] if len(context) > keep else context), continuation

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs: Any) -> list[tuple[float, bool]]:  # fmt: skip
        if not requests:
            return []
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        pairs = [self._fit(list(context), list(continuation)) for _, context, continuation in requests]
        results = score_tokens(self._model, pairs, batch_size=self.batch_size, reuse_prefix=self.reuse_prefix,
                               progress=bar.update)  # fmt: skip
        bar.close()
        for (request, _, _), result in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        documents = [request.args[0] for request in requests]
        windows = [rolling_windows(self.tok_encode(text), [self.prefix_token_id], self.max_length)
                   for text in documents]  # fmt: skip
        flat = [(None, context, continuation) for doc in windows for context, continuation in doc]
        scores = self._loglikelihood_tokens(flat, disable_tqdm=disable_tqdm)
        totals, at = [], 0
        for text, doc in zip(documents, windows):
            totals.append(sum(logprob for logprob, _ in scores[at : at + len(doc)]))
            at += len(doc)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), totals[-1])
        return totals

    # ---- generation ---------------------------------------------------------------------------------
    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, as the task asks) continuations cut at the first stop string; requests with the
        same generation arguments batched, longest first."""
        args = [request.args for request in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(args)
        bar = tqdm(total=len(args), disable=disable_tqdm, desc="Running generate_until requests")
        for indices in groups.values():
            indices.sort(key=lambda i: (-len(self.tok_encode(args[i][0])), args[i][0]))
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                texts = self._generate([args[i][0] for i in batch], args[batch[0]][1])
                for i, text in zip(batch, texts):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
                bar.update(len(batch))
        bar.close()
        return out  # type: ignore[return-value]

    def _generate(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        options = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        until = handle_stop_sequences(options.pop("until", None), eos=self.tok_decode(self.eot_token_id, False))
        max_new_tokens = options.pop("max_gen_toks")
        if max_new_tokens >= self.max_length:
            raise ValueError(f"max_gen_toks {max_new_tokens} must be less than max_length {self.max_length}")
        if not options.get("do_sample"):
            options.pop("temperature", None)
        input_ids, attention_mask = self._left_padded(contexts, self.max_length - max_new_tokens)
        sequences = self._model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                         max_new_tokens=max_new_tokens, stop_strings=[s for s in until if s],
                                         tokenizer=self.tokenizer, pad_token_id=self._pad_id(), **options)  # fmt: skip
        new = sequences[:, input_ids.shape[1] :].tolist()
        return [postprocess_generated_text(self.tok_decode(row), until, None) for row in new]

    def _left_padded(self, contexts: list[str], max_context: int) -> tuple[Any, Any]:
        """Each context encoded as `hf`'s batch encoding does (special tokens decided by the first one),
        left-truncated to max_context tokens and left-padded."""
        import torch

        special = self.add_bos_token
        if has_bos_prefix(contexts[0], getattr(self.tokenizer, "bos_token", None)):
            special = False
        rows = [self._encode(text, special is not False)[-max_context:] for text in contexts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self._pad_id(), dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[b, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id


def run_cli(argv: Sequence[str]) -> int:
    """`lm_eval ARGS` (the harness's own command line) with the `glmkit` model registered."""
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0
