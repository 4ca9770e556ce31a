"""torch.compile: one graph, no graph break, results equal to eager, no (V, D) tensor in the program.

Most checks capture the program with Dynamo and AOTAutograd (``backend="aot_eager"``: the graphs
inductor would compile, without its code generation); one runs inductor itself.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import LAYOUTS, D, N, Rows, V, reference
from helpers.hf import tiny_llama_config
from torch import nn

from embconstraint import constrain
from embconstraint._mechanism import pin_of


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class _TiedLM(nn.Module):
    def __init__(self, bias: bool = False) -> None:
        super().__init__()
        self.emb = nn.Embedding(V, D, padding_idx=3)
        self.head = nn.Linear(D, V, bias=bias)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.emb(ids)))


def _model(kind: str, layout: str) -> nn.Module:
    torch.manual_seed(0)
    ref, idx = reference(), LAYOUTS[layout]
    if kind == "embedding":
        return constrain(nn.Embedding(V, D, padding_idx=8), ref, indices=idx)
    if kind == "bag":
        return constrain(nn.EmbeddingBag(V, D, mode="sum"), ref, indices=idx)
    if kind == "head":
        return constrain(nn.Linear(D, V), ref, indices=idx)
    model = _TiedLM()
    constrain(model.emb, ref, indices=idx, root=model)
    return model


def _input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "head":  # (batches of 2 x 3: no value of the program is (V, D) by coincidence)
        return torch.randn(2, 3, D, generator=g)
    return torch.randint(0, V, (2, 3), generator=g)


def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return (model(x).float() ** 2).mean()


def _step(loss_fn, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward (compiled or not) and backward (AOTAutograd's compiled backward for a compiled forward)."""
    loss = loss_fn(model, x)
    loss.backward()
    return loss.detach()


KINDS = ["embedding", "bag", "head", "tied"]


class _Shapes:
    """An AOTAutograd backend that records the shape of every value the forward and backward
    graphs compute (their inputs aside: the table is one, the model's own storage)."""

    def __init__(self) -> None:
        self.shapes: list[tuple[int, ...]] = []

    def __call__(self, gm, example_inputs):
        from torch._dynamo.backends.common import aot_autograd

        def record(graph, _inputs):
            for node in graph.graph.nodes:
                if node.op == "placeholder":
                    continue
                val = node.meta.get("val")
                for v in val if isinstance(val, (list, tuple)) else [val]:
                    if isinstance(v, torch.Tensor):
                        self.shapes.append(tuple(v.shape))
            return graph.forward

        return aot_autograd(fw_compiler=record, bw_compiler=record)(gm, example_inputs)


def _pinned(model: nn.Module) -> torch.Tensor:
    module = next(m for m in model.modules() if pin_of(m) is not None)
    pin = pin_of(module)
    with torch.no_grad():
        return module.weight.index_select(0, pin.pinned_rows())


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_compiled_training_equals_eager_in_one_graph(kind, layout):
    """Three AdamW steps, the forward compiled with ``fullgraph=True`` (one graph, no break) and
    eager: the same losses, gradients and free rows (to rounding), the pinned rows bitwise the
    reference throughout, and no value of shape (V, D) in the compiled forward or backward."""
    eager = _model(kind, layout)
    compiled_model = copy.deepcopy(eager)
    ref = _pinned(eager).clone()
    backend = _Shapes()
    loss_fn = torch.compile(_loss, backend=backend, fullgraph=True)
    opt_e = torch.optim.AdamW(eager.parameters(), lr=0.1, weight_decay=0.1)
    opt_c = torch.optim.AdamW(compiled_model.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(3):
        x = _input(kind)
        loss_e, loss_c = _step(_loss, eager, x), _step(loss_fn, compiled_model, x)
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
        for (name, pe), pc in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
            torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-6, msg=name)
        opt_e.step(), opt_c.step()
        opt_e.zero_grad(), opt_c.zero_grad()
        assert torch.equal(_pinned(compiled_model), ref) and torch.equal(_pinned(eager), ref)
    assert backend.shapes and (V, D) not in backend.shapes
    assert (V - N, D) in backend.shapes  # the free rows' gradient is there


def test_the_full_table_check_catches_a_plain_parametrization():
    """The same shape check on a ``torch.cat`` parametrization: its (V, D) merged weight and
    gradient are in the compiled program."""

    class Cat(nn.Module):
        def forward(self, free):
            return torch.cat([torch.zeros(N, D), free])

    plain = nn.Embedding(V, D)
    torch.nn.utils.parametrize.register_parametrization(plain, "weight", Cat(), unsafe=True)
    plain.parametrizations.weight.original = nn.Parameter(torch.randn(V - N, D))
    backend = _Shapes()
    _step(torch.compile(_loss, backend=backend, fullgraph=True), plain, _input("embedding"))
    assert (V, D) in backend.shapes


@pytest.mark.slow  # (inductor compiles for ~20 s; tests/test_training.py runs inductor in the default suite)
def test_inductor_trains_exactly():
    """The default backend (inductor): a tied model with a biased head, five SGD steps."""
    torch.manual_seed(0)
    eager = _TiedLM(bias=True)
    constrain(eager.emb, reference(), indices=LAYOUTS["scattered"], root=eager)
    compiled_model = copy.deepcopy(eager)
    ref = _pinned(eager).clone()
    loss_fn = torch.compile(_loss, fullgraph=True)
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.5, momentum=0.9)
    opt_c = torch.optim.SGD(compiled_model.parameters(), lr=0.5, momentum=0.9)
    for _ in range(5):
        x = _input("tied")
        torch.testing.assert_close(
            _step(loss_fn, compiled_model, x), _step(_loss, eager, x), rtol=1e-5, atol=1e-6
        )
        opt_e.step(), opt_c.step()
        opt_e.zero_grad(), opt_c.zero_grad()
    assert torch.equal(_pinned(compiled_model), ref)
    for pe, pc in zip(eager.parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(pc, pe, rtol=1e-5, atol=1e-6)


def test_a_write_inside_the_compiled_region_is_refused():
    emb = _model("embedding", "prefix")

    def write(x):
        with torch.no_grad():
            emb.weight[N] = 0.0
        return emb(x)

    with pytest.raises(Exception, match="inside torch.compile is not supported"):
        torch.compile(write, backend="eager", fullgraph=True)(_input("embedding"))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_after_a_move_and_a_cast(layout):
    """``.to(dtype)`` after constrain: the compiled lookup uses the converted rows (the pinned
    rows cast once, exactly as eager does) without re-aliasing in the graph."""
    model = _model("embedding", layout).to(torch.float64)
    x = _input("embedding")
    expected = model(x)
    got = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
    assert got.dtype == torch.float64 and torch.equal(got, expected)


def test_functional_embedding_call_on_the_weight():
    """``F.embedding(ids, emb.weight)`` written in user code, compiled: the kernel, not the table."""
    emb = _model("embedding", "scattered")
    x = _input("embedding")
    expected = F.embedding(x, emb.weight.detach().clone())
    got = torch.compile(lambda ids: F.embedding(ids, emb.weight), backend="aot_eager", fullgraph=True)(x)
    assert torch.equal(got, expected)


def _language_model(family: str, tied: bool) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    from embconstraint.hf import constrain_new_tokens

    torch.manual_seed(0)
    if family == "llama":
        config = tiny_llama_config(60, 16, tied=tied)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.GPT2Config(
            vocab_size=60,
            n_embd=16,
            n_layer=1,
            n_head=2,
            tie_word_embeddings=tied,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
        )
        model = transformers.GPT2LMHeadModel(config)
    model.resize_token_embeddings(64, mean_resizing=False)
    constrain_new_tokens(model, 60)
    return model


def _lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.flatten(0, 1).float(), ids.flatten())


@pytest.mark.parametrize(
    ("family", "tied"),
    [
        ("llama", True),
        ("gpt2", False),
        pytest.param("llama", False, marks=pytest.mark.slow),
        pytest.param("gpt2", True, marks=pytest.mark.slow),
    ],
)
def test_language_models_compile_whole(family, tied):
    """A tiny Llama / GPT-2 after ``constrain_new_tokens``: one graph, no break (``fullgraph``
    compiles or raises), the loss and every gradient equal to eager."""
    eager = _language_model(family, tied)
    compiled_model = copy.deepcopy(eager)
    ids = torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    loss_fn = torch.compile(_lm_loss, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(_step(loss_fn, compiled_model, ids), _step(_lm_loss, eager, ids))
    for (name, pe), pc in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
        torch.testing.assert_close(pc.grad, pe.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_a_weight_made_outside_and_passed_into_a_compiled_function():
    """The eager weight (and its detached form) as arguments of a compiled function: Dynamo runs
    its dispatch outside the graph; the result is the eager one."""
    emb = _model("embedding", "scattered")
    x = _input("embedding")

    def f(w, ids):
        return F.embedding(ids, w) * 2 + w.sum()

    weight = emb.weight
    expected = f(weight, x)
    got = torch.compile(f, backend="aot_eager")(weight, x)
    assert torch.equal(got, expected)
    got.sum().backward()
    assert _pinned(emb).shape == (N, D) and pin_of(emb).free_parameter.grad is not None
    detached = emb.weight.detach()
    assert torch.equal(torch.compile(f, backend="aot_eager")(detached, x), f(detached, x))


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("sgbf", [False, True], ids=["plain", "scale_grad_by_freq"])
def test_compiled_lookup_gradient_is_the_plain_embeddings_free_rows(layout, sgbf):
    """The compiled backward of a lookup (which sends pinned ids' zero gradient to spread-out free
    rows, or to a sink row with ``scale_grad_by_freq``) against a plain ``nn.Embedding`` holding
    the same weight: the free rows' gradient to rounding, repeated ids and the padding row
    included, and an infinite gradient at pinned ids stays out of the free rows."""
    torch.manual_seed(0)
    rows = Rows.of(layout)
    emb = constrain(
        nn.Embedding(V, D, padding_idx=rows.free[1], scale_grad_by_freq=sgbf),
        reference(),
        indices=rows.indices,
    )
    plain = nn.Embedding(
        V, D, padding_idx=rows.free[1], scale_grad_by_freq=sgbf, _weight=emb.weight.detach().clone()
    )
    ids = torch.tensor(
        [
            [rows.pinned[0], rows.free[0], rows.free[0], rows.pinned[1]],
            [rows.free[1], rows.free[2], rows.pinned[0], V - 1],
        ]
    )
    scale = torch.where(torch.isin(ids, torch.tensor(rows.pinned)), float("inf"), 1.0).unsqueeze(-1)

    def loss(module, ids):
        return (module(ids) * scale).sum()

    loss(plain, ids).backward()
    torch.compile(loss, backend="aot_eager", fullgraph=True)(emb, ids).backward()
    free = pin_of(emb).free_parameter.grad
    assert torch.isinf(plain.weight.grad[rows.pinned[0]]).all()  # (the plain table's pinned row)
    torch.testing.assert_close(free, plain.weight.grad[pin_of(emb).free_rows()], rtol=1e-6, atol=1e-6)
