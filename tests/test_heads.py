"""Output heads (``nn.Linear`` whose rows are vocabulary entries): constrain, train, save, release."""

from __future__ import annotations

import pytest
import torch
from conftest import free_param
from torch import nn

from embconstraint import PinnedRowsError, constrain, is_constrained, merged_state_dict, release
from embconstraint.core import pin_of

V, D, N = 12, 5, 7
SCATTERED = [11, 0, 4, 7, 2, 9, 5]
LAYOUTS = {"prefix": None, "scattered": SCATTERED}


def _rows(indices):
    return list(range(N)) if indices is None else list(indices)


def _free_rows(indices):
    pinned = set(_rows(indices))
    return [r for r in range(V) if r not in pinned]


def _head(bias: bool = True, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(D, V, bias=bias)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_reference_linear_pins_weight_rows_and_bias_entries(layout, bias):
    indices = LAYOUTS[layout]
    head, ref = _head(bias), nn.Linear(D, N, bias=bias)
    before_w, before_b = head.weight.detach().clone(), bias and head.bias.detach().clone()
    assert constrain(head, ref, indices=indices) is head and is_constrained(head)
    free = _free_rows(indices)
    assert torch.equal(head.weight[_rows(indices)], ref.weight)
    assert torch.equal(head.weight[free], before_w[free])
    shapes = [tuple(p.shape) for p in head.parameters()]
    if bias:
        assert torch.equal(head.bias[_rows(indices)], ref.bias)
        assert torch.equal(head.bias[free], before_b[free])
        assert shapes == [(V - N, D), (V - N,)]
    else:
        assert shapes == [(V - N, D)]
    assert list(head.state_dict()) == (["weight", "bias"] if bias else ["weight"])


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reference", ["tensor", "embedding"])
def test_tensor_or_embedding_reference_pins_bias_at_current_values(layout, reference):
    indices = LAYOUTS[layout]
    head = _head()
    ref = torch.randn(N, D) if reference == "tensor" else nn.Embedding(N, D)
    bias_before = head.bias.detach().clone()
    constrain(head, ref, indices=indices)
    ref_w = ref if reference == "tensor" else ref.weight
    assert torch.equal(head.weight[_rows(indices)], ref_w)
    assert torch.equal(head.bias, bias_before)
    assert pin_of(head, "bias").layout is pin_of(head).layout  # one layout for both


@pytest.mark.parametrize("layout", LAYOUTS)
def test_logits_and_gradients_match_a_plain_head(layout):
    indices = LAYOUTS[layout]
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
    free = _free_rows(indices)
    assert torch.equal(x.grad, x2.grad)
    assert torch.equal(free_param(head).grad, plain.weight.grad[free])
    assert torch.equal(pin_of(head, "bias").free_parameter.grad, plain.bias.grad[free])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_round_trip_release_and_guard(layout):
    indices = LAYOUTS[layout]
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
    bad["bias"][_rows(indices)[0]] += 1.0
    with pytest.raises(PinnedRowsError, match="bias would change pinned rows"):
        other.load_state_dict(bad)
    with torch.no_grad(), pytest.raises(PinnedRowsError):
        head.bias.add_(1.0)
    with torch.no_grad():
        head.bias[_free_rows(indices)] = 3.0  # free entries may be written
    assert torch.equal(head.bias[_rows(indices)], ref.bias)
    merged_w, merged_b = head.weight.detach().clone(), head.bias.detach().clone()
    params = list(head.parameters())
    assert release(head) is head and not is_constrained(head)
    assert type(head.weight) is nn.Parameter and type(head.bias) is nn.Parameter
    assert head.weight is params[0] and head.bias is params[1]  # optimizers keep their reference
    assert torch.equal(head.weight, merged_w) and torch.equal(head.bias, merged_b)


@pytest.mark.parametrize("bias", [True, False])
def test_deepcopy_and_dtype_conversion(bias):
    import copy

    head = constrain(_head(bias), nn.Linear(D, N, bias=bias))
    clone = copy.deepcopy(head).double()
    assert torch.equal(clone.weight, head.weight.double())
    clone(torch.randn(2, D, dtype=torch.float64)).sum().backward()
    assert [tuple(p.grad.shape) for p in clone.parameters()] == [(V - N, D)] + ([(V - N,)] if bias else [])
