"""The shared checks (embconstraint._common, embconstraint._mechanism.checks): bitwise equality, PinnedRowsError, the error policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embconstraint import PinnedRowsError, constrain
from embconstraint._common import bitwise_equal, equal_bits
from embconstraint._mechanism import checked_indices


def test_bitwise_equal_compares_bits():
    a = torch.tensor([0.0, float("nan"), 1.0])
    assert bitwise_equal(a, a.clone())
    assert not bitwise_equal(a, torch.tensor([-0.0, float("nan"), 1.0]))  # torch.equal says equal
    assert not bitwise_equal(a, a[:2])
    assert equal_bits(a, torch.tensor([-0.0, float("nan"), 2.0])).tolist() == [False, True, False]


def test_a_signed_zero_in_a_pinned_row_is_a_change():
    emb = constrain(nn.Embedding(4, 2), torch.zeros(2, 2))
    with torch.no_grad(), pytest.raises(PinnedRowsError, match="would change pinned rows"):
        emb.weight.neg_()
    assert bitwise_equal(emb.weight[:2], torch.zeros(2, 2))


def test_load_state_dict_with_other_pinned_rows_raises_pinned_rows_error():
    emb = constrain(nn.Embedding(4, 2), torch.zeros(2, 2))
    before = emb.weight.detach().clone()
    assert issubclass(PinnedRowsError, RuntimeError)
    with pytest.raises(PinnedRowsError, match="Pass on_mismatch='checkpoint'"):
        nn.Sequential(emb).load_state_dict({"0.weight": torch.ones(4, 2)})
    assert bitwise_equal(emb.weight, before)


def test_indices_checked_without_the_embedding_size():
    assert checked_indices([5, 1], 2, None).tolist() == [5, 1]
    with pytest.raises(ValueError, match="non-negative"):
        checked_indices([-1, 1], 2, None)
    with pytest.raises(ValueError, match=r"must lie in \[0, 5\)"):
        checked_indices([5, 1], 2, 5)


@pytest.mark.parametrize(
    "call",
    [
        lambda w: F.embedding(torch.tensor([0]), w, max_norm=1.0),
        lambda w: F.embedding_bag(torch.tensor([[0]]), w, max_norm=1.0),
    ],
)
def test_max_norm_is_a_value_error_everywhere(call):
    with pytest.raises(ValueError, match="max_norm"):
        constrain(nn.Embedding(4, 2, max_norm=1.0), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="max_norm"):
        call(constrain(nn.Embedding(4, 2), torch.zeros(2, 2)).weight)
