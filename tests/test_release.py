"""``release()``: a plain module again, with the same Parameter object (now (V, D)) holding the
merged weight; a pending gradient and a live optimizer's state are widened to (V, D), so that
training goes on exactly as on a plain embedding; constrain/release cycles keep every free row's
gradient."""

from __future__ import annotations

import pytest
import torch
from helpers import SCATTERED, D, N, V, constrained, constrained_and_plain, free_param, loss_of, reference
from torch import nn

from embconstraint import constrain, is_constrained, merged_state_dict, release


def test_release_leaves_a_plain_trainable_embedding(layout):
    emb, _, _ = constrained_and_plain(indices=layout.indices)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    emb(torch.arange(V)).sum().backward()
    opt.step()
    merged = emb.weight.detach().clone()
    param = free_param(emb)
    assert release(emb) is emb
    assert not is_constrained(emb)
    assert type(emb) is nn.Embedding and type(emb.weight) is nn.Parameter
    assert emb.weight is param  # same Parameter object, now (V, D)
    assert torch.equal(emb.weight, merged)
    assert list(emb.state_dict()) == ["weight"]
    emb.weight.grad = None
    emb(torch.arange(V)).sum().backward()
    assert emb.weight.grad.shape == (V, D) and torch.equal(emb.weight.grad, torch.ones(V, D))
    with pytest.raises(ValueError, match="holds no constrained embedding"):
        release(emb)


def test_release_walks_a_model():
    model = nn.Sequential(nn.Embedding(V, D), nn.Linear(D, 2), nn.EmbeddingBag(V, D))
    constrain(model[0], torch.zeros(N, D))
    constrain(model[2], torch.ones(N, D), indices=SCATTERED)
    merged = merged_state_dict(model)
    release(model)
    assert not any(is_constrained(m) for m in model.modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, merged[key])


# -- gradients and optimizers --------------------------------------------------------------------


def _full_grad(weight: torch.Tensor) -> torch.Tensor:
    """The (V, D) gradient of ``loss_of`` at ``weight``, computed on a plain embedding."""
    plain = nn.Embedding.from_pretrained(weight.detach().clone(), freeze=False)
    loss_of(plain).backward()
    return plain.weight.grad


def test_release_merges_a_pending_grad(layout) -> None:
    emb = constrained(layout.indices)
    loss_of(emb).backward()
    expected = _full_grad(emb.weight)
    expected[layout.pinned] = 0  # pinned rows had no gradient
    release(emb)
    assert emb.weight.grad is not None and torch.equal(emb.weight.grad, expected)
    loss_of(emb).backward()  # accumulates into the (V, D) grad, as on any Parameter
    assert torch.equal(emb.weight.grad, expected + _full_grad(emb.weight))


def test_release_without_a_grad_leaves_none(layout) -> None:
    emb = constrained(layout.indices)
    release(emb)
    assert emb.weight.grad is None


def test_sgd_step_after_release_does_not_move_pinned_rows() -> None:
    torch.manual_seed(0)
    ref = torch.randn(V - 1, D)
    emb = constrain(nn.Embedding(V, D), ref)  # one free row: its grad broadcasts onto (V, D)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    loss_of(emb).backward()
    free_before, grad = emb.weight[V - 1].detach().clone(), free_param(emb).grad[0].clone()
    release(emb)
    opt.step()
    assert torch.equal(emb.weight[: V - 1], ref)
    assert torch.equal(emb.weight[V - 1], free_before - 0.1 * grad)


_OPTIMIZERS = {
    "AdamW": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    "SGD-momentum": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
    "Adagrad": lambda p: torch.optim.Adagrad(p, lr=0.05),
    "Adam": lambda p: torch.optim.Adam(p, lr=0.05),
    "RMSprop": lambda p: torch.optim.RMSprop(p, lr=0.05, momentum=0.5),
}


def _widened(state: dict, free_rows: list[int], num_free: int) -> dict:
    """The optimizer state_dict with every (V - n, D) state tensor widened to (V, D)."""
    out = {"param_groups": state["param_groups"], "state": {}}
    for pid, per_param in state["state"].items():
        out["state"][pid] = {}
        for key, value in per_param.items():
            if isinstance(value, torch.Tensor) and value.shape == (num_free, D):
                wide = torch.zeros(V, D, dtype=value.dtype)
                wide[free_rows] = value
                value = wide
            out["state"][pid][key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


@pytest.mark.parametrize("name", list(_OPTIMIZERS))
def test_release_with_optimizer_keeps_training_all_rows(layout, name) -> None:
    emb = constrained(layout.indices)
    opt = _OPTIMIZERS[name](emb.parameters())
    for _ in range(2):  # stage 1: only the free rows train
        opt.zero_grad()
        loss_of(emb).backward()
        opt.step()
    rows = layout.free
    assert torch.equal(emb.parametrizations.weight.original, emb.weight[rows])  # state row k = free row k
    # the independent computation: a plain embedding with the widened state, same optimizer
    plain = nn.Embedding.from_pretrained(emb.weight.detach().clone(), freeze=False)
    plain_opt = _OPTIMIZERS[name](plain.parameters())
    plain_opt.load_state_dict(_widened(opt.state_dict(), rows, V - N))
    release(emb, optimizer=opt)
    for module, o in ((emb, opt), (plain, plain_opt)):  # stage 2: every row trains
        for _ in range(2):
            o.zero_grad()
            loss_of(module).backward()
            o.step()
    assert torch.equal(emb.weight, plain.weight)
    assert not torch.equal(emb.weight[layout.pinned], reference())  # pinned rows moved by real gradients


def test_release_merges_a_pending_sparse_grad(layout) -> None:
    emb = constrained(layout.indices, sparse=True)
    loss_of(emb).backward()
    expected = _full_grad(emb.weight)
    expected[layout.pinned] = 0
    release(emb)
    assert emb.weight.grad.is_sparse and emb.weight.grad.shape == (V, D)
    assert torch.equal(emb.weight.grad.to_dense(), expected)
    opt = torch.optim.SparseAdam(emb.parameters(), lr=0.1)
    opt.step()  # a sparse optimizer takes the widened sparse gradient
    assert torch.equal(emb.weight[layout.pinned], reference())  # zero gradient: not moved


def test_release_with_an_optimizer_keeps_scalar_state_and_others_untouched() -> None:
    emb = constrained()
    other = nn.Parameter(torch.ones(V - N, D))  # same shape as the free rows, another parameter
    opt = torch.optim.Adam([*emb.parameters(), other], lr=0.1)
    (loss_of(emb) + other.sum()).backward()
    opt.step()
    other_state = {k: v.clone() for k, v in opt.state[other].items()}
    step = opt.state[emb.parametrizations.weight.original]["step"].clone()
    release(emb, optimizer=opt)
    assert torch.equal(opt.state[emb.weight]["step"], step)
    assert opt.state[emb.weight]["exp_avg"].shape == (V, D)
    assert all(torch.equal(opt.state[other][k], v) for k, v in other_state.items())


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_constrain_keeps_the_free_rows_of_a_pending_grad(layout, sparse) -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(V, D, sparse=sparse)
    loss_of(emb).backward()
    pending = emb.weight.grad.to_dense().clone()
    constrain(emb, reference(), indices=layout.indices)
    assert torch.equal(free_param(emb).grad.to_dense(), pending[layout.free])
    loss_of(emb).backward()  # accumulates into the (V - n, D) gradient
    release(emb)  # and back: constrain and release cycles keep every free row's gradient
    expected = pending + _full_grad(emb.weight)
    expected[layout.pinned] = 0
    assert torch.equal(emb.weight.grad.to_dense(), expected)
