"""Group (diverse) and constrained beam search, with the bookkeeping of the reference's older beam scorer.

These two modes still run on the reference's per-prompt scorer, which differs from `beam.py`'s vectorised
search in ways that change results: per prompt (and per group of beams) a list of finished hypotheses scored
sum_logprobs / generated_len ** length_penalty; its "done" test uses the best candidate of the step, EOS ones
included; a done prompt keeps decoding pad tokens from batch row 0's first beam (of its group); finished rows
end with the first EOS id whichever one stopped them. Selection walks the ranked candidates in Python, as the
reference does: these modes are not on any fast path.

Group beam search splits the beams into groups decoded one after another within each step; `HammingDiversity`
lowers the scores of tokens that earlier groups chose at this step. Constrained beam search re-ranks each
step's beams so that beams that produced more constraint tokens ("banks") are kept alongside the best ones.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .beam import NEG, GenerateBeamDecoderOnlyOutput
from .constraints import ConstraintProgress, build_constraints
from .engine import Decoder
from .processors import HammingDiversity

Chosen = list[tuple[float, int, int]]  # (running score, token, parent row) per kept beam


class Hypotheses:
    """The best `size` finished hypotheses of one prompt (or one group of its beams)."""

    def __init__(self, size: int, config: Any, max_new_tokens: int):
        self.size, self.config, self.max_new_tokens = size, config, max_new_tokens
        self.items: list[tuple[float, torch.Tensor]] = []  # (normalised score, prompt + new ids)
        self.worst = 1e9

    def add(self, ids: torch.Tensor, logprob_sum: float, generated: int) -> None:
        score = logprob_sum / generated**self.config.length_penalty
        if len(self.items) < self.size or score > self.worst:
            self.items.append((score, ids))
            if len(self.items) > self.size:
                ranked = sorted((s, i) for i, (s, _) in enumerate(self.items))
                del self.items[ranked[0][1]]
                self.worst = ranked[1][0]
            else:
                self.worst = min(score, self.worst)

    def done(self, best_logprob_sum: float, generated: int) -> bool:
        """Full, and no running beam can beat the worst kept one (early_stopping=True: full is enough)."""
        cfg = self.config
        if len(self.items) < self.size:
            return False
        if cfg.early_stopping is True:
            return True
        if cfg.early_stopping == "never" and cfg.length_penalty > 0.0:
            generated = self.max_new_tokens
        return self.worst >= best_logprob_sum / generated**cfg.length_penalty


class _Search:
    """State shared by both searches: B prompts x n beams as rows of one Decoder, row b * n + beam."""

    def __init__(self, model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: Any, groups: int):
        self.plan, self.cfg = plan, plan.config
        self.n, self.width = plan.config.num_beams, plan.config.num_beams // groups
        self.B, self.P = input_ids.shape
        self.L = self.P + plan.max_new_tokens
        self.eos = set(plan.eos)
        self.keep = max(2, 1 + len(plan.eos)) * self.width  # candidates ranked per prompt (and group)
        self.running = torch.zeros(self.B * self.n, self.L, dtype=torch.long, device=input_ids.device)
        self.running[:, : self.P] = input_ids.repeat_interleave(self.n, dim=0)
        # the first beam of each group starts alone, so that a group's beams do not all pick the same tokens
        self.scores = torch.full((self.B, self.n), NEG, device=input_ids.device)
        self.scores[:, :: self.width] = 0.0
        self.scores = self.scores.view(-1)
        self.decoder = Decoder(model, self.L)
        self.logits = self.decoder.prefill(self.running[:, : self.P], attention_mask.repeat_interleave(self.n, dim=0))

    def candidates(self, total: torch.Tensor) -> tuple[list, list, list]:
        """Per prompt, the `keep` best (score, token, beam within the group) of `total` (B * width, V): the
        running scores plus the processed log-probabilities."""
        V = total.shape[-1]
        top, index = torch.topk(total.view(self.B, -1), self.keep, dim=1)
        return top.tolist(), (index % V).tolist(), (index // V).tolist()

    def walk(self, hyps: Hypotheses, top: list[float], tokens: list[int], beams: list[int], first_row: int,
             cur: int, accept: Callable[[torch.Tensor], bool] = lambda ids: True) -> Chosen:  # fmt: skip
        """The reference scorer's pass over one prompt's ranked candidates: an EOS among the first `width`
        becomes a hypothesis (if `accept`s its ids), the first `width` others run on."""
        chosen: Chosen = []
        for rank, (score, token, beam) in enumerate(zip(top, tokens, beams)):
            row = first_row + beam
            if token in self.eos:
                if rank < self.width and accept(self.running[row, :cur]):
                    hyps.add(self.running[row, :cur].clone(), score, cur + 1 - self.P)
            else:
                chosen.append((score, token, row))
                if len(chosen) == self.width:
                    break
        return chosen

    def idle(self, first_row: int) -> Chosen:
        """What a done prompt's beams carry on with: pad tokens from row `first_row` (the reference's index 0)."""
        return [(0.0, self.plan.pad, first_row)] * self.width

    def advance(self, chosen: Chosen, cur: int) -> None:
        """Apply the kept beams (one entry per row) and reorder the cache to their parents."""
        scores, tokens, parents = zip(*chosen)
        dev = self.running.device
        parents = torch.tensor(parents, device=dev)
        self.scores = torch.tensor(scores, device=dev)
        self.running = self.running[parents]
        self.running[:, cur] = torch.tensor(tokens, device=dev)
        self.decoder.cache.reorder(parents)

    def output(self, best: list[list[tuple[float, torch.Tensor]]], all_scores: list, all_logits: list
               ) -> GenerateBeamDecoderOnlyOutput:  # fmt: skip
        """Sequences padded to the longest (+1 for an EOS, within max length); a shorter one ends with the first
        EOS id (the reference appends it, whichever EOS stopped the hypothesis)."""
        chosen = [item for items in best for item in items]
        lengths = [len(ids) for _, ids in chosen]
        width = min(max(lengths) + 1, self.L)
        pad = self.plan.pad if self.plan.pad is not None else 0
        sequences = torch.full((len(chosen), width), pad, dtype=torch.long, device=self.running.device)
        for i, (_, ids) in enumerate(chosen):
            sequences[i, : len(ids)] = ids
            if len(ids) < width:
                sequences[i, len(ids)] = self.plan.eos[0]
        return GenerateBeamDecoderOnlyOutput(
            sequences=sequences,
            sequences_scores=torch.tensor([s for s, _ in chosen], device=self.running.device),
            scores=tuple(all_scores),
            logits=tuple(all_logits),
        )

    def best(self, hyps: Sequence[Hypotheses]) -> list[tuple[float, torch.Tensor]]:
        ranked = sorted((item for h in hyps for item in h.items), key=lambda item: item[0])
        return ranked[::-1][: self.cfg.num_return_sequences]


@torch.no_grad()
def group_beam_search(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      plan: Any) -> GenerateBeamDecoderOnlyOutput:  # fmt: skip
    """Diverse beam search: num_beam_groups groups of num_beams / num_beam_groups beams, decoded group after
    group within each step; `scores` are the processed log-probabilities (diversity penalty included)."""
    G = plan.config.num_beam_groups
    s = _Search(model, input_ids, attention_mask, plan, G)
    B, n, w = s.B, s.n, s.width
    diversity = next((p for p in plan.processors if isinstance(p, HammingDiversity)), None)
    hyps = [[Hypotheses(w, s.cfg, plan.max_new_tokens) for _ in range(G)] for _ in range(B)]
    done = [[False] * G for _ in range(B)]
    group_rows = [(torch.arange(B)[:, None] * n + g * w + torch.arange(w)).flatten() for g in range(G)]
    all_scores, all_logits = [], []
    for cur in range(s.P, s.L):
        log_probs = torch.log_softmax(s.logits, dim=-1)
        processed = torch.empty_like(log_probs)
        chosen: Chosen = []
        picked = torch.zeros(B, n, dtype=torch.long, device=log_probs.device)  # this step's tokens, per group
        for g, rows in enumerate(group_rows):
            rows = rows.to(log_probs.device)
            if diversity is not None:
                diversity.earlier_tokens = picked[:, : g * w]
            group_lp = log_probs[rows]
            for processor in plan.processors:
                group_lp = processor(s.running[rows, :cur], group_lp)
            processed[rows] = group_lp
            top, tokens, beams = s.candidates(group_lp + s.scores[rows, None])
            kept: Chosen = []
            for b in range(B):
                if done[b][g]:
                    kept += s.idle(g * w)
                    continue
                kept += s.walk(hyps[b][g], top[b], tokens[b], beams[b], b * n + g * w, cur)
                done[b][g] = hyps[b][g].done(top[b][0], cur + 1 - s.P)
            picked[:, g * w : (g + 1) * w] = torch.tensor([t for _, t, _ in kept]).view(B, w)
            chosen += kept
        # rows are ordered b * n + beam; `chosen` is group-major: put it in row order
        chosen = [chosen[g * B * w + b * w + k] for b in range(B) for g in range(G) for k in range(w)]
        all_scores.append(processed)
        all_logits.append(s.logits)
        s.advance(chosen, cur)
        if all(map(all, done)) or cur + 1 == s.L:
            break
        s.logits = s.decoder.step(s.running[:, cur : cur + 1])
    for b in range(B):
        for g in range(G):
            if not done[b][g]:
                for row in range(b * n + g * w, b * n + (g + 1) * w):
                    hyps[b][g].add(s.running[row, : cur + 1], float(s.scores[row]), cur + 1 - s.P)
    return s.output([s.best(hyps[b]) for b in range(B)], all_scores, all_logits)


@torch.no_grad()
def constrained_beam_search(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            plan: Any) -> GenerateBeamDecoderOnlyOutput:  # fmt: skip
    """Beam search whose output must contain every constraint (`force_words_ids` / `constraints`); a finished
    hypothesis counts only once it does. `scores` are the running scores plus the processed log-probabilities
    (cumulative, as the reference returns them in this mode)."""
    cfg = plan.config
    constraints = build_constraints(cfg.force_words_ids, cfg.constraints)
    vocab = model.get_output_embeddings().out_features
    outside = [t for t in _flat(cfg.force_words_ids) if t >= vocab]
    if outside:
        raise ValueError(f"`force_words_ids` token {outside[0]} is outside the model's vocabulary (0..{vocab - 1})")
    s = _Search(model, input_ids, attention_mask, plan, 1)
    B, n = s.B, s.n
    hyps = [Hypotheses(n, cfg, plan.max_new_tokens) for _ in range(B)]
    done = [False] * B

    def completes(ids: list[int]) -> bool:
        progress = ConstraintProgress(constraints)
        progress.reset(ids)
        return progress.completed

    all_scores, all_logits = [], []
    for cur in range(s.P, s.L):
        log_probs = torch.log_softmax(s.logits, dim=-1)
        for processor in plan.processors:
            log_probs = processor(s.running[:, :cur], log_probs)
        total = log_probs + s.scores[:, None]
        all_scores.append(total)
        all_logits.append(s.logits)
        top, tokens, beams = s.candidates(total)
        chosen: Chosen = []
        for b in range(B):
            if done[b]:
                chosen += s.idle(0)
                continue
            kept = s.walk(hyps[b], top[b], tokens[b], beams[b], b * n, cur,
                          accept=lambda ids: completes(ids.tolist()))  # fmt: skip
            chosen += _rank_by_bank(s, constraints, kept, total, b * n, cur)
            done[b] = hyps[b].done(top[b][0], cur + 1 - s.P)
        s.advance(chosen, cur)
        if all(done) or cur + 1 == s.L:
            break
        s.logits = s.decoder.step(s.running[:, cur : cur + 1])
    for b in range(B):
        if done[b]:
            continue
        rows = range(b * n, (b + 1) * n)
        complete = [row for row in rows if completes(s.running[row, : cur + 1].tolist())]
        if len(complete) < cfg.num_return_sequences:  # too few meet the constraints: return the others too
            complete += [row for row in rows if row not in complete]
        for row in complete:
            hyps[b].add(s.running[row, : cur + 1], float(s.scores[row]), cur + 1 - s.P)
    return s.output([s.best([h]) for h in hyps], all_scores, all_logits)


def _rank_by_bank(s: _Search, constraints: list[Any], kept: Chosen, total: torch.Tensor, first: int,
                  cur: int) -> Chosen:  # fmt: skip
    """The reference's re-ranking of one prompt's beams: the kept ones plus, from each beam before this step,
    every token that advances a constraint; sorted by bank (constraint tokens produced) * 100 + score, then
    taken round-robin over banks (the best of each bank, then the second best, ...), num_beams of them."""
    n = s.width
    states, seen = [], set()
    for _, token, row in kept:
        seq = [*s.running[row, :cur].tolist(), token]
        states.append(ConstraintProgress(constraints))
        states[-1].reset(seq)
        seen.add(tuple(seq))
    extra: Chosen = []
    for row in range(first, first + n):
        before = s.running[row, :cur].tolist()
        progress = ConstraintProgress(constraints)
        progress.reset(before)
        if progress.completed:
            continue
        for token in progress.advance():
            state = progress.copy()
            state.add(token)
            if (*before, token) not in seen:
                seen.add((*before, token))
                extra.append((float(total[row, token]), token, row))
                states.append(state)
    if not extra:
        return kept
    everything = kept + extra
    banks = torch.tensor([state.bank() for state in states], device=total.device)
    scores = torch.tensor([score for score, _, _ in everything], device=total.device)
    order = (banks * 100 + scores).sort(descending=True).indices.tolist()
    ranks, previous, count = [], None, -1
    for bank in banks[order].tolist():
        count = count + 1 if bank == previous else 0
        ranks.append(count)
        previous = bank
    order = [order[i] for i in sorted(range(len(order)), key=ranks.__getitem__)][:n]
    return [everything[i] for i in order]


def _flat(force_words_ids: Any) -> list[int]:
    if force_words_ids is None:
        return []
    return [t for word in force_words_ids for part in word for t in (part if isinstance(part, list) else [part])]
