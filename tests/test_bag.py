"""``nn.EmbeddingBag`` on a constrained weight: every mode, per-sample weights, offsets and
padding give the plain bag's output, the gradient of ``per_sample_weights``, and the plain
gradient restricted to the free rows."""

from __future__ import annotations

import pytest
import torch
from helpers import D, N, V, constrained_and_plain, free_param
from torch import nn

BAG_CASES = [
    ("sum", {}, False),
    ("sum", {}, True),
    ("mean", {}, False),
    ("max", {}, False),
    ("sum", {"padding_idx": 10}, True),
    ("mean", {"padding_idx": 2}, False),
    ("mean", {"padding_idx": 10}, False),
    ("max", {"padding_idx": 10}, False),
    ("mean", {"sparse": True}, False),
    ("sum", {"sparse": True}, True),
]


@pytest.mark.parametrize("offsets", [False, True], ids=["2d", "offsets"])
@pytest.mark.parametrize(("mode", "kw", "weighted"), BAG_CASES)
def test_embedding_bag_matches_plain(mode, kw, weighted, offsets, layout):
    emb, plain, _ = constrained_and_plain(nn.EmbeddingBag, indices=layout.indices, mode=mode, **kw)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (4, 5), generator=gen)
    x[0, :2] = 2
    x[1, 1] = 10
    psw = torch.rand(4, 5, generator=gen, requires_grad=True) if weighted else None
    args = {"input": x, "per_sample_weights": psw}
    if offsets:  # 1-D input with offsets, including an empty bag
        args = {
            "input": x.flatten(),
            "offsets": torch.tensor([0, 5, 5, 12]),
            "per_sample_weights": None if psw is None else psw.flatten(),
        }
    out, ref_out = emb(**args), plain(**args)
    assert torch.equal(out, ref_out)
    upstream = torch.randn_like(out)
    psw_grad = None
    if psw is not None:
        (psw_grad,) = torch.autograd.grad((out * upstream).sum(), psw, retain_graph=True)
    (out * upstream).sum().backward()
    ref_psw_grad = None
    if psw is not None:
        (ref_psw_grad,) = torch.autograd.grad((ref_out * upstream).sum(), psw, retain_graph=True)
        torch.testing.assert_close(psw_grad, ref_psw_grad)
    (ref_out * upstream).sum().backward()
    grad, ref_grad = free_param(emb).grad, plain.weight.grad
    if kw.get("sparse"):
        grad, ref_grad = grad.to_dense(), ref_grad.to_dense()
    torch.testing.assert_close(grad, ref_grad[layout.free])


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_scale_grad_by_freq_divides_by_the_true_count(mode):
    """torch 2.13's CPU kernel divides by the wrong count (pytorch/pytorch#190063); the
    constrained bag divides each free row's gradient by that row's frequency in the batch."""
    emb, plain, _ = constrained_and_plain(nn.EmbeddingBag, mode=mode, scale_grad_by_freq=True)
    x = torch.tensor([[8, 8, 9, 1], [11, 8, 0, 9]])
    emb(x).sum().backward()
    unscaled = nn.EmbeddingBag(V, D, mode=mode)
    unscaled.weight.data.copy_(plain.weight.data)
    unscaled(x).sum().backward()
    counts = torch.bincount(x.flatten(), minlength=V).clamp_min(1).float()
    expected = unscaled.weight.grad / counts[:, None]
    if mode == "sum":  # row 8: three hits of gradient 1, scaled by 1/3
        assert torch.equal(free_param(emb).grad[1], torch.ones(D))
    torch.testing.assert_close(free_param(emb).grad, expected[N:])
