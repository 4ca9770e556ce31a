"""Output heads (``nn.Linear`` whose rows are vocabulary entries): constrain, train, save, release;
the ``F.linear`` kernel against an independent computation; heads tied to a constrained embedding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    DENSE_OPTIMIZERS,
    IDS,
    SCATTERED,
    D,
    N,
    Rows,
    StorageRecorder,
    V,
    free_param,
    reference,
)
from torch import nn

from embconstraint import PinnedRowsError, constrain, is_constrained, merged_state_dict, release
from embconstraint._mechanism import pin_of


def _head(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D, V, bias=bias)


@pytest.mark.parametrize("bias", [True, False])
def test_reference_linear_pins_weight_rows_and_bias_entries(layout, bias):
    indices = layout.indices
    head, ref = _head(bias), nn.Linear(D, N, bias=bias)
    before_w, before_b = head.weight.detach().clone(), bias and head.bias.detach().clone()
    assert constrain(head, ref, indices=indices) is head and is_constrained(head)
    free = layout.free
    assert torch.equal(head.weight[layout.pinned], ref.weight)
    assert torch.equal(head.weight[free], before_w[free])
    shapes = [tuple(p.shape) for p in head.parameters()]
    if bias:
        assert torch.equal(head.bias[layout.pinned], ref.bias)
        assert torch.equal(head.bias[free], before_b[free])
        assert shapes == [(V - N, D), (V - N,)]
    else:
        assert shapes == [(V - N, D)]
    assert list(head.state_dict()) == (["weight", "bias"] if bias else ["weight"])


@pytest.mark.parametrize("ref_kind", ["tensor", "embedding"])
def test_tensor_or_embedding_reference_pins_bias_at_current_values(layout, ref_kind):
    indices = layout.indices
    head = _head()
    ref = torch.randn(N, D) if ref_kind == "tensor" else nn.Embedding(N, D)
    bias_before = head.bias.detach().clone()
    constrain(head, ref, indices=indices)
    ref_w = ref if ref_kind == "tensor" else ref.weight
    assert torch.equal(head.weight[layout.pinned], ref_w)
    assert torch.equal(head.bias, bias_before)
    assert pin_of(head, "bias").layout is pin_of(head).layout  # one layout for both


def test_logits_and_gradients_match_a_plain_head(layout):
    indices = layout.indices
    head = constrain(_head(), torch.randn(N, D), indices=indices)
    plain = nn.Linear(D, V)
    with torch.no_grad():
        plain.weight.copy_(head.weight)
        plain.bias.copy_(head.bias)
    x = torch.randn(2, 3, D, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    out, ref = head(x), plain(x2)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    out.backward(g)
    ref.backward(g)
    free = layout.free
    assert torch.equal(x.grad, x2.grad)
    w_free = plain.weight.detach()[free].requires_grad_(True)  # F.linear's own backward, free rows only
    (g_free,) = torch.autograd.grad(nn.functional.linear(x2.detach(), w_free), w_free, g[..., free])
    assert torch.equal(free_param(head).grad, g_free)
    torch.testing.assert_close(free_param(head).grad, plain.weight.grad[free])
    assert torch.equal(pin_of(head, "bias").free_parameter.grad, plain.bias.grad[free])


def test_state_dict_round_trip_release_and_guard(layout):
    indices = layout.indices
    ref = nn.Linear(D, N)
    head = constrain(_head(), ref, indices=indices)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    head(torch.randn(4, D)).pow(2).sum().backward()
    opt.step()
    sd = merged_state_dict(head)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {"weight": (V, D), "bias": (V,)}
    other = constrain(_head(seed=1), ref, indices=indices)
    other.load_state_dict(sd)
    assert torch.equal(other.weight, head.weight) and torch.equal(other.bias, head.bias)
    plain = _head(seed=2)
    plain.load_state_dict(sd)
    assert torch.equal(plain.bias, head.bias)
    bad = {k: v.clone() for k, v in sd.items()}
    bad["bias"][layout.pinned[0]] += 1.0
    with pytest.raises(PinnedRowsError, match="bias would change pinned rows"):
        other.load_state_dict(bad)
    with torch.no_grad(), pytest.raises(PinnedRowsError):
        head.bias.add_(1.0)
    with torch.no_grad():
        head.bias[layout.free] = 3.0  # free entries may be written
    assert torch.equal(head.bias[layout.pinned], ref.bias)
    merged_w, merged_b = head.weight.detach().clone(), head.bias.detach().clone()
    params = list(head.parameters())
    assert release(head) is head and not is_constrained(head)
    assert type(head.weight) is nn.Parameter and type(head.bias) is nn.Parameter
    assert head.weight is params[0] and head.bias is params[1]  # optimizers keep their reference
    assert torch.equal(head.weight, merged_w) and torch.equal(head.bias, merged_b)


@pytest.mark.parametrize("bias", [True, False])
def test_deepcopy_and_dtype_conversion(bias):
    head = constrain(_head(bias), nn.Linear(D, N, bias=bias))
    clone = copy.deepcopy(head).double()
    assert torch.equal(clone.weight, head.weight.double())
    clone(torch.randn(2, D, dtype=torch.float64)).sum().backward()
    assert [tuple(p.grad.shape) for p in clone.parameters()] == [(V - N, D)] + ([(V - N,)] if bias else [])


# -- the F.linear kernel --------------------------------------------------------------------------


class _TiedLM(nn.Module):
    """A lookup and an output head sharing one (V, D) weight, with a head bias."""

    def __init__(self, dim: int = D, vocab: int = V) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(vocab, dim), nn.Linear(dim, vocab)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def _constrained_model(tied: bool, indices, dim: int = D, vocab: int = V, n: int = N):
    torch.manual_seed(0)
    model = _TiedLM(dim, vocab)
    if tied:
        constrain(model.emb, torch.randn(n, dim), root=model, indices=indices)
    else:
        model.head.weight = nn.Parameter(torch.randn(vocab, dim))
        constrain(model.head, torch.randn(n, dim), indices=indices)
    return model


def _at_table_offset(value: torch.Tensor, num_pinned: int) -> nn.Parameter:
    """A Parameter holding ``value`` at the memory offset the free rows have in the table (after
    ``num_pinned`` rows): an optimizer's vectorized loops then split it as they split ours."""
    row = value[0].numel() if value.dim() > 1 else 1
    buf = torch.empty(num_pinned * row + value.numel(), dtype=value.dtype)
    return nn.Parameter(buf[num_pinned * row :].view(value.shape).copy_(value))


def _reference_steps(model: nn.Module, tied: bool, layout: Rows, opt_name: str, batches):
    """An independent computation with plain PyTorch: the (V, D) weight rebuilt every step from
    the pinned rows and separate free-row parameters (the optimizer sees only those); the logits,
    the input and bias gradients come from a plain head; the free rows' weight gradient from
    PyTorch's own ``F.linear`` backward over the free rows' logits (a BLAS may pick another
    kernel for the full (V, D) product, so its free rows can differ in the last bit)."""
    rows, free = layout.pinned, layout.free
    w0, b0 = model.head.weight.detach().clone(), model.head.bias.detach().clone()
    emb_w = model.emb.weight.detach().clone()
    params = [
        _at_table_offset(w0[free], len(rows)),
        _at_table_offset(b0, 0) if tied else _at_table_offset(b0[free], len(rows)),
    ]
    if not tied:
        params.append(nn.Parameter(emb_w.clone()))
    opt = DENSE_OPTIMIZERS[opt_name](params)
    outs, weights = [], []
    for ids in batches:
        w = w0.clone()
        w[free] = params[0].detach()
        b = b0.clone()
        if tied:
            b = params[1].detach().clone()
        else:
            b[free] = params[1].detach()
        b.requires_grad_(True)
        e = (w.clone() if tied else params[2].detach().clone()).requires_grad_(True)
        h = torch.tanh(nn.functional.embedding(ids, e))
        out = nn.functional.linear(h, w, b)
        out.retain_grad()
        out.pow(2).mean().backward()
        w_free = params[0].detach().clone().requires_grad_(True)
        (g_free,) = torch.autograd.grad(nn.functional.linear(h.detach(), w_free), w_free, out.grad[..., free])
        params[0].grad = g_free + e.grad[free] if tied else g_free
        params[1].grad = b.grad if tied else b.grad[free]
        if not tied:
            params[2].grad = e.grad
        opt.step()
        opt.zero_grad()
        outs.append(out.detach())
        weights.append(w)
    return outs, weights, rows


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("opt_name", DENSE_OPTIMIZERS)
def test_training_is_bitwise_the_reference_computation(opt_name, tied, layout):
    indices = layout.indices
    model = _constrained_model(tied, indices)
    batches = [torch.randint(0, V, (3, 4), generator=torch.Generator().manual_seed(s)) for s in range(4)]
    ref_outs, ref_weights, rows = _reference_steps(model, tied, layout, opt_name, batches)
    pinned = model.head.weight[rows].detach().clone()
    opt = DENSE_OPTIMIZERS[opt_name](model.parameters())
    for ids, ref_out, ref_w in zip(batches, ref_outs, ref_weights, strict=True):
        assert torch.equal(model.head.weight, ref_w)
        out = model(ids)
        assert torch.equal(out, ref_out)  # the logits, bitwise
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(model.head.weight[rows], pinned)


def test_the_head_kernel_is_used_not_the_generic_path(monkeypatch):
    """The generic path's Merge node would back-propagate a (V, D) gradient: it must not run."""
    from embconstraint._mechanism import kernels as _kernels

    def refuse(*args):
        raise AssertionError("the generic Merge path ran for F.linear")

    for tied in (True, False):
        model = _constrained_model(tied, None)
        monkeypatch.setattr(_kernels.Merge, "backward", staticmethod(refuse))
        model(torch.arange(V)).sum().backward()
        monkeypatch.undo()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_no_full_size_tensor_in_the_backward(tied, layout):
    big_v, n, dim = 1000, 900, 64
    indices = (
        None
        if layout.name == "prefix"
        else torch.randperm(big_v, generator=torch.Generator().manual_seed(0))[:n]
    )
    model = _constrained_model(tied, indices, dim=dim, vocab=big_v, n=n)
    if not tied:
        model.emb.requires_grad_(False)  # a plain trainable embedding has a (V, D) gradient of its own
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, weight_decay=0.1)
    ids = torch.randint(0, big_v, (2, 2))
    model(ids).sum().backward()  # warm up (lazy per-device caches, optimizer state)
    opt.step()
    loss = model(ids).pow(2).sum()
    opt.zero_grad()
    with StorageRecorder() as rec:
        loss.backward()
        opt.step()
    too_big = [(f, s) for f, s in rec.sizes if s >= big_v * dim // 2]
    assert too_big == []
    assert rec.sizes  # the recorder did see the backward


def test_autocast_falls_back_and_keeps_pinned_rows():
    model = _constrained_model(False, SCATTERED)
    pinned = model.head.weight[SCATTERED].detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.arange(V))
    assert out.dtype == torch.bfloat16
    out.float().pow(2).sum().backward()
    opt.step()
    assert torch.equal(model.head.weight[SCATTERED], pinned)


# -- a head tied to a constrained embedding (head.weight = emb.weight) ------------------------------


class _TiedNoBias(nn.Module):
    """An embedding and a bias-free head sharing one Parameter: logits = emb(ids) @ emb.weight.T."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


def test_constrain_with_root_keeps_a_tied_head(layout) -> None:
    model = _TiedNoBias()
    constrain(model.emb, reference(), indices=layout.indices, root=model)
    logits = model(IDS)
    assert logits.shape == (len(IDS), V)
    assert torch.equal(model.head.weight, model.emb.weight)
    assert torch.equal(logits, F.linear(model.emb(IDS), model.emb.weight))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    F.cross_entropy(logits, torch.tensor([5, 4, 3, 1])).backward()
    opt.step()
    logits = model(IDS)
    assert torch.equal(logits, F.linear(model.emb(IDS), model.emb.weight))  # still tied after a step
    assert torch.equal(model.emb.weight[layout.pinned], reference())
    plain = _TiedNoBias()
    plain.load_state_dict(model.state_dict())  # loads into the plain, tied model
    assert torch.equal(plain.emb.weight, model.emb.weight)
    assert torch.equal(plain(IDS), logits)


def test_tied_head_is_never_silently_shrunk(layout) -> None:
    model = _TiedNoBias()
    try:
        constrain(model.emb, reference(), indices=layout.indices)  # the head is outside what constrain sees
        logits = model(IDS)
    except (RuntimeError, ValueError) as err:  # refusing clearly is acceptable
        assert "tied" in str(err) or "shared" in str(err)
        return
    assert logits.shape == (len(IDS), V)
    assert torch.equal(logits, F.linear(model.emb(IDS), model.emb.weight))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    F.cross_entropy(logits, torch.tensor([5, 4, 3, 1])).backward()
    opt.step()
    assert torch.equal(model(IDS), F.linear(model.emb(IDS), model.emb.weight))  # still tied after a step
    assert torch.equal(model.emb.weight[layout.pinned], reference())
