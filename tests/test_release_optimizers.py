"""``release(module, optimizer=...)`` with optimizers whose state is not shaped like the weight:
factored Adafactor (its row statistics are widened, its column statistics kept), and the ones whose
state cannot be widened (LBFGS after a step, ZeroRedundancyOptimizer, an unknown shape), refused
before anything changes."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from embconstraint import constrain, is_constrained, release

V, N = 10, 6  # 4 free rows


def _emb(dim: int) -> nn.Embedding:
    torch.manual_seed(0)
    ref = torch.randn(N, dim)
    return constrain(nn.Embedding(V, dim), ref, indices=[0, 2, 3, 5, 6, 9])  # free rows 1, 4, 7, 8


FREE = torch.tensor([1, 4, 7, 8])
PINNED = torch.tensor([0, 2, 3, 5, 6, 9])


def _loss(module: nn.Module, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, V, (16,), generator=g)
    return (module(ids) * torch.randn(16, module.weight.shape[1], generator=g)).sum()


def _train(module: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        opt.zero_grad()
        _loss(module, step).backward()
        opt.step()


def _closure(module: nn.Module, opt: torch.optim.Optimizer):
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(module, 0)
        loss.backward()
        return loss

    return closure


def _hf_adafactor(params, **kw):
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=1e-2, relative_step=False, scale_parameter=False, warmup_init=False, **kw)


ADAFACTORS = {
    "transformers": _hf_adafactor,
    "transformers beta1": lambda p: _hf_adafactor(p, beta1=0.9),
    "torch": lambda p: torch.optim.Adafactor(p, lr=1e-2),
}
ROW_KEY = {"transformers": "exp_avg_sq_row", "transformers beta1": "exp_avg_sq_row", "torch": "row_var"}
COL_KEY = {"transformers": "exp_avg_sq_col", "transformers beta1": "exp_avg_sq_col", "torch": "col_var"}


def _spread(value: torch.Tensor) -> torch.Tensor:
    """The literal widening: one entry per row of the table, zeros in the pinned rows."""
    wide = torch.zeros((V, *value.shape[1:]), dtype=value.dtype)
    for k, row in enumerate(FREE.tolist()):
        wide[row] = value[k]
    return wide


@pytest.mark.parametrize("dim", [3, 4], ids=["D=3", "D=free rows"])  # D = 4: row and column statistics alike
@pytest.mark.parametrize("name", list(ADAFACTORS))
def test_adafactor_row_statistics_are_widened(name, dim):
    if name.startswith("transformers"):
        pytest.importorskip("transformers")
    elif not hasattr(torch.optim, "Adafactor"):
        pytest.skip("torch.optim.Adafactor needs torch >= 2.5")
    emb = _emb(dim)
    opt = ADAFACTORS[name](emb.parameters())
    _train(emb, opt, range(3))
    free = emb.parametrizations.weight.original
    before = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in opt.state[free].items()}
    assert before[ROW_KEY[name]].shape[0] == V - N

    # the independent computation: a plain embedding, the same optimizer, the state widened by hand
    plain = nn.Embedding.from_pretrained(emb.weight.detach().clone(), freeze=False)
    plain_opt = ADAFACTORS[name](plain.parameters())
    state = opt.state_dict()
    state["state"] = {
        0: {k: _spread(v) if k in (ROW_KEY[name], "exp_avg") else copy.deepcopy(v) for k, v in before.items()}
    }
    plain_opt.load_state_dict(state)

    release(emb, optimizer=opt)
    after = opt.state[emb.weight]
    assert after[ROW_KEY[name]].shape[0] == V
    assert torch.equal(after[ROW_KEY[name]][FREE], before[ROW_KEY[name]])
    assert not after[ROW_KEY[name]][PINNED].any()
    assert torch.equal(after[COL_KEY[name]], before[COL_KEY[name]])  # a mean over rows: kept
    assert after["step"] == before["step"]
    _train(emb, opt, range(3, 6))  # the same optimizer goes on, every row trains
    _train(plain, plain_opt, range(3, 6))
    assert torch.equal(emb.weight, plain.weight)
    assert torch.isfinite(emb.weight).all()


def test_lbfgs_after_a_step_is_refused_and_nothing_changes():
    emb = _emb(3)
    opt = torch.optim.LBFGS(emb.parameters(), max_iter=2)

    closure = _closure(emb, opt)

    opt.step(closure)
    weight, free = emb.weight.detach().clone(), emb.parametrizations.weight.original
    d = opt.state[free]["d"].clone()
    with pytest.raises(ValueError, match="release: LBFGS keeps one flat history over all its parameters"):
        release(emb, optimizer=opt)
    assert is_constrained(emb) and torch.equal(emb.weight, weight)
    assert torch.equal(opt.state[free]["d"], d) and free.grad.shape == (V - N, 3)
    opt.step(closure)  # the optimizer still works on the free rows


def test_lbfgs_before_any_step_is_accepted():
    emb = _emb(3)
    opt = torch.optim.LBFGS(emb.parameters(), max_iter=2)
    release(emb, optimizer=opt)

    closure = _closure(emb, opt)

    opt.step(closure)
    assert opt.state[emb.weight]["d"].shape == (V * 3,)


class _Odd(torch.optim.Optimizer):
    """An optimizer with a state of its own shape (per-block statistics) and a list of tensors."""

    def __init__(self, params, kind: str):
        super().__init__(params, {"lr": 0.1})
        self.kind = kind

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state[p]
                if self.kind == "blocks":
                    st["absmax"] = p.grad.abs().flatten()[:2].clone()  # (2,): neither per row nor a scalar
                else:
                    st.setdefault("history", []).append(p.grad.clone())
                p.add_(p.grad, alpha=-group["lr"])


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        (
            "blocks",
            r"release: _Odd's state 'absmax' has shape \(2,\), neither one entry per free row \(the free rows "
            r"are \(4, 3\)\) nor a scalar",
        ),
        ("list", "release: _Odd keeps state 'history' as a list of tensors, which cannot be widened"),
    ],
)
def test_a_state_that_cannot_be_widened_is_refused(kind, message):
    emb = _emb(3)
    other = nn.Parameter(torch.zeros(2))
    opt = _Odd([*emb.parameters(), other], kind)
    (_loss(emb, 0) + other.sum()).backward()
    opt.step()
    weight = emb.weight.detach().clone()
    with pytest.raises(ValueError, match=message):
        release(emb, optimizer=opt)
    assert is_constrained(emb) and torch.equal(emb.weight, weight)
    release(emb)  # without the optimizer it is released (and a new optimizer is the user's to build)
    assert emb.weight.shape == (V, 3)


def test_an_optimizer_that_does_not_hold_the_rows_is_left_alone():
    emb = _emb(3)
    other = nn.Parameter(torch.zeros(5))
    opt = torch.optim.LBFGS([other])
    opt.step(lambda: other.pow(2).sum().backward() or other.pow(2).sum())
    release(emb, optimizer=opt)  # LBFGS over another parameter: nothing of it is the embedding's
    assert not is_constrained(emb)


def test_zero_redundancy_optimizer_is_refused():
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        emb = _emb(3)
        opt = ZeroRedundancyOptimizer(list(emb.parameters()), optimizer_class=torch.optim.Adam, lr=0.1)
        _train(emb, opt, range(2))
        weight = emb.weight.detach().clone()
        with pytest.raises(
            ValueError,
            match="release: ZeroRedundancyOptimizer partitions its parameters across ranks by their size",
        ):
            release(emb, optimizer=opt)
        assert is_constrained(emb) and torch.equal(emb.weight, weight)
        _train(emb, opt, range(2, 3))  # still usable
    finally:
        dist.destroy_process_group()
