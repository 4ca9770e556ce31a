"""Functional tests of the core: constrain / release / is_constrained / merged_state_dict."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import free_param
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from embconstraint import constrain, is_constrained, merged_state_dict, release

V, D, N = 12, 5, 7
SCATTERED = [11, 0, 4, 7, 2, 9, 5]  # N distinct rows, neither prefix nor sorted
LAYOUTS = {"prefix": None, "scattered": SCATTERED}


def _rows(indices):
    return list(range(N)) if indices is None else list(indices)


def _free_rows(indices, num_rows=V):
    pinned = set(_rows(indices))
    return [r for r in range(num_rows) if r not in pinned]


_free = free_param


def _pair(module_cls=nn.Embedding, indices=None, seed=0, **kw):
    """A constrained embedding and a plain twin holding the same merged weight."""
    torch.manual_seed(seed)
    reference = torch.randn(N, D)
    emb = constrain(module_cls(V, D, **kw), reference, indices=indices)
    plain = module_cls(V, D, **kw)
    with torch.no_grad():
        plain.weight.copy_(emb.weight)
    return emb, plain, reference


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weight_holds_reference_and_only_free_rows_train(layout):
    indices = LAYOUTS[layout]
    emb, _, reference = _pair(indices=indices)
    assert is_constrained(emb)
    assert torch.equal(emb.weight[_rows(indices)], reference)
    assert [tuple(p.shape) for p in emb.parameters()] == [(V - N, D)]
    assert emb.weight.shape == (V, D)
    assert f"layout={layout}" in repr(emb) and "storage=aliased" in repr(emb)


def test_prefix_constraint_reuses_the_embedding_storage():
    """Constraining allocates no second (V, D) table: the embedding's own storage is reused."""
    emb = nn.Embedding(V, D)
    storage = emb.weight.untyped_storage().data_ptr()
    reference = torch.randn(N, D)
    constrain(emb, reference)
    assert _free(emb).untyped_storage().data_ptr() == storage
    assert emb.state_dict()["weight"].untyped_storage().data_ptr() == storage
    assert torch.equal(emb.weight[:N], reference)


def test_reference_aliasing_the_embedding():
    """Pinning rows at their current values, or at other rows' values, from the weight itself."""
    emb = nn.Embedding(V, D)
    before = emb.weight.detach().clone()
    constrain(emb, emb.weight[:N])
    assert torch.equal(emb.weight, before)
    emb = nn.Embedding(V, D)
    before = emb.weight.detach().clone()
    constrain(emb, emb.weight[2:N + 2])
    assert torch.equal(emb.weight[:N], before[2:N + 2]) and torch.equal(emb.weight[N:], before[N:])


def test_reference_is_copied():
    reference = torch.randn(N, D)
    emb = constrain(nn.Embedding(V, D), reference)
    kept = reference.clone()
    reference.add_(1.0)
    assert torch.equal(emb.weight[:N], kept)


def test_reference_module_and_parameter():
    old = nn.Embedding(N, D)
    emb = constrain(nn.Embedding(V, D), old)
    assert torch.equal(emb.weight[:N], old.weight)
    emb2 = constrain(nn.Embedding(V, D), old.weight)
    assert torch.equal(emb2.weight[:N], old.weight)
    # a constrained embedding can be the reference of another one
    emb3 = constrain(nn.Embedding(V + 3, D), emb)
    assert torch.equal(emb3.weight[:V], emb.weight)


OPTIMIZERS = {
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, weight_decay=0.01),
    "sparse_adam": lambda p: torch.optim.SparseAdam(list(p), lr=0.05),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("opt_name", OPTIMIZERS)
def test_pinned_rows_exact_after_steps(opt_name, layout):
    indices = LAYOUTS[layout]
    sparse = opt_name == "sparse_adam"
    emb, _, reference = _pair(indices=indices, sparse=sparse)
    opt = OPTIMIZERS[opt_name](emb.parameters())
    before = emb.weight.detach().clone()
    for step in range(6):
        x = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(step))
        loss = emb(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert torch.equal(emb.weight[_rows(indices)], reference)
    free = _free_rows(indices)
    assert not torch.equal(emb.weight[free], before[free])  # the free rows did train
    for state in opt.state.values():  # optimizer state only for the free rows
        for value in state.values():
            if torch.is_tensor(value) and value.dim() == 2:
                assert tuple(value.shape) == (V - N, D)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "kw",
    [{}, {"padding_idx": 3}, {"padding_idx": 10}, {"padding_idx": -1}, {"scale_grad_by_freq": True}, {"sparse": True}],
    ids=["plain", "pad_pinned_or_free", "pad_free", "pad_negative", "scale_grad_by_freq", "sparse"],
)
def test_embedding_forward_and_gradients_match_plain(kw, layout):
    indices = LAYOUTS[layout]
    emb, plain, _ = _pair(indices=indices, **kw)
    x = torch.tensor([[0, 3, 3, 10, 11], [10, 1, 3, 6, 8]])
    out, ref_out = emb(x), plain(x)
    assert torch.equal(out, ref_out)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    (ref_out * upstream).sum().backward()
    grad, ref_grad = _free(emb).grad, plain.weight.grad
    if kw.get("sparse"):
        grad, ref_grad = grad.to_dense(), ref_grad.to_dense()
    assert grad.shape == (V - N, D)
    torch.testing.assert_close(grad, ref_grad[_free_rows(indices)])


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


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("offsets", [False, True], ids=["2d", "offsets"])
@pytest.mark.parametrize(("mode", "kw", "weighted"), BAG_CASES)
def test_embedding_bag_matches_plain(mode, kw, weighted, offsets, layout):
    indices = LAYOUTS[layout]
    emb, plain, _ = _pair(nn.EmbeddingBag, indices=indices, mode=mode, **kw)
    gen = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (4, 5), generator=gen)
    x[0, :2] = 2
    x[1, 1] = 10
    psw = torch.rand(4, 5, generator=gen, requires_grad=True) if weighted else None
    args = {"input": x, "per_sample_weights": psw}
    if offsets:  # 1-D input with offsets, including an empty bag
        args = {"input": x.flatten(), "offsets": torch.tensor([0, 5, 5, 12]),
                "per_sample_weights": None if psw is None else psw.flatten()}
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
    grad, ref_grad = _free(emb).grad, plain.weight.grad
    if kw.get("sparse"):
        grad, ref_grad = grad.to_dense(), ref_grad.to_dense()
    torch.testing.assert_close(grad, ref_grad[_free_rows(indices)])


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_embedding_bag_scale_grad_by_freq_divides_by_the_true_count(mode):
    """torch 2.13's CPU kernel divides by the wrong count (pytorch/pytorch#190063); the
    constrained bag divides each free row's gradient by that row's frequency in the batch."""
    emb, plain, _ = _pair(nn.EmbeddingBag, mode=mode, scale_grad_by_freq=True)
    x = torch.tensor([[8, 8, 9, 1], [11, 8, 0, 9]])
    emb(x).sum().backward()
    unscaled = nn.EmbeddingBag(V, D, mode=mode)
    unscaled.weight.data.copy_(plain.weight.data)
    unscaled(x).sum().backward()
    counts = torch.bincount(x.flatten(), minlength=V).clamp_min(1).float()
    expected = unscaled.weight.grad / counts[:, None]
    if mode == "sum":  # row 8: three hits of gradient 1, scaled by 1/3
        assert torch.equal(_free(emb).grad[1], torch.ones(D))
    torch.testing.assert_close(_free(emb).grad, expected[N:])


def test_max_norm_is_refused():
    with pytest.raises(ValueError, match="max_norm"):
        constrain(nn.Embedding(V, D, max_norm=1.0), torch.zeros(N, D))
    emb = constrain(nn.Embedding(V, D), torch.zeros(N, D))
    with pytest.raises(ValueError, match="max_norm"):
        torch.nn.functional.embedding(torch.tensor([1]), emb.weight, max_norm=1.0)


class _Recorder(TorchDispatchMode):
    """Records the size of every new storage an aten op produces (views and aliases of its
    inputs do not count)."""

    def __init__(self):
        super().__init__()
        self.sizes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        seen = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor) and t.layout == torch.strided}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.layout == torch.strided and t.untyped_storage().data_ptr() not in seen:
                self.sizes.append((str(func), t.untyped_storage().nbytes() // t.element_size()))
        return out


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("module_cls", [nn.Embedding, nn.EmbeddingBag])
def test_no_full_size_tensor_in_a_training_step(module_cls, layout):
    """Neither a (V, D) copy of the weight nor a (V, D) gradient is ever built."""
    big_v, n = 1000, 900
    emb = constrain(module_cls(big_v, 4), torch.randn(n, 4),
                    indices=None if layout == "prefix" else torch.randperm(big_v)[:n])
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1, weight_decay=0.1)
    x = torch.randint(0, big_v, (8, 3))
    emb(x).sum().backward()  # warm up (the lazy per-device index cache)
    opt.step()
    with _Recorder() as rec:
        loss = emb(x).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    too_big = [(f, s) for f, s in rec.sizes if s > (big_v - n + 1) * 4]
    assert too_big == []


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generic_uses_of_weight_are_differentiable(layout):
    """A tied-head style use (weight @ h) gets the right gradient for the free rows."""
    indices = LAYOUTS[layout]
    emb, plain, _ = _pair(indices=indices)
    h = torch.randn(3, D)
    (h @ emb.weight.t()).sin().sum().backward()
    (h @ plain.weight.t()).sin().sum().backward()
    torch.testing.assert_close(_free(emb).grad, plain.weight.grad[_free_rows(indices)])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_release_leaves_a_plain_trainable_embedding(layout):
    indices = LAYOUTS[layout]
    emb, _, reference = _pair(indices=indices)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    emb(torch.arange(V)).sum().backward()
    opt.step()
    merged = emb.weight.detach().clone()
    param = _free(emb)
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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_has_plain_keys_and_round_trips(layout):
    indices = LAYOUTS[layout]
    emb, plain, reference = _pair(indices=indices)
    sd = emb.state_dict()
    assert list(sd) == ["weight"] and sd["weight"].shape == (V, D)
    assert torch.equal(sd["weight"], plain.weight)
    # into a fresh constrained module ...
    fresh = constrain(nn.Embedding(V, D), reference, indices=indices)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.weight, emb.weight)
    assert "storage=aliased" in repr(fresh)
    # ... and into a plain one
    other = nn.Embedding(V, D)
    other.load_state_dict(sd)
    assert torch.equal(other.weight, emb.weight)


def test_plain_checkpoint_loads_and_pinned_mismatch_is_reported():
    emb, plain, reference = _pair()
    with torch.no_grad():
        plain.weight[N:] = 3.0
    emb.load_state_dict(plain.state_dict())
    assert torch.equal(emb.weight[N:], torch.full((V - N, D), 3.0))
    with torch.no_grad():
        plain.weight[1] += 1.0
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="pinned rows"):
        emb.load_state_dict(plain.state_dict())
    assert torch.equal(emb.weight, before)  # nothing changed
    adopt = constrain(nn.Embedding(V, D), reference, on_mismatch="checkpoint")
    adopt.load_state_dict(plain.state_dict())
    assert torch.equal(adopt.weight, plain.weight)


def test_wrong_shape_checkpoint_is_reported():
    emb = constrain(nn.Embedding(V, D), torch.zeros(N, D))
    with pytest.raises(RuntimeError, match=r"size mismatch for weight"):
        emb.load_state_dict({"weight": torch.zeros(V + 1, D)})


def test_checkpoint_never_stores_the_table_twice():
    big_v, d, n = 4000, 16, 3600
    emb = constrain(nn.Embedding(big_v, d), torch.randn(n, d))
    model = nn.Sequential(emb, nn.Linear(d, 1))
    for sd in (model.state_dict(), merged_state_dict(model)):
        buf = io.BytesIO()
        torch.save(sd, buf)
        table_bytes = big_v * d * 4
        assert table_bytes <= buf.tell() < table_bytes * 1.05


def test_merged_state_dict_shares_no_storage():
    model = nn.Sequential(constrain(nn.Embedding(V, D), torch.zeros(N, D)), nn.Linear(D, 2))
    live = {p.untyped_storage().data_ptr() for p in model.parameters()}
    live.add(model[0].weight.untyped_storage().data_ptr())
    sd = merged_state_dict(model)
    assert sorted(sd) == ["0.weight", "1.bias", "1.weight"]
    assert all(t.untyped_storage().data_ptr() not in live for t in sd.values())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_conversion_keeps_the_constraint(dtype):
    emb, _, reference = _pair()
    emb.to(dtype)
    assert emb.weight.dtype == dtype
    assert torch.equal(emb.weight[:N], reference.to(dtype))
    assert "storage=aliased" in repr(emb)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        emb(torch.arange(V)).float().pow(2).sum().backward()
        opt.step()
    assert torch.equal(emb.weight[:N], reference.to(dtype))
    assert _free(emb).dtype == dtype


def test_half_and_bfloat16_methods():
    emb, _, reference = _pair()
    assert torch.equal(emb.half().weight[:N], reference.half())
    assert torch.equal(emb.bfloat16().weight[:N], reference.half().bfloat16())


def test_autocast_keeps_pinned_rows_exact():
    emb, _, reference = _pair()
    head = nn.Linear(D, 1)
    opt = torch.optim.AdamW([*emb.parameters(), *head.parameters()], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head(emb(torch.arange(V))).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(emb.weight[:N], reference)
    assert emb.weight.dtype == torch.float32


@pytest.mark.parametrize("layout", LAYOUTS)
def test_deepcopy(layout):
    emb, _, reference = _pair(indices=LAYOUTS[layout])
    twin = copy.deepcopy(emb)
    assert is_constrained(twin) and torch.equal(twin.weight, emb.weight)
    opt = torch.optim.SGD(twin.parameters(), lr=1.0)
    twin(torch.arange(V)).sum().backward()
    opt.step()
    assert torch.equal(twin.weight[_rows(LAYOUTS[layout])], reference)
    assert not torch.equal(twin.weight, emb.weight)  # the copy trains alone
    assert "storage=aliased" in repr(twin)


def test_non_parameter_free_rows_take_the_copy_path():
    """When a wrapper replaces the free rows by a tensor that is not the aliased Parameter
    (as some distributed strategies do), the merged weight is rebuilt (and says so)."""
    emb, _, reference = _pair()
    plist = emb.parametrizations.weight
    replacement = plist.original.detach().clone() + 1.0
    del plist._parameters["original"]
    plist.original = replacement  # a plain tensor attribute, as a wrapper might leave it
    assert torch.equal(emb.weight[N:], replacement)
    assert torch.equal(emb.weight[:N], reference)
    assert "storage=copy" in repr(emb)


def _train_clone(model, steps, compiled):
    run = torch.compile(model) if compiled else model
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for step in range(steps):
        x = torch.randint(0, V, (4, 6), generator=torch.Generator().manual_seed(step))
        loss = run(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.parametrize("module_cls", [nn.Embedding, nn.EmbeddingBag])
def test_torch_compile_trains_like_eager(module_cls):
    torch.manual_seed(0)
    reference = torch.randn(N, D)
    model = nn.Sequential(constrain(module_cls(V, D), reference), nn.Linear(D, 1))
    twin = copy.deepcopy(model)
    torch._dynamo.reset()
    _train_clone(model, 4, compiled=False)
    _train_clone(twin, 4, compiled=True)
    assert torch.equal(twin[0].weight[:N], reference)
    torch.testing.assert_close(twin[0].weight, model[0].weight, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", LAYOUTS)
def test_cuda_round_trip(layout):
    indices = LAYOUTS[layout]
    emb, _, reference = _pair(nn.EmbeddingBag, indices=indices, mode="sum")
    emb.cuda()
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        emb(torch.randint(0, V, (4, 3), device="cuda")).pow(2).sum().backward()
        opt.step()
    assert torch.equal(emb.weight[_rows(indices)].cpu(), reference)
    assert torch.equal(emb.cpu().weight[_rows(indices)], reference)
