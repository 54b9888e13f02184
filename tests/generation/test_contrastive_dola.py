"""Contrastive search and DoLa decoding against oracles written here from the algorithms as transformers 4.52.4
runs them (later releases fetch them from the Hub as remote code, so 4.56.2 cannot serve as the oracle).

Each oracle runs glmkit's own full forward (no cache, output_hidden_states=True) over the whole sequence at
every step, so what is checked is the cached, batched, padded implementation against the plain algorithm;
glmkit's forward itself is checked against the reference elsewhere. scripts/check_contrastive_dola_452.py
compares against transformers 4.52.4 itself (run by hand; its results are in handoff/contrastive-dola.md).
"""

from __future__ import annotations

import math
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DECODERS, VOCAB, reference_and_ours
from transformers.generation import logits_process as hf

from glmkit.generation.contrastive import premature_layers

P, NEW, PAD = 7, 10, 0


@pytest.fixture(scope="module", params=sorted(TINY_DECODERS))
def model(request, tmp_path_factory):
    return reference_and_ours(request.param, tmp_path_factory.mktemp(request.param) / "model")[1]


def prompts(padded: bool, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (batch, P), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    if padded:  # left padding of different lengths
        ids[1, :3], mask[1, :3] = PAD, 0
        ids[2, :1], mask[2, :1] = PAD, 0
    return ids, mask


def full_forward(model, ids: torch.Tensor, mask: torch.Tensor, attentions: bool = False):
    """The whole sequence at once, positions counting the real tokens (padding at 1, as generate places it)."""
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    return model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                 output_hidden_states=True, output_attentions=attentions)  # fmt: skip


def processors(repetition_penalty: float = 1.0, temperature: float = 1.0, top_p: float = 1.0):
    chain = hf.LogitsProcessorList()
    if repetition_penalty != 1.0:
        chain.append(hf.RepetitionPenaltyLogitsProcessor(repetition_penalty))
    if temperature != 1.0:
        chain.append(hf.TemperatureLogitsWarper(temperature))
    if top_p < 1.0:
        chain.append(hf.TopPLogitsWarper(top_p))
    return chain


def finish(out: torch.Tensor, fed: torch.Tensor, mask: torch.Tensor, token: torch.Tensor, stop: torch.Tensor,
           eos: list[int]):  # fmt: skip
    """Append one token per row: pad for rows already stopped (in the output; `fed` is what the model saw)."""
    shown = torch.where(stop, torch.full_like(token, PAD), token)
    stop = stop | torch.isin(shown, torch.tensor(eos or [-1]))
    return torch.cat([out, shown[:, None]], 1), torch.cat([fed, token[:, None]], 1), F.pad(mask, (0, 1), value=1), stop


@torch.no_grad()
def contrastive_oracle(model, ids, mask, top_k: int, alpha: float, eos: list[int] | None = None, **options):
    """Per step: the top_k tokens of the processed distribution; for each, a full forward of the sequence with
    it appended; keep the one maximising (1 - alpha) * p - alpha * max cosine(its last hidden state, those of
    the earlier real tokens). A stopped row shows pad, while the model keeps seeing the candidate it chose."""
    chain = processors(**options)
    out, fed, stop = ids, ids, torch.zeros(ids.shape[0], dtype=torch.bool)
    all_scores, all_logits = [], []
    for _ in range(NEW):
        state = full_forward(model, fed, mask)
        context = state.hidden_states[-1]  # (B, S, C)
        logits = state.logits[:, -1].float()
        scores = chain(out, logits.clone())
        probs, candidates = torch.softmax(scores, -1).topk(top_k, dim=-1)
        values = []
        for j in range(top_k):
            extended = torch.cat([fed, candidates[:, j : j + 1]], 1)
            h = full_forward(model, extended, F.pad(mask, (0, 1), value=1)).hidden_states[-1][:, -1]  # (B, C)
            cosine = F.cosine_similarity(h[:, None], context, dim=-1, eps=1e-30)  # (B, S)
            penalty = cosine.masked_fill(mask == 0, -2.0).max(-1).values
            values.append((1 - alpha) * probs[:, j] - alpha * penalty)
        best = torch.stack(values, 1).argmax(-1)
        token = candidates[torch.arange(len(best)), best]
        out, fed, mask, stop = finish(out, fed, mask, token, stop, eos)
        all_scores.append(scores)
        all_logits.append(logits)
        if bool(stop.all()):
            break
    return out, all_scores, all_logits


def select_premature(final: torch.Tensor, early: list[torch.Tensor]) -> torch.Tensor:
    """The reference's divergence (4.52.4 `_dola_select_contrast`): 0.5 * (KL(M || final) + KL(M || early)),
    each averaged over the vocabulary, M the mean of the two distributions; averaged over the batch."""
    if len(early) == 1:
        return early[0]
    p = torch.softmax(final, -1)
    divergences = []
    for logits in early:
        q = torch.softmax(logits, -1)
        m = 0.5 * (p + q)
        kl_p = (m * (m.log() - torch.log_softmax(final, -1))).mean(-1)
        kl_q = (m * (m.log() - torch.log_softmax(logits, -1))).mean(-1)
        divergences.append((0.5 * (kl_p + kl_q)).mean())
    return early[int(torch.stack(divergences).argmax())]


@torch.no_grad()
def dola_oracle(model, ids, mask, layers: list[int], eos: list[int] | None = None, do_sample: bool = False,
                **options):  # fmt: skip
    """Per step: lm_head on the last position's input of each candidate layer (0: the embeddings); the most
    divergent one is subtracted in log-probabilities from the final layer's, on the tokens with at least a tenth
    of its top probability (-inf elsewhere); processors; argmax or one multinomial draw."""
    chain = processors(**options)
    out, stop = ids, torch.zeros(ids.shape[0], dtype=torch.bool)
    all_scores, all_logits = [], []
    for _ in range(NEW):
        state = full_forward(model, out, mask)
        final = state.logits[:, -1].float()
        early = [model.lm_head(state.hidden_states[i][:, -1]).float() for i in layers]
        log_final, log_early = torch.log_softmax(final, -1), torch.log_softmax(select_premature(final, early), -1)
        plausible = log_final >= log_final.max(-1, keepdim=True).values + math.log(0.1)
        scores = chain(out, torch.where(plausible, log_final - log_early, -math.inf))
        token = torch.multinomial(torch.softmax(scores, -1), 1)[:, 0] if do_sample else scores.argmax(-1)
        out, _, mask, stop = finish(out, out, mask, token, stop, eos)
        all_scores.append(scores)
        all_logits.append(final)
        if bool(stop.all()):
            break
    return out, all_scores, all_logits


def compare(got, want) -> None:
    sequences, scores, logits = want
    assert got.sequences.tolist() == sequences.tolist()
    assert len(got.scores) == len(scores) == len(got.logits) == len(logits)
    for step, (g, w) in enumerate(zip(got.scores, scores)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5, msg=lambda m, step=step: f"scores at step {step}: {m}")
    for step, (g, w) in enumerate(zip(got.logits, logits)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=2e-5, msg=lambda m, step=step: f"logits at step {step}: {m}")


def generate(model, ids, mask, **kwargs):
    return model.generate(ids, attention_mask=mask, max_new_tokens=NEW, return_dict_in_generate=True,
                          output_scores=True, output_logits=True, **kwargs)  # fmt: skip


def early_eos(model, ids, mask, **kwargs) -> tuple[list[int], int]:
    """EOS ids (the model config's 1 too) that stop row 0 mid-way when nothing else stops it, and where."""
    row = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None, **kwargs)[0, P:].tolist()
    at = next(i for i in range(2, NEW - 1) if row[i] not in row[:i])  # its first appearance
    at = row.index(1) if 1 in row[:at] else at
    return [row[at], 1], P + at


def differs_from_greedy(model, ids, mask, sequences) -> bool:
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None)
    return greedy.tolist() != sequences.tolist()


# ---- contrastive search ---------------------------------------------------------------------------


@pytest.mark.parametrize("padded", [False, True], ids=["aligned", "left-padded"])
@pytest.mark.parametrize("top_k,alpha", [(4, 0.6), (2, 0.3), (7, 0.9)])
def test_contrastive_search_matches_oracle(model, top_k, alpha, padded):
    ids, mask = prompts(padded)
    got = generate(model, ids, mask, penalty_alpha=alpha, top_k=top_k, eos_token_id=None)
    want = contrastive_oracle(model, ids, mask, top_k, alpha)
    compare(got, want)
    if (top_k, alpha) == (4, 0.6):  # the penalty must matter, or the comparison proves nothing
        assert differs_from_greedy(model, ids, mask, want[0])


def test_contrastive_search_eos_and_repetition_penalty(model):
    ids, mask = prompts(padded=True)
    options = dict(penalty_alpha=0.6, top_k=4, repetition_penalty=1.3)
    eos, at = early_eos(model, ids, mask, **options)
    got = generate(model, ids, mask, eos_token_id=eos, **options)
    want = contrastive_oracle(model, ids, mask, 4, 0.6, eos, repetition_penalty=1.3)
    compare(got, want)
    assert want[0][0, at] == eos[0] and (want[0][0, at + 1 :] == PAD).all()  # row 0 stopped and was padded


def test_contrastive_search_single_row_stops_at_eos(model):
    ids, mask = prompts(False, batch=1)
    eos, at = early_eos(model, ids, mask, penalty_alpha=0.6, top_k=4)
    got = model.generate(ids, max_new_tokens=NEW, penalty_alpha=0.6, top_k=4, eos_token_id=eos)
    assert got.tolist() == contrastive_oracle(model, ids, mask, 4, 0.6, eos)[0].tolist()
    assert got.shape[1] == at + 1  # ends with its EOS, no padding after it


def test_contrastive_search_streams_the_same_tokens(model):
    ids, mask = prompts(padded=True)
    options = dict(max_new_tokens=NEW, penalty_alpha=0.6, top_k=4, eos_token_id=None)
    whole = model.generate(ids, attention_mask=mask, **options)
    chunks = list(model.stream(ids, attention_mask=mask, **options))
    streamed = [sum((c.token_ids[row] for c in chunks), []) for row in range(ids.shape[0])]
    assert streamed == whole[:, P:].tolist()


def test_contrastive_search_with_compile_warns_and_runs_plain(model):
    ids, mask = prompts(padded=False, batch=1)
    options = dict(max_new_tokens=4, penalty_alpha=0.6, top_k=4, eos_token_id=None)
    with pytest.warns(UserWarning, match="contrastive search .* plain decode path"):
        got = model.generate(ids, cache_implementation="static", **options)
    assert got.tolist() == model.generate(ids, **options).tolist()


# ---- DoLa -------------------------------------------------------------------------------------------


def candidate_layers(model, dola_layers) -> list[int]:
    """What "low" / "high" mean for these 2-layer models, written out from the reference's rule: untied
    embeddings, low [0] and high [1]; tied (XGLM), both [1] (layer 0 would read the embeddings back)."""
    if isinstance(dola_layers, list):
        return dola_layers
    tied = model.config.tie_word_embeddings
    return {("low", False): [0], ("high", False): [1], ("low", True): [1], ("high", True): [1]}[dola_layers, tied]


@pytest.mark.parametrize("padded", [False, True], ids=["aligned", "left-padded"])
@pytest.mark.parametrize("dola_layers", ["low", "high", [0, 1], [1, 0, 1]], ids=str)
def test_dola_greedy_matches_oracle(model, dola_layers, padded):
    ids, mask = prompts(padded)
    got = generate(model, ids, mask, dola_layers=dola_layers, repetition_penalty=1.2, eos_token_id=None)
    want = dola_oracle(model, ids, mask, candidate_layers(model, dola_layers), repetition_penalty=1.2)
    compare(got, want)
    if dola_layers == [0, 1] and padded:
        assert differs_from_greedy(model, ids, mask, want[0])


def test_dola_eos(model):
    ids, mask = prompts(padded=True)
    options = dict(dola_layers=[0, 1], repetition_penalty=1.2)
    eos, at = early_eos(model, ids, mask, **options)
    got = generate(model, ids, mask, eos_token_id=eos, **options)
    want = dola_oracle(model, ids, mask, [0, 1], eos, repetition_penalty=1.2)
    compare(got, want)
    assert want[0][0, at] == eos[0] and (want[0][0, at + 1 :] == PAD).all()


@pytest.mark.parametrize("dola_layers", ["high", [0, 1]], ids=str)
def test_dola_sampling_matches_oracle(model, dola_layers):
    ids, mask = prompts(padded=True)
    options = dict(temperature=0.8, top_p=0.9)
    torch.manual_seed(11)
    got = generate(model, ids, mask, dola_layers=dola_layers, do_sample=True, top_k=0, eos_token_id=None, **options)
    torch.manual_seed(11)
    want = dola_oracle(model, ids, mask, candidate_layers(model, dola_layers), do_sample=True, **options)
    compare(got, want)


def test_dola_picks_layers_per_depth():
    """The reference's rule (4.52.4 `_dola_decoding`), written out: N <= 40 layers: low range(start, N // 2, 2),
    high range(N // 2, N, 2); N > 40: range(start, 20, 2) and range(N - 20, N, 2); start 0, or with tied
    embeddings 2 (1 for N = 2, 0 for N = 1); low is [start] when start == N // 2."""

    def fake(depth: int, tied: bool):
        base = types.SimpleNamespace(layers=[None] * depth)
        return types.SimpleNamespace(base_model=base, config=types.SimpleNamespace(tie_word_embeddings=tied))

    expected = {
        (1, False): ([0], [0]), (1, True): ([0], [0]), (2, False): ([0], [1]), (2, True): ([1], [1]),
        (4, True): ([2], [2]), (5, True): ([2], [2, 4]), (10, False): ([0, 2, 4], [5, 7, 9]),
        (10, True): ([2, 4], [5, 7, 9]), (40, False): (list(range(0, 20, 2)), list(range(20, 40, 2))),
        (41, True): (list(range(2, 20, 2)), list(range(21, 41, 2))),
        (60, False): (list(range(0, 20, 2)), list(range(40, 60, 2))),
    }  # fmt: skip
    for (depth, tied), (low, high) in expected.items():
        assert premature_layers(fake(depth, tied), "low") == low, (depth, tied)
        assert premature_layers(fake(depth, tied), "high") == high, (depth, tied)
    assert premature_layers(fake(10, False), [3, 0, 9]) == [3, 0, 9]


# ---- per-layer outputs and the returned cache ------------------------------------------------------------


MODES = [dict(penalty_alpha=0.6, top_k=4), dict(dola_layers=[0, 1], repetition_penalty=1.2)]


@pytest.mark.parametrize("mode", MODES, ids=["contrastive", "dola"])
def test_attentions_hidden_states_and_returned_cache(model, mode):
    """Per step, the attentions and hidden states of the pass its logits came from (the prompt's, then the chosen
    token's), as a full forward of the final sequences gives them; the cache holds every token but the last, one
    row per prompt, and greedy decoding continues from it as from scratch."""
    ids, mask = prompts(padded=True)
    whole = F.pad(mask, (0, NEW), value=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # glmkit's sdpa models compute attention weights eagerly, and say so
        out = generate(model, ids, mask, eos_token_id=None, output_attentions=True, output_hidden_states=True, **mode)
        full = full_forward(model, out.sequences, whole, attentions=True)
    depth = len(model.base_model.layers)
    assert len(out.hidden_states) == len(out.attentions) == NEW
    for t in range(NEW):
        q = slice(0, P) if t == 0 else slice(P + t - 1, P + t)
        real = mask.bool() if t == 0 else torch.ones(ids.shape[0], 1, dtype=torch.bool)  # padding's are arbitrary
        assert len(out.hidden_states[t]) == depth + 1 and len(out.attentions[t]) == depth
        for layer, (got, want) in enumerate(zip(out.hidden_states[t], full.hidden_states)):
            torch.testing.assert_close(got[real], want[:, q][real], rtol=1e-5, atol=2e-5,
                                       msg=f"hidden {layer} at step {t}")  # fmt: skip
        for layer, (got, want) in enumerate(zip(out.attentions[t], full.attentions)):
            want = want[:, :, q, : q.stop]  # (B, H, queries, keys)
            torch.testing.assert_close(got.transpose(1, 2)[real], want.transpose(1, 2)[real], rtol=1e-5, atol=2e-5,
                                       msg=f"attentions {layer} at step {t}")  # fmt: skip
    cache = out.past_key_values
    assert cache.get_seq_length() == P + NEW - 1 and cache.lengths.shape[0] == ids.shape[0]
    more = dict(attention_mask=whole, max_new_tokens=3, eos_token_id=None)
    assert model.generate(out.sequences, past_key_values=cache, **more).tolist() == \
        model.generate(out.sequences, **more).tolist()  # fmt: skip


@pytest.mark.parametrize("mode", MODES, ids=["contrastive", "dola"])
def test_inputs_embeds_and_past_key_values_refused(model, mode):
    ids, mask = prompts(padded=False, batch=1)
    with pytest.raises(NotImplementedError, match="input_ids only"):
        model.generate(inputs_embeds=model.get_input_embeddings()(ids), max_new_tokens=3, **mode)
    cache = model.generate(ids, max_new_tokens=2, return_dict_in_generate=True).past_key_values
    with pytest.raises(NotImplementedError, match="input_ids only"):
        model.generate(torch.cat([ids, ids[:, :3]], 1), past_key_values=cache, max_new_tokens=3, **mode)


# ---- refused settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,message", [
    (dict(penalty_alpha=0.6, top_k=1), "top_k` > 1"),
    (dict(penalty_alpha=0.6, top_k=None), "top_k` > 1"),
    (dict(penalty_alpha=0.6, top_k=4, do_sample=True), "do_sample=False"),
    (dict(penalty_alpha=0.6, top_k=4, num_beams=2), "num_beams` = 1"),
    (dict(penalty_alpha=1.5, top_k=4), r"penalty_alpha.*\[0, 1\]"),
    (dict(penalty_alpha=-0.1, top_k=4), r"penalty_alpha.*\[0, 1\]"),
    (dict(penalty_alpha=0.6, top_k=VOCAB + 1), "larger than the vocabulary"),
    (dict(penalty_alpha=0.6, top_k=4, dola_layers="low"), "no `dola_layers`"),
    (dict(penalty_alpha=0.6, top_k=4, prompt_lookup_num_tokens=3), "speculative decoding"),
    (dict(dola_layers="middle"), "'low', 'high'"),
    (dict(dola_layers=[]), "non-empty list"),
    (dict(dola_layers=[0, -1]), "non-empty list"),
    (dict(dola_layers=[0.5]), "non-empty list"),
    (dict(dola_layers=[True]), "non-empty list"),
    (dict(dola_layers=[0, 2]), "2 is not an early layer of this 2-layer model"),
    (dict(dola_layers="low", num_beams=2), "num_beams` = 1"),
    (dict(dola_layers=[0], prompt_lookup_num_tokens=3), "speculative decoding"),
])  # fmt: skip
def test_refused_settings(model, kwargs, message):
    ids, _ = prompts(False, batch=1)
    with pytest.raises(ValueError, match=message):
        model.generate(ids, max_new_tokens=3, **kwargs)


def test_penalty_alpha_must_be_a_number(model):
    with pytest.raises(TypeError, match="penalty_alpha"):
        model.generate(prompts(False, batch=1)[0], max_new_tokens=3, penalty_alpha="0.6")


def test_dola_low_on_a_too_shallow_tied_model(tmp_path):
    """A 3-layer model with tied embeddings has no "low" layer (they start at 2, its first half ends at 1)."""
    model = reference_and_ours("xglm", tmp_path / "model", num_layers=3)[1]
    with pytest.raises(ValueError, match="dola_layers='low' selects no layer of this 3-layer model"):
        model.generate(prompts(False, batch=1)[0], max_new_tokens=3, dola_layers="low")
    out = model.generate(prompts(False, batch=1)[0], max_new_tokens=3, dola_layers="high")  # high is [1]
    assert out.shape == (1, P + 3)


def test_penalty_alpha_zero_is_greedy(model):
    ids, mask = prompts(padded=True)
    greedy = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, eos_token_id=None, penalty_alpha=0.0)
    assert got.tolist() == greedy.tolist()
