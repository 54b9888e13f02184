"""glmkit.tf XGLM against two oracles: transformers' TFXGLM* classes and glmkit's PyTorch model, on tiny random
checkpoints built in transformers (PyTorch) and saved. Runs in the tf CI step (.ci/steps/tf.sh); the main suite
skips it (no TensorFlow there) unless GLMKIT_REQUIRE_TF makes a missing import an error."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not os.environ.get("GLMKIT_REQUIRE_TF"):
    pytest.importorskip("tensorflow")
    pytest.importorskip("tf_keras")
import tensorflow as tf  # noqa: E402
import transformers  # noqa: E402
from conftest import scale_weights  # noqa: E402
from xglm_oracles import BASE, BEAM_CASES, PAD, VOCAB, batch, close, model_builder, rel  # noqa: E402

import glmkit  # noqa: E402
from glmkit.checkpoint import CheckpointError  # noqa: E402
from glmkit.tf import TFXGLMForCausalLM, TFXGLMModel  # noqa: E402

VARIANTS = {
    "gelu_scaled": dict(d_model=32, attention_heads=4),
    "relu_unscaled_3heads": dict(d_model=48, attention_heads=3, activation_function="relu", scale_embedding=False),
    "gelu_new_untied_odd": dict(d_model=45, attention_heads=5, activation_function="gelu_new",
                                tie_word_embeddings=False),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return model_builder(tmp_path_factory, VARIANTS, transformers.TFXGLMForCausalLM, TFXGLMForCausalLM)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_hidden_states_attentions(built, variant):
    _, tf_ref, ours, pt, _ = built(variant)
    ids, mask = batch(left_pad=2)
    out = ours(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    expected = tf_ref(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    close(expected.logits, out.logits, "logits vs TF reference")
    assert len(out.hidden_states) == len(expected.hidden_states) == BASE["num_layers"] + 1
    for i, (e, a) in enumerate(zip(expected.hidden_states, out.hidden_states)):
        close(e, a, f"hidden state {i} vs TF reference")
    for i, (e, a) in enumerate(zip(expected.attentions, out.attentions)):
        close(e, a, f"attentions {i} vs TF reference")
    with torch.no_grad():
        pt_out = pt(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
    valid = mask.astype(bool)  # padded queries see no key; each implementation fills those rows its own way
    close(pt_out.logits.numpy()[valid], out.logits.numpy()[valid], "logits vs glmkit PyTorch")
    for i, (e, a) in enumerate(zip(pt_out.hidden_states, out.hidden_states)):
        close(e.numpy()[valid], a.numpy()[valid], f"hidden state {i} vs glmkit PyTorch")


def test_base_model_inputs_embeds_and_positions(built):
    _, tf_ref, _, pt, path = built("gelu_scaled")
    base = TFXGLMModel.from_pretrained(path)  # a CausalLM checkpoint into the bare model
    ids, mask = batch()
    hidden = base(ids, attention_mask=mask).last_hidden_state
    with torch.no_grad():
        expected = pt.model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask)).last_hidden_state
    close(expected.numpy(), hidden, "TFXGLMModel vs glmkit PyTorch XGLMModel")
    embeds = base.model.embed_tokens(tf.constant(ids)) * base.model.embed_scale
    close(hidden, base(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, "inputs_embeds")
    positions = np.array([[3, 4, 5, 6, 7, 8, 9], [0, 0, 1, 2, 3, 4, 5]])
    close(tf_ref(ids, position_ids=positions).logits, built("gelu_scaled")[2](ids, position_ids=positions).logits,
          "explicit position_ids")  # fmt: skip
    assert isinstance(base(ids, return_dict=False), tuple)


@pytest.mark.parametrize("variant", ["gelu_scaled", "gelu_new_untied_odd"])
def test_loss(built, variant):
    ref, tf_ref, ours, _, _ = built(variant)
    ids, mask = batch(T=9)
    labels = ids.astype(np.int64).copy()
    labels[0, 4:6] = -100
    with torch.no_grad():
        expected = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                       labels=torch.from_numpy(labels)).loss  # fmt: skip
    loss = ours(ids, attention_mask=mask, labels=labels).loss
    close(expected.numpy(), loss, "loss vs PyTorch reference")
    close(np.reshape(tf_ref(ids, attention_mask=mask, labels=labels).loss, ()), loss, "loss vs TF reference")


@pytest.mark.parametrize("variant", ["gelu_scaled", "relu_unscaled_3heads"])
def test_cached_decoding(built, variant):
    """Prefill, then one token at a time with the reference's (k, v) tuples: the full forward's logits and the
    TF reference's own cached decoding."""
    _, tf_ref, ours, _, _ = built(variant)
    ids, mask = batch(T=9, left_pad=2)
    P, T = 4, ids.shape[1]
    full = ours(ids, attention_mask=mask).logits.numpy()
    out = ours(ids[:, :P], attention_mask=mask[:, :P], use_cache=True)
    ref_out = tf_ref(ids[:, :P], attention_mask=mask[:, :P], use_cache=True)
    close(ref_out.logits, out.logits, "prefill vs TF reference")
    for t in range(P, T):
        out = ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.past_key_values,
                   use_cache=True)  # fmt: skip
        ref_out = tf_ref(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=ref_out.past_key_values,
                         use_cache=True)  # fmt: skip
        close(full[:, t : t + 1], out.logits, f"cached step {t} vs full forward")
        close(ref_out.logits, out.logits, f"cached step {t} vs TF reference")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_greedy_generation_token_identical(built, variant):
    _, tf_ref, ours, pt, _ = built(variant)
    ids, mask = batch(T=5)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12).numpy()
    expected = tf_ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False).numpy()
    np.testing.assert_array_equal(got[:, : expected.shape[1]], expected)  # the reference stops when all rows end
    assert (got[:, expected.shape[1] :] == PAD).all()
    pt_seq = pt.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask), max_new_tokens=12,
                         do_sample=False).numpy()  # fmt: skip
    np.testing.assert_array_equal(got[:, : pt_seq.shape[1]], pt_seq)


def test_greedy_generation_left_padded(built):
    _, tf_ref, ours, _, _ = built("relu_unscaled_3heads")
    ids, mask = batch(T=6, left_pad=2)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=10).numpy()
    expected = tf_ref.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False).numpy()
    np.testing.assert_array_equal(got[:, : expected.shape[1]], expected)


@pytest.mark.parametrize("settings,eos,left_pad", BEAM_CASES)
def test_beam_search_token_identical(built, settings, eos, left_pad):
    """Sequences equal the TF reference's beam search (eager: cut where its loop stopped), finished hypotheses
    included."""
    _, tf_ref, ours, _, _ = built("gelu_scaled")
    ids, mask = batch(T=5, left_pad=left_pad)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=eos, **settings).numpy()
    expected = tf_ref.generate(ids, attention_mask=mask, max_new_tokens=12, pad_token_id=PAD, eos_token_id=eos,
                               **settings).numpy()  # fmt: skip
    assert got.shape[0] == expected.shape[0] == 2 * settings.get("num_return_sequences", 1)
    np.testing.assert_array_equal(got[:, : expected.shape[1]], expected)
    assert (got[:, expected.shape[1] :] == PAD).all()
    assert (got[:, 5:] == eos).any()


def test_sampling(built):
    _, tf_ref, ours, _, _ = built("gelu_scaled")
    ids, _ = batch(T=4)
    greedy = ours.generate(ids, max_new_tokens=8).numpy()
    np.testing.assert_array_equal(greedy, ours.generate(ids, max_new_tokens=8, do_sample=True, top_k=1).numpy())
    copies = ours.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, num_return_sequences=3).numpy()
    expected = tf_ref.generate(ids, max_new_tokens=8, do_sample=True, top_k=1, num_return_sequences=3).numpy()
    assert copies.shape[0] == expected.shape[0] == 3 * len(ids)  # each prompt 3 times, in order
    np.testing.assert_array_equal(copies[:, : expected.shape[1]], expected)
    draw = lambda seed: ours.generate(ids, max_new_tokens=8, do_sample=True, temperature=2.0, top_p=0.9,
                                      seed=(seed, 0)).numpy()  # fmt: skip
    np.testing.assert_array_equal(draw(1), draw(1))
    assert any((draw(1) != draw(s)).any() for s in range(2, 6)), "sampling ignored the seed"


def test_save_pretrained_loads_in_reference(built, tmp_path):
    _, _, ours, _, _ = built("gelu_new_untied_odd")
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "tf_model.h5").is_file()
    reloaded = transformers.TFXGLMForCausalLM.from_pretrained(tmp_path)
    ids, mask = batch()
    close(reloaded(ids, attention_mask=mask).logits, ours(ids, attention_mask=mask).logits, "reference load of ours")


def test_loads_reference_h5_and_bin_files(built, tmp_path):
    ref, tf_ref, ours, _, _ = built("gelu_scaled")
    tf_ref.save_pretrained(tmp_path / "h5")
    ref.save_pretrained(tmp_path / "bin", safe_serialization=False)
    ids, mask = batch()
    expected = ours(ids, attention_mask=mask).logits
    for sub in ("h5", "bin"):
        close(expected, TFXGLMForCausalLM.from_pretrained(tmp_path / sub)(ids, attention_mask=mask).logits, sub)


def test_cross_attention(tmp_path):
    torch.manual_seed(1)
    ref = transformers.XGLMForCausalLM(transformers.XGLMConfig(**BASE, d_model=40, attention_heads=5,
                                                               add_cross_attention=True)).eval()  # fmt: skip
    scale_weights(ref)
    ref.save_pretrained(tmp_path)
    ours, pt = TFXGLMForCausalLM.from_pretrained(tmp_path), glmkit.XGLMForCausalLM.from_pretrained(tmp_path).eval()
    tf_ref = transformers.TFXGLMForCausalLM.from_pretrained(tmp_path, from_pt=True)
    ids, mask = batch()
    enc = np.random.default_rng(2).standard_normal((2, 5, 40)).astype(np.float32)
    enc_mask = np.array([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]], np.int32)
    kwargs = dict(attention_mask=mask, encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
                  output_attentions=True)  # fmt: skip
    out = ours(ids, **kwargs)
    close(tf_ref(ids, **kwargs).logits, out.logits, "cross-attention logits vs TF reference")
    with torch.no_grad():
        expected = pt(torch.from_numpy(ids).long(), **{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v
                                                       for k, v in kwargs.items()})  # fmt: skip
    close(expected.logits.numpy(), out.logits, "cross-attention logits vs glmkit PyTorch")
    close(expected.cross_attentions[1].numpy(), out.cross_attentions[1], "cross-attention weights")
    # head masks (the reference scales each head's weights after the softmax) and the cache of a cross-attention
    # call (per layer: self k, v, cross k, v), continued by one cached step
    rng = np.random.default_rng(3)
    masks = dict(head_mask=(rng.random((2, 5)) > 0.4).astype(np.float32),
                 cross_attn_head_mask=rng.random((2, 5)).astype(np.float32))  # fmt: skip
    out = ours(ids[:, :6], **{**kwargs, "attention_mask": mask[:, :6]}, **masks, use_cache=True)
    ref_out = tf_ref(ids[:, :6], **{**kwargs, "attention_mask": mask[:, :6]}, **masks, use_cache=True)
    close(ref_out.logits, out.logits, "head-masked logits vs TF reference")
    for name in ("attentions", "cross_attentions"):
        for i, (e, a) in enumerate(zip(ref_out[name], out[name])):
            close(e, a, f"head-masked {name} {i} vs TF reference")
    for layer, (e, a) in enumerate(zip(ref_out.past_key_values, out.past_key_values)):
        assert len(e) == len(a) == 4, f"layer {layer}: cache entries {len(e)} (reference) vs {len(a)}"
        for e_t, a_t in zip(e, a):
            close(e_t, a_t, f"layer {layer} cache")
    step = dict(kwargs, attention_mask=mask, use_cache=True)
    close(tf_ref(ids[:, 6:], past_key_values=ref_out.past_key_values, **step).logits,
          ours(ids[:, 6:], past_key_values=out.past_key_values, **step).logits, "cached cross-attention step")


def test_dropout_only_in_training(built):
    _, _, ours, _, _ = built("gelu_scaled")
    ids, _ = batch()
    eval_logits = ours(ids).logits.numpy()
    np.testing.assert_array_equal(eval_logits, ours(ids, training=False).logits.numpy())
    assert rel(eval_logits, ours(ids, training=True).logits.numpy()) > 1e-3


def test_bad_inputs(built, tmp_path):
    _, _, ours, _, path = built("gelu_scaled")
    with pytest.raises(ValueError, match="vocab_size"):
        ours(np.array([[3, VOCAB]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        ours(np.ones((1, 3), np.int32), position_ids=np.array([[0, 1, 40]]))
    with pytest.raises(ValueError, match="attention_mask"):
        ours(np.ones((1, 3), np.int32), attention_mask=np.ones((1, 4)))
    with pytest.raises(NotImplementedError, match="beam sampling"):
        ours.generate(np.ones((1, 3), np.int32), num_beams=2, do_sample=True)
    with pytest.raises(ValueError, match="head_mask"):
        ours(np.ones((1, 3), np.int32), head_mask=np.ones((BASE["num_layers"], 3)))
    (tmp_path / "config.json").write_text((path / "config.json").read_text())
    (tmp_path / "tf_model.h5").write_bytes(b"not hdf5")
    with pytest.raises(CheckpointError, match="tf_model.h5"):
        TFXGLMForCausalLM.from_pretrained(tmp_path)


def test_lazy_export():
    assert glmkit.TFXGLMForCausalLM is TFXGLMForCausalLM and glmkit.TFXGLMModel is TFXGLMModel
