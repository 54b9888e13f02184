"""`glmkit.layers.Linear`: fp32 CPU inference on oneDNN's matmul or, one row in a compiled graph, a multiply-reduce
inductor fuses; everything else on `F.linear`."""

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DECODERS, assert_close, ran_ops, reference_and_ours

from glmkit import layers

pytestmark = pytest.mark.skipif(not layers._ONEDNN, reason="this torch build has no oneDNN matmul")


def ran_onednn(fn) -> tuple[torch.Tensor, bool]:
    out, ops = ran_ops(fn)
    return out, any("_linear_pointwise" in op for op in ops)


def big_linear(bias: bool = True) -> layers.Linear:
    torch.manual_seed(0)
    return layers.Linear(1024, layers.ONEDNN_MIN_WEIGHT // 1024, bias=bias)


@pytest.mark.parametrize("shape", [(1, 1024), (3, 1024), (2, 5, 1024)])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_runs_on_onednn_and_equals_f_linear(shape, bias):
    linear, x = big_linear(bias), torch.randn(shape)
    with torch.no_grad():
        got, onednn = ran_onednn(lambda: linear(x))
        want = F.linear(x, linear.weight, linear.bias)
    assert onednn
    assert_close(got, want, rtol=1e-5, what="oneDNN linear")


def test_autograd_autocast_small_weights_and_other_dtypes_stay_on_f_linear():
    linear, x = big_linear(), torch.randn(2, 1024, requires_grad=True)
    out, onednn = ran_onednn(lambda: linear(x))  # grad mode, parameters that want gradients
    assert not onednn
    out.sum().backward()
    assert linear.weight.grad is not None
    assert_close(x.grad, linear.weight.detach().sum(0).expand(2, -1), rtol=1e-5, what="input gradient")
    small = layers.Linear(64, 64)
    with torch.no_grad():
        assert not ran_onednn(lambda: small(torch.randn(1, 64)))[1]
        assert not ran_onednn(lambda: big_linear().to(torch.bfloat16)(torch.randn(1, 1024, dtype=torch.bfloat16)))[1]
        with torch.backends.mkldnn.flags(enabled=False):
            assert not ran_onednn(lambda: big_linear()(torch.randn(1, 1024)))[1]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast's dtype, as F.linear gives
            out, onednn = ran_onednn(lambda: big_linear()(torch.randn(1, 1024)))
        assert out.dtype == torch.bfloat16 and not onednn


def test_compiled_without_graph_breaks_equals_eager():
    """Large weights reach oneDNN through the custom op inside the graph; small ones are inductor's own matmul."""
    torch.manual_seed(0)
    x = torch.randn(4, 1024)
    for rows, expect_onednn in ((layers.ONEDNN_MIN_WEIGHT // 1024, True), (256, False)):
        linear = layers.Linear(1024, rows)
        compiled = torch.compile(linear, fullgraph=True)
        with torch.no_grad():
            compiled(x)
            got, onednn = ran_onednn(lambda c=compiled: c(x))
            assert onednn == expect_onednn
            assert_close(got, linear(x), rtol=1e-5, what="compiled linear")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_one_row_is_a_fused_multiply_reduce(bias, dtype):
    """One input row (batch-1 decode) in a compiled graph: no matmul call, the same result (bf16: products and sum in
    fp32, rounded once, as bf16 GEMMs do); two rows: a matmul."""
    torch._dynamo.reset()  # Linear.forward's graphs from other tests count against dynamo's recompile limit
    torch.manual_seed(0)
    for rows in (layers.ONEDNN_MIN_WEIGHT // 1024, 256):
        linear = layers.Linear(1024, rows, bias=bias).to(dtype)
        compiled = torch.compile(linear, fullgraph=True, options={"emulate_precision_casts": True})  # the engine's
        with torch.no_grad(), layers.gemv_as_reduction():
            for batch, fused in ((1, True), (2, False)):
                x = torch.randn(batch, 1, 1024, dtype=dtype)
                compiled(x)
                got, ops = ran_ops(lambda c=compiled, x=x: c(x))
                matmuls = {op for op in ops if op.endswith(("::mm", "::addmm", "_linear_pointwise", "::linear"))}
                assert (not matmuls) == fused, (rows, batch, matmuls)
                exact = linear.double()(x.double())
                linear.to(dtype)
                assert got.dtype == dtype
                if dtype == torch.float32:
                    assert_close(got, exact.float(), rtol=1e-5, what=f"compiled {rows} rows")
                else:  # the exact result rounded once: rounding every product too would miss it in many places
                    assert (got == exact.to(dtype)).float().mean() > 0.99, (rows, batch)


def test_a_graph_compiled_outside_the_engine_keeps_its_matmul():
    """Only the engine's inductor step asks for the multiply-reduce: a user's own torch.compile, with another
    backend maybe, must not materialise weight * x."""
    torch._dynamo.reset()
    linear, x = layers.Linear(1024, 256), torch.randn(1, 1, 1024)
    with torch.no_grad():
        for backend in ("inductor", "eager"):
            compiled = torch.compile(linear, fullgraph=True, backend=backend)
            compiled(x)
            got, ops = ran_ops(lambda c=compiled: c(x))
            assert any(op.endswith(("::mm", "::addmm", "::linear")) for op in ops), (backend, ops)
            assert_close(got, F.linear(x, linear.weight, linear.bias), rtol=1e-5, what=f"{backend} linear")


@pytest.mark.parametrize("family", list(TINY_DECODERS))
def test_families_on_onednn_match_the_reference(family, tmp_path, monkeypatch):
    """Every linear of the tiny decoders through oneDNN (threshold lowered): logits within 1e-4 of the
    reference's and the same greedy tokens, batched with left padding."""
    monkeypatch.setattr(layers, "ONEDNN_MIN_WEIGHT", 0)
    ref, ours = reference_and_ours(family, tmp_path)
    ids = torch.randint(3, 90, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        logits, onednn = ran_onednn(lambda: ours(ids, attention_mask=mask).logits)
        assert onednn
        assert_close(logits * mask[..., None], ref(ids, attention_mask=mask).logits * mask[..., None], rtol=1e-4,
                     what=f"{family} logits")  # fmt: skip
        kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
        assert torch.equal(ours.generate(ids, **kwargs), ref.generate(ids, **kwargs))
