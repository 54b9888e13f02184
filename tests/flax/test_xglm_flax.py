"""glmkit.flax XGLM against two oracles: transformers' FlaxXGLM* classes and glmkit's PyTorch model, on tiny
random checkpoints built in transformers (PyTorch) and saved. Runs in the flax CI step (.ci/steps/flax.sh);
the main suite skips it (no JAX there) unless GLMKIT_REQUIRE_FLAX makes a missing import an error."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not os.environ.get("GLMKIT_REQUIRE_FLAX"):
    pytest.importorskip("flax")
    pytest.importorskip("jax")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import transformers  # noqa: E402
from conftest import scale_weights  # noqa: E402
from xglm_oracles import BASE, BEAM_CASES, PAD, VOCAB, batch, close, model_builder, rel  # noqa: E402

import glmkit  # noqa: E402
from glmkit.checkpoint import CheckpointError  # noqa: E402
from glmkit.flax import FlaxXGLMForCausalLM, FlaxXGLMModel  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
VARIANTS = {
    "gelu_scaled": dict(d_model=32, attention_heads=4),
    "relu_unscaled_3heads": dict(d_model=48, attention_heads=3, activation_function="relu", scale_embedding=False),
    "gelu_new_untied": dict(d_model=40, attention_heads=5, activation_function="gelu_new", tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return model_builder(tmp_path_factory, VARIANTS, transformers.FlaxXGLMForCausalLM, FlaxXGLMForCausalLM)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_hidden_states_attentions(built, variant):
    ref, flax_ref, ours, pt, _ = built(variant)
    ids, mask = batch()
    out = ours(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    expected = flax_ref(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    close(expected.logits, out.logits, "logits vs Flax reference")
    assert len(out.hidden_states) == len(expected.hidden_states) == BASE["num_layers"] + 1
    for i, (e, a) in enumerate(zip(expected.hidden_states, out.hidden_states)):
        close(e, a, f"hidden state {i} vs Flax reference")
    for i, (e, a) in enumerate(zip(expected.attentions, out.attentions)):
        close(e, a, f"attentions {i} vs Flax reference")
    with torch.no_grad():
        pt_out = pt(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    close(pt_out.logits.numpy(), out.logits, "logits vs glmkit PyTorch")
    for i, (e, a) in enumerate(zip(pt_out.hidden_states, out.hidden_states)):
        close(e.numpy(), a, f"hidden state {i} vs glmkit PyTorch")


def test_left_padding_and_explicit_positions(built):
    _, flax_ref, ours, pt, _ = built("gelu_scaled")
    ids, mask = batch(left_pad=3)
    positions = np.clip(mask.cumsum(-1) - 1, -1, None)
    close(flax_ref(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits, "padded logits")
    out = ours(ids, attention_mask=mask, position_ids=positions)
    close(flax_ref(ids, attention_mask=mask, position_ids=positions).logits, out.logits, "padded, mask positions")
    with torch.no_grad():
        expected = pt(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                      position_ids=torch.from_numpy(positions).long().clamp_min(0)).logits.numpy()  # fmt: skip
    valid = mask.astype(bool)
    close(expected[valid], np.asarray(out.logits)[valid], "padded logits vs glmkit PyTorch (real tokens)")


def test_base_model_and_inputs_embeds(built):
    _, _, ours, pt, path = built("gelu_scaled")
    base = FlaxXGLMModel.from_pretrained(path)  # a CausalLM checkpoint: the "model." prefix is dropped
    ids, mask = batch()
    hidden = base(ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        expected = pt.model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)).last_hidden_state
    close(expected.numpy(), hidden, "FlaxXGLMModel vs glmkit PyTorch XGLMModel")
    embeds = base.module.apply({"params": base.params}, jnp.asarray(ids), method="embed")
    close(hidden, base(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, "inputs_embeds")
    assert isinstance(base(ids, return_dict=False), tuple)


@pytest.mark.parametrize("variant", ["gelu_scaled", "gelu_new_untied"])
def test_loss(built, variant):
    ref, _, ours, _, _ = built(variant)
    ids, mask = batch(T=9)
    labels = ids.astype(np.int64).copy()
    labels[0, 4:6] = -100
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                       labels=torch.from_numpy(labels)).loss  # fmt: skip
    close(expected.numpy(), ours(ids, attention_mask=mask, labels=labels).loss, "loss vs PyTorch reference")


@pytest.mark.parametrize("variant", ["gelu_scaled", "relu_unscaled_3heads"])
def test_cached_decoding(built, variant):
    """Prefill then one token at a time through a preallocated cache: the full forward's logits, and the
    Flax reference's own cached decoding."""
    _, flax_ref, ours, _, _ = built(variant)
    ids, mask = batch(T=9, left_pad=2)
    B, T, P = *ids.shape, 4
    full = ours(ids, attention_mask=mask).logits
    cache, ref_cache = ours.init_cache(B, T), flax_ref.init_cache(B, T)
    out = ours(ids[:, :P], attention_mask=mask, past_key_values=cache)
    ref_out = flax_ref(ids[:, :P], attention_mask=mask, past_key_values=ref_cache,
                       position_ids=np.broadcast_to(np.arange(P), (B, P)))  # fmt: skip
    close(ref_out.logits, out.logits, "prefill vs Flax reference")
    valid = mask.astype(bool)  # pad queries see no key: their (uniform) rows differ from a full forward's
    close(np.asarray(full)[:, :P][valid[:, :P]], np.asarray(out.logits)[valid[:, :P]], "prefill vs full forward")
    cache, ref_cache = out.past_key_values, ref_out.past_key_values
    for t in range(P, T):
        out = ours(ids[:, t : t + 1], attention_mask=mask, past_key_values=cache)
        ref_out = flax_ref(ids[:, t : t + 1], attention_mask=mask, past_key_values=ref_cache,
                           position_ids=np.full((B, 1), t))  # fmt: skip
        close(np.asarray(full)[:, t : t + 1], out.logits, f"cached step {t} vs full forward")
        close(ref_out.logits, out.logits, f"cached step {t} vs Flax reference")
        cache, ref_cache = out.past_key_values, ref_out.past_key_values


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generation_token_identical(built, variant):
    _, flax_ref, ours, pt, _ = built(variant)
    ids, mask = batch(T=5)
    got = np.asarray(ours.generate(ids, attention_mask=mask, max_new_tokens=12).sequences)
    expected = np.asarray(flax_ref.generate(ids, attention_mask=mask, max_length=17, pad_token_id=PAD).sequences)
    np.testing.assert_array_equal(got, expected)
    pt_seq = pt.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask), max_new_tokens=12,
                         do_sample=False).numpy()  # fmt: skip
    n = pt_seq.shape[1]  # glmkit's PyTorch generate stops at EOS; ours pads after it
    np.testing.assert_array_equal(got[:, :n], pt_seq)


def test_greedy_generation_left_padded(built):
    _, flax_ref, ours, _, _ = built("relu_unscaled_3heads")
    ids, mask = batch(T=6, left_pad=2)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10).sequences
    expected = flax_ref.generate(ids, attention_mask=mask, max_length=16, pad_token_id=PAD).sequences
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


@pytest.mark.parametrize("settings,eos,left_pad", BEAM_CASES[:2])
def test_beam_search_token_identical(built, settings, eos, left_pad):
    """Sequences (and sequence scores) equal the Flax reference's beam search, finished hypotheses included."""
    _, flax_ref, ours, _, _ = built("gelu_scaled")
    ids, mask = batch(T=5, left_pad=left_pad)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, **settings)
    expected = flax_ref.generate(ids, attention_mask=mask, max_length=17, pad_token_id=PAD, eos_token_id=eos,
                                 **settings)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(got.sequences), np.asarray(expected.sequences))
    assert (np.asarray(got.sequences)[:, 5:] == eos).any()
    close(expected.scores, got.scores, "beam scores", rtol=1e-4)


def test_sampling(built):
    _, _, ours, _, _ = built("gelu_scaled")
    ids, mask = batch(T=4)
    greedy = ours.generate(ids, max_new_tokens=8).sequences
    top1 = ours.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, prng_key=jax.random.PRNGKey(3)).sequences
    np.testing.assert_array_equal(np.asarray(greedy), np.asarray(top1))
    copies = ours.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, num_return_sequences=3).sequences
    np.testing.assert_array_equal(np.repeat(np.asarray(greedy), 3, 0), np.asarray(copies))
    draw = lambda seed: np.asarray(ours.generate(ids, max_new_tokens=8, do_sample=True, temperature=2.0, top_p=0.9,
                                                 prng_key=jax.random.PRNGKey(seed)).sequences)  # fmt: skip
    np.testing.assert_array_equal(draw(1), draw(1))
    assert any((draw(1) != draw(s)).any() for s in range(2, 6)), "sampling ignored the key"
    assert ((draw(7)[:, 4:] >= 0) & (draw(7)[:, 4:] < VOCAB)).all()


def test_save_pretrained_loads_in_reference(built, tmp_path):
    _, _, ours, _, _ = built("gelu_new_untied")
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "flax_model.msgpack").is_file()
    reloaded = transformers.FlaxXGLMForCausalLM.from_pretrained(tmp_path)
    ids, mask = batch()
    close(reloaded(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits, "reference load of ours")


def test_loads_reference_flax_and_bin_files(built, tmp_path):
    ref, flax_ref, ours, _, _ = built("gelu_scaled")
    flax_ref.save_pretrained(tmp_path / "flax")
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    ids, mask = batch()
    expected = ours(ids, attention_mask=mask).logits
    for sub in ("flax", "bin"):
        close(expected, FlaxXGLMForCausalLM.from_pretrained(tmp_path / sub)(ids, attention_mask=mask).logits, sub)


def test_cross_attention_matches_pytorch(tmp_path):
    """The Flax reference cannot build cross-attention (it reads config.decoder_attention_heads, which
    XGLMConfig lacks) nor an odd d_model (its table reshape fails), so glmkit's PyTorch model is the oracle."""
    torch.manual_seed(1)
    ref = transformers.XGLMForCausalLM(transformers.XGLMConfig(**BASE, d_model=45, attention_heads=5,
                                                               add_cross_attention=True)).eval()  # fmt: skip
    scale_weights(ref)
    ref.save_pretrained(tmp_path)
    ours, pt = FlaxXGLMForCausalLM.from_pretrained(tmp_path), glmkit.XGLMForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = batch()
    enc = np.random.default_rng(2).standard_normal((2, 5, 45)).astype(np.float32)
    enc_mask = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], np.int32)
    out = ours(ids, attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
               output_attentions=True)  # fmt: skip
    with torch.no_grad():
        expected = pt(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                      encoder_hidden_states=torch.from_numpy(enc), encoder_attention_mask=torch.from_numpy(enc_mask),
                      output_attentions=True)  # fmt: skip
    close(expected.logits.numpy(), out.logits, "cross-attention logits")
    close(expected.cross_attentions[1].numpy(), out.cross_attentions[1], "cross-attention weights")


def test_dropout_needs_rng_and_is_deterministic_off(built):
    _, _, ours, _, _ = built("gelu_scaled")
    ids, _ = batch()
    eval_logits = np.asarray(ours(ids).logits)
    with pytest.raises(ValueError, match="dropout_rng"):
        ours(ids, train=True)
    train = lambda seed: np.asarray(ours(ids, train=True, dropout_rng=jax.random.PRNGKey(seed)).logits)
    assert rel(eval_logits, train(0)) > 1e-3
    np.testing.assert_array_equal(train(0), train(0))


def test_bad_inputs(built, tmp_path):
    _, _, ours, _, path = built("gelu_scaled")
    with pytest.raises(ValueError, match="vocab_size"):
        ours(np.array([[3, VOCAB]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(np.ones((1, 3), np.int32), position_ids=np.array([[0, 1, 40]]))
    with pytest.raises(NotImplementedError, match="beam sampling"):
        ours.generate(np.ones((1, 3), np.int32), num_beams=2, do_sample=True)
    with pytest.raises(NotImplementedError, match="repetition_penalty"):
        ours.generate(np.ones((1, 3), np.int32), repetition_penalty=1.3)
    with pytest.raises(ValueError, match="cache holds"):
        ours(np.ones((1, 5), np.int32), past_key_values=ours.init_cache(1, 4))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "flax_model.msgpack").write_bytes(b"not msgpack")
    with pytest.raises(CheckpointError, match="flax_model.msgpack"):
        FlaxXGLMForCausalLM.from_pretrained(tmp_path)


def test_lazy_export():
    assert glmkit.FlaxXGLMForCausalLM is FlaxXGLMForCausalLM and glmkit.FlaxXGLMModel is FlaxXGLMModel
