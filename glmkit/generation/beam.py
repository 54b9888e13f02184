"""Beam search with the reference's exact bookkeeping (vectorised over batch and beams).

Per step: log-softmax, processors, add each beam's running score, keep the top K = max(2, 1 + #eos)
* num_beams continuations; those that hit a stop (EOS, length) compete, length-normalised, for the
num_beams finished slots; the best num_beams others keep running. The early-stop heuristic and
`early_stopping` (True / False / "never") decide when nothing better can come.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..outputs import ModelOutput
from .engine import Decoder

NEG = -1.0e9


@dataclass
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    sequences: torch.Tensor | None = None
    sequences_scores: torch.Tensor | None = None
    scores: tuple[torch.Tensor, ...] | None = None
    logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None  # (B * num_return_sequences, new tokens): the flat row each came from
    attentions: tuple[tuple[torch.Tensor, ...], ...] | None = None
    hidden_states: tuple[tuple[torch.Tensor, ...], ...] | None = None
    past_key_values: Any = None


def _take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Select along the beam axis (dim 1) of a (B, beams, ...) tensor."""
    return torch.take_along_dim(t, index.view(*index.shape, *([1] * (t.dim() - 2))), dim=1)


@torch.no_grad()
def beam_search(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: Any,
                inputs_embeds: torch.Tensor | None = None) -> GenerateBeamDecoderOnlyOutput:  # fmt: skip
    """Beams are rows of one `Decoder`; after each step its cache is reordered to the surviving beams.
    `inputs_embeds` (B, T, C) run in place of the prompt's ids (which may be empty, as in `decode_steps`)."""
    cfg, n = plan.config, plan.config.num_beams
    B, P = input_ids.shape
    L = P + plan.max_new_tokens
    dev = input_ids.device
    eos = torch.tensor(plan.eos, device=dev) if plan.eos else None
    keep = max(2, 1 + len(plan.eos)) * n
    top_n = torch.arange(keep, device=dev) < n
    fill = (plan.pad or plan.eos[0]) if plan.eos else -1  # the reference's fill value, quirks included
    running = torch.full((B, n, L), fill, dtype=torch.long, device=dev)
    running[:, :, :P] = input_ids[:, None]
    finished = running.clone()
    run_from = torch.full((B, n, L - P), -1, dtype=torch.int32, device=dev)  # beam_indices of the running beams
    fin_from = run_from.clone()
    run_scores = torch.zeros(B, n, device=dev)
    run_scores[:, 1:] = NEG  # all beams start identical: let only the first one expand
    fin_scores = torch.full((B, n), NEG, device=dev)
    is_fin = torch.zeros(B, n, dtype=torch.bool, device=dev)
    fin_len = torch.zeros(B, n, dtype=torch.long, device=dev)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=dev)
    first = running.view(B * n, L)[:, :P] if inputs_embeds is None else inputs_embeds.repeat_interleave(n, dim=0)
    decoder = Decoder(model, first.shape[1] + plan.max_new_tokens, record=plan.record)
    step_logits = decoder.prefill(first, attention_mask.repeat_interleave(n, dim=0))
    all_scores, all_logits, all_attentions, all_hidden = [], [], [], []
    offset = (torch.arange(B, device=dev) * n)[:, None]
    for cur in range(P, L):
        logits = step_logits
        log_probs = torch.log_softmax(logits, dim=-1)
        for processor in plan.processors:
            log_probs = processor(running.view(B * n, L)[:, :cur], log_probs)
        all_scores.append(log_probs)
        all_logits.append(logits)
        all_attentions.append(decoder.recorded[0])
        all_hidden.append(decoder.recorded[1])
        V = log_probs.shape[-1]
        total = (log_probs.view(B, n, V) + run_scores[:, :, None]).view(B, n * V)
        if cfg.do_sample:
            index = torch.multinomial(torch.softmax(total, dim=-1), num_samples=keep)
            top_lp = torch.gather(total, 1, index)
        else:
            top_lp, index = torch.topk(total, k=keep)
        source, token = index // V, index % V  # (B, K): which beam each continuation extends
        cand = _take(running, source)
        cand[:, :, cur] = token
        cand_from = _take(run_from, source)
        cand_from[:, :, cur - P] = (source + offset).int()
        hits = torch.isin(token, eos) if eos is not None else torch.zeros_like(token, dtype=torch.bool)
        if cur + 1 >= L:
            hits = torch.ones_like(hits)
        # the best num_beams continuations that did not stop keep running
        run_lp = top_lp + hits.float() * NEG
        nxt = torch.topk(run_lp, k=n)[1]
        running, run_scores, parent = _take(cand, nxt), _take(run_lp, nxt), _take(source, nxt) + offset
        run_from = _take(cand_from, nxt)
        # stopped ones among the first num_beams compete for the finished slots
        just = hits & top_n[None]
        norm = top_lp / ((cur + 1 - P) ** cfg.length_penalty)
        full = is_fin.all(-1, keepdim=True) & (cfg.early_stopping is True)
        norm = norm + full.float() * NEG + (~improvable).float() * NEG + (~just) * NEG
        merged = torch.cat((fin_scores, norm), dim=1)
        best = torch.topk(merged, k=n)[1]
        finished = _take(torch.cat((finished, cand), dim=1), best)
        fin_from = _take(torch.cat((fin_from, cand_from), dim=1), best)
        fin_scores = _take(merged, best)
        is_fin = _take(torch.cat((is_fin, just), dim=1), best)
        fin_len = _take(torch.cat((fin_len, torch.full_like(token, cur + 1 - P)), dim=1), best)
        decoder.cache.reorder(parent.flatten())
        length = cur + 1 - P
        if cfg.early_stopping == "never" and cfg.length_penalty > 0.0:
            length = L - P
        best_running = run_scores[:, :1] / (length**cfg.length_penalty)
        worst_finished = torch.where(is_fin, fin_scores.min(dim=1, keepdim=True)[0], NEG)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        open_beams = not (bool(is_fin.all()) and cfg.early_stopping is True)
        if not (bool(improvable.any()) and open_beams and not bool(hits.all())):
            break
        step_logits = decoder.step(running.view(B * n, L)[:, cur : cur + 1])
    r = cfg.num_return_sequences
    length = P + int(fin_len[:, :r].max())
    return GenerateBeamDecoderOnlyOutput(
        sequences=finished[:, :r].reshape(B * r, L)[:, :length],
        sequences_scores=fin_scores[:, :r].reshape(B * r),
        scores=tuple(all_scores),
        logits=tuple(all_logits),
        beam_indices=fin_from[:, :r].reshape(B * r, L - P)[:, : length - P],
        attentions=tuple(all_attentions) if plan.record[0] else None,
        hidden_states=tuple(all_hidden) if plan.record[1] else None,
        past_key_values=decoder.cache,
    )
