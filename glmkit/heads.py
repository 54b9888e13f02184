"""Task heads and their losses, written once and bound to a family by subclassing:

class GlmForCausalLM(ForCausalLM):
    config_class = GlmConfig
    base_model_class = GlmModel
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .generation import GenerationConfig, GenerationMixin
from .layers import Linear
from .modeling import PreTrainedModel, check_id_tensor, check_token_ids
from .outputs import (
    CausalLMOutputWithPast,
    ModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)
from .reference_api import PrepareInputsMixin


def causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    num_items_in_batch: int | None = None,
) -> torch.Tensor:
    """Next-token cross-entropy: logits at t predict labels at t+1; label -100 is ignored.
    With num_items_in_batch (gradient accumulation) the sum is divided by it instead of averaged."""
    labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:].to(logits.device)  # shift left
    logits = logits.float().reshape(-1, logits.shape[-1])
    if num_items_in_batch is None:
        return F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index)
    return (
        F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
        / num_items_in_batch
    )


def sequence_classification_loss(logits: torch.Tensor, labels: torch.Tensor, config: Any) -> torch.Tensor:
    """Regression (MSE), single-label (cross-entropy) or multi-label (BCE), chosen as the reference does
    when config.problem_type is unset, and remembered on the config."""
    num_labels = config.num_labels
    if config.problem_type is None:
        if num_labels == 1:
            config.problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            config.problem_type = "single_label_classification"
        else:
            config.problem_type = "multi_label_classification"
    labels = labels.to(logits.device)
    if config.problem_type == "regression":
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze().to(logits.dtype))
        return F.mse_loss(logits, labels.to(logits.dtype))
    if config.problem_type == "single_label_classification":
        check_token_ids(labels, num_labels, "labels", ignore=-100, kind="label", where="the labels")
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


class _HeadModel(PreTrainedModel):
    """A base model under `self.model` plus one head; subclasses set config_class and base_model_class."""

    base_model_class: ClassVar[type[PreTrainedModel]]

    def __init__(self, config: Any):
        super().__init__(config)
        self.model = self.base_model_class(config)

    def _run_base(self, return_dict: bool | None, **kwargs: Any) -> ModelOutput:
        kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return self.model(return_dict=True, **kwargs)

    def _finish(self, output: ModelOutput, return_dict: bool | None) -> ModelOutput | tuple:
        return_dict = self.config.return_dict if return_dict is None else return_dict
        return output if return_dict else output.to_tuple()


class ForCausalLM(GenerationMixin, PrepareInputsMixin, _HeadModel):
    """Language-model head on the last hidden states; `logits_to_keep` limits which positions get logits."""

    output_class: ClassVar[type[ModelOutput]] = CausalLMOutputWithPast
    _tied_weights_keys: ClassVar[list[str]] = ["lm_head.weight"]

    def __init__(self, config: Any):
        super().__init__(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = GenerationConfig.from_model_config(config)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        return_dict: bool | None = None,
        num_items_in_batch: int | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ModelOutput | tuple:
        out = self._run_base(
            return_dict, input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, **kwargs
        )
        hidden = out.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            check_id_tensor(labels, "labels")
            check_token_ids(labels, self.config.vocab_size, "labels", ignore=-100)
            if labels.shape != hidden.shape[:2]:
                raise ValueError(
                    f"labels shape {tuple(labels.shape)} must match the input's {tuple(hidden.shape[:2])}"
                )
            if logits.shape[1] != labels.shape[1]:
                raise ValueError("labels need logits at every position: leave logits_to_keep at 0")
            loss = causal_lm_loss(logits, labels, num_items_in_batch=num_items_in_batch)
        fields = {k: v for k, v in out.items() if k != "last_hidden_state"}
        return self._finish(self.output_class(loss=loss, logits=logits, **fields), return_dict)


class ForSequenceClassification(_HeadModel):
    """Scores pooled at each row's last non-pad token (found from input_ids and config.pad_token_id)."""

    init_if_missing = ("score.",)

    def __init__(self, config: Any):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs: Any,
    ) -> ModelOutput | tuple:
        out = self._run_base(
            return_dict,
            input_ids=input_ids,
            attention_mask=attention_mask,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        hidden = out.last_hidden_state  # (B, T, C)
        B, T = hidden.shape[:2]
        pad = self.config.pad_token_id
        if pad is None and B != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        if pad is None or input_ids is None:
            last = torch.full((B,), T - 1, device=hidden.device)
        else:  # rightmost non-pad token, which handles both padding sides
            non_pad = (input_ids != pad).to(hidden.device, torch.int32)
            last = (torch.arange(T, device=hidden.device, dtype=torch.int32) * non_pad).argmax(-1)
        logits = self.score(hidden[torch.arange(B, device=hidden.device), last])  # (B, num_labels)
        loss = sequence_classification_loss(logits, labels, self.config) if labels is not None else None
        output = SequenceClassifierOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=out.hidden_states,
            attentions=out.attentions,
        )
        return self._finish(output, return_dict)


class ForTokenClassification(_HeadModel):
    """Per-token scores (with dropout during training, rate from classifier_dropout / hidden_dropout / 0.1)."""

    init_if_missing = ("score.",)

    def __init__(self, config: Any):
        super().__init__(config)
        self.num_labels = config.num_labels
        rate = getattr(config, "classifier_dropout", None)
        if rate is None:
            rate = getattr(config, "hidden_dropout", None)
        self.dropout = nn.Dropout(0.1 if rate is None else rate)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> ModelOutput | tuple:
        for unused in ("past_key_values", "use_cache"):  # token classification keeps no cache
            kwargs.pop(unused, None)
        out = self._run_base(return_dict, input_ids=input_ids, attention_mask=attention_mask,
                             inputs_embeds=inputs_embeds, use_cache=False, **kwargs)  # fmt: skip
        logits = self.score(self.dropout(out.last_hidden_state))
        loss = None
        if labels is not None:
            check_id_tensor(labels, "labels")
            check_token_ids(labels, self.num_labels, "labels", ignore=-100, kind="label", where="the labels")
            loss = F.cross_entropy(
                logits.float().view(-1, self.num_labels), labels.view(-1).to(logits.device)
            )
        output = TokenClassifierOutput(
            loss=loss, logits=logits, hidden_states=out.hidden_states, attentions=out.attentions
        )
        return self._finish(output, return_dict)
