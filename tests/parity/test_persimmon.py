"""Persimmon parity: tiny random reference models saved by `transformers`, loaded by glmkit, compared in fp32.

Every variant the family has (qk-layernorm, rotary fraction, rope scaling, activation, tied embeddings,
attention implementation) is checked on logits, hidden states and loss; both classification heads with
each problem type; padded batches; cached decoding; save -> reference load; dtypes; config handling.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import assert_close, max_rel_diff, scale_weights
from transformers import DynamicCache

from glmkit.auto import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)
from glmkit.config import ConfigError
from glmkit.modeling import InputError
from glmkit.models.persimmon import (
    PersimmonConfig,
    PersimmonForCausalLM,
    PersimmonForSequenceClassification,
    PersimmonForTokenClassification,
    PersimmonModel,
    split_qkv,
)

# hidden 64 / 4 heads: head_dim 16, so rotary fractions 0.25 / 0.5 / 1.0 rotate 4 / 8 / 16 channels.
# max_position_embeddings is small so that sequences of 20+ tokens run past it (dynamic scaling kicks in).
BASE = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
)
MAX_POS = BASE["max_position_embeddings"]
RTOL = 1e-4
HEADS = {
    "causal": (transformers.PersimmonForCausalLM, PersimmonForCausalLM),
    "seq": (transformers.PersimmonForSequenceClassification, PersimmonForSequenceClassification),
    "tok": (transformers.PersimmonForTokenClassification, PersimmonForTokenClassification),
}
COMPARED: list[tuple[float, str]] = []  # every fp32 parity comparison, for the closing note


@pytest.fixture(scope="module", autouse=True)
def _report_worst(request: pytest.FixtureRequest):
    yield
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    if COMPARED and reporter is not None and capture is not None:
        worst, what = max(COMPARED)
        with capture.global_and_fixture_disabled():
            reporter.write_line(
                f"\npersimmon parity: worst fp32 relative difference {worst:.3g} ({what}) "
                f"over {len(COMPARED)} comparisons"
            )


def check(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = RTOL) -> None:
    COMPARED.append((max_rel_diff(expected, actual), what))
    assert_close(actual, expected, rtol, what)


def build(save_dir, head: str = "causal", attn: str = "sdpa", **overrides):
    """A reference model with scaled random weights, saved, and glmkit's load of that checkpoint."""
    ref_cls, ours_cls = HEADS[head]
    cfg = transformers.PersimmonConfig(**{**BASE, **overrides}, attn_implementation=attn)
    torch.manual_seed(0)
    ref = ref_cls(cfg)
    scale_weights(ref)
    ref.eval().save_pretrained(save_dir)
    ours = ours_cls.from_pretrained(save_dir, attn_implementation=attn)
    return ref, ours


def token_ids(B: int, T: int, seed: int = 1, low: int = 0) -> torch.Tensor:
    return torch.randint(low, BASE["vocab_size"], (B, T), generator=torch.Generator().manual_seed(seed))


def padded_batch(side: str, T: int = 12, pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows: full, 3 pads, 7 pads (on `side`); pad ids set to `pad`."""
    ids = token_ids(3, T, seed=2, low=1)
    mask = torch.ones(3, T, dtype=torch.long)
    for row, n in ((1, 3), (2, 7)):
        cols = slice(0, n) if side == "left" else slice(T - n, T)
        mask[row, cols] = 0
        ids[row, cols] = pad
    return ids, mask


# ---- layout --------------------------------------------------------------------------------------


def test_split_qkv_is_a_per_head_view():
    B, T, H, D = 2, 3, 4, 5
    fused = torch.randn(B, T, H * 3 * D)
    q, k, v = split_qkv(fused, H)
    for h in range(H):
        start = h * 3 * D  # head h's rows are q, k, v back to back
        assert torch.equal(q[:, :, h], fused[..., start : start + D])
        assert torch.equal(k[:, :, h], fused[..., start + D : start + 2 * D])
        assert torch.equal(v[:, :, h], fused[..., start + 2 * D : start + 3 * D])
    assert q.shape == (B, T, H, D) and q.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()


# ---- causal LM -----------------------------------------------------------------------------------

VARIANTS = {
    "default": {},
    "no-qk-layernorm": dict(qk_layernorm=False),
    "rotary-0.25": dict(partial_rotary_factor=0.25),
    "rotary-1.0-no-qkln": dict(partial_rotary_factor=1.0, qk_layernorm=False),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "linear-legacy-key-rotary-0.25": dict(
        rope_scaling={"type": "linear", "factor": 3.0}, partial_rotary_factor=0.25
    ),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    "dynamic-rotary-1.0-no-qkln": dict(
        rope_scaling={"rope_type": "dynamic", "factor": 4.0}, partial_rotary_factor=1.0, qk_layernorm=False
    ),
    "gelu-tied": dict(hidden_act="gelu", tie_word_embeddings=True),
    "silu": dict(hidden_act="silu", rope_theta=10000.0),
    "gelu_new-dropout-configured": dict(hidden_act="gelu_new", hidden_dropout=0.3, attention_dropout=0.3),
    "relu-tied-rotary-0.25": dict(hidden_act="relu", tie_word_embeddings=True, partial_rotary_factor=0.25),
    "gelu_pytorch_tanh": dict(hidden_act="gelu_pytorch_tanh"),
    "eager": dict(attn="eager"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_causal_lm_parity(save_dir, variant):
    overrides = dict(VARIANTS[variant])
    ref, ours = build(save_dir, **overrides)
    ours_state, ref_state = ours.state_dict(), ref.state_dict()
    assert ours_state.keys() == ref_state.keys()
    for name, tensor in ref_state.items():  # fused qkv and everything else kept exactly as stored
        assert torch.equal(ours_state[name], tensor), name
    labels = token_ids(2, 20, seed=3)
    labels[0, :4] = -100
    # past max_position_embeddings dynamic scaling raises its base; shorter calls keep the largest base
    # seen until one fits in max_position_embeddings, which resets it (the reference's stateful rule)
    dynamic = (overrides.get("rope_scaling") or {}).get("rope_type") == "dynamic"
    for T in (20, MAX_POS, MAX_POS + 2, 9) if dynamic else (20, 9):
        ids = token_ids(2, T, seed=T)
        kw = dict(labels=labels[:, :T], output_hidden_states=True)
        with torch.no_grad():
            expected, actual = ref(ids, **kw), ours(ids, **kw)
        check(actual.logits, expected.logits, f"{variant} T={T} logits")
        check(actual.loss, expected.loss, f"{variant} T={T} loss")
        assert len(actual.hidden_states) == len(expected.hidden_states) == BASE["num_hidden_layers"] + 1
        for i, (a, e) in enumerate(zip(actual.hidden_states, expected.hidden_states, strict=True)):
            check(a, e, f"{variant} T={T} hidden_states[{i}]")


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_padded_batch(save_dir, side, attn):
    ref, ours = build(save_dir, attn=attn, pad_token_id=0)
    ids, mask = padded_batch(side)
    kw = dict(attention_mask=mask, output_hidden_states=True, output_attentions=attn == "eager")
    with torch.no_grad():
        expected, actual = ref(ids, **kw), ours(ids, **kw)
    valid = mask.bool()  # rows that are all padding are defined differently: compare real tokens only
    what = f"{side}-padded {attn}"
    check(actual.logits[valid], expected.logits[valid], f"{what} logits")
    check(actual.hidden_states[-1][valid], expected.hidden_states[-1][valid], f"{what} last hidden")
    if attn == "eager":
        for a, e in zip(actual.attentions, expected.attentions, strict=True):
            check(a.transpose(1, 2)[valid], e.transpose(1, 2)[valid], f"{what} attention weights")


@pytest.mark.parametrize("variant", ["default", "no-qk-layernorm", "linear", "rotary-1.0-no-qkln"])
def test_cached_decoding_equals_full_forward(save_dir, variant):
    ref, ours = build(save_dir, pad_token_id=0, **VARIANTS[variant])
    ids, mask = padded_batch("left", T=MAX_POS + 6)  # decode past max_position_embeddings
    prompt = 5
    with torch.no_grad():
        full = ours(ids, attention_mask=mask).logits
        expected = ref(ids, attention_mask=mask).logits
        out = ours(ids[:, :prompt], attention_mask=mask[:, :prompt], use_cache=True)
        steps = [out.logits]
        for t in range(prompt, ids.shape[1]):
            cache = out.past_key_values
            out = ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=cache)
            steps.append(out.logits)
    cached = torch.cat(steps, dim=1)
    valid = mask.bool()
    check(cached[valid], full[valid], f"{variant} cached vs full forward")
    check(cached[valid], expected[valid], f"{variant} cached vs reference full forward")


def _decode(model, ids: torch.Tensor, prompt: int, cache) -> list[torch.Tensor]:
    """Prefill `prompt` tokens, then feed the rest one at a time; logits of every call."""
    out = model(ids[:, :prompt], past_key_values=cache, use_cache=True)
    logits = [out.logits]
    for t in range(prompt, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        logits.append(out.logits)
    return logits


@pytest.mark.parametrize("prompt", [6, MAX_POS + 4])
def test_dynamic_scaling_cached_decoding_matches_reference(save_dir, prompt):
    """Past max_position_embeddings, dynamic RoPE re-derives its base from the longest position seen, so
    cached decoding differs from a full forward; the reference defines that behaviour, and we match it."""
    ref, ours = build(save_dir, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    ids = token_ids(2, MAX_POS + 10, seed=5)
    with torch.no_grad():
        expected = _decode(ref, ids, prompt, DynamicCache())
        actual = _decode(ours, ids, prompt, None)
        for step, (a, e) in enumerate(zip(actual, expected, strict=True)):
            check(a, e, f"dynamic cached decode prompt={prompt} step {step}")
        for T in (MAX_POS + 2, 7):  # keeps the largest base seen, then resets to the original one
            later = token_ids(2, T, seed=6)
            check(ours(later).logits, ref(later).logits, f"dynamic full forward T={T} after decoding")
        if prompt < MAX_POS:  # within max_position_embeddings the cache changes nothing
            full = ours(ids[:, :MAX_POS]).logits
            check(torch.cat(actual, dim=1)[:, :MAX_POS], full, "dynamic cached vs full within max positions")


def test_training_gradients_and_dropout_match(save_dir):
    ref, ours = build(save_dir, hidden_dropout=0.25, attention_dropout=0.25)
    ref.train(), ours.train()
    ids, labels = token_ids(2, 10, seed=7), token_ids(2, 10, seed=8)
    torch.manual_seed(123)
    expected = ref(ids, labels=labels)
    torch.manual_seed(123)
    actual = ours(ids, labels=labels)
    check(actual.logits, expected.logits, "training with dropout logits")
    expected.loss.backward()
    actual.loss.backward()
    ref_params = dict(ref.named_parameters())
    for name, p in ours.named_parameters():
        check(p.grad, ref_params[name].grad, f"grad {name}")
    # dropout is live in training and off in eval
    torch.manual_seed(124)
    assert not torch.equal(ours(ids).logits, actual.logits)
    ours.eval()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, ours(ids).logits)


def test_gradient_checkpointing_gives_same_gradients(save_dir):
    _, ours = build(save_dir)
    ours.train()
    ids = token_ids(2, 10, seed=9)
    ours(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in ours.named_parameters()}
    ours.zero_grad()
    ours.model.gradient_checkpointing = True
    ours(ids, labels=ids).loss.backward()
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, plain[name], rtol=1e-5, atol=1e-7), name


# ---- classification heads ------------------------------------------------------------------------

MULTI_HOT = torch.tensor([[1.0, 0, 1], [0, 0, 1], [1, 1, 0]])
SEQ_CASES = {  # name: (num_labels, problem_type in config.json, labels)
    "regression": (1, "regression", lambda B: torch.randn(B)),
    "regression-3": (3, "regression", lambda B: torch.randn(B, 3)),
    "single-label": (3, "single_label_classification", lambda B: torch.tensor([0, 2, 1])),
    "multi-label": (3, "multi_label_classification", lambda B: MULTI_HOT),
    "inferred-regression": (1, None, lambda B: torch.randn(B)),
    "inferred-single-label": (4, None, lambda B: torch.tensor([3, 0, 1])),
    "inferred-multi-label": (2, None, lambda B: torch.tensor([[1.0, 0], [0, 1], [1, 1]])),
}


@pytest.mark.parametrize("case", SEQ_CASES)
def test_sequence_classification_parity(save_dir, case):
    num_labels, problem_type, make_labels = SEQ_CASES[case]
    ref, ours = build(save_dir, "seq", pad_token_id=0, num_labels=num_labels, problem_type=problem_type)
    ids, mask = padded_batch("right")
    ids[2, :4] = 0  # a left-padded row too: the pooled token is the rightmost non-pad one
    mask[2, :4] = 0
    labels = make_labels(3)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, labels=labels)
        actual = ours(ids, attention_mask=mask, labels=labels)
    check(actual.logits, expected.logits, f"seq-cls {case} logits")
    check(actual.loss, expected.loss, f"seq-cls {case} loss")
    assert ours.config.problem_type == ref.config.problem_type


def test_sequence_classification_needs_a_pad_token_for_batches(save_dir):
    ref, ours = build(save_dir, "seq", num_labels=3)  # pad_token_id None, as in the released config
    assert ours.config.pad_token_id is None
    ids = token_ids(2, 8)
    message = "Cannot handle batch sizes > 1 if no padding token is defined."
    with pytest.raises(ValueError) as ref_err:
        ref(ids)
    with pytest.raises(ValueError, match=message) as our_err:
        ours(ids)
    assert str(our_err.value) == str(ref_err.value)
    with torch.no_grad():  # a single row needs no pad token: the last token is pooled
        check(ours(ids[:1]).logits, ref(ids[:1]).logits, "seq-cls batch of one, no pad token")


@pytest.mark.parametrize("side", ["left", "right"])
def test_token_classification_parity(save_dir, side):
    ref, ours = build(save_dir, "tok", pad_token_id=0, num_labels=5, hidden_dropout=0.2)
    assert ours.dropout.p == ref.dropout.p == 0.2  # classifier dropout falls back to hidden_dropout
    ids, mask = padded_batch(side)
    labels = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(4))
    labels = labels.masked_fill(mask == 0, -100)
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask, labels=labels)
        actual = ours(ids, attention_mask=mask, labels=labels)
    valid = mask.bool()
    check(actual.logits[valid], expected.logits[valid], f"tok-cls {side} logits")
    check(actual.loss, expected.loss, f"tok-cls {side} loss")


def test_base_model_loads_from_causal_lm_checkpoint(save_dir):
    ref, _ = build(save_dir)
    base = PersimmonModel.from_pretrained(save_dir)
    ids = token_ids(2, 9)
    with torch.no_grad():
        check(base(ids).last_hidden_state, ref.model(ids).last_hidden_state, "base model last hidden")


# ---- saving, dtypes, auto classes ----------------------------------------------------------------


@pytest.mark.parametrize("head,overrides", [("causal", {}), ("causal", {"tie_word_embeddings": True}),
                                            ("seq", {"pad_token_id": 0}), ("tok", {})])  # fmt: skip
def test_save_then_reference_load(save_dir, tmp_path, head, overrides):
    ref, ours = build(save_dir, head, **overrides)
    out = tmp_path / "ours"
    ours.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "persimmon" and config["architectures"] == [type(ours).__name__]
    reloaded = HEADS[head][0].from_pretrained(out)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    ids = token_ids(2, 10)
    with torch.no_grad():
        check(ours(ids).logits, reloaded(ids).logits, f"save -> reference load {head} {overrides}")


def test_bfloat16_stays_close(save_dir):
    ref, _ = build(save_dir)
    ours = PersimmonForCausalLM.from_pretrained(save_dir, dtype=torch.bfloat16)
    assert ours.dtype == torch.bfloat16
    ref_bf16 = transformers.PersimmonForCausalLM.from_pretrained(save_dir, dtype=torch.bfloat16).eval()
    ids = token_ids(2, 12)
    with torch.no_grad():
        fp32, ref_bf, bf = ref(ids).logits, ref_bf16(ids).logits, ours(ids).logits
    assert bf.dtype == torch.bfloat16
    assert_close(bf, fp32, rtol=5e-2, what="bf16 vs reference fp32")
    assert_close(bf, ref_bf, rtol=5e-3, what="bf16 vs reference bf16")  # same ops: equal on CPU


@pytest.mark.parametrize("stored", [torch.bfloat16, torch.float16])
def test_dtype_auto_follows_checkpoint(save_dir, stored):
    ref, _ = build(save_dir)
    ref.to(stored).save_pretrained(save_dir)
    assert PersimmonForCausalLM.from_pretrained(save_dir, dtype="auto").dtype == stored
    assert PersimmonForCausalLM.from_pretrained(save_dir, torch_dtype="auto").dtype == stored
    assert PersimmonForCausalLM.from_pretrained(save_dir).dtype == torch.float32  # the reference's default


def test_auto_classes_pick_persimmon(save_dir):
    build(save_dir)
    assert type(AutoConfig.from_pretrained(save_dir)) is PersimmonConfig
    for auto_class, family_class in (
        (AutoModel, PersimmonModel),
        (AutoModelForCausalLM, PersimmonForCausalLM),
        (AutoModelForSequenceClassification, PersimmonForSequenceClassification),
        (AutoModelForTokenClassification, PersimmonForTokenClassification),
    ):
        assert type(auto_class.from_pretrained(save_dir)) is family_class


@pytest.mark.parametrize("bad", [BASE["vocab_size"], -1])
def test_token_id_out_of_range_is_a_clear_error(save_dir, bad):
    _, ours = build(save_dir)
    ids = token_ids(1, 6)
    ids[0, 3] = bad
    with pytest.raises(InputError, match=f"token id {bad} is outside the vocabulary"):
        ours(ids)


# ---- config --------------------------------------------------------------------------------------

SPEC_DEFAULTS = dict(
    vocab_size=262144, hidden_size=4096, intermediate_size=16384, num_hidden_layers=36,
    num_attention_heads=64, hidden_act="relu2", max_position_embeddings=16384, initializer_range=0.02,
    layer_norm_eps=1e-5,
    use_cache=True, tie_word_embeddings=False, rope_theta=25000.0, rope_scaling=None, qk_layernorm=True,
    hidden_dropout=0.0, attention_dropout=0.0, partial_rotary_factor=0.5, pad_token_id=None, bos_token_id=1,
    eos_token_id=2,
)  # fmt: skip


def test_config_defaults_match_reference():
    ours, ref = PersimmonConfig(), transformers.PersimmonConfig()
    for key, value in SPEC_DEFAULTS.items():
        assert getattr(ours, key) == getattr(ref, key) == value, key


def test_config_round_trips_through_reference(tmp_path):
    ours = PersimmonConfig(**BASE, rope_scaling={"type": "dynamic", "factor": 2.0}, qk_layernorm=False)
    ours.save_pretrained(tmp_path)
    ref = transformers.PersimmonConfig.from_pretrained(tmp_path)
    for key in (*BASE, "rope_scaling", "qk_layernorm", "partial_rotary_factor", "rope_theta", "hidden_act"):
        assert getattr(ref, key) == getattr(ours, key), key
    assert PersimmonConfig.from_pretrained(tmp_path) == ours


def test_config_accepts_v5_rope_parameters():
    rope = {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    cfg = PersimmonConfig(rope_parameters=rope)
    assert (cfg.rope_theta, cfg.partial_rotary_factor) == (10000.0, 0.25)
    assert cfg.rope_scaling == {"rope_type": "dynamic", "factor": 2.0}
    assert PersimmonConfig(rope_parameters={"rope_type": "default", "rope_theta": 500.0}).rope_scaling is None


@pytest.mark.parametrize(
    "overrides,error",
    [
        (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), ConfigError),
        (dict(rope_scaling={"rope_type": "linear"}), ConfigError),
        (dict(hidden_size=60, num_attention_heads=8), ConfigError),
        (dict(partial_rotary_factor=0.1875), ConfigError),  # 3 rotary channels
        (dict(head_dim=32), ConfigError),
        (dict(hidden_act="no-such-activation"), ValueError),
        (dict(model_type="glm"), ConfigError),
    ],
)
def test_config_rejects_what_it_cannot_honour(tmp_path, overrides, error):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "persimmon", **BASE, **overrides}))
    with pytest.raises(error):
        PersimmonConfig.from_pretrained(tmp_path)
