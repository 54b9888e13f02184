"""Packed sequences: position_ids restarting at 0 inside a row mark documents that never attend to each other.

Each packed row's logits are compared with the reference (transformers) model run on every document alone.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_DECODERS, VOCAB, assert_close, reference_and_ours

from glmkit.layers import packed_documents

FAMILIES = sorted(TINY_DECODERS)
LENGTHS = [[5, 3, 4], [2, 7, 3]]  # two rows of 12 tokens, documents of these lengths


def packed_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[list[torch.Tensor]]]:
    """(ids (B, T), position_ids (B, T), the documents of each row)."""
    g = torch.Generator().manual_seed(seed)
    docs = [[torch.randint(3, VOCAB, (n,), generator=g) for n in row] for row in LENGTHS]
    ids = torch.stack([torch.cat(row) for row in docs])
    positions = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in LENGTHS])
    return ids, positions, docs


def alone(ref, docs: list[list[torch.Tensor]]) -> torch.Tensor:
    """The reference's logits of every document run by itself, concatenated back into rows (B, T, V)."""
    with torch.no_grad():
        rows = [torch.cat([ref(d[None], position_ids=torch.arange(len(d))[None]).logits[0] for d in row])
                for row in docs]  # fmt: skip
    return torch.stack(rows)


def test_packed_documents_split_at_zero():
    assert packed_documents(torch.tensor([[0, 1, 2, 3]])) is None
    got = packed_documents(torch.tensor([[0, 1, 0, 1, 2, 0], [3, 4, 0, 1, 2, 3]]))
    assert got.tolist() == [[1, 1, 2, 2, 2, 3], [1, 1, 2, 2, 2, 2]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("use_cache", [False, None])
def test_packed_row_equals_documents_alone(family, use_cache, save_dir):
    ref, ours = reference_and_ours(family, save_dir)
    ids, positions, docs = packed_batch()
    with torch.no_grad():
        got = ours(ids, position_ids=positions, use_cache=use_cache).logits
    assert_close(got, alone(ref, docs), 1e-4, f"{family} packed rows")


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_loss_and_shared_positions(family, save_dir):
    """Training: one (1, T) position row shared by the batch, labels, gradients flow."""
    ref, ours = reference_and_ours(family, save_dir)
    ids, positions, docs = packed_batch()
    ids = ids[:1].expand(2, -1)
    ours.train()
    out = ours(ids, position_ids=positions[:1], labels=ids)
    out.loss.backward()
    assert_close(out.logits.detach()[0], alone(ref, docs[:1])[0], 1e-4, f"{family} shared positions")


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_mask_turns_packing_off(family, save_dir):
    """With an attention_mask the positions are only positions (the reference's rule): no documents."""
    ref, ours = reference_and_ours(family, save_dir)
    ids, positions, _ = packed_batch()
    mask = torch.ones_like(ids)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, position_ids=positions).logits
        want = ref(ids, attention_mask=mask, position_ids=positions.clone()).logits
    assert_close(got, want, 1e-4, f"{family} masked, not packed")
