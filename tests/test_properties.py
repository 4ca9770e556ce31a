"""Property-based tests (hypothesis): random sizes, pinned-row sets, dtypes, modules and optimizers.

After random training steps a constrained embedding must hold its pinned rows bitwise, and its
free rows must match an independent reference: a plain module of the same configuration whose
weight is rebuilt each step from the fixed pinned rows and a separate ``(V - n, D)`` parameter of
free rows; the plain module's gradient is restricted to the free rows by hand and a second
optimizer (same hyper-parameters, weight decay included) updates that parameter only.
"""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from embconstraint import constrain, is_constrained, merged_state_dict, release

SETTINGS = settings(
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# Free rows: the reference optimizer runs the same arithmetic on the same gradients, so the
# results agree to rounding (bfloat16 rounds coarsely, and Adam-type updates amplify it a little).
TOLERANCE = {torch.float32: (1e-5, 1e-6), torch.float64: (1e-12, 1e-14), torch.bfloat16: (2e-2, 2e-2)}

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, nesterov=True, weight_decay=0.01),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
    "adagrad": lambda p: torch.optim.Adagrad(p, lr=0.1, weight_decay=0.01),
    "rmsprop": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.5, weight_decay=0.01),
    "sparse_adam": lambda p: torch.optim.SparseAdam(p, lr=0.05),
}


@dataclass
class Problem:
    num_rows: int
    dim: int
    pinned: list[int]  # user rows, in reference order
    indices: Any  # what constrain() is given: None, a list or a tensor
    dtype: torch.dtype
    ref_dtype: torch.dtype
    module_cls: type
    kwargs: dict = field(default_factory=dict)
    optimizer: str = "sgd"
    steps: int = 1
    seed: int = 0
    weighted: bool = False  # per_sample_weights (EmbeddingBag, mode="sum")
    offsets: bool = False  # 1-D input with offsets (EmbeddingBag)

    @property
    def free(self) -> list[int]:
        pinned = set(self.pinned)
        return [r for r in range(self.num_rows) if r not in pinned]

    @property
    def sparse(self) -> bool:
        return bool(self.kwargs.get("sparse"))


@st.composite
def _pinned_rows(draw, num_rows: int) -> tuple[list[int], Any]:
    n = draw(st.integers(0, num_rows))
    kind = draw(st.sampled_from(["default", "prefix", "suffix", "permuted", "sorted"]))
    if kind == "default":
        return list(range(n)), None
    if kind == "prefix":
        rows = list(range(n))
    elif kind == "suffix":
        rows = list(range(num_rows - n, num_rows))
    else:
        rows = draw(st.permutations(range(num_rows)))[:n]
        if kind == "sorted":
            rows = sorted(rows)
    as_tensor = draw(st.booleans())
    return rows, torch.tensor(rows, dtype=torch.long) if as_tensor else list(rows)


@st.composite
def problems(draw, module_cls: type) -> Problem:
    num_rows = draw(st.integers(1, 10))
    dim = draw(st.integers(1, 4))
    pinned, indices = draw(_pinned_rows(num_rows))
    dtype = draw(st.sampled_from(DTYPES))
    # the reference may be wider than the embedding when its values are exactly representable
    ref_dtype = draw(st.sampled_from([dtype, torch.float64]))
    kwargs: dict[str, Any] = {}
    if draw(st.booleans()):
        kwargs["padding_idx"] = draw(st.integers(-num_rows, num_rows - 1))
    weighted = offsets = False
    if module_cls is nn.EmbeddingBag:
        kwargs["mode"] = draw(st.sampled_from(["sum", "mean", "max"]))
        weighted = kwargs["mode"] == "sum" and draw(st.booleans())
        offsets = draw(st.booleans())
    optimizers = [o for o in OPTIMIZERS if not (o == "sparse_adam" and kwargs.get("mode") == "max")]
    optimizer = draw(st.sampled_from(optimizers))
    if optimizer == "sparse_adam":
        kwargs["sparse"] = True
    elif module_cls is nn.Embedding and draw(st.booleans()):
        # (EmbeddingBag's own CPU kernel scales by a wrong count, pytorch/pytorch#190063: test_bag covers it)
        kwargs["scale_grad_by_freq"] = True
    return Problem(
        num_rows,
        dim,
        pinned,
        indices,
        dtype,
        ref_dtype,
        module_cls,
        kwargs,
        optimizer,
        steps=draw(st.integers(1, 4)),
        seed=draw(st.integers(0, 2**16)),
        weighted=weighted,
        offsets=offsets,
    )


def _batch(p: Problem, gen: torch.Generator) -> dict[str, torch.Tensor | None]:
    shape = (12,) if p.offsets else (3, 4)
    x = torch.randint(0, p.num_rows, shape, generator=gen)
    psw = (
        torch.rand(shape, generator=gen, dtype=torch.float64).to(p.dtype).requires_grad_()
        if p.weighted
        else None
    )
    if p.module_cls is nn.Embedding:
        return {"input": x}
    if p.offsets:  # 1-D input with offsets, an empty bag included
        return {"input": x, "offsets": torch.tensor([0, 4, 4, 9]), "per_sample_weights": psw}
    return {"input": x, "per_sample_weights": psw}


def _loss(out: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    out = out.to(upstream.dtype)
    return (out * upstream).sum() + 0.5 * out.pow(2).sum()


def _sparse_free_grad(grad: torch.Tensor, free: list[int], num_rows: int) -> torch.Tensor:
    """A sparse (V, D) gradient, restricted to the free rows and renumbered to (V - n, D)."""
    grad = grad.coalesce()
    pos = torch.full((num_rows,), -1, dtype=torch.long)
    pos[free] = torch.arange(len(free))
    rows = pos[grad.indices()[0]]
    keep = rows >= 0
    return torch.sparse_coo_tensor(
        rows[keep].unsqueeze(0), grad.values()[keep], (len(free), grad.shape[1]), check_invariants=True
    )


class _Reference:
    """The independent implementation: plain module + separate free-row parameter."""

    def __init__(self, p: Problem, initial: torch.Tensor, reference: torch.Tensor) -> None:
        self.p = p
        self.plain = p.module_cls(p.num_rows, p.dim, dtype=p.dtype, **p.kwargs)
        self.pinned_rows = reference.to(p.dtype)
        self.free = nn.Parameter(initial[p.free].clone())
        self.opt = OPTIMIZERS[p.optimizer]([self.free])

    def weight(self) -> torch.Tensor:
        w = torch.empty(self.p.num_rows, self.p.dim, dtype=self.p.dtype)
        w[self.p.pinned] = self.pinned_rows
        w[self.p.free] = self.free.detach()
        return w

    def step(self, batch: dict, upstream: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.plain.weight.copy_(self.weight())
        self.plain.weight.grad = None
        out = self.plain(**batch)
        _loss(out, upstream).backward()
        grad = self.plain.weight.grad
        if self.p.sparse:
            self.free.grad = _sparse_free_grad(grad, self.p.free, self.p.num_rows)
        else:
            self.free.grad = grad[self.p.free]
        self.opt.step()
        return out.detach()


def _run(p: Problem) -> None:
    torch.manual_seed(p.seed)
    reference = torch.randn(len(p.pinned), p.dim, dtype=torch.float64).to(p.dtype).to(p.ref_dtype)
    emb = p.module_cls(p.num_rows, p.dim, dtype=p.dtype, **p.kwargs)
    initial = emb.weight.detach().clone()
    constrain(emb, reference, indices=p.indices)

    # right after constrain: pinned rows from the reference, free rows kept, one (V - n, D) parameter
    assert is_constrained(emb)
    weight = emb.weight.detach()
    assert weight.dtype == p.dtype and weight.shape == (p.num_rows, p.dim)
    assert torch.equal(weight[p.pinned], reference.to(p.dtype))
    assert torch.equal(weight[p.free], initial[p.free])
    assert [tuple(q.shape) for q in emb.parameters()] == [(len(p.free), p.dim)]

    ref = _Reference(p, weight.clone(), reference)
    opt = OPTIMIZERS[p.optimizer](list(emb.parameters()))
    gen = torch.Generator().manual_seed(p.seed)
    rtol, atol = TOLERANCE[p.dtype]
    for step in range(p.steps):
        batch = _batch(p, gen)
        ref_batch = {
            k: v.detach().clone().requires_grad_(v.requires_grad) if torch.is_tensor(v) else v
            for k, v in batch.items()
        }
        out = emb(**batch)
        upstream = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(
            torch.float32 if p.dtype == torch.bfloat16 else p.dtype
        )
        ref_out = ref.step(ref_batch, upstream)
        if step == 0:  # same weights so far: the same forward, bitwise
            assert torch.equal(out, ref_out)
        opt.zero_grad()
        _loss(out, upstream).backward()
        opt.step()
        if p.weighted:  # the gradient of per_sample_weights is the plain module's
            torch.testing.assert_close(
                batch["per_sample_weights"].grad, ref_batch["per_sample_weights"].grad, rtol=rtol, atol=atol
            )
        weight = emb.weight.detach()
        assert torch.equal(weight[p.pinned], reference.to(p.dtype)), f"pinned rows moved at step {step}"
        torch.testing.assert_close(weight[p.free], ref.free.detach(), rtol=rtol, atol=atol)

    for state in opt.state.values():  # optimizer state exists for the free rows only
        for value in state.values():
            if torch.is_tensor(value) and value.dim() == 2:
                assert tuple(value.shape) == (len(p.free), p.dim)

    # every way out gives the same (V, D) tensor in user order, bitwise
    merged = emb.weight.detach().clone()
    assert type(merged) is torch.Tensor
    for out_weight in _ways_out(emb):
        assert out_weight.dtype == p.dtype and torch.equal(out_weight, merged)
    released = release(emb).weight
    assert type(released) is nn.Parameter and released.dtype == p.dtype
    assert torch.equal(released, merged)


def _ways_out(emb: nn.Module) -> list[torch.Tensor]:
    buf = io.BytesIO()
    torch.save(emb.weight.detach(), buf)
    buf.seek(0)
    ways = [
        merged_state_dict(emb)["weight"],
        emb.state_dict()["weight"],
        copy.deepcopy(emb).weight.detach(),
        copy.deepcopy(emb.weight.detach()),
        torch.load(buf),
        # through raw memory: data_ptr() (safetensors) and NumPy
        safetensors.torch.load(safetensors.torch.save({"w": emb.weight.detach()}))["w"],
        emb.weight.detach().to(torch.float64).to(emb.weight.dtype),
        emb.weight[torch.arange(emb.weight.shape[0])].detach(),
    ]
    if emb.weight.dtype != torch.bfloat16:  # NumPy has no bfloat16
        ways.append(torch.from_numpy(np.array(emb.weight.detach())))
    return ways


@SETTINGS
@given(problems(nn.Embedding))
def test_embedding_trains_like_the_reference(p: Problem) -> None:
    _run(p)


@SETTINGS
@given(problems(nn.EmbeddingBag))
def test_embedding_bag_trains_like_the_reference(p: Problem) -> None:
    _run(p)


@settings(max_examples=30, deadline=None, database=None)
@given(
    st.integers(1, 10).flatmap(lambda v: st.tuples(st.just(v), st.integers(1, 4), _pinned_rows(v))),
    st.sampled_from(DTYPES),
    st.integers(0, 2**16),
    st.data(),
)
def test_plain_checkpoints_load_free_rows_and_check_pinned_rows(shape, dtype, seed, data) -> None:
    """A plain (V, D) checkpoint loads its free rows exactly; any change to one pinned value is
    refused with nothing changed, unless on_mismatch="checkpoint", which adopts it."""
    num_rows, dim, (pinned, indices) = shape
    torch.manual_seed(seed)
    reference = torch.randn(len(pinned), dim, dtype=dtype)
    emb = constrain(nn.Embedding(num_rows, dim, dtype=dtype), reference, indices=indices)
    checkpoint = torch.randn(num_rows, dim, dtype=dtype)
    checkpoint[pinned] = reference
    emb.load_state_dict({"weight": checkpoint})
    assert torch.equal(emb.weight, checkpoint)
    if not pinned:
        return
    row = data.draw(st.sampled_from(pinned))
    col = data.draw(st.integers(0, dim - 1))
    bad = checkpoint.clone()
    bad[row, col] += 1.0
    before = emb.weight.detach().clone()
    with pytest.raises(RuntimeError, match="would change pinned rows"):
        emb.load_state_dict({"weight": bad})
    assert torch.equal(emb.weight, before)
    adopt = constrain(
        nn.Embedding(num_rows, dim, dtype=dtype), reference, indices=indices, on_mismatch="checkpoint"
    )
    adopt.load_state_dict({"weight": bad})
    assert torch.equal(adopt.weight, bad)


@settings(max_examples=30, deadline=None, database=None)
@given(
    st.integers(1, 10).flatmap(lambda v: st.tuples(st.just(v), st.integers(1, 4), _pinned_rows(v))),
    st.integers(0, 3),
    st.sampled_from(["module", "weight"]),
    st.integers(0, 2**16),
)
def test_a_constrained_embedding_is_a_reference_in_user_order(shape, extra, form, seed) -> None:
    """A constrained embedding (any layout) used as the reference of a bigger one, or loaded as a
    live weight, stands for its merged weight in user order."""
    num_rows, dim, (pinned, indices) = shape
    torch.manual_seed(seed)
    old = constrain(nn.Embedding(num_rows, dim), torch.randn(len(pinned), dim), indices=indices)
    merged = old.weight.detach().clone()
    new = constrain(nn.Embedding(num_rows + extra, dim), old if form == "module" else old.weight)
    assert torch.equal(new.weight[:num_rows], merged)
    twin = constrain(nn.Embedding(num_rows, dim), merged[pinned], indices=indices)
    twin.load_state_dict({"weight": old.weight})  # a live (merged) weight as the checkpoint value
    assert torch.equal(twin.weight, merged)
    plain = nn.Embedding(num_rows, dim)
    plain.load_state_dict({"weight": old.weight})
    assert torch.equal(plain.weight, merged)
