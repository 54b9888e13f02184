"""attn_implementation "eager" / "flex_attention" / "flash_attention_2" give the reference's (sdpa) numbers on
every family: padded batches, packed rows, cached decoding (plain, static and compiled engine paths).

flash_attn needs CUDA: on CPU its kernels are stood in for by `fake_flash` (each sequence run through sdpa with
bottom-right causal alignment, as flash_attn aligns it), which checks glmkit's unpadding / packing bookkeeping;
the real kernels run only where a GPU and the package exist.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_DECODERS, VOCAB, assert_close, reference_and_ours
from test_packing import alone, packed_batch

from glmkit import attn_backends
from glmkit.attn_backends import AttentionBackendError

FAMILIES = sorted(TINY_DECODERS)
HAS_FLASH = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def load(family: str, directory, impl: str, **kwargs):
    """The reference model and glmkit's load of it with `impl`."""
    ref, ours = reference_and_ours(family, directory)
    return ref, type(ours).from_pretrained(directory, attn_implementation=impl, **kwargs)


def left_padded(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ids (3, 9) with 0 / 3 / 6 left pads, the mask, positions counted over real tokens (as generate's)."""
    ids = torch.randint(3, VOCAB, (3, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, pads in enumerate((0, 3, 6)):
        mask[row, :pads] = 0
    return ids, mask, (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def check_padded_and_packed(ref, ours, what: str) -> None:
    ids, mask, positions = left_padded()
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, position_ids=positions).logits
        want = ref(ids, attention_mask=mask, position_ids=positions.clone()).logits
        real = mask.bool()
        assert_close(got[real], want[real], 1e-4, f"{what} padded batch")
        ids, positions, docs = packed_batch()
        assert_close(ours(ids, position_ids=positions, use_cache=False).logits, alone(ref, docs), 1e-4,
                     f"{what} packed rows")  # fmt: skip


def check_generation(ref, ours, what: str, **fast) -> None:
    """Greedy tokens of a left-padded batch: the reference's, on glmkit's plain / static / compiled paths."""
    ids, mask, _ = left_padded(1)
    kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    want = ref.generate(ids, **kwargs)
    assert torch.equal(ours.generate(ids, **kwargs, **fast), want), what


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("impl", ["eager", "flex_attention"])
def test_implementation_matches_reference(family, impl, save_dir):
    ref, ours = load(family, save_dir, impl)
    assert ours.config._attn_implementation == impl
    check_padded_and_packed(ref, ours, f"{family} {impl}")
    check_generation(ref, ours, f"{family} {impl} plain")
    check_generation(ref, ours, f"{family} {impl} static", cache_implementation="static")


@pytest.mark.parametrize("family", FAMILIES)
def test_flex_in_the_compiled_step(family, save_dir):
    """flex_attention captured in the compiled decode step (the eager backend: capture, no C++ build)."""
    ref, ours = load(family, save_dir, "flex_attention")
    check_generation(ref, ours, f"{family} flex compiled", compile={"backend": "eager"})


def test_flex_training_with_dropout_runs(save_dir):
    """flex_attention has no dropout: a training pass with attention dropout computes through sdpa."""
    _, ours = load("xglm", save_dir, "flex_attention", attention_dropout=0.5)
    ours.train()
    ids, positions, _ = packed_batch()
    ours(ids, position_ids=positions, labels=ids).loss.backward()


# ---- flash_attention_2 -----------------------------------------------------------------------------


def _fake_flash_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_func's contract on (B, T, H, D) tensors, grouped K/V heads, bottom-right causal."""
    T, S = q.shape[1], k.shape[1]
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T) if causal else None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                         scale=softmax_scale, enable_gqa=True)  # fmt: skip
    return out.transpose(1, 2)


def _fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False):
    """flash_attn_varlen_func's contract: (total, H, D) sequences delimited by cu_seqlens."""
    lengths_q, lengths_k = cu_q.diff(), cu_k.diff()
    assert cu_q.dtype == cu_k.dtype == torch.int32 and len(cu_q) == len(cu_k)
    assert max_q == int(lengths_q.max()) and max_k == int(lengths_k.max())
    assert bool((lengths_q <= lengths_k).all())
    out = []
    for i in range(len(cu_q) - 1):
        qs, ks, vs = q[cu_q[i] : cu_q[i + 1]], k[cu_k[i] : cu_k[i + 1]], v[cu_k[i] : cu_k[i + 1]]
        if len(qs):
            out.append(_fake_flash_func(qs[None], ks[None], vs[None], softmax_scale=softmax_scale, causal=causal)[0])
    return torch.cat(out)


@pytest.fixture
def fake_flash(monkeypatch):
    """A CPU stand-in for the flash_attn package, accepted on CPU float32 tensors."""
    module = types.ModuleType("flash_attn")
    module.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    module.flash_attn_func, module.flash_attn_varlen_func = _fake_flash_func, _fake_flash_varlen
    monkeypatch.setitem(sys.modules, "flash_attn", module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attn_backends, "FLASH_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(attn_backends, "FLASH_DTYPES", (torch.float16, torch.bfloat16, torch.float32))


@pytest.mark.parametrize("family", FAMILIES)
def test_flash_bookkeeping_matches_reference(family, save_dir, fake_flash):
    ref, ours = load(family, save_dir, "flash_attention_2")
    check_padded_and_packed(ref, ours, f"{family} flash")
    check_generation(ref, ours, f"{family} flash plain")
    check_generation(ref, ours, f"{family} flash static", cache_implementation="static")
    ids, mask, positions = left_padded()
    with torch.no_grad():  # incremental HF-style forward over a padded cache, one token at a time
        want = ref(ids, attention_mask=mask, position_ids=positions.clone()).logits
        out = ours(ids[:, :5], attention_mask=mask[:, :5], position_ids=positions[:, :5], use_cache=True)
        for t in range(5, ids.shape[1]):
            out = ours(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], position_ids=positions[:, t : t + 1],
                       past_key_values=out.past_key_values, use_cache=True)  # fmt: skip
        assert_close(out.logits[:, -1], want[:, -1], 1e-4, f"{family} flash cached steps")
    with pytest.raises(AttentionBackendError, match="compiled"):
        ours.generate(ids, attention_mask=mask, max_new_tokens=2, compile={"backend": "eager"})


def test_flash_refused_where_it_cannot_run(save_dir, monkeypatch):
    ref, ours = reference_and_ours("glm", save_dir)
    cls = type(ours)
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(AttentionBackendError, match="flash_attn package"):
            cls.from_pretrained(save_dir, attn_implementation="flash_attention_2")
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    sys.modules["flash_attn"].__spec__ = importlib.machinery.ModuleSpec("flash_attn", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(AttentionBackendError, match="CUDA GPU"):
        cls.from_pretrained(save_dir, attn_implementation="flash_attention_2")
    with pytest.raises(AttentionBackendError, match="CUDA GPU"):
        cls.from_config(ours.config, attn_implementation="flash_attention_2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    model = cls.from_pretrained(save_dir, attn_implementation="flash_attention_2")  # loads; CPU tensors refused
    with pytest.raises(AttentionBackendError, match="CUDA tensors"):
        model(torch.tensor([[3, 4, 5]]))
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        cls.from_pretrained(save_dir, attn_implementation="flash_attention_3")


@pytest.mark.skipif(not HAS_FLASH, reason="needs a CUDA GPU and the flash_attn package")
@pytest.mark.parametrize("family", FAMILIES)
def test_flash_on_gpu_matches_sdpa(family, save_dir):
    """The real kernels in bfloat16 against glmkit's sdpa path in bfloat16 (both checked on CPU above)."""
    cls = type(reference_and_ours(family, save_dir)[1])
    load_gpu = dict(dtype=torch.bfloat16, device_map="cuda")
    sdpa = cls.from_pretrained(save_dir, **load_gpu)
    flash = cls.from_pretrained(save_dir, **load_gpu, attn_implementation="flash_attention_2")
    ids, mask, positions = (t.cuda() for t in left_padded())
    with torch.no_grad():
        got = flash(ids, attention_mask=mask, position_ids=positions).logits.float()
        want = sdpa(ids, attention_mask=mask, position_ids=positions).logits.float()
    real = mask.bool()
    assert_close(got[real], want[real], 3e-2, f"{family} flash on GPU")
    # padded decoding runs the varlen kernel every step (bf16 ties may pick other tokens: shapes only)
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert flash.generate(ids, **kwargs).shape == (3, 13)
