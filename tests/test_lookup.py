"""Lookups (``nn.Embedding``, ``F.embedding``) on a constrained weight: the same output as a plain
embedding holding the merged weight, the plain gradient restricted to the free rows, and the
errors plain torch raises for ids out of range."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import SCATTERED, D, N, V, constrained, constrained_and_plain, free_param
from torch import nn


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"padding_idx": 3},
        {"padding_idx": 10},
        {"padding_idx": -1},
        {"scale_grad_by_freq": True},
        {"sparse": True},
    ],
    ids=["plain", "pad_pinned_or_free", "pad_free", "pad_negative", "scale_grad_by_freq", "sparse"],
)
def test_embedding_forward_and_gradients_match_plain(kw, layout):
    emb, plain, _ = constrained_and_plain(indices=layout.indices, **kw)
    x = torch.tensor([[0, 3, 3, 10, 11], [10, 1, 3, 6, 8]])
    out, ref_out = emb(x), plain(x)
    assert torch.equal(out, ref_out)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (ref_out * upstream).sum().backward()
    grad, ref_grad = free_param(emb).grad, plain.weight.grad
    if kw.get("sparse"):
        grad, ref_grad = grad.to_dense(), ref_grad.to_dense()
    assert grad.shape == (V - N, D)
    torch.testing.assert_close(grad, ref_grad[layout.free])


def _plain_error(cls: type, ids: torch.Tensor, **kwargs) -> type[Exception]:
    try:
        cls(V, D, **kwargs)(ids)
    except Exception as err:  # noqa: BLE001 - the type plain torch raises is what we compare
        return type(err)
    raise AssertionError("plain torch accepted the ids")


@pytest.mark.parametrize("ids", [[-1], [2, -V], [V], [-V - 1]], ids=str)
@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (nn.Embedding, {}),
        (nn.Embedding, {"padding_idx": 1}),
        (nn.EmbeddingBag, {}),
        (nn.EmbeddingBag, {"padding_idx": 1}),
    ],
    ids=["Embedding", "Embedding-padding", "EmbeddingBag", "EmbeddingBag-padding"],
)
def test_out_of_range_ids_raise_like_plain_torch(layout, cls, kwargs, ids) -> None:
    emb = constrained(layout.indices, cls, **kwargs)
    with pytest.raises(_plain_error(cls, torch.tensor([ids]), **kwargs)):
        emb(torch.tensor([ids]))


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda w: F.embedding(torch.tensor([-1]), w), id="F.embedding"),
        pytest.param(
            lambda w: F.embedding_bag(torch.tensor([-1]), w, torch.tensor([0])), id="F.embedding_bag-offsets"
        ),
    ],
)
def test_negative_ids_raise_in_functional_calls(fn) -> None:
    emb = constrained(SCATTERED)
    with pytest.raises((IndexError, RuntimeError)):
        fn(emb.weight)
