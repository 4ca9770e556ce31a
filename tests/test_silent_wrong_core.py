"""Issue 12: silent wrong results of the core API (constrain / release / state dicts).

Each test states the behaviour the issue asks for and is marked ``xfail(strict=True)`` while the
bug is there: a fix makes it pass, and then the marker must go (strict xfail fails otherwise).
Tests without a marker are regressions for cases of the same class that already hold.
Every test runs for both layouts: the prefix one (``indices=None``) and a scattered one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from embconstraint import constrain, merged_state_dict, release

V, D, N = 6, 3, 3
LAYOUTS = [pytest.param(None, id="prefix"), pytest.param([4, 0, 2], id="scattered")]
IDS = torch.tensor([0, 1, 3, 5])


def _rows(indices: list[int] | None) -> list[int]:
    return list(range(N)) if indices is None else list(indices)


def _free(indices: list[int] | None) -> list[int]:
    return [r for r in range(V) if r not in _rows(indices)]


def _ref() -> torch.Tensor:
    # values float16/bfloat16 cannot hold exactly (the half round trip must not round them)
    return torch.randn(N, D, generator=torch.Generator().manual_seed(1))


def _emb(indices: list[int] | None, cls: type = nn.Embedding, **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return constrain(cls(V, D, **kwargs), _ref(), indices=indices)


def _free_grad(emb: nn.Module) -> torch.Tensor | None:
    return emb.parametrizations.weight.original.grad


# -- 12.1: a detached weight is a constant --------------------------------------------------

_DETACHED_OPS = {
    "F.embedding": lambda w: F.embedding(IDS, w),
    "F.embedding_bag": lambda w: F.embedding_bag(IDS.view(1, -1), w, mode="sum"),
    "from_pretrained(freeze=True)": lambda w: nn.Embedding.from_pretrained(w, freeze=True)(IDS),
    "EmbeddingBag.from_pretrained": lambda w: nn.EmbeddingBag.from_pretrained(w, freeze=True)(IDS.view(1, -1)),
}
_DETACHED_OPS_OK = {  # ops that already treat the detached weight as a constant (regressions)
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
    assert _free_grad(emb) is None  # no gradient reached the constrained embedding


@pytest.mark.xfail(strict=True, reason="issue 12.1: lookups on a detached weight still require grad")
@pytest.mark.parametrize("way", list(_WAYS))
@pytest.mark.parametrize("op", list(_DETACHED_OPS))
@pytest.mark.parametrize("indices", LAYOUTS)
def test_lookup_on_detached_weight_is_constant(indices, op, way) -> None:
    emb = _emb(indices)
    expected = _DETACHED_OPS[op](emb.weight.detach().clone())  # a plain tensor, same values
    _assert_constant(emb, _DETACHED_OPS[op](_WAYS[way](emb)), expected)


@pytest.mark.parametrize("op", list(_DETACHED_OPS_OK))
@pytest.mark.parametrize("indices", LAYOUTS)
def test_other_ops_on_detached_weight_are_constant(indices, op) -> None:
    emb = _emb(indices)
    expected = _DETACHED_OPS_OK[op](emb.weight.detach().clone())
    _assert_constant(emb, _DETACHED_OPS_OK[op](emb.weight.detach()), expected)


@pytest.mark.xfail(strict=True, reason="issue 12.1: a frozen teacher built from weight.detach() trains the student")
@pytest.mark.parametrize("indices", LAYOUTS)
def test_frozen_teacher_from_detached_weight_does_not_train_the_model(indices) -> None:
    emb = _emb(indices)
    teacher = nn.Embedding.from_pretrained(emb.weight.detach(), freeze=True)
    before = emb.weight.detach().clone()
    opt = torch.optim.SGD(emb.parameters(), lr=0.5)
    F.mse_loss(teacher(IDS), torch.zeros(len(IDS), D)).backward()  # a loss of the teacher alone
    opt.step()
    assert torch.equal(emb.weight.detach(), before)


# -- 12.2: weight tying with an nn.Linear head ----------------------------------------------

class _TiedLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(ids))


@pytest.mark.xfail(strict=True, reason="issue 12.2: constrain(..., root=model) to keep a tied head")
@pytest.mark.parametrize("indices", LAYOUTS)
def test_constrain_with_root_keeps_a_tied_head(indices) -> None:
    model = _TiedLM()
    constrain(model.emb, _ref(), indices=indices, root=model)
    logits = model(IDS)
    assert logits.shape == (len(IDS), V)
    assert torch.equal(model.head.weight, model.emb.weight)
    assert torch.equal(logits, model.emb(IDS) @ model.emb.weight.T)
    plain = _TiedLM()
    plain.load_state_dict(model.state_dict())  # loads into the plain, tied model
    assert torch.equal(plain.emb.weight, model.emb.weight)
    assert torch.equal(plain(IDS), logits)


@pytest.mark.xfail(strict=True, reason="issue 12.2: a tied head it cannot see is silently shrunk")
@pytest.mark.parametrize("indices", LAYOUTS)
def test_tied_head_is_never_silently_shrunk(indices) -> None:
    model = _TiedLM()
    constrain(model.emb, _ref(), indices=indices)  # the head is outside what constrain sees
    try:
        logits = model(IDS)
    except (RuntimeError, ValueError) as err:  # refusing clearly is acceptable
        assert "tied" in str(err) or "shared" in str(err)
        return
    assert logits.shape == (len(IDS), V)
    assert torch.equal(logits, model.emb(IDS) @ model.emb.weight.T)


# -- 12.3: out-of-range ids raise in every layout -------------------------------------------

def _plain_error(cls: type, ids: torch.Tensor, **kwargs) -> type[Exception]:
    try:
        cls(V, D, **kwargs)(ids)
    except Exception as err:  # noqa: BLE001 - the type plain torch raises is what we compare
        return type(err)
    raise AssertionError("plain torch accepted the ids")


def _params_3() -> list:
    params = []
    for layout in (None, [4, 0, 2]):
        for cls, kwargs in ((nn.Embedding, {}), (nn.Embedding, {"padding_idx": 1}),
                            (nn.EmbeddingBag, {}), (nn.EmbeddingBag, {"padding_idx": 1})):
            for ids in ([-1], [2, -V], [V], [-V - 1]):
                name = f"{'prefix' if layout is None else 'scattered'}-{cls.__name__}-{kwargs}-{ids}"
                # the scattered layout wraps -1..-V (reads row V + id) and, for bags, raises
                # IndexError where nn.EmbeddingBag raises RuntimeError
                bug = layout is not None and (-V <= min(ids) < 0 or cls is nn.EmbeddingBag)
                marks = [pytest.mark.xfail(strict=True, reason="issue 12.3: scattered layout, out-of-range ids")] * bug
                params.append(pytest.param(layout, cls, kwargs, ids, id=name, marks=marks))
    return params


@pytest.mark.parametrize(("indices", "cls", "kwargs", "ids"), _params_3())
def test_out_of_range_ids_raise_like_plain_torch(indices, cls, kwargs, ids) -> None:
    emb = _emb(indices, cls, **kwargs)
    with pytest.raises(_plain_error(cls, torch.tensor([ids]), **kwargs)):
        emb(torch.tensor([ids]))


@pytest.mark.xfail(strict=True, reason="issue 12.3: F.embedding on the scattered weight wraps negative ids")
@pytest.mark.parametrize("fn", [pytest.param(lambda w: F.embedding(torch.tensor([-1]), w), id="F.embedding"),
                                pytest.param(lambda w: F.embedding_bag(torch.tensor([-1]), w, torch.tensor([0])),
                                             id="F.embedding_bag-offsets")])
def test_negative_ids_raise_in_functional_calls(fn) -> None:
    emb = _emb([4, 0, 2])
    with pytest.raises((IndexError, RuntimeError)):
        fn(emb.weight)


# -- 12.4: release() and gradients / optimizers ---------------------------------------------

def _loss(emb: nn.Module) -> torch.Tensor:
    return (emb(IDS) ** 2).sum() if isinstance(emb, nn.Embedding) else (emb(IDS.view(1, -1)) ** 2).sum()


def _full_grad(weight: torch.Tensor) -> torch.Tensor:
    """The (V, D) gradient of ``_loss`` at ``weight``, computed on a plain embedding."""
    plain = nn.Embedding.from_pretrained(weight.detach().clone(), freeze=False)
    _loss(plain).backward()
    return plain.weight.grad


@pytest.mark.xfail(strict=True, reason="issue 12.4: release() leaves a (V - n, D) .grad")
@pytest.mark.parametrize("indices", LAYOUTS)
def test_release_merges_a_pending_grad(indices) -> None:
    emb = _emb(indices)
    _loss(emb).backward()
    expected = _full_grad(emb.weight)
    expected[_rows(indices)] = 0  # pinned rows had no gradient
    release(emb)
    assert emb.weight.grad is not None and torch.equal(emb.weight.grad, expected)
    _loss(emb).backward()  # accumulates into the (V, D) grad, as on any Parameter
    assert torch.equal(emb.weight.grad, expected + _full_grad(emb.weight))


@pytest.mark.parametrize("indices", LAYOUTS)
def test_release_without_a_grad_leaves_none(indices) -> None:
    emb = _emb(indices)
    release(emb)
    assert emb.weight.grad is None


@pytest.mark.xfail(strict=True, reason="issue 12.4: SGD after release broadcasts the one free row's grad")
def test_sgd_step_after_release_does_not_move_pinned_rows() -> None:
    torch.manual_seed(0)
    ref = torch.randn(V - 1, D)
    emb = constrain(nn.Embedding(V, D), ref)  # one free row: its grad broadcasts onto (V, D)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    _loss(emb).backward()
    free_before, grad = emb.weight[V - 1].detach().clone(), _free_grad(emb)[0].clone()
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


@pytest.mark.xfail(strict=True, reason="issue 12.4: release(module, optimizer=...) does not exist")
@pytest.mark.parametrize("name", list(_OPTIMIZERS))
@pytest.mark.parametrize("indices", LAYOUTS)
def test_release_with_optimizer_keeps_training_all_rows(indices, name) -> None:
    emb = _emb(indices)
    opt = _OPTIMIZERS[name](emb.parameters())
    for _ in range(2):  # stage 1: only the free rows train
        opt.zero_grad()
        _loss(emb).backward()
        opt.step()
    free_rows = _free(indices)
    assert torch.equal(emb.parametrizations.weight.original, emb.weight[free_rows])  # state row k = free row k
    # the independent computation: a plain embedding with the widened state, same optimizer
    plain = nn.Embedding.from_pretrained(emb.weight.detach().clone(), freeze=False)
    plain_opt = _OPTIMIZERS[name](plain.parameters())
    plain_opt.load_state_dict(_widened(opt.state_dict(), free_rows, V - N))
    release(emb, optimizer=opt)
    for module, o in ((emb, opt), (plain, plain_opt)):  # stage 2: every row trains
        for _ in range(2):
            o.zero_grad()
            _loss(module).backward()
            o.step()
    assert torch.equal(emb.weight, plain.weight)
    assert not torch.equal(emb.weight[_rows(indices)], _ref())  # pinned rows moved by real gradients


# -- 12.5: a first forward under inference_mode after .to() ---------------------------------

@pytest.mark.xfail(strict=True, reason="issue 12.5: table rebuilt under inference_mode is an inference tensor")
@pytest.mark.parametrize("cast", [pytest.param(lambda e: e.double(), id="double"),
                                  pytest.param(lambda e: e.to("cpu", torch.float64), id="to-device-dtype"),
                                  pytest.param(lambda e: e.half().float(), id="half-float")])
@pytest.mark.parametrize("indices", LAYOUTS)
def test_inference_mode_first_forward_after_to(indices, cast) -> None:
    emb = cast(_emb(indices))
    with torch.inference_mode():
        emb(IDS)
    sd = emb.state_dict()
    assert not sd["weight"].is_inference()
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    _loss(emb).backward()
    opt.step()
    with torch.no_grad():
        emb.weight.mul_(1.0)  # a guarded write that keeps every row
    assert torch.equal(emb.weight[_rows(indices)], _ref().to(emb.weight.dtype))


# -- 12.6: half / bfloat16 round trips keep the reference -----------------------------------

@pytest.mark.xfail(strict=True, reason="issue 12.6: .half()/.bfloat16() round the pinned rows for good")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("indices", LAYOUTS)
def test_low_precision_round_trip_restores_the_reference(indices, dtype) -> None:
    emb = _emb(indices).to(dtype)
    emb(IDS)
    assert torch.equal(emb.weight[_rows(indices)], _ref().to(dtype))  # the reference cast to dtype
    emb.float()
    emb(IDS)
    assert torch.equal(emb.weight[_rows(indices)], _ref())  # bitwise again
    assert torch.equal(emb.state_dict()["weight"][_rows(indices)], _ref())


# -- 12.7: meta device, to_empty, load --------------------------------------------------------

@pytest.mark.xfail(strict=True, reason="issue 12.7: constrained meta embedding is unusable after to_empty")
@pytest.mark.parametrize("indices", LAYOUTS)
def test_meta_embedding_materialises_after_to_empty(indices) -> None:
    with torch.device("meta"):
        emb = nn.Embedding(V, D)
    constrain(emb, _ref(), indices=indices)
    emb.to_empty(device="cpu")
    assert torch.equal(emb.weight[_rows(indices)], _ref())
    checkpoint = torch.randn(V, D, generator=torch.Generator().manual_seed(2))
    checkpoint[_rows(indices)] = _ref()
    emb.load_state_dict({"weight": checkpoint})
    assert torch.equal(emb(IDS), checkpoint[IDS])
    assert torch.equal(emb.state_dict()["weight"], checkpoint)
    assert torch.equal(release(emb).weight, checkpoint)


# -- 12.8: state dict tensors are not a back door -------------------------------------------

_EXPORTS = {
    "state_dict": lambda e: e.state_dict()["weight"],
    "state_dict(keep_vars=True)": lambda e: e.state_dict(keep_vars=True)["weight"],
    "nested state_dict": lambda e: nn.Sequential(e).state_dict()["0.weight"],
    "merged_state_dict": lambda e: merged_state_dict(nn.Sequential(e))["0.weight"],
}


def _write_8(t: torch.Tensor) -> None:
    with torch.no_grad():
        t.add_(1.0)


_XFAIL_8 = pytest.mark.xfail(strict=True, reason="issue 12.8: writes into state_dict tensors move pinned rows (prefix)")


@pytest.mark.parametrize(("indices", "way"), [
    pytest.param(layout, way, id=f"{'prefix' if layout is None else 'scattered'}-{way}",
                 marks=[_XFAIL_8] * (layout is None and way != "merged_state_dict"))
    for layout in (None, [4, 0, 2]) for way in _EXPORTS])
def test_writing_into_a_state_dict_keeps_pinned_rows(indices, way) -> None:
    emb = _emb(indices)
    try:
        _write_8(_EXPORTS[way](emb))
    except RuntimeError:
        pass  # refusing the write is fine too
    assert torch.equal(emb.weight[_rows(indices)], _ref())
    assert torch.equal(emb(IDS)[[0]], _ref()[[_rows(indices).index(0)]])


# -- 12.12 (core part) ----------------------------------------------------------------------

@pytest.mark.xfail(strict=True, reason="issue 12.12: missing-key error names the parametrization key")
def test_missing_key_error_names_the_plain_key() -> None:
    model = nn.Sequential(_emb(None))
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict({})
    assert '"0.weight"' in str(info.value)
    assert "parametrizations" not in str(info.value)


@pytest.mark.xfail(strict=True, reason="issue 12.12: weight.set_() under no_grad is a silent no-op")
@pytest.mark.parametrize("indices", LAYOUTS)
def test_set_on_weight_raises(indices) -> None:
    emb = _emb(indices)
    with torch.no_grad(), pytest.raises(RuntimeError, match="set_"):
        emb.weight.set_(torch.zeros(V, D))


@pytest.mark.xfail(strict=True, reason="issue 12.12: NumPy integer arrays are refused as indices")
@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_numpy_indices_are_accepted(dtype) -> None:
    emb = constrain(nn.Embedding(V, D), _ref(), indices=np.array([4, 0, 2], dtype=dtype))
    assert torch.equal(emb.weight[[4, 0, 2]], _ref())


@pytest.mark.xfail(strict=True, reason="issue 12.12: meta/sparse reference leaks internals")
@pytest.mark.parametrize("reference", [pytest.param(lambda: torch.empty(N, D, device="meta"), id="meta"),
                                       pytest.param(lambda: _ref().to_sparse(), id="sparse")])
def test_meta_or_sparse_reference_is_refused_in_one_line(reference) -> None:
    emb = nn.Embedding(V, D)
    with pytest.raises((TypeError, ValueError)) as info:
        constrain(emb, reference())
    message = str(info.value)
    assert "reference" in message and "\n" not in message
    assert not hasattr(emb, "parametrizations")


@pytest.mark.xfail(strict=True, reason="issue 12.12: torch.func per-sample gradients fail (TensorWrapper)")
@pytest.mark.parametrize("indices", LAYOUTS)
def test_torch_func_per_sample_grads(indices) -> None:
    from torch.func import functional_call, grad, vmap

    emb = _emb(indices)
    params = {k: v.detach() for k, v in emb.named_parameters()}

    def loss(p: dict, x: torch.Tensor) -> torch.Tensor:
        return (functional_call(emb, p, (x.unsqueeze(0),)) ** 2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, IDS)
    (name,) = params
    for i, x in enumerate(IDS):  # each equals the gradient of that sample alone
        emb.zero_grad()
        (emb(x.unsqueeze(0)) ** 2).sum().backward()
        assert torch.equal(per_sample[name][i], dict(emb.named_parameters())[name].grad)
