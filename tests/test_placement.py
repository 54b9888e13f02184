"""device_map over several devices in one process (glmkit.placement): the plan, the reference's accelerate plan as
the oracle for the sizes, the hooks' movement, the errors, and (on a machine with 2+ GPUs) the split model against
the single-device one."""

from __future__ import annotations

import pytest
import torch

import glmkit.placement as placement
from glmkit import GlmConfig, GlmForCausalLM
from glmkit.attn_backends import FlashMask
from glmkit.cache import KVCache
from glmkit.generation.engine import forward_tokens
from glmkit.layers import Rotation
from glmkit.placement import DeviceMapError, moved, placement_units, plan_device_map
from tests.conftest import TINY_DECODERS, VOCAB, reference_and_ours

LAYERS = 6


@pytest.fixture
def fake_cuda(monkeypatch):
    """Plans for CUDA devices this CPU machine lacks (planning reads only sizes; nothing is placed)."""
    monkeypatch.setattr(placement, "check_device_available", lambda device: None)


def meta_models(tied: bool = False):
    """The reference's GLM and ours, same config, on the meta device (only sizes are looked at)."""
    import transformers

    kwargs = {**TINY_DECODERS["glm"][3], "num_hidden_layers": LAYERS, "tie_word_embeddings": tied}
    with torch.device("meta"):
        ref = transformers.GlmForCausalLM(transformers.GlmConfig(vocab_size=VOCAB, **kwargs))
        ours = GlmForCausalLM(GlmConfig(vocab_size=VOCAB, **kwargs))
    return ref, ours


def reference_plan(ref, max_memory: dict, balanced: bool, dtype: torch.dtype) -> dict[str, int]:
    """accelerate's plan as transformers makes it for device_map="balanced" / "sequential". accelerate keeps
    room for the largest layer on the first GPU (where it runs CPU-offloaded layers); glmkit never offloads, so
    the oracle gets that room added to the first device's max_memory."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    no_split = ref._no_split_modules
    if balanced:
        max_memory = get_balanced_memory(ref, max_memory=dict(max_memory), no_split_module_classes=no_split,
                                         dtype=dtype)  # fmt: skip
    layer = 0
    for module in ref.modules():
        if type(module).__name__ in no_split:
            layer = max(layer, sum(p.numel() * dtype.itemsize for p in module.parameters()))
    first = min(max_memory)
    max_memory = {**max_memory, first: max_memory[first] + layer}
    return dict(infer_auto_device_map(ref, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype))


def expanded(device_map: dict, units: list[str]) -> dict[str, int]:
    """A (possibly merged) map -> every unit's device (the longest key that is the unit or contains it)."""
    out = {}
    for unit in units:
        keys = [k for k in device_map if k == "" or unit == k or unit.startswith(k + ".")]
        out[unit] = device_map[max(keys, key=len)]
    return out


LAYER_BYTES = 144640  # one tiny GLM layer in fp32 (checked against the model below)


@pytest.mark.parametrize("strategy", ["balanced", "sequential"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("max_memory", [
    {0: 10**6, 1: 10**6},
    {0: 10**6, 1: 10**6, 2: 10**6},
    {0: 10**6, 1: 10**6, 2: 10**6, 3: 10**6},
    {0: 2 * LAYER_BYTES, 1: 3 * LAYER_BYTES, 2: 10**6},
    {0: 3 * LAYER_BYTES // 2, 1: 4 * LAYER_BYTES, 2: 4 * LAYER_BYTES, 3: 10**6},
], ids=["2gpu", "3gpu", "4gpu", "3gpu-uneven", "4gpu-small-first"])  # fmt: skip
def test_plan_matches_reference_accelerate(fake_cuda, strategy, dtype, max_memory):
    ref, ours = meta_models()
    assert placement.unit_sizes(ours, torch.float32)["model.layers.0"] == LAYER_BYTES
    plan = plan_device_map(ours, strategy, dtype, max_memory)
    expected = expanded(reference_plan(ref, max_memory, strategy == "balanced", dtype), list(plan))
    assert {name: device.index for name, device in plan.items()} == expected
    if strategy == "balanced":
        assert len({d.index for d in plan.values()}) > 1  # each case really splits


def test_tied_head_goes_with_its_embedding(fake_cuda):
    _, ours = meta_models(tied=True)
    plan = plan_device_map(ours, "balanced", torch.float32, {0: 10**6, 1: 10**6})
    assert plan["lm_head"] == plan["model.embed_tokens"] == torch.device("cuda", 0)
    assert plan[f"model.layers.{LAYERS - 1}"] == torch.device("cuda", 1)


def test_explicit_map_by_prefix(fake_cuda):
    _, ours = meta_models()
    plan = plan_device_map(ours, {"model": 0, "model.layers.4": 1, "model.layers.5": "cuda:1", "lm_head": "cpu"},
                           torch.float32)  # fmt: skip
    assert placement_units(ours) == list(plan)
    assert [plan[f"model.layers.{i}"].index for i in range(LAYERS)] == [0, 0, 0, 0, 1, 1]
    assert plan["model.norm"] == torch.device("cuda", 0) and plan["lm_head"] == torch.device("cpu")


def test_hf_device_map_merges_as_the_reference(fake_cuda):
    ref, ours = meta_models()
    memory = {0: 10**6, 1: 10**6}
    plan = plan_device_map(ours, "balanced", torch.float32, memory)
    merged = placement._merged({name: device.index for name, device in plan.items()})
    assert merged == reference_plan(ref, memory, True, torch.float32)
    assert placement._merged({u: 0 for u in plan}) == {"": 0}


@pytest.mark.parametrize("bad, message", [
    ({"model.embed_tokens": "cpu"}, "leaves modules unplaced: model.layers.0"),
    ({"": "cpu", "model.decoder": "cpu"}, "does not have: model.decoder"),
    ({"": "cpu", "model.layers.0.mlp": "cpu"}, "glmkit places whole layers"),
    ({"": "cpu", "lm_head": "disk"}, "does not offload weights to disk"),
    ({"": "cpu", "lm_head": "tpu:3"}, "not a device"),
])  # fmt: skip
def test_bad_maps(bad, message):
    _, ours = meta_models()
    with pytest.raises(DeviceMapError, match=message):
        plan_device_map(ours, bad, torch.float32)


def test_max_memory_too_small(fake_cuda):
    _, ours = meta_models()
    with pytest.raises(DeviceMapError, match=r"does not fit max_memory .*model.layers.2"):
        plan_device_map(ours, "sequential", torch.float32, {0: "200KB", 1: "200KB"})
    with pytest.raises(DeviceMapError, match=r"max_memory\[1\] = 'lots'"):
        plan_device_map(ours, "balanced", torch.float32, {0: 10**6, 1: "lots"})


def test_missing_devices_and_tensor_parallel(save_dir):
    reference_and_ours("glm", save_dir)
    if torch.cuda.device_count() < 8:
        with pytest.raises(ValueError, match="cuda:7"):
            GlmForCausalLM.from_pretrained(save_dir, device_map={"": "cpu", "lm_head": "cuda:7"})
    with pytest.raises(ValueError, match="max_memory is used with device_map"):
        GlmForCausalLM.from_pretrained(save_dir, max_memory={"cpu": 10**9})
    with pytest.raises(ValueError, match="quantization .* cannot be combined with a device_map"):
        GlmForCausalLM.from_pretrained(save_dir, device_map={"": "cpu", "lm_head": "cpu"}, quantization="int8")
    with pytest.raises(DeviceMapError, match="does not fit max_memory"):
        GlmForCausalLM.from_pretrained(save_dir, device_map="auto", max_memory={"cpu": "10KB"})


def test_moved_copies_small_objects_and_leaves_caches():
    rot = Rotation(torch.ones(2, 3, 4), torch.zeros(2, 3, 4), False, 8)
    cache = KVCache()
    mask = FlashMask(torch.ones(2, 1, 3, 3, dtype=torch.bool))
    args = moved((torch.ones(2), rot, mask, cache, None, False), torch.device("meta"))
    assert args[0].is_meta and args[1].cos.is_meta and args[1].sin.is_meta and args[1] is not rot
    assert not rot.cos.is_meta and args[1].half == rot.half
    assert all(t.is_meta for t in vars(args[2]).values() if isinstance(t, torch.Tensor))
    assert args[3] is cache and args[4:] == (None, False)


@pytest.mark.parametrize("family", list(TINY_DECODERS))
def test_module_map_gives_the_plain_models_numbers(save_dir, family):
    """Every unit placed (on the one device this machine has): hooks in place, logits, cached and padded greedy
    generation and the static cache all equal the plain model's, which equals the reference."""
    ref, plain = reference_and_ours(family, save_dir)
    units = placement_units(plain)
    mapped = type(plain).from_pretrained(save_dir, device_map={u: "cpu" for u in units})
    assert mapped.hf_device_map == {u: "cpu" for u in units}
    assert all(mapped.get_submodule(u)._forward_pre_hooks for u in units if "rotary" not in u)
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    torch.testing.assert_close(mapped(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    for kwargs in ({}, {"attention_mask": mask}):
        assert torch.equal(mapped.generate(ids, **greedy, **kwargs), ref.generate(ids, **greedy, **kwargs))
    # the static cache gives the same greedy tokens (the reference's XGLM has no static cache to compare with)
    assert torch.equal(mapped.generate(ids, **greedy, cache_implementation="static"), ref.generate(ids, **greedy))


@pytest.mark.parametrize("family", list(TINY_DECODERS))
def test_cpu_and_meta_split_runs_every_cache_path(save_dir, family):
    """Real movement on a CPU machine: the embedding and layer 0 on the CPU, the rest on the meta device (which
    computes shapes only, and refuses any op mixing it with CPU tensors). A padded prompt, a cached step, beam
    reordering and a ragged batch of stacked caches all run; each layer's KV buffers sit on its own device.
    (XGLM untied here: a tied head sits with its embedding, and meta logits cannot come back to the CPU.)"""
    _, plain = reference_and_ours(family, save_dir, tie_word_embeddings=False)
    units = placement_units(plain)
    split = type(plain).from_pretrained(save_dir, device_map={u: "cpu" if i < 2 else "meta"
                                                              for i, u in enumerate(units)})  # fmt: skip
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    out = split(ids, attention_mask=mask, use_cache=True)
    head = next(split.lm_head.parameters()).device
    assert out.logits.shape == (2, 7, VOCAB) and out.logits.device == head
    assert [k.device.type for k in out.past_key_values.keys] == ["cpu", "meta"]
    assert out.past_key_values.lengths.device.type == "cpu"
    cache = out.past_key_values
    step = split(ids[:, :1], attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=cache, use_cache=True)
    assert step.logits.shape == (2, 1, VOCAB)
    cache.reorder(torch.tensor([1, 0]))
    ragged = KVCache.stack([split(ids[:1, :3], use_cache=True).past_key_values,
                            split(ids[:1, :5], use_cache=True).past_key_values])  # fmt: skip
    assert not ragged.uniform
    assert split(ids[:, :2], past_key_values=ragged, use_cache=True).logits.shape == (2, 2, VOCAB)
    assert [k.device.type for k in ragged.keys] == ["cpu", "meta"]


def test_compile_refused_over_several_devices(save_dir):
    _, plain = reference_and_ours("glm", save_dir)
    plain.hf_device_map = {"model": "cpu", "lm_head": 0}  # as a split model reports itself
    with pytest.raises(DeviceMapError, match="compile=True does not run on a model placed over several devices"):
        plain.generate(torch.tensor([[5, 6]]), max_new_tokens=2, do_sample=False, compile=True)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 or more CUDA devices")
@pytest.mark.parametrize("family", list(TINY_DECODERS))
def test_gpu_split_matches_single_device(save_dir, family):
    """The layers split over every visible GPU: logits, greedy tokens (plain, padded, static) and the server's
    scheduler path equal the model on one GPU; each layer's KV buffers live on that layer's device."""
    _, plain = reference_and_ours(family, save_dir, num_layers=4) if family == "xglm" else \
        reference_and_ours(family, save_dir, num_hidden_layers=4)  # fmt: skip
    single = type(plain).from_pretrained(save_dir, device_map="cuda:0")
    split = type(plain).from_pretrained(save_dir, device_map="balanced")
    devices = sorted(set(split.hf_device_map.values()), key=str)
    assert len(devices) >= 2, split.hf_device_map
    ids = torch.randint(3, VOCAB, (2, 9), device="cuda:0")
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    logits = split(ids).logits
    assert logits.device == next(split.lm_head.parameters()).device
    torch.testing.assert_close(logits.to("cuda:0"), single(ids).logits, rtol=1e-4, atol=1e-4)
    for kwargs in ({}, {"attention_mask": mask}, {"cache_implementation": "static"}):
        want = single.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs)
        assert torch.equal(split.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, **kwargs), want)
    out = split(ids, use_cache=True)
    layer_devices = [k.device for k in out.past_key_values.keys]
    assert layer_devices == [next(layer.parameters()).device for layer in split.base_model.layers]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", list(TINY_DECODERS))
def test_gpu_and_cpu_split_matches_the_reference(save_dir, family):
    """Real movement with one GPU: the embedding and first layer on the GPU, the rest and the head on the CPU
    (and the other way round); logits and greedy tokens equal the reference on the CPU."""
    ref, plain = reference_and_ours(family, save_dir)
    units = placement_units(plain)
    ids = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    for first, rest in (("cuda:0", "cpu"), ("cpu", "cuda:0")):
        split = type(plain).from_pretrained(save_dir, device_map={u: first if i < 2 else rest
                                                                   for i, u in enumerate(units)})  # fmt: skip
        inputs = ids.to(first)
        logits = split(inputs).logits
        assert logits.device == next(split.lm_head.parameters()).device  # (a tied head sits with the embedding)
        torch.testing.assert_close(logits.cpu(), ref(ids).logits, rtol=1e-4, atol=1e-4)
        for kwargs in ({}, {"attention_mask": mask}):
            want = ref.generate(ids, **greedy, **kwargs)
            got = split.generate(inputs, **greedy, **{k: v.to(first) for k, v in kwargs.items()})
            assert torch.equal(got.cpu(), want)
        beams = dict(max_new_tokens=4, do_sample=False, num_beams=2, pad_token_id=0)  # reorders the cache
        assert torch.equal(split.generate(inputs, **beams).cpu(), ref.generate(ids, **beams))
        out = split(inputs, use_cache=True)
        assert out.past_key_values.keys[0].device.type == torch.device(first).type
        assert out.past_key_values.keys[-1].device.type == torch.device(rest).type
        # rows at different lengths (a server batch): per-row slots written on each layer's device
        rows = [ids[:1, :3], ids[1:, :5]]
        ragged = KVCache.stack([split(r.to(first), use_cache=True).past_key_values for r in rows])
        got = forward_tokens(split, ragged, ids[:, 5:7].to(first), last_only=False).cpu()  # the scheduler's step
        for r, row in enumerate(rows):
            want = ref(torch.cat([row, ids[r : r + 1, 5:7]], 1)).logits[:, -2:]
            torch.testing.assert_close(got[r : r + 1], want, rtol=1e-4, atol=1e-4)
