"""Rows files as PEFT users use token adapters: one file loaded onto the same base in another
precision (cast on load, the fingerprint still checked), several files with disjoint rows stacked
on one base, switched and unloaded (``unload_rows``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from embconstraint import constrain, load_rows, release, save_rows, unload_rows
from embconstraint.files import loaded_rows

pytest.importorskip("safetensors")

V, D = 12, 4
A_ROWS, B_ROWS = [8, 9], [10, 11]


def _base(dtype: torch.dtype = torch.float32) -> nn.ModuleDict:
    """The "pretrained" model every file is trained on: an embedding and an untied head with a bias."""
    torch.manual_seed(0)
    return nn.ModuleDict({"emb": nn.Embedding(V, D), "head": nn.Linear(D, V)}).to(dtype)


def _train(free: list[int], seed: int, dtype: torch.dtype = torch.float32) -> nn.ModuleDict:
    """The base with only the rows ``free`` trained (every other row pinned at the base's values)."""
    model = _base(dtype)
    pinned = [r for r in range(V) if r not in free]
    for m in model.values():
        constrain(m, m.weight.detach()[pinned], indices=pinned)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(seed)
    for _ in range(3):
        ids = torch.randint(0, V, (16,), generator=g)
        loss = model["head"](model["emb"](ids)).logsumexp(-1).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def _file(tmp_path, name: str, free: list[int], seed: int, dtype: torch.dtype = torch.float32):
    model = _train(free, seed, dtype)
    path = tmp_path / f"{name}.safetensors"
    save_rows(model, path)
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return path, trained


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _expected(base: dict, *loads: tuple[dict, list[int]]) -> dict[str, torch.Tensor]:
    """The literal result: the base's tensors with each load's rows written over them."""
    out = {k: v.clone() for k, v in base.items()}
    for trained, rows in loads:
        for k in out:
            out[k][rows] = trained[k][rows].to(out[k].dtype)
    return out


def _refused(model: nn.Module, path, match: str) -> None:
    """``load_rows`` raises and changes nothing."""
    before = _state(model)
    with pytest.raises(ValueError, match=match):
        load_rows(model, path)
    assert _same(_state(model), before)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


# -- precision -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "model_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=["bf16", "fp16", "fp64"]
)
def test_a_float32_file_loads_onto_the_same_base_in_another_precision(tmp_path, model_dtype):
    path, trained = _file(tmp_path, "a", A_ROWS, seed=1)
    model = _base().to(model_dtype)  # the same base, another precision
    base = _state(model)
    assert sorted(load_rows(model, path)) == ["emb.weight", "head.bias", "head.weight"]
    assert _same(_state(model), _expected(base, (trained, A_ROWS)))  # cast as PEFT casts: .to(dtype)


def test_a_bfloat16_file_loads_onto_the_float32_base_it_was_cast_from(tmp_path):
    path, trained = _file(tmp_path, "a", A_ROWS, seed=1, dtype=torch.bfloat16)
    model = _base()  # float32: its rows round to the bfloat16 base the file was trained on
    base = _state(model)
    load_rows(model, path)
    assert _same(_state(model), _expected(base, (trained, A_ROWS)))  # bfloat16 -> float32 is exact


def test_the_fingerprint_still_holds_across_precisions(tmp_path):
    path, _ = _file(tmp_path, "a", A_ROWS, seed=1)
    other = _base(torch.bfloat16)
    with torch.no_grad():
        bits = other["emb"].weight.view(torch.int16)
        bits[3, 0] += 1  # one pinned value one bfloat16 ulp away
    _refused(other, path, r"pinned rows of emb\.weight differ .*fingerprint mismatch")


def test_float16_and_bfloat16_cannot_be_compared(tmp_path):
    path, _ = _file(tmp_path, "a", A_ROWS, seed=1, dtype=torch.float16)
    model = _base(torch.bfloat16)
    _refused(
        model,
        path,
        r"emb\.weight is torch\.bfloat16 in the model, the file holds torch\.float16 "
        r"and no fingerprint of its pinned rows in torch\.bfloat16",
    )


def test_a_float32_file_onto_a_constrained_bfloat16_model(tmp_path):
    """The Trainer resume case in another precision: the constrained weight's free rows take the cast rows."""
    path, trained = _file(tmp_path, "a", A_ROWS, seed=1)
    model = _base(torch.bfloat16)
    base = _state(model)
    pinned = [r for r in range(V) if r not in A_ROWS]
    for m in model.values():
        constrain(m, m.weight.detach()[pinned], indices=pinned)
    load_rows(model, path)
    assert _same(_state(model), _expected(base, (trained, A_ROWS)))


# -- several files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("order", ["ab", "ba"])
def test_files_with_disjoint_rows_stack_in_any_order(tmp_path, order):
    a, trained_a = _file(tmp_path, "a", A_ROWS, seed=1)
    b, trained_b = _file(tmp_path, "b", B_ROWS, seed=2)
    model = _base()
    base = _state(model)
    for path in [a, b] if order == "ab" else [b, a]:
        load_rows(model, path)
    assert _same(_state(model), _expected(base, (trained_a, A_ROWS), (trained_b, B_ROWS)))
    assert list(loaded_rows(model)) == [str(p.resolve()) for p in ([a, b] if order == "ab" else [b, a])]


def test_unload_one_file_then_all(tmp_path):
    a, trained_a = _file(tmp_path, "a", A_ROWS, seed=1)
    b, trained_b = _file(tmp_path, "b", B_ROWS, seed=2)
    model = _base()
    base = _state(model)
    load_rows(model, a)
    load_rows(model, b)
    with torch.no_grad():
        model["emb"].weight[A_ROWS] += 1.0  # trained further after loading: unloading still restores the base
    assert sorted(unload_rows(model, a)) == ["emb.weight", "head.bias", "head.weight"]
    assert _same(_state(model), _expected(base, (trained_b, B_ROWS)))
    load_rows(model, a)  # loads again: the other rows are the base's again
    unload_rows(model)
    assert _same(_state(model), base) and loaded_rows(model) == {}
    with pytest.raises(ValueError, match="unload_rows: no rows file loaded into ModuleDict"):
        unload_rows(model)


def test_a_file_with_the_same_rows_switches_and_unload_goes_back_to_the_base(tmp_path):
    a1, _ = _file(tmp_path, "a1", A_ROWS, seed=1)
    a2, trained_a2 = _file(tmp_path, "a2", A_ROWS, seed=3)
    model = _base()
    base = _state(model)
    load_rows(model, a1)
    load_rows(model, a2)  # a switch: the fingerprint is taken over the base's rows, a1's set aside
    assert _same(_state(model), _expected(base, (trained_a2, A_ROWS)))
    assert list(loaded_rows(model)) == [str(a2.resolve())]
    unload_rows(model, a2)
    assert _same(_state(model), base)  # the base, not a1


def test_a_partial_overlap_is_refused(tmp_path):
    a, _ = _file(tmp_path, "a", A_ROWS, seed=1)
    c, _ = _file(tmp_path, "c", [9, 10], seed=4)
    model = _base()
    load_rows(model, a)
    _refused(
        model,
        c,
        r"rows of emb\.weight in .*c\.safetensors' overlap rows loaded from "
        r".*a\.safetensors' \(not the same rows\); unload_rows",
    )


def test_stacking_still_checks_the_base(tmp_path):
    a, _ = _file(tmp_path, "a", A_ROWS, seed=1)
    b, _ = _file(tmp_path, "b", B_ROWS, seed=2)
    model = _base()
    load_rows(model, a)
    with torch.no_grad():
        model["head"].bias[0] += 1.0  # the base itself changed: b was not trained on it
    _refused(model, b, r"pinned rows of head\.bias differ")
    other = _base()
    with torch.no_grad():
        other["emb"].weight[A_ROWS] += 1.0  # rows a file did not load are the base's: no set-aside for them
    with pytest.raises(ValueError, match=r"pinned rows of emb\.weight differ"):
        load_rows(other, b)


def test_stacked_rows_give_the_logits_of_each_adapter_on_its_tokens(tmp_path):
    a, _ = _file(tmp_path, "a", A_ROWS, seed=1)
    b, _ = _file(tmp_path, "b", B_ROWS, seed=2)
    trained_a, trained_b = _train(A_ROWS, 1), _train(B_ROWS, 2)
    model = _base()
    load_rows(model, a)
    load_rows(model, b)
    for trained in (trained_a, trained_b):
        release(trained)
    ids = torch.tensor(A_ROWS)
    with torch.no_grad():
        # embedding rows of a's tokens are a's; the logits of a's tokens (head rows) are a's too
        assert torch.equal(model["emb"](ids), trained_a["emb"](ids))
        h = torch.randn(3, D, generator=torch.Generator().manual_seed(0))
        assert torch.equal(model["head"](h)[:, A_ROWS], trained_a["head"](h)[:, A_ROWS])
        assert torch.equal(model["head"](h)[:, B_ROWS], trained_b["head"](h)[:, B_ROWS])


def test_repeated_loads_into_a_constrained_weight_replace(tmp_path):
    """Trainer checkpoints (resume, best model): files with the constrained weight's own free rows."""
    a1, _ = _file(tmp_path, "a1", A_ROWS, seed=1)
    a2, trained_a2 = _file(tmp_path, "a2", A_ROWS, seed=3)
    model = _base()
    base = _state(model)
    pinned = [r for r in range(V) if r not in A_ROWS]
    for m in model.values():
        constrain(m, m.weight.detach()[pinned], indices=pinned)
    load_rows(model, a1)
    load_rows(model, a2)
    load_rows(model, a2)
    assert _same(_state(model), _expected(base, (trained_a2, A_ROWS)))
    unload_rows(model)
    assert _same(_state(model), base)
