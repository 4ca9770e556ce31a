"""Every way autograd, torch.func, checkpointing, torch's parametrize utilities and the exporters
reach a constrained weight, side by side with a literal ``torch.cat`` parametrization of the same
model (the reference): equal results, or a clear refusal where plain PyTorch refuses too.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from helpers import IDS as _IDS
from helpers import LAYOUTS, CatRows, D, N, V, reference
from torch import nn
from torch.func import functional_call, grad, jvp, vmap
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint

from embconstraint import PinnedRowsError, constrain, merged_state_dict, release
from embconstraint._mechanism import pin_of

IDS = torch.stack([_IDS, _IDS.flip(0)])  # (2, 4): 2-D ids


def _pair(kind: str, layout: str, **kwargs) -> tuple[nn.Module, nn.Module]:
    """(constrained, reference) modules with equal weights."""
    torch.manual_seed(0)
    module = {"embedding": nn.Embedding, "bag": nn.EmbeddingBag, "head": nn.Linear}[kind]
    module = module(D, V, bias=False) if kind == "head" else module(V, D, **kwargs)
    ref = reference()
    other = copy.deepcopy(module)
    constrain(module, ref, indices=LAYOUTS[layout])
    parametrize.register_parametrization(other, "weight", CatRows(ref, LAYOUTS[layout]), unsafe=True)
    assert torch.equal(module.weight.detach(), other.weight.detach())
    return module, other


def _free(module: nn.Module) -> torch.Tensor:
    return module.parametrizations.weight.original


def _close(a: torch.Tensor | None, b: torch.Tensor | None) -> None:
    assert a is not None and b is not None
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _input(kind: str) -> torch.Tensor:
    return torch.randn(2, 3, D, generator=torch.Generator().manual_seed(2)) if kind == "head" else IDS


# -- higher-order gradients ---------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_input_gradient_penalty_through_a_head(layout):
    """R1 / gradient-penalty style: the gradient of a function of d(loss)/d(input)."""
    grads = []
    for module in _pair("head", layout):
        x = _input("head").requires_grad_()
        (g,) = torch.autograd.grad(torch.tanh(module(x)).pow(2).sum(), x, create_graph=True)
        g.pow(2).sum().backward()
        grads.append(_free(module).grad)
    _close(*grads)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_input_gradient_penalty_through_a_tied_model(layout):
    grads = []
    for tied_cat in (False, True):
        torch.manual_seed(0)
        emb, head = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
        head.weight = emb.weight
        model = nn.ModuleDict({"emb": emb, "head": head})
        ref = reference()
        if tied_cat:
            parametrize.register_parametrization(emb, "weight", CatRows(ref, LAYOUTS[layout]), unsafe=True)
            free = emb.parametrizations.weight.original
            head_weight = emb.weight  # the tie, written out
        else:
            constrain(emb, ref, indices=LAYOUTS[layout], root=model)
            free = pin_of(emb).free_parameter
            head_weight = head.weight
        h = torch.tanh(emb(IDS)).detach().requires_grad_()
        (g,) = torch.autograd.grad(F.linear(h, head_weight).pow(2).sum(), h, create_graph=True)
        (g.pow(2).sum() + emb(IDS).pow(2).sum()).backward()
        grads.append(free.grad)
    _close(*grads)


@pytest.mark.parametrize("ids", [IDS[0], IDS], ids=["1d", "2d"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_hessian_vector_product_through_a_lookup(layout, ids):
    hvps = []
    for module in _pair("embedding", layout):
        free = _free(module)
        (g,) = torch.autograd.grad(module(ids).pow(3).sum(), free, create_graph=True)
        (hvp,) = torch.autograd.grad((g * torch.ones_like(g)).sum(), free)
        hvps.append(hvp)
    _close(*hvps)


def test_double_backward_through_a_bag_is_refused_as_plain_torch_refuses():
    for module in _pair("bag", "scattered", mode="sum"):
        free = _free(module)
        (g,) = torch.autograd.grad(module(IDS).pow(3).sum(), free, create_graph=True)
        with pytest.raises(
            RuntimeError, match="derivative for .*_embedding_bag_backward.* is not implemented"
        ):
            torch.autograd.grad(g.sum(), free)


# -- forward-mode AD, vmap, torch.func ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["embedding", "bag", "head"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_jvp_with_respect_to_the_free_rows(kind, layout):
    outs = []
    for module in _pair(kind, layout):
        free = _free(module).detach()
        tangent = torch.ones_like(free)

        def f(free, module=module):
            return functional_call(module, {"parametrizations.weight.original": free}, (_input(kind),))

        if kind == "bag":  # plain torch has no forward-mode AD for embedding_bag
            with pytest.raises(NotImplementedError, match="forward AD with _embedding_bag"):
                jvp(f, (free,), (tangent,))
            continue
        outs.append(jvp(f, (free,), (tangent,)))
    for a, b in zip(*outs, strict=True):
        _close(a, b)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_ad_dual_input_through_a_head(layout):
    tangents = []
    for module in _pair("head", layout):
        with fwAD.dual_level():
            x = fwAD.make_dual(_input("head"), torch.ones(2, 3, D))
            tangents.append(fwAD.unpack_dual(module(x)).tangent)
    _close(*tangents)


@pytest.mark.parametrize("kind", ["embedding", "bag", "head"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_over_the_inputs(kind, layout):
    for module in _pair(kind, layout):
        x = _input(kind)
        batched = vmap(module)(x.unsqueeze(1) if kind == "bag" else x)
        looped = torch.stack([module(row.unsqueeze(0) if kind == "bag" else row) for row in x])
        _close(batched, looped)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_sample_gradients(layout):
    results = []
    for module in _pair("embedding", layout):
        params = {"parametrizations.weight.original": _free(module).detach()}

        def loss(params, ids, module=module):
            return functional_call(module, params, (ids,)).pow(2).sum()

        results.append(vmap(grad(loss), in_dims=(None, 0))(params, IDS)["parametrizations.weight.original"])
    _close(*results)


@pytest.mark.parametrize("kind", ["embedding", "head"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_functional_call_with_the_plain_key_leaves_the_module_as_it_was(kind, layout):
    """``functional_call(model, {"weight": W}, x)``, the key ``state_dict()`` uses: computes with
    W, and the module keeps its own weight afterwards (its free rows too)."""
    ours, ref = _pair(kind, layout)
    before = ours.weight.detach().clone()
    new = before.clone()
    new[[r for r in range(V) if r not in (LAYOUTS[layout] or range(N))]] += 1.0
    out = functional_call(ours, {"weight": new}, (_input(kind),))
    expected = F.linear(_input(kind), new) if kind == "head" else F.embedding(_input(kind), new)
    _close(out, expected)
    assert torch.equal(ours.weight.detach(), before)
    assert torch.equal(_free(ours).detach(), _free(ref).detach())


# -- activation checkpointing, detach and requires_grad ------------------------------------------------


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_activation_checkpointing(layout, reentrant):
    grads = []
    for module in _pair("embedding", layout):
        h = torch.randn(2, D, generator=torch.Generator().manual_seed(4)).requires_grad_()

        def body(h, weight, module=module):
            return torch.tanh(h @ weight.t()).sum() + module(IDS).pow(2).sum()

        checkpoint(body, h, module.weight, use_reentrant=reentrant).backward()
        grads.append(_free(module).grad)
    _close(*grads)


def test_requires_grad_attribute_on_a_detached_weight_makes_a_leaf_of_its_own():
    ours, _ = _pair("embedding", "scattered")
    t = ours.weight.detach()
    assert not t.requires_grad
    t.requires_grad = True
    assert t.requires_grad and t.is_leaf
    F.embedding(IDS, t).sum().backward()
    assert t.grad is not None and t.grad.shape == (V, D)
    assert _free(ours).grad is None  # a tensor of its own: the module is not reached
    with torch.no_grad():
        t[0] += 1.0  # and writable like one: the module's pinned row is untouched
    assert not torch.equal(t[0], ours.weight[0])


def test_grad_attribute_set_on_a_detached_weight_stays_on_it():
    ours, _ = _pair("embedding", "scattered")
    t = ours.weight.detach()
    t.grad = torch.ones(V, D)
    assert torch.equal(t.grad, torch.ones(V, D))


def test_the_weight_is_a_real_autograd_tensor():
    """Code that reads autograd state in C++ (``autograd.Function.apply``, ``torch.autograd.grad``
    with the weight as input) sees what Python sees."""
    ours, ref = _pair("embedding", "prefix")
    for module in (ours, ref):
        w = module.weight
        assert w.requires_grad and w.grad_fn is not None and not w.is_leaf
    w = ours.weight
    (g,) = torch.autograd.grad((w * 2).sum(), w)
    assert torch.equal(g, torch.full((V, D), 2.0))
    with torch.no_grad():
        assert not ours.weight.requires_grad


# -- hooks on the free rows ---------------------------------------------------------------------------


def test_hooks_on_the_free_rows():
    grads = []
    for module in _pair("embedding", "scattered"):
        free = _free(module)
        free.register_hook(lambda g: g * 3)
        seen: list[torch.Tensor] = []
        free.register_post_accumulate_grad_hook(lambda p, seen=seen: seen.append(p.grad.clone()))
        module(IDS).pow(2).sum().backward()
        assert len(seen) == 1 and torch.equal(seen[0], free.grad)
        grads.append(free.grad)
    _close(*grads)


def test_optimizer_in_backward():
    """The optimizer steps inside the post-accumulate-grad hook (as torch's tutorial and FSDP do)."""
    results = []
    for module in _pair("embedding", "prefix"):
        free = _free(module)
        opt = torch.optim.AdamW([free], lr=0.1)

        def step(p, opt=opt):
            opt.step()
            opt.zero_grad()

        free.register_post_accumulate_grad_hook(step)
        for _ in range(3):
            module(IDS).pow(2).sum().backward()
        results.append(module.weight.detach())
    _close(*results)
    assert torch.equal(results[0][:N], results[1][:N])


# -- torch's parametrize utilities ---------------------------------------------------------------------


def test_cached_parametrizations():
    grads = []
    for module in _pair("embedding", "scattered"):
        with parametrize.cached():
            assert module.weight is module.weight
            (module(IDS).pow(2).sum() + module(IDS[:, :2]).sum()).backward()
        grads.append(_free(module).grad)
    _close(*grads)


def test_type_before_parametrizations():
    ours, _ = _pair("embedding", "prefix")
    assert parametrize.type_before_parametrizations(ours) is nn.Embedding


@pytest.mark.parametrize("layout", LAYOUTS)
def test_remove_parametrizations_leaves_a_plain_module(layout):
    ours, ref = _pair("embedding", layout)
    merged = ours.weight.detach().clone()
    parametrize.remove_parametrizations(ours, "weight")
    parametrize.remove_parametrizations(ref, "weight")
    assert type(ours) is nn.Embedding and isinstance(ours.weight, nn.Parameter)
    assert torch.equal(ours.weight, merged) and torch.equal(ours.weight, ref.weight)
    assert list(ours.state_dict()) == ["weight"]
    ours.load_state_dict({"weight": torch.zeros(V, D)})  # a plain module again: anything loads
    assert torch.equal(ours.weight, torch.zeros(V, D))


def test_remove_parametrizations_on_a_tied_embedding_keeps_the_tie():
    torch.manual_seed(0)
    emb, head = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    constrain(emb, torch.randn(N, D), root=model)
    parametrize.remove_parametrizations(emb, "weight")
    assert torch.equal(head.weight, emb.weight)
    sd = model.state_dict()
    assert sorted(sd) == ["emb.weight", "head.weight"] and torch.equal(sd["head.weight"], emb.weight)
    model.load_state_dict(sd)
    release(model)
    assert head.weight is emb.weight


def test_remove_parametrizations_without_leaving_the_parametrization_behaves_as_for_cat():
    ours, ref = _pair("embedding", "scattered")
    parametrize.remove_parametrizations(ours, "weight", leave_parametrized=False)
    parametrize.remove_parametrizations(ref, "weight", leave_parametrized=False)
    assert ours.weight.shape == ref.weight.shape == (V - N, D) and torch.equal(ours.weight, ref.weight)


# -- state dicts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_keep_vars_reports_what_trains(layout):
    ours, _ = _pair("embedding", layout)
    with torch.no_grad():  # (as a Parameter would, whatever the grad mode)
        sd = ours.state_dict(keep_vars=True)
    trainable = {k for k, v in sd.items() if v.requires_grad}
    assert trainable == {"weight"} and torch.equal(sd["weight"].detach(), ours.weight.detach())
    buffer = io.BytesIO()
    torch.save({k: v for k, v in sd.items() if v.requires_grad}, buffer)
    buffer.seek(0)
    assert torch.equal(torch.load(buffer)["weight"], merged_state_dict(ours)["weight"])
    _free(ours).requires_grad_(False)
    assert not ours.state_dict(keep_vars=True)["weight"].requires_grad


@pytest.mark.parametrize("layout", LAYOUTS)
def test_constrained_under_inference_mode_then_written(layout):
    with torch.inference_mode():
        pass
    emb = nn.Embedding(V, D)
    with torch.inference_mode():
        constrain(emb, torch.zeros(N, D), indices=LAYOUTS[layout])
    free_row = next(r for r in range(V) if r not in (LAYOUTS[layout] or range(N)))
    with torch.no_grad():
        emb.weight[free_row] = 3.0
    assert torch.equal(emb.weight[free_row], torch.full((D,), 3.0))
    emb(IDS).sum().backward()
    assert _free(emb).grad is not None


# -- exporters -----------------------------------------------------------------------------------------


class _Tied(nn.Module):
    def __init__(self, layout: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb, self.head = nn.Embedding(V, D), nn.Linear(D, V)
        self.head.weight = self.emb.weight
        constrain(self.emb, torch.randn(N, D), indices=LAYOUTS[layout], root=self)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_torch_export(layout):
    model = _Tied(layout)
    program = torch.export.export(model, (IDS,))
    assert torch.equal(program.module()(IDS), model(IDS))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_jit_trace_saves_and_loads(layout):
    model = _Tied(layout)
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.trace(model, (IDS,)), buffer)
    buffer.seek(0)
    assert torch.equal(torch.jit.load(buffer)(IDS), model(IDS))


def test_jit_script_is_refused_naming_the_way_out():
    with pytest.raises(
        RuntimeError, match=r"torch.jit.script cannot compile .* torch.jit.trace or torch.export"
    ):
        torch.jit.script(_Tied("prefix"))
    with pytest.raises(RuntimeError, match="release"):
        torch.jit.script(_Tied("prefix").head)


def test_onnx_export(tmp_path):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _Tied("scattered")
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (IDS,), str(path), dynamo=True)
    session = ort.InferenceSession(str(path))
    (out,) = session.run(None, {session.get_inputs()[0].name: IDS.numpy()})
    _close(torch.from_numpy(out), model(IDS).detach())


@pytest.mark.parametrize("layout", LAYOUTS)
def test_assigning_real_is_a_guarded_write(layout):
    """``t.real = value`` writes into a tensor's storage without ``__torch_function__`` in torch:
    on a constrained weight, its detached form or a view it is checked like any write."""
    ours, _ = _pair("embedding", layout)
    before = ours.weight.detach().clone()
    for get in (lambda: ours.weight, lambda: ours.weight.detach()):
        with (
            torch.no_grad(),
            pytest.raises(PinnedRowsError, match=r"\.real assignment would change pinned rows"),
        ):
            get().real = torch.ones(V, D)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"\.real assignment on a view"):
        ours.weight[1:].real = torch.ones(V - 1, D)
    assert torch.equal(ours.weight.detach(), before)
    free = [r for r in range(V) if r not in (LAYOUTS[layout] or range(N))]
    value = before.clone()
    value[free] = 5.0
    with torch.no_grad():
        ours.weight.real = value
    assert torch.equal(ours.weight.detach(), value)
