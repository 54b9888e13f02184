"""The fast decode path (static cache, fixed-shape steps, torch.compile) gives the plain path's tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DECODERS, VOCAB, ran_ops, reference_and_ours, scale_weights

from glmkit.generation import engine

FAMILIES = TINY_DECODERS
STATIC = dict(cache_implementation="static")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(reference model, glmkit model) with the same weights, loaded through the real loader."""
    return reference_and_ours(request.param, tmp_path_factory.mktemp(request.param))


def prompts(batch, length=9, seed=3):
    """Random prompts; row i (of 8) is left-padded by i % 4 tokens."""
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row in range(batch):
        pad = row % 4
        mask[row, :pad], ids[row, :pad] = 0, 0
    return ids, mask


@pytest.mark.parametrize("batch", [1, 8])
def test_greedy_identical_to_plain_and_reference(pair, batch):
    ref, ours = pair
    ids, mask = prompts(batch)
    kwargs = dict(max_new_tokens=16, eos_token_id=None)
    with torch.no_grad():
        want = ref.generate(ids, attention_mask=mask, **kwargs)
    plain = ours.generate(ids, attention_mask=mask, **kwargs)
    static = ours.generate(ids, attention_mask=mask, **kwargs, **STATIC)
    assert torch.equal(plain, want)
    assert torch.equal(static, want)


def test_eos_stopping_trimmed_like_plain(pair):
    """Rows stop at different steps; the fast path checks only every CHECK_EVERY steps but returns the
    plain path's sequences (same length, same padding)."""
    ours = pair[1]
    ids, mask = prompts(3)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=None)[:, ids.shape[1] :]
    for eos in ([int(free[0, 2]), int(free[1, 4]), int(free[2, 5])], [int(free[0, 12])]):
        kwargs = dict(max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
        plain = ours.generate(ids, attention_mask=mask, **kwargs)
        static = ours.generate(ids, attention_mask=mask, **kwargs, **STATIC)
        assert static.shape == plain.shape and torch.equal(static, plain)


def test_processors_scores_and_sampling_like_plain(pair):
    ours = pair[1]
    ids, mask = prompts(2)
    kwargs = dict(max_new_tokens=10, eos_token_id=None, repetition_penalty=1.3, return_dict_in_generate=True,
                  output_scores=True, output_logits=True)  # fmt: skip
    plain = ours.generate(ids, attention_mask=mask, **kwargs)
    static = ours.generate(ids, attention_mask=mask, **kwargs, **STATIC)
    assert torch.equal(static.sequences, plain.sequences)
    assert len(static.scores) == len(plain.scores) == 10
    for a, b in zip(static.scores + static.logits, plain.scores + plain.logits):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    sampled = []
    for extra in ({}, STATIC):
        torch.manual_seed(7)
        sampled.append(ours.generate(ids, attention_mask=mask, do_sample=True, top_k=10, max_new_tokens=12,
                                     eos_token_id=None, **extra))  # fmt: skip
    assert torch.equal(sampled[0], sampled[1])


def test_static_cache_step_matches_plain_forward(pair):
    """One decode step on the whole static buffer gives the logits of a full forward pass."""
    ours = pair[1]
    ids, mask = prompts(2)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    decoder = engine.Decoder(ours, 200, "static")
    with torch.no_grad():
        decoder.prefill(ids[:, :-1], mask[:, :-1])
        got = decoder.step(ids[:, -1:])
        want = ours(ids, attention_mask=mask, position_ids=positions).logits[:, -1]
    assert decoder.cache.keys[0].shape[2] == 200
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_compiled_step_is_one_graph_reused_across_lengths(pair):
    """The decode step captures whole (fullgraph) and one graph serves every prompt length and
    max_new_tokens, however long: the cache's slot dimension is dynamic, so a generation that grows never
    waits for a recompile. (The "eager" backend checks capture without a C++ build.)"""
    ours = pair[1]
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    options = {"backend": backend, "fullgraph": True}
    for length, new in ((9, 12), (7, 20), (30, 150), (5, 300)):
        ids, mask = prompts(2, length=length)
        plain = ours.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=None)
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=None, compile=options)
        assert torch.equal(got, plain)
    assert len(graphs) == 1


def test_model_changes_recompile_though_model_guards_are_skipped(pair):
    """The default options skip dynamo's guards on the model (host time per step); a changed model (weights
    replaced, dtype, config) must then get a fresh graph rather than reuse a stale one."""
    import copy

    ours = copy.deepcopy(pair[1])
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    options = {"backend": backend, "options": {"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}}
    ids, mask = prompts(2)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, eos_token_id=None)

    def check(expected_graphs):
        assert torch.equal(ours.generate(ids, **kwargs, compile=options), ours.generate(ids, **kwargs))
        assert len(graphs) == expected_graphs

    check(1)
    check(1)  # unchanged: reused
    head = ours.get_output_embeddings()
    head.weight = torch.nn.Parameter(head.weight.detach().flip(0))  # weights replaced (new tensor)
    check(2)
    ours.to(torch.float64)
    check(3)
    ours.config.output_hidden_states = True
    check(4)


def test_many_shapes_stay_compiled():
    """One graph per batch size: many batch sizes need more than dynamo's default 8 graphs per function;
    none may silently fall back to eager."""
    from glmkit import GlmConfig, GlmForCausalLM

    ours = GlmForCausalLM(GlmConfig(vocab_size=VOCAB, **{**FAMILIES["glm"][3], "num_hidden_layers": 1})).eval()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for batch in range(1, 11):
        ids, mask = prompts(batch)
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, eos_token_id=None, compile={"backend": backend})
    assert len(graphs) == 10  # dynamo alone stops at 8


def test_dynamic_rope_past_the_limit_on_the_fast_path():
    """Dynamic RoPE scaling (a host-side length check, a graph break under compile) gives the plain path's
    tokens and logits on the static and the compiled path while decoding past max_position_embeddings."""
    from glmkit import PersimmonConfig, PersimmonForCausalLM

    torch.manual_seed(0)
    config = PersimmonConfig(vocab_size=VOCAB, **{**FAMILIES["persimmon"][3], "max_position_embeddings": 16},
                             rope_scaling={"type": "dynamic", "factor": 2.0})  # fmt: skip
    ours = PersimmonForCausalLM(config).eval()
    scale_weights(ours, factor=6.0)
    ids, mask = prompts(2)
    kwargs = dict(attention_mask=mask, max_new_tokens=20, eos_token_id=None,  # 9 + 20 positions > 16
                  return_dict_in_generate=True, output_logits=True)  # fmt: skip
    plain = ours.generate(ids, **kwargs)
    for fast_path in (STATIC, {"compile": {"backend": "eager"}}):
        got = ours.generate(ids, **kwargs, **fast_path)
        assert torch.equal(got.sequences, plain.sequences)
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(plain.logits), rtol=1e-4, atol=1e-4)
    ours.model.rotary_emb.scaling_type = "default"  # the scaling does change these logits
    unscaled = ours.generate(ids, **kwargs)
    assert not torch.allclose(torch.stack(unscaled.logits)[-1], torch.stack(plain.logits)[-1], atol=1e-2)


def test_compile_failure_falls_back_to_eager(pair):
    """A failed compile warns and decodes eagerly; later calls with the same options do not try again."""
    ours = pair[1]
    attempts = []

    def broken(gm, example_inputs):
        attempts.append(1)
        raise RuntimeError("no compiler here")

    ids, mask = prompts(1)
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None,
                            compile={"backend": broken})  # fmt: skip
    assert torch.equal(got, plain)
    assert attempts == [1]
    again = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, compile={"backend": broken})
    assert torch.equal(again, plain) and attempts == [1]


def test_stream_on_the_fast_path_like_plain(pair):
    """`stream(..., compile=...)` / static cache: the same token ids and finish reasons per step as the plain
    stream, rows stopping at different steps included."""
    ours = pair[1]
    ids, mask = prompts(3)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)[:, ids.shape[1] :]
    kwargs = dict(max_new_tokens=12, eos_token_id=[int(free[0, 3]), int(free[2, 6])], pad_token_id=0)

    def chunks(**extra):
        return [(c.token_ids, c.finish_reason) for c in ours.stream(ids, attention_mask=mask, **kwargs, **extra)]

    plain = chunks()
    assert any("stop" in reasons for _, reasons in plain)
    assert chunks(**STATIC) == plain
    assert chunks(compile={"backend": "eager"}) == plain


def test_fast_path_arguments_checked_and_beam_warns(pair):
    ours = pair[1]
    ids, mask = prompts(1)
    with pytest.raises(ValueError, match="cache_implementation"):
        ours.generate(ids, max_new_tokens=2, cache_implementation="paged")
    with pytest.warns(UserWarning, match="beam search runs on the plain"):
        ours.generate(ids, max_new_tokens=2, num_beams=2, compile=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        ours.generate(ids, max_new_tokens=2, use_cache=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the CUDA-graph path)")
@pytest.mark.parametrize("batch", [1, 8])
def test_cuda_graphs_identical_to_plain(pair, batch):
    """On GPU, compile=True captures CUDA graphs; replays (the second call too) give the plain path's tokens."""
    import copy

    ours = copy.deepcopy(pair[1]).cuda()
    ids, mask = (t.cuda() for t in prompts(batch))
    kwargs = dict(attention_mask=mask, max_new_tokens=16, eos_token_id=None)
    plain = ours.generate(ids, **kwargs)
    for _ in range(2):
        assert torch.equal(ours.generate(ids, **kwargs, compile=True), plain)


@pytest.mark.slow
def test_inductor_compile_on_cpu(pair):
    """The real compiled mode (inductor C++ kernels): ~1 minute of compiling per family on 2 cores."""
    ours = pair[1]
    ids, mask = prompts(8)
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None, compile=True),
                       plain)  # fmt: skip


def test_compile_options():
    cpu, gpu = engine.compile_options(None, cuda=False), engine.compile_options(None, cuda=True)
    plain = {"emulate_precision_casts": True, "size_asserts": False, "alignment_asserts": False,
             "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}  # fmt: skip
    assert cpu == {"dynamic": False, "options": {**plain, "cpp_wrapper": True}}
    assert gpu["options"] == {**plain, "triton.cudagraphs": True}  # CUDA graphs = what "reduce-overhead" sets
    assert engine.compile_options({"mode": "max-autotune"}, cuda=True) == {"dynamic": False, "mode": "max-autotune"}


@pytest.mark.parametrize("heads, kv_heads", [(8, 2), (4, 4), (16, 1)])
def test_compiled_single_query_attention_equals_sdpa(heads, kv_heads):
    """Under torch.compile a one-token grouped query takes the matmul form (fusable); it must equal eager
    sdpa, padding mask included."""
    from glmkit.layers import attention

    torch.manual_seed(0)
    q, k, v = torch.randn(3, heads, 1, 16), torch.randn(3, kv_heads, 20, 16), torch.randn(3, kv_heads, 20, 16)
    mask = torch.ones(3, 1, 1, 20, dtype=torch.bool)
    mask[1, ..., :5] = False  # a left-padded row
    mask[2, ..., 12:] = False  # slots not yet written
    eager, _ = attention(q, k, v, mask, scale=0.25)
    compiled, _ = torch.compile(attention, backend="eager", fullgraph=True)(q, k, v, mask, scale=0.25)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


def test_batch_one_compiled_step_computes_its_linears_as_reductions(tmp_path):
    """Batch 1 on CPU, inductor: the step's linears are multiply-reduces (no matmul call left in it) and greedy gives
    the plain path's tokens; under another backend the same step keeps its matmuls."""
    ours = reference_and_ours("glm", tmp_path)[1]
    ids, mask = prompts(1)
    plain = ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    assert torch.equal(ours.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None, compile=True),
                       plain)  # fmt: skip
    python_wrapper = {"dynamic": False, "options": {"cpp_wrapper": False}}  # the C++ wrapper's calls are not profiled
    for options, reductions in ((python_wrapper, True), ({"backend": "eager"}, False)):
        decoder = engine.Decoder(ours, 16, "compiled", options)
        with torch.no_grad():
            tokens = decoder.prefill(ids).argmax(-1, keepdim=True)
            decoder.step(tokens)
            ops = ran_ops(lambda d=decoder, t=tokens: d.step(t))[1]
        matmuls = {op for op in ops if op.endswith(("::mm", "::addmm", "::linear"))}
        assert (not matmuls) == reductions, (options, matmuls)
