"""On CUDA (skipped without it; ``benchmarks/gpu_check.sh`` runs these first): the kernels and the
compiled program, against a literal ``torch.cat`` parametrization and against eager mode."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import IDS, LAYOUTS, CatRows, D, N, V, reference
from helpers.hf import tiny_llama_config
from torch import nn
from torch.nn.utils import parametrize

from embconstraint import constrain
from embconstraint._mechanism import pin_of

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")
KINDS = ["embedding", "bag", "head"]


def _pair(kind: str, indices) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    module = {
        "embedding": lambda: nn.Embedding(V, D, padding_idx=8),
        "bag": lambda: nn.EmbeddingBag(V, D),
        "head": lambda: nn.Linear(D, V),
    }[kind]()
    twin = copy.deepcopy(module)
    constrain(module, reference(), indices=indices)
    parametrize.register_parametrization(twin, "weight", CatRows(reference(), indices), unsafe=True)
    return module.to(CUDA), twin.to(CUDA)


def _input(kind: str) -> torch.Tensor:
    if kind == "head":
        return torch.randn(2, 3, D, device=CUDA, generator=torch.Generator(CUDA).manual_seed(1))
    return torch.stack([IDS, IDS.flip(0)]).to(CUDA)


def _pinned(module: nn.Module, indices) -> torch.Tensor:
    rows = list(range(N)) if indices is None else indices
    with torch.no_grad():
        return module.weight[rows]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_kernels_train_like_the_cat_reference(kind, layout):
    ours, ref = _pair(kind, LAYOUTS[layout])
    pinned = _pinned(ours, LAYOUTS[layout]).clone()
    opts = [torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1) for m in (ours, ref)]
    for _ in range(3):
        for m, opt in zip((ours, ref), opts, strict=True):
            opt.zero_grad()
            m(_input(kind)).pow(2).mean().backward()
            opt.step()
        torch.testing.assert_close(ours.weight.detach(), ref.weight.detach(), rtol=1e-5, atol=1e-6)
    assert torch.equal(_pinned(ours, LAYOUTS[layout]), pinned)
    assert all(d.type == "cuda" for d in pin_of(ours).layout.cached_devices)  # no map left on the CPU


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_inductor_on_cuda_equals_eager(kind, layout):
    torch._dynamo.reset()
    eager, _ = _pair(kind, LAYOUTS[layout])
    compiled_model = copy.deepcopy(eager)
    pinned = _pinned(eager, LAYOUTS[layout]).clone()
    forward = torch.compile(compiled_model, fullgraph=True)
    for _ in range(2):
        x = _input(kind)
        (le := eager(x).pow(2).mean()).backward()
        (lc := forward(x).pow(2).mean()).backward()
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-6)
    for pe, pc in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(_pinned(compiled_model, LAYOUTS[layout]), pinned)


def test_a_language_model_compiles_on_cuda():
    transformers = pytest.importorskip("transformers")
    from embconstraint.hf import constrain_new_tokens

    torch.manual_seed(0)
    config = tiny_llama_config(60, 32, tied=True)
    model = transformers.LlamaForCausalLM(config)
    model.resize_token_embeddings(64, mean_resizing=False)
    constrain_new_tokens(model, 60)
    model.to(CUDA)
    old = model.get_input_embeddings().weight.detach()[:60].clone()
    forward = torch.compile(model, fullgraph=True)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for step in range(3):
        ids = torch.randint(0, 64, (2, 16), device=CUDA, generator=torch.Generator(CUDA).manual_seed(step))
        opt.zero_grad()
        forward(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    assert torch.equal(model.get_input_embeddings().weight.detach()[:60], old)
