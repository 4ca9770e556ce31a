"""Dtype and device conversions of a constrained module (``.to``, ``.half()``, autocast, the meta
device and ``to_empty``, CUDA): the pinned rows are always the reference cast once to the current
dtype, bitwise, and training goes on."""

from __future__ import annotations

import pytest
import torch
from helpers import IDS, D, N, V, constrained, constrained_and_plain, free_param, loss_of, reference
from torch import nn

from embconstraint import constrain, release


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_dtype_conversion_keeps_the_constraint(dtype):
    emb, _, ref = constrained_and_plain()
    emb.to(dtype)
    assert emb.weight.dtype == dtype
    assert torch.equal(emb.weight[:N], ref.to(dtype))
    assert "storage=aliased" in repr(emb)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        emb(torch.arange(V)).float().pow(2).sum().backward()
        opt.step()
    assert torch.equal(emb.weight[:N], ref.to(dtype))
    assert free_param(emb).dtype == dtype


def test_half_and_bfloat16_methods():
    emb, _, ref = constrained_and_plain()
    assert torch.equal(emb.half().weight[:N], ref.half())
    assert torch.equal(emb.bfloat16().weight[:N], ref.half().bfloat16())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_round_trip_restores_the_reference(layout, dtype) -> None:
    emb = constrained(layout.indices).to(dtype)
    emb(IDS)
    assert torch.equal(emb.weight[layout.pinned], reference().to(dtype))  # the reference cast to dtype
    emb.float()
    emb(IDS)
    assert torch.equal(emb.weight[layout.pinned], reference())  # bitwise again
    assert torch.equal(emb.state_dict()["weight"][layout.pinned], reference())


def test_chained_casts_cast_the_reference_once(layout) -> None:
    ref = reference()
    ref[0, 0] = 1 + 2**-8 + 2**-12  # bf16 rounds it up; half rounds it to a bf16 tie, then bf16 rounds down
    assert ref.bfloat16()[0, 0] != ref.half().bfloat16()[0, 0]
    emb = constrain(nn.Embedding(V, D), ref, indices=layout.indices).half()
    emb(IDS)  # a forward in half precision
    emb.bfloat16()
    assert torch.equal(emb.weight[layout.pinned], ref.bfloat16())


@pytest.mark.parametrize(
    "cast",
    [
        pytest.param(lambda e: e.double(), id="double"),
        pytest.param(lambda e: e.to("cpu", torch.float64), id="to-device-dtype"),
        pytest.param(lambda e: e.half().float(), id="half-float"),
    ],
)
def test_inference_mode_first_forward_after_to(layout, cast) -> None:
    emb = cast(constrained(layout.indices))
    with torch.inference_mode():
        emb(IDS)
    sd = emb.state_dict()
    assert not sd["weight"].is_inference()
    opt = torch.optim.SGD(emb.parameters(), lr=0.1)
    loss_of(emb).backward()
    opt.step()
    with torch.no_grad():
        emb.weight.mul_(1.0)  # a guarded write that keeps every row
    assert torch.equal(emb.weight[layout.pinned], reference().to(emb.weight.dtype))


def test_autocast_keeps_pinned_rows_exact():
    emb, _, ref = constrained_and_plain()
    head = nn.Linear(D, 1)
    opt = torch.optim.AdamW([*emb.parameters(), *head.parameters()], lr=0.1, weight_decay=0.1)
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head(emb(torch.arange(V))).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.equal(emb.weight[:N], ref)
    assert emb.weight.dtype == torch.float32


def test_meta_embedding_materialises_after_to_empty(layout) -> None:
    with torch.device("meta"):
        emb = nn.Embedding(V, D)
    constrain(emb, reference(), indices=layout.indices)
    emb.to_empty(device="cpu")
    assert torch.equal(emb.weight[layout.pinned], reference())
    checkpoint = torch.randn(V, D, generator=torch.Generator().manual_seed(2))
    checkpoint[layout.pinned] = reference()
    emb.load_state_dict({"weight": checkpoint})
    assert torch.equal(emb(IDS), checkpoint[IDS])
    assert torch.equal(emb.state_dict()["weight"], checkpoint)
    assert torch.equal(release(emb).weight, checkpoint)


@pytest.mark.gpu
def test_cuda_round_trip(layout):
    emb, _, ref = constrained_and_plain(nn.EmbeddingBag, indices=layout.indices, mode="sum")
    emb.cuda()
    opt = torch.optim.AdamW(emb.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        emb(torch.randint(0, V, (4, 3), device="cuda")).pow(2).sum().backward()
        opt.step()
    assert torch.equal(emb.weight[layout.pinned].cpu(), ref)
    assert torch.equal(emb.cpu().weight[layout.pinned], ref)
