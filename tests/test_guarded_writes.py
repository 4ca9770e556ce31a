"""Nothing a user plausibly does to a constrained weight changes its pinned rows silently.

Every write below either raises, leaving the whole weight (free rows too) bitwise as it was,
or, when it leaves the pinned rows unchanged, is applied to the free rows. Out of scope (raw
memory, not guarded): writes through ``untyped_storage()``, ``data_ptr()``, DLPack exports and
``as_strided`` views with an explicit storage offset.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers import IDS, LAYOUTS, D, N, V, constrained, reference
from torch import nn

from embconstraint import constrain, merged_state_dict


@dataclass
class Setup:
    emb: nn.Module
    reference: torch.Tensor
    pinned: list[int]
    free: list[int]

    @property
    def dtype(self) -> torch.dtype:
        return self.emb.weight.dtype


VARIANTS = {  # module, layout, dtype
    "prefix": (nn.Embedding, "prefix", None),
    "scattered": (nn.Embedding, "scattered", None),
    "prefix-double": (nn.Embedding, "prefix", torch.float64),
    "scattered-bag-double": (nn.EmbeddingBag, "scattered", torch.float64),
}


def _setup(variant: str, reference: torch.Tensor | None = None) -> Setup:
    module_cls, layout, dtype = VARIANTS[variant]
    indices = LAYOUTS[layout]
    torch.manual_seed(0)
    if reference is None:
        reference = torch.randn(N, D)
    emb = constrain(module_cls(V, D), reference, indices=indices)
    if dtype is not None:
        emb.to(dtype)  # the constraint survives the conversion; writes must still be checked
    pinned = list(range(N)) if indices is None else list(indices)
    free = [r for r in range(V) if r not in pinned]
    return Setup(emb, reference.to(emb.weight.dtype), pinned, free)


def _weight(s: Setup) -> torch.Tensor:
    return s.emb.weight.detach().clone()


def _assert_aliased_and_trainable(s: Setup) -> None:
    """The free rows are still the optimizer's Parameter, aliasing the merged weight."""
    assert "storage=aliased" in repr(s.emb)
    opt = torch.optim.SGD(s.emb.parameters(), lr=1.0)
    before = _weight(s)
    s.emb(torch.tensor([s.free + s.pinned])).sum().backward()
    opt.step()
    after = _weight(s)
    assert torch.equal(after[s.pinned], s.reference)
    assert not torch.equal(after[s.free], before[s.free])


def _other(s: Setup) -> torch.Tensor:
    return torch.full((V, D), 0.25, dtype=s.dtype)


# Writes that change pinned rows: each must raise and change nothing.
REFUSED: dict[str, Callable[[Setup], object]] = {
    # weight.data
    "data[row] = 1": lambda s: s.emb.weight.data.__setitem__(s.pinned[0], 1.0),
    "data.zero_()": lambda s: s.emb.weight.data.zero_(),
    "data.copy_(other)": lambda s: s.emb.weight.data.copy_(_other(s)),
    "data.fill_(2)": lambda s: s.emb.weight.data.fill_(2.0),
    "data.add_(1)": lambda s: s.emb.weight.data.add_(1.0),
    "data.normal_()": lambda s: s.emb.weight.data.normal_(),
    "data.uniform_()": lambda s: s.emb.weight.data.uniform_(),
    "data[all] = other": lambda s: s.emb.weight.data.__setitem__(slice(None), _other(s)),
    "data = other": lambda s: setattr(s.emb.weight, "data", _other(s)),
    "data = other (grad mode)": lambda s: setattr(s.emb.weight, "data", _other(s)),
    # in-place ops on weight under no_grad
    "add_": lambda s: s.emb.weight.add_(1.0),
    "mul_": lambda s: s.emb.weight.mul_(2.0),
    "fill_": lambda s: s.emb.weight.fill_(0.5),
    "zero_": lambda s: s.emb.weight.zero_(),
    "copy_": lambda s: s.emb.weight.copy_(_other(s)),
    "clamp_": lambda s: s.emb.weight.clamp_(-0.1, 0.1),
    "div_": lambda s: s.emb.weight.div_(3.0),
    "neg_": lambda s: s.emb.weight.neg_(),
    "__setitem__ row": lambda s: s.emb.weight.__setitem__(s.pinned[-1], 0.0),
    "__setitem__ all rows": lambda s: s.emb.weight.__setitem__(slice(None), 0.0),
    "__setitem__ row list": lambda s: s.emb.weight.__setitem__([s.free[0], s.pinned[1]], 0.0),
    "__setitem__ bool mask": lambda s: s.emb.weight.__setitem__(s.emb.weight.detach() > 0, 0.0),
    "__setitem__ column": lambda s: s.emb.weight.__setitem__((slice(None), 1), 0.0),
    "index_put_": lambda s: s.emb.weight.index_put_(
        (torch.tensor(s.pinned[:2]),), torch.tensor(3.0, dtype=s.dtype)
    ),
    "index_fill_": lambda s: s.emb.weight.index_fill_(0, torch.tensor([s.pinned[2]]), 3.0),
    "index_copy_": lambda s: s.emb.weight.index_copy_(
        0, torch.tensor(s.pinned), torch.zeros(N, D, dtype=s.dtype)
    ),
    "index_add_": lambda s: s.emb.weight.index_add_(
        0, torch.tensor(s.pinned), torch.ones(N, D, dtype=s.dtype)
    ),
    "masked_fill_": lambda s: s.emb.weight.masked_fill_(torch.ones(V, D, dtype=torch.bool), 0.0),
    "scatter_": lambda s: s.emb.weight.scatter_(0, torch.full((1, D), s.pinned[0]), 9.0),
    "+= 1": lambda s: s.emb.weight.__iadd__(1.0),
    "*= 0": lambda s: s.emb.weight.__imul__(0.0),
    "torch.zero_(weight)": lambda s: torch.zero_(s.emb.weight),
    "torch.add(out=weight)": lambda s: torch.add(s.emb.weight, 1.0, out=s.emb.weight),
    "torch.mul(out=weight.data)": lambda s: torch.mul(s.emb.weight.data, 2.0, out=s.emb.weight.data),
    "torch.ops.aten.fill_": lambda s: torch.ops.aten.fill_(s.emb.weight, 1.0),
    "torch.ops.aten.copy_": lambda s: torch.ops.aten.copy_(s.emb.weight.data, _other(s)),
    # detach()
    "detach()[row] = 1": lambda s: s.emb.weight.detach().__setitem__(s.pinned[0], 1.0),
    "detach().zero_()": lambda s: s.emb.weight.detach().zero_(),
    "detach().detach().fill_()": lambda s: s.emb.weight.detach().detach().fill_(1.0),
    "data.data.fill_()": lambda s: s.emb.weight.data.data.fill_(1.0),
    "contiguous().fill_()": lambda s: s.emb.weight.data.contiguous().fill_(1.0),
    "to(same dtype).fill_()": lambda s: s.emb.weight.data.to(s.dtype).fill_(1.0),
    # views (refused whatever rows they touch)
    "weight[row].fill_()": lambda s: s.emb.weight[s.pinned[0]].fill_(1.0),
    "data[a:b].fill_()": lambda s: s.emb.weight.data[0:V].fill_(1.0),
    "data.t().fill_()": lambda s: s.emb.weight.data.t().fill_(1.0),
    "data.T.zero_()": lambda s: s.emb.weight.data.T.zero_(),
    "data.view(-1).fill_()": lambda s: s.emb.weight.data.view(-1).fill_(1.0),
    "data.reshape(-1).fill_()": lambda s: s.emb.weight.data.reshape(-1).fill_(1.0),
    "data.flatten().fill_()": lambda s: s.emb.weight.data.flatten().fill_(1.0),
    "data.unsqueeze(0).fill_()": lambda s: s.emb.weight.data.unsqueeze(0).fill_(1.0),
    "data[...].fill_()": lambda s: s.emb.weight.data[...].fill_(1.0),
    "data.select(0, row).fill_()": lambda s: s.emb.weight.data.select(0, s.pinned[0]).fill_(1.0),
    "data.narrow().fill_()": lambda s: s.emb.weight.data.narrow(0, 0, V).fill_(1.0),
    "data.unbind(0)[row].fill_()": lambda s: s.emb.weight.data.unbind(0)[s.pinned[0]].fill_(1.0),
    "data.split(1)[row].fill_()": lambda s: s.emb.weight.data.split(1)[s.pinned[0]].fill_(1.0),
    "data.chunk(2)[0].fill_()": lambda s: s.emb.weight.data.chunk(2)[0].fill_(1.0),
    "data.as_strided().fill_()": lambda s: s.emb.weight.data.as_strided((2,), (1,)).fill_(1.0),
    "data.view_as().copy_()": lambda s: s.emb.weight.data.view_as(_other(s)).copy_(_other(s)),
    "data[:2] += 1": lambda s: s.emb.weight.data[:2].__iadd__(1.0),
    # NumPy: arrays of a constrained weight are read-only
    "detach().numpy()[row] = 1": lambda s: s.emb.weight.detach().numpy().__setitem__(s.pinned[0], 1.0),
    "data.numpy()[:] = 0": lambda s: s.emb.weight.data.numpy().__setitem__(slice(None), 0.0),
    "numpy(force=True)[row] = 1": lambda s: s.emb.weight.numpy(force=True).__setitem__(s.pinned[0], 1.0),
    "np.asarray(detach())[row] = 1": lambda s: np.asarray(s.emb.weight.detach()).__setitem__(
        s.pinned[0], 1.0
    ),
    "detach()[:2].numpy()[0] = 1": lambda s: s.emb.weight.detach()[:2].numpy().__setitem__(0, 1.0),
    "np.copyto(numpy(), 0)": lambda s: np.copyto(s.emb.weight.detach().numpy(), 0.0),
    # nn.init on the weight
    "init.normal_": lambda s: nn.init.normal_(s.emb.weight),
    "init.uniform_": lambda s: nn.init.uniform_(s.emb.weight),
    "init.xavier_uniform_": lambda s: nn.init.xavier_uniform_(s.emb.weight),
    "init.xavier_normal_": lambda s: nn.init.xavier_normal_(s.emb.weight),
    "init.kaiming_uniform_": lambda s: nn.init.kaiming_uniform_(s.emb.weight),
    "init.kaiming_normal_": lambda s: nn.init.kaiming_normal_(s.emb.weight),
    "init.trunc_normal_": lambda s: nn.init.trunc_normal_(s.emb.weight),
    "init.orthogonal_": lambda s: nn.init.orthogonal_(s.emb.weight),
    "init.sparse_": lambda s: nn.init.sparse_(s.emb.weight, 0.5),
    "init.eye_": lambda s: nn.init.eye_(s.emb.weight),
    "init.zeros_": lambda s: nn.init.zeros_(s.emb.weight),
    "init.ones_": lambda s: nn.init.ones_(s.emb.weight),
    "init.constant_": lambda s: nn.init.constant_(s.emb.weight, 0.5),
    "init.normal_(weight.data)": lambda s: nn.init.normal_(s.emb.weight.data),
    "module.reset_parameters()": lambda s: s.emb.reset_parameters(),
    "model.apply(hf-style init)": lambda s: nn.Sequential(s.emb).apply(
        lambda m: (
            m.weight.data.normal_(mean=0.0, std=0.02)
            if isinstance(m, (nn.Embedding, nn.EmbeddingBag))
            else None
        )
    ),
    # assignment and checkpoints
    "module.weight = other": lambda s: setattr(s.emb, "weight", _other(s)),
    "load_state_dict(other)": lambda s: s.emb.load_state_dict({"weight": _other(s)}),
    "load_state_dict(other, strict=False)": lambda s: s.emb.load_state_dict(
        {"weight": _other(s)}, strict=False
    ),
    "load_state_dict(other, assign=True)": lambda s: s.emb.load_state_dict(
        {"weight": _other(s)}, assign=True
    ),
    "load_state_dict(wrong shape)": lambda s: s.emb.load_state_dict({"weight": torch.zeros(V + 1, D)}),
}

GRAD_MODE = {"data = other (grad mode)"}  # run with grad enabled: the .data setter is not autograd


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", REFUSED)
def test_write_that_changes_pinned_rows_is_refused(name, variant):
    s = _setup(variant)
    before = _weight(s)
    with torch.set_grad_enabled(name in GRAD_MODE), pytest.raises((RuntimeError, ValueError)):
        REFUSED[name](s)
    after = _weight(s)
    assert after.dtype == before.dtype
    assert torch.equal(after, before)  # free rows too
    assert torch.equal(after[s.pinned], s.reference)
    _assert_aliased_and_trainable(s)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(
    "op",
    [
        lambda s: s.emb.weight.__setitem__(s.free, 0.0),
        lambda s: s.emb.weight.mul_(1.0),
        lambda s: torch.add(s.emb.weight, 0.0, out=s.emb.weight),
    ],
    ids=["setitem free rows", "mul_(1)", "out="],
)
def test_write_with_grad_enabled_is_refused(op, variant):
    """As for any leaf that requires grad, in-place writes need torch.no_grad(), even those
    that would leave the pinned rows unchanged."""
    s = _setup(variant)
    before = _weight(s)
    with pytest.raises(RuntimeError, match=r"needs torch\.no_grad\(\)"):
        op(s)
    assert torch.equal(_weight(s), before)


def _positive_reference() -> torch.Tensor:
    return torch.arange(1, N * D + 1, dtype=torch.float32).reshape(N, D)


# Writes that leave pinned rows unchanged: (reference, write, expected free rows given the old weight).
ACCEPTED: dict[
    str, tuple[torch.Tensor | None, Callable[[Setup], object], Callable[[torch.Tensor, Setup], torch.Tensor]]
] = {
    "weight[free] = 0": (
        None,
        lambda s: s.emb.weight.__setitem__(s.free, 0.0),
        lambda w, s: torch.zeros(V - N, D),
    ),
    "data[free] = 0": (
        None,
        lambda s: s.emb.weight.data.__setitem__(s.free, 0.0),
        lambda w, s: torch.zeros(V - N, D),
    ),
    "detach()[free] = 0": (
        None,
        lambda s: s.emb.weight.detach().__setitem__(s.free, 0.0),
        lambda w, s: torch.zeros(V - N, D),
    ),
    "index_put_ free rows": (
        None,
        lambda s: s.emb.weight.index_put_((torch.tensor(s.free),), torch.tensor(2.0, dtype=s.dtype)),
        lambda w, s: torch.full((V - N, D), 2.0),
    ),
    "index_fill_ free row": (
        None,
        lambda s: s.emb.weight.data.index_fill_(0, torch.tensor(s.free[1:2]), 5.0),
        lambda w, s: torch.cat([w[s.free[:1]], torch.full((1, D), 5.0), w[s.free[2:]]]),
    ),
    "masked_fill_ free rows": (
        None,
        lambda s: s.emb.weight.masked_fill_(_row_mask(s.free), -1.0),
        lambda w, s: torch.full((V - N, D), -1.0),
    ),
    "copy_ keeping pinned rows": (
        None,
        lambda s: s.emb.weight.copy_(_with_free(s, 7.0)),
        lambda w, s: torch.full((V - N, D), 7.0),
    ),
    "data = value keeping pinned rows": (
        None,
        lambda s: setattr(s.emb.weight, "data", _with_free(s, 7.0)),
        lambda w, s: torch.full((V - N, D), 7.0),
    ),
    "module.weight = value keeping pinned rows": (
        None,
        lambda s: setattr(s.emb, "weight", _with_free(s, 7.0)),
        lambda w, s: torch.full((V - N, D), 7.0),
    ),
    "load_state_dict keeping pinned rows": (
        None,
        lambda s: s.emb.load_state_dict({"weight": _with_free(s, 7.0)}),
        lambda w, s: torch.full((V - N, D), 7.0),
    ),
    "load_state_dict(assign=True) keeping pinned rows": (
        None,
        lambda s: s.emb.load_state_dict({"weight": _with_free(s, 7.0)}, assign=True),
        lambda w, s: torch.full((V - N, D), 7.0),
    ),
    "load_state_dict of the free-rows key": (
        None,
        lambda s: s.emb.load_state_dict({"parametrizations.weight.original": torch.full((V - N, D), 7.0)}),
        lambda w, s: torch.full((V - N, D), 7.0),
    ),
    "clamp_ inside the pinned range": (
        _positive_reference(),
        lambda s: s.emb.weight.clamp_(min=0.5),
        lambda w, s: w[s.free].clamp(min=0.5),
    ),
    "abs_ of positive pinned rows": (
        _positive_reference(),
        lambda s: s.emb.weight.abs_(),
        lambda w, s: w[s.free].abs(),
    ),
    "init.zeros_ with a zero reference": (
        torch.zeros(N, D),
        lambda s: nn.init.zeros_(s.emb.weight),
        lambda w, s: torch.zeros(V - N, D),
    ),
    "init.ones_ with a ones reference": (
        torch.ones(N, D),
        lambda s: nn.init.ones_(s.emb.weight),
        lambda w, s: torch.ones(V - N, D),
    ),
    "init.constant_ with a constant reference": (
        torch.full((N, D), 0.5),
        lambda s: nn.init.constant_(s.emb.weight, 0.5),
        lambda w, s: torch.full((V - N, D), 0.5),
    ),
    "mul_(1)": (None, lambda s: s.emb.weight.mul_(1.0), lambda w, s: w[s.free]),
}


def _row_mask(rows: list[int]) -> torch.Tensor:
    mask = torch.zeros(V, D, dtype=torch.bool)
    mask[rows] = True
    return mask


def _with_free(s: Setup, value: float) -> torch.Tensor:
    w = _weight(s)
    w[s.free] = value
    return w


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("name", ACCEPTED)
def test_write_that_keeps_pinned_rows_is_applied(name, variant):
    reference, write, expected = ACCEPTED[name]
    s = _setup(variant, reference)
    before = _weight(s)
    with torch.no_grad():
        write(s)
    after = _weight(s)
    assert after.dtype == before.dtype
    assert torch.equal(after[s.pinned], s.reference)
    assert torch.equal(after[s.free], expected(before, s).to(s.dtype))
    _assert_aliased_and_trainable(s)


@pytest.mark.parametrize("variant", VARIANTS)
def test_free_row_parameter_writes_reach_only_free_rows(variant):
    """``parametrizations.weight.original`` is the free block: writing it is training it."""
    s = _setup(variant)
    free_param = s.emb.parametrizations.weight.original
    with torch.no_grad():
        free_param.fill_(3.0)
        free_param.data[0] = -1.0
        nn.init.normal_(free_param)
        free_param.zero_()
    after = _weight(s)
    assert torch.equal(after[s.pinned], s.reference)
    assert torch.equal(after[s.free], torch.zeros(V - N, D, dtype=s.dtype))
    _assert_aliased_and_trainable(s)


@pytest.mark.parametrize("variant", VARIANTS)
def test_numpy_arrays_read_the_merged_weight(variant):
    """Read-only, but correct: NumPy sees the merged weight in user order."""
    s = _setup(variant)
    array = s.emb.weight.detach().numpy()
    assert not array.flags.writeable
    np.testing.assert_array_equal(array, s.emb.weight.detach().clone().numpy())
    np.testing.assert_array_equal(np.asarray(s.emb.weight.detach())[s.pinned], s.reference.numpy())
    copy = np.array(s.emb.weight.detach())  # an explicit copy is an ordinary array
    copy[:] = 0.0
    assert torch.equal(_weight(s)[s.pinned], s.reference)


def test_writes_are_checked_after_release_and_reconstrain():
    """A released weight is plain again (writes go through); constraining again guards it anew."""
    from embconstraint import release

    s = _setup("scattered")
    release(s.emb)
    with torch.no_grad():
        s.emb.weight.zero_()
    assert torch.equal(s.emb.weight, torch.zeros(V, D))
    constrain(s.emb, s.reference, indices=s.pinned)
    with torch.no_grad(), pytest.raises(RuntimeError, match="would change pinned rows"):
        s.emb.weight.data.fill_(1.0)
    assert torch.equal(s.emb.weight[s.pinned], s.reference)


# -- the state dict's tensors and the parameter vectors ---------------------------------------------

_EXPORTS = {
    "state_dict": lambda e: e.state_dict()["weight"],
    "state_dict(keep_vars=True)": lambda e: e.state_dict(keep_vars=True)["weight"],
    "nested state_dict": lambda e: nn.Sequential(e).state_dict()["0.weight"],
    "merged_state_dict": lambda e: merged_state_dict(nn.Sequential(e))["0.weight"],
}


@pytest.mark.parametrize("way", list(_EXPORTS))
def test_writing_into_a_state_dict_keeps_pinned_rows(layout, way) -> None:
    emb = constrained(layout.indices)
    try:
        with torch.no_grad():
            _EXPORTS[way](emb).add_(1.0)
    except RuntimeError:
        pass  # refusing the write is fine too
    assert torch.equal(emb.weight[layout.pinned], reference())
    assert torch.equal(emb(IDS)[[0]], reference()[[layout.pinned.index(0)]])


def test_parameter_vectors_only_reach_the_free_rows(layout) -> None:
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    emb = constrained(layout.indices)
    parameters_to_vector(emb.parameters()).add_(1.0)  # a copy
    assert torch.equal(emb.weight[layout.pinned], reference())
    vector_to_parameters(torch.arange(float((V - N) * D)), emb.parameters())
    assert torch.equal(emb.weight[layout.pinned], reference())
    assert torch.equal(emb.weight[layout.free], torch.arange(float((V - N) * D)).view(V - N, D))
    named = dict(emb.named_parameters())
    assert list(named) == ["parametrizations.weight.original"]
    with torch.no_grad():
        named["parametrizations.weight.original"].zero_()
    assert torch.equal(emb.weight[layout.pinned], reference())


def test_set_on_weight_raises(layout) -> None:
    emb = constrained(layout.indices)
    with torch.no_grad(), pytest.raises(RuntimeError, match="set_"):
        emb.weight.set_(torch.zeros(V, D))
