"""Tools that save, average and reload weights, on a constrained model: safetensors' ``save_model``
/ ``load_model``, ``torch.optim.swa_utils.AveragedModel`` (SWA and EMA), and an EMA that writes into
``state_dict()`` tensors in place (as timm's ``ModelEmaV3`` does). The pinned rows stay bitwise;
the free rows are what the same tool gives on a plain model with the same values."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from embconstraint import PinnedRowsError, constrain

safetensors_torch = pytest.importorskip("safetensors.torch")

V, N, D = 10, 6, 4
LAYOUTS = [pytest.param(None, id="prefix"), pytest.param([9, 0, 3, 4, 6, 1], id="scattered")]


def _model(indices, tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    emb, head = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
    if tied:
        head.weight = emb.weight
    model = nn.Sequential(emb, nn.Tanh(), head)
    rows = list(range(N)) if indices is None else indices
    constrain(emb, emb.weight.detach()[rows], indices=indices, root=model)
    return model


def _step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    ids = torch.randint(0, V, (8,), generator=torch.Generator().manual_seed(step))
    opt.zero_grad()
    model(ids).logsumexp(-1).sum().backward()
    opt.step()


def _plain_copy(model: nn.Module) -> nn.Module:
    """An unconstrained model with the same values (and the same tie)."""
    emb, head = nn.Embedding(V, D), nn.Linear(D, V, bias=False)
    if (
        model[2].weight is model[0].weight
        or getattr(model[2], "parametrizations", None) is not None
        and "weight" in model[2].parametrizations
    ):
        head.weight = emb.weight
    plain = nn.Sequential(emb, nn.Tanh(), head)
    plain.load_state_dict(model.state_dict())
    return plain


def _pinned(model: nn.Module, indices) -> torch.Tensor:
    rows = list(range(N)) if indices is None else indices
    return model[0].weight.detach()[rows]


def _trained(indices, tied: bool) -> nn.Module:
    model = _model(indices, tied)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    for step in range(3):
        _step(model, opt, step)
    return model


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    return all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_safetensors_save_model_then_load_model_into_a_plain_model(tmp_path, tied):
    model = _trained(None, tied)
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_model(model, str(path))
    plain = _plain_copy(_model(None, tied))
    assert safetensors_torch.load_model(plain, str(path)) == (set(), [])
    assert _same_state(plain, model)


def test_safetensors_load_model_into_a_constrained_untied_model(tmp_path):
    model = _trained(None, False)
    safetensors_torch.save_model(model, str(tmp_path / "m.safetensors"))
    fresh = _model(None, False)
    assert safetensors_torch.load_model(fresh, str(tmp_path / "m.safetensors")) == (set(), [])
    assert _same_state(fresh, model)


@pytest.mark.parametrize("indices", LAYOUTS)
def test_safetensors_load_model_into_a_constrained_tied_model(tmp_path, indices):
    """``save_model`` writes the tied weight once (the embedding and the head share one storage,
    in every layout); ``load_model`` (strict) loads it back; a strict ``load_state_dict`` of the
    file misses the head's key exactly as it does for the plain tied model."""
    model = _trained(indices, True)
    path = tmp_path / "m.safetensors"
    safetensors_torch.save_model(model, str(path))
    assert sorted(safetensors_torch.load_file(str(path))) == ["0.weight"]
    fresh = _model(indices, True)
    safetensors_torch.load_model(fresh, str(path))
    assert _same_state(fresh, model)
    plain = _plain_copy(_model(indices, True))
    for m in (_model(indices, True), plain):
        with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "2.weight"'):
            m.load_state_dict(safetensors_torch.load_file(str(path)))


@pytest.mark.parametrize("indices", LAYOUTS)
@pytest.mark.parametrize("kind", ["swa", "ema"])
def test_averaged_model_averages_the_free_rows_and_keeps_the_pinned_ones(indices, kind):
    model = _model(indices)
    reference = _pinned(model, indices).clone()
    plain = _plain_copy(model)
    make = (
        (lambda m: AveragedModel(m))
        if kind == "swa"
        else (lambda m: AveragedModel(m, multi_avg_fn=get_ema_multi_avg_fn(0.9)))
    )
    averaged, plain_averaged = make(model), make(plain)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(4):
        _step(model, opt, step)
        plain.load_state_dict(model.state_dict())  # the plain model follows the same trajectory
        averaged.update_parameters(model)
        plain_averaged.update_parameters(plain)
    assert torch.equal(_pinned(averaged.module, indices), reference)
    assert torch.equal(
        averaged.module[0].weight, plain_averaged.module[0].weight
    )  # pinned rows: lerp(x, x) = x
    assert torch.equal(averaged.module[2].weight, plain_averaged.module[2].weight)
    assert not torch.equal(averaged.module[0].weight, model[0].weight)  # it did average
    model.load_state_dict(
        averaged.module.state_dict()
    )  # loading the average back passes the pinned-row check


@pytest.mark.parametrize("indices", LAYOUTS)
def test_an_ema_that_writes_into_state_dict_tensors(indices):
    """timm's ModelEmaV3: ``ema_v.lerp_(model_v, 1 - decay)`` over ``state_dict().values()``."""
    model = _model(indices)
    ema = copy.deepcopy(model)
    plain, plain_ema = _plain_copy(model), _plain_copy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        _step(model, opt, step)
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            for e, m in ((ema, model), (plain_ema, plain)):
                for ema_v, model_v in zip(e.state_dict().values(), m.state_dict().values(), strict=True):
                    ema_v.lerp_(model_v, 0.1)
    assert torch.equal(_pinned(ema, indices), _pinned(model, indices))
    assert all(
        torch.equal(a, b)
        for a, b in zip(ema.state_dict().values(), plain_ema.state_dict().values(), strict=True)
    )
    assert not torch.equal(ema[0].weight, model[0].weight)


@pytest.mark.parametrize("indices", LAYOUTS)
def test_an_ema_that_averages_into_state_dict_tensors(indices):
    """timm's ModelEmaV2: ``ema_v.copy_(ema_v * d + (1 - d) * model_v)``. On equal pinned values
    that average rounds by up to an ulp; the pinned rows of the EMA stay bitwise, its free rows are
    the plain model's EMA, bitwise."""
    model = _model(indices)
    ema = copy.deepcopy(model)
    plain, plain_ema = _plain_copy(model), _plain_copy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(3):
        _step(model, opt, step)
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            for e, m in ((ema, model), (plain_ema, plain)):
                for ema_v, model_v in zip(e.state_dict().values(), m.state_dict().values(), strict=True):
                    ema_v.copy_(ema_v * 0.97 + (1 - 0.97) * model_v)
    rows = list(range(N)) if indices is None else indices
    free = [r for r in range(V) if r not in rows]
    assert torch.equal(_pinned(ema, indices), _pinned(model, indices))
    assert not torch.equal(plain_ema[0].weight[rows], _pinned(model, indices))  # the plain EMA did round them
    assert torch.equal(ema[0].weight[free], plain_ema[0].weight[free])
    assert torch.equal(ema[2].weight, plain_ema[2].weight)
    with torch.no_grad(), pytest.raises(PinnedRowsError, match="would change pinned rows"):
        next(iter(ema.state_dict().values())).mul_(0.5)  # more than rounding: refused
