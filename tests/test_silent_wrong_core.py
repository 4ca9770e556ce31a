"""Issue 12: silent wrong results of the core API (constrain / release / state dicts).

Each test states the behaviour the issue asks for and is marked ``xfail(strict=True)`` while the
bug is there: a fix makes it pass, and then the marker must go (strict xfail fails otherwise).
Tests without a marker are regressions for cases of the same class that already hold.
Most run in both layouts: the prefix one (``indices=None``) and a scattered one.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _issue12 import IDS, LAYOUTS, D, N, V, emb_of, free_grad, free_rows, loss_of, pinned_rows, reference
from torch import nn

from embconstraint import constrain, merged_state_dict, release

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
    assert free_grad(emb) is None  # no gradient reached the constrained embedding


@pytest.mark.parametrize("way", list(_WAYS))
@pytest.mark.parametrize("op", list(_DETACHED_OPS))
@pytest.mark.parametrize("indices", LAYOUTS)
def test_lookup_on_detached_weight_is_constant(indices, op, way) -> None:
    emb = emb_of(indices)
    expected = _DETACHED_OPS[op](emb.weight.detach().clone())  # a plain tensor, same values
    _assert_constant(emb, _DETACHED_OPS[op](_WAYS[way](emb)), expected)


@pytest.mark.parametrize("op", list(_DETACHED_OPS_OK))
@pytest.mark.parametrize("indices", LAYOUTS)
def test_other_ops_on_detached_weight_are_constant(indices, op) -> None:
    emb = emb_of(indices)
    expected = _DETACHED_OPS_OK[op](emb.weight.detach().clone())
    _assert_constant(emb, _DETACHED_OPS_OK[op](emb.weight.detach()), expected)


@pytest.mark.parametrize("indices", LAYOUTS)
def test_frozen_teacher_from_detached_weight_does_not_train_the_model(indices) -> None:
    emb = emb_of(indices)
    teacher = nn.Embedding.from_pretrained(emb.weight.detach(), freeze=True)
    before = emb.weight.detach().clone()
    opt = torch.optim.SGD(emb.parameters(), lr=0.5)
    student = torch.zeros(len(IDS), D, requires_grad=True)  # plain torch refuses a backward of the teacher alone
    F.mse_loss(teacher(IDS), student).backward()
    opt.step()
    assert torch.equal(emb.weight.detach(), before)


@pytest.mark.parametrize("indices", LAYOUTS)
def test_new_leaf_from_detached_weight_receives_the_gradient(indices) -> None:
    emb = emb_of(indices)
    leaf = emb.weight.detach().requires_grad_()  # e.g. gradients w.r.t. the embedding table
    F.embedding(IDS, leaf).sum().backward()
    counts = torch.bincount(IDS, minlength=V).float()[:, None].expand(V, D)
    assert leaf.grad is not None and torch.equal(leaf.grad, counts)
    assert free_grad(emb) is None


_TRAINABLE_COPIES = {
    "from_pretrained(freeze=False)": lambda w: nn.Embedding.from_pretrained(w, freeze=False).weight,
    "nn.Parameter": nn.Parameter,
}


@pytest.mark.parametrize("make", list(_TRAINABLE_COPIES))
@pytest.mark.parametrize("indices", LAYOUTS)
def test_trainable_copy_of_detached_weight_is_its_own_parameter(indices, make) -> None:
    emb = emb_of(indices)
    student = _TRAINABLE_COPIES[make](emb.weight.detach())  # e.g. a student initialised from the model
    F.embedding(IDS, student).sum().backward()
    counts = torch.bincount(IDS, minlength=V).float()[:, None].expand(V, D)
    assert student.grad is not None and torch.equal(student.grad, counts)
    assert free_grad(emb) is None


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


@pytest.mark.parametrize("indices", LAYOUTS)
def test_constrain_with_root_keeps_a_tied_head(indices) -> None:
    model = _TiedLM()
    constrain(model.emb, reference(), indices=indices, root=model)
    logits = model(IDS)
    assert logits.shape == (len(IDS), V)
    assert torch.equal(model.head.weight, model.emb.weight)
    assert torch.equal(logits, F.linear(model.emb(IDS), model.emb.weight))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    F.cross_entropy(logits, torch.tensor([5, 4, 3, 1])).backward()
    opt.step()
    logits = model(IDS)
    assert torch.equal(logits, F.linear(model.emb(IDS), model.emb.weight))  # still tied after a step
    assert torch.equal(model.emb.weight[pinned_rows(indices)], reference())
    plain = _TiedLM()
    plain.load_state_dict(model.state_dict())  # loads into the plain, tied model
    assert torch.equal(plain.emb.weight, model.emb.weight)
    assert torch.equal(plain(IDS), logits)


@pytest.mark.parametrize("indices", LAYOUTS)
def test_tied_head_is_never_silently_shrunk(indices) -> None:
    model = _TiedLM()
    try:
        constrain(model.emb, reference(), indices=indices)  # the head is outside what constrain sees
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
    assert torch.equal(model.emb.weight[pinned_rows(indices)], reference())


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
                params.append(pytest.param(layout, cls, kwargs, ids, id=name))
    return params


@pytest.mark.parametrize(("indices", "cls", "kwargs", "ids"), _params_3())
def test_out_of_range_ids_raise_like_plain_torch(indices, cls, kwargs, ids) -> None:
    emb = emb_of(indices, cls, **kwargs)
    with pytest.raises(_plain_error(cls, torch.tensor([ids]), **kwargs)):
        emb(torch.tensor([ids]))


@pytest.mark.parametrize("fn", [pytest.param(lambda w: F.embedding(torch.tensor([-1]), w), id="F.embedding"),
                                pytest.param(lambda w: F.embedding_bag(torch.tensor([-1]), w, torch.tensor([0])),
                                             id="F.embedding_bag-offsets")])
def test_negative_ids_raise_in_functional_calls(fn) -> None:
    emb = emb_of([4, 0, 2])
    with pytest.raises((IndexError, RuntimeError)):
        fn(emb.weight)


# -- 12.5: a first forward under inference_mode after .to() ---------------------------------

@pytest.mark.parametrize("cast", [pytest.param(lambda e: e.double(), id="double"),
                                  pytest.param(lambda e: e.to("cpu", torch.float64), id="to-device-dtype"),
                                  pytest.param(lambda e: e.half().float(), id="half-float")])
@pytest.mark.parametrize("indices", LAYOUTS)
def test_inference_mode_first_forward_after_to(indices, cast) -> None:
    emb = cast(emb_of(indices))
    with torch.inference_mode():
        emb(IDS)
    sd = emb.state_dict()
    assert not sd["weight"].is_inference()
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    loss_of(emb).backward()
    opt.step()
    with torch.no_grad():
        emb.weight.mul_(1.0)  # a guarded write that keeps every row
    assert torch.equal(emb.weight[pinned_rows(indices)], reference().to(emb.weight.dtype))


# -- 12.6: half / bfloat16 round trips keep the reference -----------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("indices", LAYOUTS)
def test_low_precision_round_trip_restores_the_reference(indices, dtype) -> None:
    emb = emb_of(indices).to(dtype)
    emb(IDS)
    assert torch.equal(emb.weight[pinned_rows(indices)], reference().to(dtype))  # the reference cast to dtype
    emb.float()
    emb(IDS)
    assert torch.equal(emb.weight[pinned_rows(indices)], reference())  # bitwise again
    assert torch.equal(emb.state_dict()["weight"][pinned_rows(indices)], reference())


@pytest.mark.parametrize("indices", LAYOUTS)
def test_chained_casts_cast_the_reference_once(indices) -> None:
    ref = reference()
    ref[0, 0] = 1 + 2**-8 + 2**-12  # bf16 rounds it up; half rounds it to a bf16 tie, then bf16 rounds down
    assert ref.bfloat16()[0, 0] != ref.half().bfloat16()[0, 0]
    emb = constrain(nn.Embedding(V, D), ref, indices=indices).half()
    emb(IDS)  # a forward in half precision
    emb.bfloat16()
    assert torch.equal(emb.weight[pinned_rows(indices)], ref.bfloat16())


# -- 12.7: meta device, to_empty, load --------------------------------------------------------

@pytest.mark.parametrize("indices", LAYOUTS)
def test_meta_embedding_materialises_after_to_empty(indices) -> None:
    with torch.device("meta"):
        emb = nn.Embedding(V, D)
    constrain(emb, reference(), indices=indices)
    emb.to_empty(device="cpu")
    assert torch.equal(emb.weight[pinned_rows(indices)], reference())
    checkpoint = torch.randn(V, D, generator=torch.Generator().manual_seed(2))
    checkpoint[pinned_rows(indices)] = reference()
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


@pytest.mark.parametrize(("indices", "way"), [
    pytest.param(layout, way, id=f"{'prefix' if layout is None else 'scattered'}-{way}")
    for layout in (None, [4, 0, 2]) for way in _EXPORTS])
def test_writing_into_a_state_dict_keeps_pinned_rows(indices, way) -> None:
    emb = emb_of(indices)
    try:
        _write_8(_EXPORTS[way](emb))
    except RuntimeError:
        pass  # refusing the write is fine too
    assert torch.equal(emb.weight[pinned_rows(indices)], reference())
    assert torch.equal(emb(IDS)[[0]], reference()[[pinned_rows(indices).index(0)]])


@pytest.mark.parametrize("indices", LAYOUTS)
def test_parameter_vectors_only_reach_the_free_rows(indices) -> None:
    from torch.nn.utils import parameters_to_vector, vector_to_parameters

    emb = emb_of(indices)
    parameters_to_vector(emb.parameters()).add_(1.0)  # a copy
    assert torch.equal(emb.weight[pinned_rows(indices)], reference())
    vector_to_parameters(torch.arange(float((V - N) * D)), emb.parameters())
    assert torch.equal(emb.weight[pinned_rows(indices)], reference())
    assert torch.equal(emb.weight[free_rows(indices)], torch.arange(float((V - N) * D)).view(V - N, D))
    named = dict(emb.named_parameters())
    assert list(named) == ["parametrizations.weight.original"]
    with torch.no_grad():
        named["parametrizations.weight.original"].zero_()
    assert torch.equal(emb.weight[pinned_rows(indices)], reference())


# -- 12.12 (core part) ----------------------------------------------------------------------

def test_missing_key_error_names_the_plain_key() -> None:
    model = nn.Sequential(emb_of(None))
    with pytest.raises(RuntimeError) as info:
        model.load_state_dict({})
    assert '"0.weight"' in str(info.value)
    assert "parametrizations" not in str(info.value)
    assert model.load_state_dict({}, strict=False).missing_keys == ["0.weight"]


@pytest.mark.parametrize("indices", LAYOUTS)
def test_set_on_weight_raises(indices) -> None:
    emb = emb_of(indices)
    with torch.no_grad(), pytest.raises(RuntimeError, match="set_"):
        emb.weight.set_(torch.zeros(V, D))


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_numpy_indices_are_accepted(dtype) -> None:
    emb = constrain(nn.Embedding(V, D), reference(), indices=np.array([4, 0, 2], dtype=dtype))
    assert torch.equal(emb.weight[[4, 0, 2]], reference())


@pytest.mark.parametrize("reference", [pytest.param(lambda: torch.empty(N, D, device="meta"), id="meta"),
                                       pytest.param(lambda: reference().to_sparse(), id="sparse")])
def test_meta_or_sparse_reference_is_refused_in_one_line(reference) -> None:
    emb = nn.Embedding(V, D)
    with pytest.raises((TypeError, ValueError)) as info:
        constrain(emb, reference())
    message = str(info.value)
    assert "reference" in message and "\n" not in message
    assert not hasattr(emb, "parametrizations")


_FUNC_MODULES = {
    "Embedding": lambda idx: emb_of(idx),
    "EmbeddingBag": lambda idx: emb_of(idx, nn.EmbeddingBag, mode="sum"),
    "Linear head": lambda idx: constrain(nn.Linear(D, V), reference(), indices=idx),
}


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's vmap fallback for bags
@pytest.mark.parametrize("kind", list(_FUNC_MODULES))
@pytest.mark.parametrize("indices", LAYOUTS)
def test_torch_func_per_sample_grads(indices, kind) -> None:
    """functional_call + vmap(grad(...)) (per-sample gradients, as in differentially private
    training): each sample's gradient of the free rows (and free bias entries) is the one a
    backward of that sample alone gives, and the pinned rows hold."""
    from torch.func import functional_call, grad, vmap

    module = _FUNC_MODULES[kind](indices)
    inputs = torch.randn(len(IDS), D, generator=torch.Generator().manual_seed(2)) if kind == "Linear head" \
        else IDS.view(-1, 1)
    params = {k: v.detach() for k, v in module.named_parameters()}

    def loss(p: dict, x: torch.Tensor) -> torch.Tensor:
        return (functional_call(module, p, (x.unsqueeze(0),)) ** 2).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, inputs)
    assert set(per_sample) == set(params) and params  # only the free rows (and free bias entries)
    for i, x in enumerate(inputs):  # each equals the gradient of that sample alone
        module.zero_grad()
        (module(x.unsqueeze(0)) ** 2).sum().backward()
        for name, p in module.named_parameters():
            assert per_sample[name][i].shape == p.shape
            torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-6, atol=1e-7)
            if kind != "Linear head":  # one looked-up row: the same sums, bitwise
                assert torch.equal(per_sample[name][i], p.grad)
    assert torch.equal(module.weight.detach()[pinned_rows(indices)], reference())
