"""A detached constrained weight (``weight.detach()``, ``weight.data``) is a constant: no op on it
sends a gradient to the constrained module, and a new leaf or Parameter made from it gets its own
gradient (a frozen teacher, a student initialised from the model, gradients w.r.t. the table)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import IDS, D, V, constrained, free_param
from torch import nn

_DETACHED_OPS = {  # lookups: the constrained weight's own kernels must treat a detached weight as a constant
    "F.embedding": lambda w: F.embedding(IDS, w),
    "F.embedding_bag": lambda w: F.embedding_bag(IDS.view(1, -1), w, mode="sum"),
    "from_pretrained(freeze=True)": lambda w: nn.Embedding.from_pretrained(w, freeze=True)(IDS),
    "EmbeddingBag.from_pretrained": lambda w: nn.EmbeddingBag.from_pretrained(w, freeze=True)(
        IDS.view(1, -1)
    ),
}
_OTHER_OPS = {  # any other op on the detached weight
    "clone": lambda w: w.clone(),
    "getitem": lambda w: w[IDS],
    "index_select": lambda w: w.index_select(0, IDS),
    "matmul": lambda w: torch.ones(2, V) @ w,
    "F.linear": lambda w: F.linear(torch.ones(2, D), w),
    "mul": lambda w: w * 2,
    "to(float64)": lambda w: w.double(),
    "numpy": lambda w: torch.tensor(w.numpy()),
}
_WAYS = {"detach()": lambda e: e.weight.detach(), ".data": lambda e: e.weight.data}


def _assert_constant(emb: nn.Module, out: torch.Tensor, expected: torch.Tensor) -> None:
    assert not out.requires_grad
    assert torch.equal(out, expected)
    student = torch.ones_like(out, requires_grad=True)  # a loss that mixes in the constant
    (student * out).sum().backward()
    assert free_param(emb).grad is None  # no gradient reached the constrained embedding


@pytest.mark.parametrize("way", list(_WAYS))
@pytest.mark.parametrize("op", list(_DETACHED_OPS))
def test_lookup_on_detached_weight_is_constant(layout, op, way) -> None:
    emb = constrained(layout.indices)
    expected = _DETACHED_OPS[op](emb.weight.detach().clone())  # a plain tensor, same values
    _assert_constant(emb, _DETACHED_OPS[op](_WAYS[way](emb)), expected)


@pytest.mark.parametrize("op", list(_OTHER_OPS))
def test_other_ops_on_detached_weight_are_constant(layout, op) -> None:
    emb = constrained(layout.indices)
    expected = _OTHER_OPS[op](emb.weight.detach().clone())
    _assert_constant(emb, _OTHER_OPS[op](emb.weight.detach()), expected)


def test_frozen_teacher_from_detached_weight_does_not_train_the_model(layout) -> None:
    emb = constrained(layout.indices)
    teacher = nn.Embedding.from_pretrained(emb.weight.detach(), freeze=True)
    before = emb.weight.detach().clone()
    opt = torch.optim.SGD(emb.parameters(), lr=0.5)
    student = torch.zeros(
        len(IDS), D, requires_grad=True
    )  # plain torch refuses a backward of the teacher alone
    F.mse_loss(teacher(IDS), student).backward()
    opt.step()
    assert torch.equal(emb.weight.detach(), before)


def test_new_leaf_from_detached_weight_receives_the_gradient(layout) -> None:
    emb = constrained(layout.indices)
    leaf = emb.weight.detach().requires_grad_()  # e.g. gradients w.r.t. the embedding table
    F.embedding(IDS, leaf).sum().backward()
    counts = torch.bincount(IDS, minlength=V).float()[:, None].expand(V, D)
    assert leaf.grad is not None and torch.equal(leaf.grad, counts)
    assert free_param(emb).grad is None


_TRAINABLE_COPIES = {
    "from_pretrained(freeze=False)": lambda w: nn.Embedding.from_pretrained(w, freeze=False).weight,
    "nn.Parameter": nn.Parameter,
}


@pytest.mark.parametrize("make", list(_TRAINABLE_COPIES))
def test_trainable_copy_of_detached_weight_is_its_own_parameter(layout, make) -> None:
    emb = constrained(layout.indices)
    student = _TRAINABLE_COPIES[make](emb.weight.detach())  # e.g. a student initialised from the model
    F.embedding(IDS, student).sum().backward()
    counts = torch.bincount(IDS, minlength=V).float()[:, None].expand(V, D)
    assert student.grad is not None and torch.equal(student.grad, counts)
    assert free_param(emb).grad is None
