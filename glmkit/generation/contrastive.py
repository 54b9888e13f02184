"""Contrastive search and DoLa: greedy-family decoding that reads the model's hidden states, not only its logits.

Contrastive search (`penalty_alpha` > 0 with `top_k` > 1; Su et al. 2022, "A Contrastive Framework for Neural
Text Generation"): each step runs the top_k tokens of the processed distribution through the model at once
(top_k cache rows per prompt) and keeps the candidate maximising (1 - alpha) * its probability - alpha * its
degeneration penalty, the largest cosine similarity between its last hidden state (after the final norm) and
those of the row's earlier real tokens. The kept candidate's logits are the next step's.

DoLa (`dola_layers`; Chuang et al. 2024, "DoLa: Decoding by Contrasting Layers Improves Factuality"): the
next-token logits are the final layer's log-probabilities minus those of an early ("premature") layer, read
through lm_head from that layer's input (no final norm). Of several candidate layers the one whose
distribution is furthest from the final one (Jensen-Shannon divergence, averaged over the batch) is used;
tokens the final layer gives under a tenth of its top probability are ruled out. The processors then run on
the result, which is picked greedily or sampled as usual.

Both follow transformers 4.52.4, the last release with them in its core (later ones fetch hub code, which
glmkit never runs). They decode eagerly on a plain cache; a finished row keeps decoding (its tokens are
replaced by padding), as there.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .engine import Decoder, Step, _room, choose_tokens, decode_mode, place_tokens, reserved_length

RELATIVE_TOP = 0.1  # DoLa keeps the tokens given at least this fraction of the final layer's top probability


def layered_steps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: Any,
                  fast: dict[str, Any], drafter: Any) -> Iterator[Step] | None:  # fmt: skip
    """The token loop of contrastive search or DoLa when the config asks for one (checked here, before any
    work), else None."""
    cfg = plan.config
    if not cfg.penalty_alpha and cfg.dola_layers is None:
        return None
    name = "contrastive search (penalty_alpha)" if cfg.penalty_alpha else "DoLa decoding (dola_layers)"
    if drafter is not None:
        raise ValueError(f"{name} cannot be combined with speculative decoding (prompt_lookup_num_tokens / "
                         "assistant_model)")  # fmt: skip
    if decode_mode(fast) != "plain":
        warnings.warn(f"{name} runs on the plain decode path; compile / static cache ignored", stacklevel=3)
    if cfg.penalty_alpha:
        vocab = model.get_output_embeddings().out_features
        if cfg.top_k > vocab:
            raise ValueError(f"contrastive search: `top_k` ({cfg.top_k}) is larger than the vocabulary ({vocab})")
        return contrastive_steps(model, input_ids, attention_mask, plan)
    return dola_steps(model, input_ids, attention_mask, plan, premature_layers(model, cfg.dola_layers))


def _prefilled(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               plan: Any) -> tuple[Decoder, torch.Tensor]:  # fmt: skip
    """A plain Decoder that records every pass's hidden states (and attentions when asked), holding the prompt
    (one pass, as the reference's), and that pass's logits."""
    P = input_ids.shape[1]
    total = P + plan.max_new_tokens
    capacity = total if reserved_length(model, P, total, "plain") == total else None
    decoder = Decoder(model, capacity, record=(plan.record[0], True))
    return decoder, decoder.prefill(input_ids, attention_mask)


def _shown(plan: Any, attentions: tuple | None, hidden: tuple, rows: torch.Tensor | None = None) -> tuple:
    """The (attentions, hidden states) a Step carries: those generate was asked to return (of `rows` only)."""
    pick = (lambda t: t) if rows is None else (lambda t: tuple(x[rows.to(x.device)] for x in t))
    return pick(attentions) if plan.record[0] else None, pick(hidden) if plan.record[1] else None


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


@torch.no_grad()
def contrastive_steps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      plan: Any) -> Iterator[Step]:  # fmt: skip
    """Contrastive search: one Step per new token. The cache holds top_k rows per prompt (row b * K + k),
    equal up to their last slot: keeping the chosen candidate copies that slot into its siblings. At the end it
    is left as the reference returns it: one row per prompt, without the last token."""
    cfg = plan.config
    K, alpha = cfg.top_k, cfg.penalty_alpha
    (B, P), dev = input_ids.shape, input_ids.device
    total = P + plan.max_new_tokens
    decoder, logits = _prefilled(model, input_ids, attention_mask, plan)
    context = _unit(decoder.recorded[1][-1])  # (B, S, C) each earlier token's last hidden state, normalised
    real = attention_mask.bool()  # (B, S) which of them are real tokens
    shown = _shown(plan, *decoder.recorded)
    cache = decoder.cache
    cache.reorder(torch.arange(B, device=dev).repeat_interleave(K))
    first_row = torch.arange(B, device=dev) * K
    ids = input_ids
    eos = torch.tensor(plan.eos, device=dev) if plan.eos else None
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    for step in range(plan.max_new_tokens):
        cur = P + step
        scores = logits
        for processor in plan.processors:
            scores = processor(ids[:, :cur], scores)
        probs, candidates = torch.softmax(scores, dim=-1).topk(K, dim=-1)  # (B, K)
        candidate_logits = decoder.step(candidates.view(B * K, 1))
        candidate_context = _unit(decoder.recorded[1][-1].view(B, K, -1))  # (B, K, C)
        cosine = candidate_context @ context[:, :cur].transpose(1, 2)  # (B, K, cur)
        penalty = cosine.masked_fill(~real[:, None, :cur], -math.inf).amax(dim=-1)  # (B, K)
        best = ((1.0 - alpha) * probs - alpha * penalty).argmax(dim=-1)  # (B,)
        rows = first_row + best
        cache.keep_last(rows.repeat_interleave(K))
        context, real, ids = _room(context, cur + 1, total, 0), _room(real, cur + 1, total, 0), \
            _room(ids, cur + 1, total, plan.pad)  # fmt: skip
        context[:, cur] = candidate_context[torch.arange(B, device=dev), best]
        real[:, cur] = True
        tokens, stopped = place_tokens(plan, ids, cur, candidates.gather(1, best[:, None]).squeeze(1), finished, eos)
        stopped_now = stopped & ~finished
        finished = finished | stopped
        yield Step(tokens, logits, scores, finished, stopped_now, *shown, cache)
        if bool(finished.all()):
            break
        logits, shown = candidate_logits[rows], _shown(plan, *decoder.recorded, rows)
    cache.reorder(first_row)
    cache.rewind(1)  # the last token's keys: the reference's other modes never run it


def premature_layers(model: Any, dola_layers: str | list[int]) -> list[int]:
    """The candidate premature layers (0: the embeddings, i: the input of layer i) for `dola_layers`, as the
    reference picks them: "low" every second layer of the first half (of the first 20 past 40 layers), "high" of
    the second half (of the last 20). With tied embeddings "low" starts at layer 2 (1 in a 2-layer model):
    layer 0 read through the embeddings' own transpose says little."""
    depth = len(model.base_model.layers)
    if not isinstance(dola_layers, str):
        outside = [i for i in dola_layers if i >= depth]
        if outside:
            raise ValueError(f"dola_layers: {outside[0]} is not an early layer of this {depth}-layer model (0 is the "
                             f"embeddings, {depth - 1} the last layer's input)")  # fmt: skip
        return list(dola_layers)
    half = depth // 2
    if dola_layers == "high":
        return list(range(half if depth <= 40 else depth - 20, depth, 2))
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    start = (2 if depth > 2 else depth - 1) if tied else 0
    layers = [start] if start == half else list(range(start, half if depth <= 40 else 20, 2))
    if not layers:
        raise ValueError(f"dola_layers='low' selects no layer of this {depth}-layer model with tied embeddings (its "
                         f"low layers start at {start}, its first half ends at {half}): pass 'high' or a list of "
                         "layer indices")  # fmt: skip
    return layers


@torch.no_grad()
def dola_steps(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: Any,
               layers: list[int]) -> Iterator[Step]:  # fmt: skip
    """DoLa decoding against the candidate premature `layers`: one Step per new token, whose `logits` are the
    final layer's and `scores` the processed contrast."""
    (B, P), dev = input_ids.shape, input_ids.device
    total = P + plan.max_new_tokens
    decoder, logits = _prefilled(model, input_ids, attention_mask, plan)
    head = model.get_output_embeddings()
    ids = input_ids
    eos = torch.tensor(plan.eos, device=dev) if plan.eos else None
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    for step in range(plan.max_new_tokens):
        cur = P + step
        hidden = decoder.recorded[1]
        early = torch.stack([head(hidden[i][:, -1]).float().to(dev) for i in layers])  # (layers, B, V)
        ids = _room(ids, cur + 1, total, plan.pad)
        tokens, scores, stopped = choose_tokens(plan, ids, cur, dola_logits(logits, early), finished, eos)
        stopped_now = stopped & ~finished
        finished = finished | stopped
        yield Step(tokens, logits, scores, finished, stopped_now, *_shown(plan, *decoder.recorded), decoder.cache)
        if step + 1 == plan.max_new_tokens or bool(finished.all()):
            return
        logits = decoder.step(tokens[:, None])


def dola_logits(final: torch.Tensor, early: torch.Tensor) -> torch.Tensor:
    """The contrast of the final logits (B, V) with the premature layer among `early` (L, B, V) whose distribution
    differs most from the final one, over the batch: final minus premature log-probabilities where the final
    layer gives at least RELATIVE_TOP of its top probability, -inf elsewhere."""
    premature = early[0]
    if early.shape[0] > 1:
        log_final, log_early = final.log_softmax(dim=-1), early.log_softmax(dim=-1)
        middle = 0.5 * (final.softmax(dim=-1)[None] + early.softmax(dim=-1))  # (L, B, V)
        # Jensen-Shannon: the mean of KL(middle || final) and KL(middle || early), each averaged over the vocabulary
        js = 0.5 * (F.kl_div(log_final[None], middle, reduction="none").mean(-1)
                    + F.kl_div(log_early, middle, reduction="none").mean(-1))  # (L, B)  # fmt: skip
        premature = early[int(js.mean(dim=-1).argmax())]
    log_final, log_premature = final.log_softmax(dim=-1), premature.log_softmax(dim=-1)
    plausible = log_final >= log_final.amax(dim=-1, keepdim=True) + math.log(RELATIVE_TOP)
    return torch.where(plausible, log_final - log_premature, -math.inf)
