"""The row layout (embconstraint._mechanism.layout.Layout): user order <-> table order."""

from __future__ import annotations

import torch

from embconstraint._mechanism import Layout


def test_prefix_layout_is_the_user_order():
    lay = Layout.from_indices(None, num_pinned=3, num_rows=5)
    assert lay.kind == "prefix" and lay.rows is None
    table = torch.arange(10.0).reshape(5, 2)
    assert lay.to_user_order(table) is table and lay.user_to_layout(table) is table
    assert lay.pinned_rows().tolist() == [0, 1, 2] and lay.free_rows().tolist() == [3, 4]
    ids = torch.tensor([4, 0])
    lidx, lpad = lay.index(ids, -1)
    assert lidx is ids and lpad == 4
    assert Layout.from_indices(torch.arange(3), 3, 5).kind == "prefix"


def test_scattered_layout_round_trips_and_remaps_ids():
    lay = Layout.from_indices(torch.tensor([3, 0]), num_pinned=2, num_rows=5)
    assert lay.kind == "scattered" and lay.rows.tolist() == [3, 0, 1, 2, 4]
    weight = torch.arange(10.0).reshape(5, 2)
    table = lay.user_to_layout(weight)
    assert torch.equal(table[0], weight[3]) and torch.equal(table[1], weight[0])
    assert torch.equal(lay.to_user_order(table), weight)
    ids = torch.tensor([[0, 3], [4, 1]])
    lidx, lpad = lay.index(ids, padding_idx=3)
    assert torch.equal(table[lidx], weight[ids]) and lpad == 0
    assert lay.cached_devices == (torch.device("cpu"),)
