"""WeightReader.get_slice: the bytes of one rank's shard, equal to slicing the whole tensor."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import glmkit.checkpoint as checkpoint
from glmkit.checkpoint import WeightReader
from glmkit.distributed.plan import TensorParallelError, head_split

TENSORS = {"matrix": torch.randn(11, 13), "bf16": torch.randn(7, 5, 3).to(torch.bfloat16), "bias": torch.randn(9)}


@pytest.mark.parametrize("chunk", [4 << 20, 16])  # one block, or many blocks through a tiny staging buffer
@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_slice_equals_slicing_the_whole_tensor(tmp_path, monkeypatch, chunk, dtype):
    monkeypatch.setattr(checkpoint, "_READ_CHUNK", chunk)
    save_file(TENSORS, str(tmp_path / "model.safetensors"))
    reader = WeightReader(tmp_path)
    for name, whole in TENSORS.items():
        for dim in range(whole.dim()):
            for start, stop in [(0, 1), (1, whole.shape[dim]), (2, whole.shape[dim] - 1), (2, 2)]:
                got = reader.get_slice(name, dim, start, stop, dtype)
                expected = whole.narrow(dim, start, stop - start)
                expected = expected if dtype is None else expected.to(dtype)
                assert got.dtype == expected.dtype and torch.equal(got, expected), (name, dim, start, stop)


def test_pytorch_bin_checkpoints_slice_too(tmp_path):
    torch.save(TENSORS, tmp_path / "pytorch_model.bin")
    reader = WeightReader(tmp_path)
    assert torch.equal(reader.get_slice("matrix", 1, 3, 8), TENSORS["matrix"][:, 3:8])
    assert torch.equal(reader.get_slice("bf16", 0, 1, 4, torch.float32), TENSORS["bf16"][1:4].float())
    rows = reader.get_slice("matrix", 0, 2, 5)
    rows.add_(1)  # private memory: the mapped file (and the next read) keep the saved values
    assert torch.equal(reader.get_slice("matrix", 0, 2, 5), TENSORS["matrix"][2:5])


def test_kv_heads_replicated_where_fewer_than_ranks():
    """8 query heads over 2 kv heads at 4 ranks: ranks 0-1 read kv head 0, ranks 2-3 kv head 1."""
    q, kv = head_split(8, 2, 4)
    assert [q(r) for r in range(4)] == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert [kv(r) for r in range(4)] == [(0, 1), (0, 1), (1, 2), (1, 2)]
    with pytest.raises(TensorParallelError, match="num_key_value_heads"):
        head_split(12, 3, 2)
    with pytest.raises(TensorParallelError, match=r"num_attention_heads \(6\)"):
        head_split(6, 2, 4)
