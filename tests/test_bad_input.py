"""Every input the public API refuses: the exception type, its message, and that nothing changed.

``CASES`` is the single source of the errors table of the docs (``docs/reference/errors.md``): print
it with ``python tests/test_bad_input.py``; ``tests/test_docs.py`` fails when the page and this table
drift apart. In a message, ``…`` stands for any text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.hf import tiny_llama_config
from torch import nn
from torch.nn.utils import parametrize

from embconstraint import (
    constrain,
    is_constrained,
    load_rows,
    merged_state_dict,
    release,
    save_rows,
    unload_rows,
)

V, D, N = 6, 3, 3


def _plain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Embedding(V, D)


def _constrained() -> nn.Module:
    torch.manual_seed(0)
    return constrain(nn.Embedding(V, D), torch.randn(N, D))


def _ref(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape or (N, D), generator=torch.Generator().manual_seed(1)).to(dtype)


class _Identity(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _other_parametrization() -> nn.Module:
    emb = _plain()
    parametrize.register_parametrization(emb, "weight", _Identity())
    return emb


def _tensor_weight() -> nn.Module:
    emb = _plain()
    weight = emb.weight.detach()
    del emb._parameters["weight"]
    emb.weight = weight  # a plain tensor attribute
    return emb


def _integer_weight() -> nn.Module:
    emb = _plain()
    emb.weight = nn.Parameter(torch.arange(V * D).reshape(V, D), requires_grad=False)
    return emb


def _tied_model() -> nn.Module:
    emb, head = _plain(), nn.Linear(D, V, bias=False)
    head.weight = emb.weight
    return nn.Sequential(emb, head)


def _set_weight(emb: nn.Module, value: torch.Tensor) -> None:
    emb.weight = value


def _write(op: Callable[[torch.Tensor], Any], grad: bool = False) -> Callable[[nn.Module], Any]:
    def call(emb: nn.Module) -> Any:
        with torch.set_grad_enabled(grad):
            return op(emb.weight)

    return call


def _pinned_changed_checkpoint(emb: nn.Module) -> None:
    sd = emb.state_dict()
    sd["weight"] = sd["weight"].clone()
    sd["weight"][0] += 1.0
    emb.load_state_dict(sd)


def _rows_file(module: nn.Module) -> str:
    """A rows file saved from ``module`` (constrained), in a fresh temporary folder."""
    import tempfile

    path = Path(tempfile.mkdtemp()) / "rows.safetensors"
    save_rows(module, path)
    return str(path)


def _rows_of_other_model() -> str:
    torch.manual_seed(5)
    return _rows_file(constrain(nn.Embedding(V, D), torch.randn(N, D)))


def _constrain_sharded(module: nn.Module) -> None:
    """``constrain`` on a copy of ``module`` sharded by ``fully_shard`` (its weight a DTensor), in a
    one-process gloo group that is torn down afterwards. (A weight sharded on rows by tensor
    parallelism, not by FSDP, is accepted: tests/test_tensor_parallel.py.)"""
    import copy

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        twin = copy.deepcopy(module)
        fully_shard(twin, mesh=init_device_mesh("cpu", (1,)))
        constrain(twin, _ref())
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class Case:
    input: str  # the table's "input" column (Markdown)
    call: Callable[[nn.Module], Any] = field(repr=False)
    error: type[Exception]
    message: str  # a fragment of the message; "…" stands for any text
    target: Callable[[], nn.Module] = field(default=_plain, repr=False)  # the module `call` gets


def _stale_grad() -> nn.Module:
    """An embedding whose data was resized (as transformers' resize does) with a gradient left from before."""
    emb = nn.Embedding(V - 1, D)
    emb.weight.grad = torch.zeros(V - 1, D)
    emb.weight.data = torch.zeros(V, D)
    return emb


CASES: list[Case] = [
    # -- constrain: the embedding -----------------------------------------------------------
    Case(
        "`constrain` on an embedding whose `.grad` has another shape than its weight (a gradient from "
        "before a resize)",
        lambda m: constrain(m, _ref()),
        ValueError,
        f"embedding.weight.grad has shape ({V - 1}, {D}) but embedding.weight has shape ({V}, {D}) "
        "(a gradient from before a resize?); clear it first",
        _stale_grad,
    ),
    Case(
        "`constrain(embedding, …)`: `embedding` is not an `nn.Embedding`/`nn.EmbeddingBag`/`nn.Linear` (e.g. `nn.Conv1d`)",
        lambda m: constrain(m, _ref(N, 4)),
        TypeError,
        "embedding must be an nn.Embedding, nn.EmbeddingBag or nn.Linear (an output head), got Conv1d",
        lambda: nn.Conv1d(4, V, 1),
    ),
    Case(
        "`constrain(embedding, …)`: `embedding` is a tensor",
        lambda m: constrain(m.weight, _ref()),
        TypeError,
        "embedding must be an nn.Embedding, nn.EmbeddingBag or nn.Linear (an output head), got Parameter",
    ),
    Case(
        "`constrain(head, reference)`: `reference` has another `D` than the head",
        lambda m: constrain(m, nn.Linear(D + 1, N)),
        ValueError,
        "reference has embedding dimension 4 but the embedding has 3",
        lambda: nn.Linear(D, V),
    ),
    Case(
        "`constrain(head, reference)`: `reference` is an `nn.Linear` with a bias, the head has none",
        lambda m: constrain(m, nn.Linear(D, N)),
        ValueError,
        "reference is an nn.Linear with a bias but embedding (Linear) has none; "
        "pass reference.weight to pin the weight rows only",
        lambda: nn.Linear(D, V, bias=False),
    ),
    Case(
        "`constrain(head, reference)`: `reference` is an `nn.Linear` without a bias, the head has one",
        lambda m: constrain(m, nn.Linear(D, N, bias=False)),
        ValueError,
        "reference is an nn.Linear without a bias but embedding (Linear) has one; "
        "pass reference.weight to pin the bias entries at their current values",
        lambda: nn.Linear(D, V),
    ),
    Case(
        "`constrain` on an embedding whose Parameter another module shares (`head.weight = emb.weight`), "
        "without `root=`",
        lambda m: constrain(m[0], _ref()),
        RuntimeError,
        "embedding.weight is shared with Linear.weight (tied weights): constraining it would shrink that "
        "module's weight to the free rows; pass root=<the model> to keep them tied",
        _tied_model,
    ),
    Case(
        "`constrain(…, root=x)`: `x` is not a module",
        lambda m: constrain(m, _ref(), root=[m]),
        TypeError,
        "root must be an nn.Module, got list",
    ),
    Case(
        "`constrain` on an embedding that is already constrained",
        lambda m: constrain(m, _ref()),
        ValueError,
        "embedding is already constrained; call release() first",
        _constrained,
    ),
    Case(
        "`constrain` on an embedding whose `weight` has another parametrization",
        lambda m: constrain(m, _ref()),
        ValueError,
        "embedding.weight already has a parametrization; embconstraint must be the only one",
        _other_parametrization,
    ),
    Case(
        "`constrain` on an embedding whose `weight` is not an `nn.Parameter`",
        lambda m: constrain(m, _ref()),
        TypeError,
        "embedding.weight must be an nn.Parameter",
        _tensor_weight,
    ),
    Case(
        "`constrain` on an embedding already sharded by `fully_shard` (its weight a `DTensor`)",
        _constrain_sharded,
        ValueError,
        "embedding.weight is already sharded (a DTensor, e.g. by fully_shard); call constrain() before "
        "fully_shard(), which then shards only the free rows",
    ),
    Case(
        "`constrain` on an embedding with an integer `weight`",
        lambda m: constrain(m, _ref()),
        TypeError,
        "embedding.weight must be floating point, got torch.int64",
        _integer_weight,
    ),
    Case(
        "`constrain` on an embedding with `max_norm` set",
        lambda m: constrain(m, _ref()),
        ValueError,
        "embedding.max_norm renormalizes rows in place and would move pinned rows; "
        "constrained embeddings need max_norm=None",
        lambda: nn.Embedding(V, D, max_norm=1.0),
    ),
    Case(
        '`constrain(…, on_mismatch=…)` other than `"error"`/`"checkpoint"`',
        lambda m: constrain(m, _ref(), on_mismatch="ignore"),
        ValueError,
        "on_mismatch must be one of ('error', 'checkpoint'), got 'ignore'",
    ),
    # -- constrain: the reference -----------------------------------------------------------
    Case(
        "`reference` is not a tensor or an embedding (a list)",
        lambda m: constrain(m, _ref().tolist()),
        TypeError,
        "reference must be an nn.Embedding, nn.EmbeddingBag, nn.Linear, Tensor or Parameter of shape (n, D), got list",
    ),
    Case(
        "`reference` is a sparse tensor",
        lambda m: constrain(m, _ref().to_sparse()),
        ValueError,
        "reference must be a dense (strided) tensor, got layout torch.sparse_coo",
    ),
    Case(
        "`reference` is on the meta device",
        lambda m: constrain(m, torch.empty(N, D, device="meta")),
        ValueError,
        "reference is on the meta device (no values); pass a materialised tensor",
    ),
    Case(
        "`reference` is a NumPy array",
        lambda m: constrain(m, _ref().numpy()),
        TypeError,
        "reference must be an nn.Embedding, nn.EmbeddingBag, nn.Linear, Tensor or Parameter of shape (n, D), "
        "got ndarray",
    ),
    Case(
        "`reference` is a module other than an embedding or a head",
        lambda m: constrain(m, nn.Conv1d(D, N, 1)),
        TypeError,
        "reference must be an nn.Embedding, nn.EmbeddingBag, nn.Linear, Tensor or Parameter of shape (n, D), "
        "got Conv1d",
    ),
    Case(
        "`reference` is an `nn.Linear` with a bias for an embedding",
        lambda m: constrain(m, nn.Linear(D, N)),
        ValueError,
        "reference is an nn.Linear with a bias but embedding (Embedding) has none",
    ),
    Case(
        "`reference` is 1-D",
        lambda m: constrain(m, _ref(D)),
        ValueError,
        "reference must have shape (n, D), got shape (3,)",
    ),
    Case(
        "`reference` is 3-D",
        lambda m: constrain(m, _ref(1, N, D)),
        ValueError,
        "reference must have shape (n, D), got shape (1, 3, 3)",
    ),
    Case(
        "`reference` has integer values",
        lambda m: constrain(m, torch.zeros(N, D, dtype=torch.long)),
        TypeError,
        "reference must be a floating-point tensor, got dtype torch.int64",
    ),
    Case(
        "`reference` is complex",
        lambda m: constrain(m, torch.zeros(N, D, dtype=torch.complex64)),
        TypeError,
        "reference must be a floating-point tensor, got dtype torch.complex64",
    ),
    Case(
        "`reference` has another embedding dimension `D`",
        lambda m: constrain(m, _ref(N, D + 1)),
        ValueError,
        "reference has embedding dimension 4 but the embedding has 3 "
        "(reference shape (3, 4), embedding weight shape (6, 3))",
    ),
    Case(
        "`reference` is an embedding with another `D`",
        lambda m: constrain(m, nn.Embedding(N, D + 1)),
        ValueError,
        "reference has embedding dimension 4 but the embedding has 3",
    ),
    Case(
        "`reference` has more rows than the embedding",
        lambda m: constrain(m, _ref(V + 1, D)),
        ValueError,
        "reference has 7 rows but the embedding only has 6",
    ),
    Case(
        "`reference` holds `nan`",
        lambda m: constrain(m, _ref().index_fill(0, torch.tensor([1]), float("nan"))),
        ValueError,
        "reference holds non-finite values (nan or inf); pinned rows must be finite",
    ),
    Case(
        "`reference` holds `inf`",
        lambda m: constrain(m, _ref().index_fill(0, torch.tensor([2]), float("-inf"))),
        ValueError,
        "reference holds non-finite values (nan or inf)",
    ),
    Case(
        "`reference` is float64 with values a float32 embedding cannot hold exactly",
        lambda m: constrain(m, _ref(dtype=torch.float64) / 3),
        ValueError,
        "reference dtype torch.float64 cannot be cast exactly to the embedding's dtype torch.float32; "
        "cast the embedding (or the reference) first",
    ),
    Case(
        "`reference` is float32 and the embedding bfloat16",
        lambda m: constrain(m, _ref()),
        ValueError,
        "reference dtype torch.float32 cannot be cast exactly to the embedding's dtype torch.bfloat16",
        lambda: _plain().bfloat16(),
    ),
    Case(
        "`reference` is float32 with values beyond float16's range, embedding float16",
        lambda m: constrain(m, torch.full((N, D), 1e5)),
        ValueError,
        "reference dtype torch.float32 cannot be cast exactly to the embedding's dtype torch.float16",
        lambda: _plain().half(),
    ),
    # -- constrain: the indices -------------------------------------------------------------
    Case(
        "`indices` with a row `>= V`",
        lambda m: constrain(m, _ref(), indices=[0, 1, V]),
        ValueError,
        "indices must lie in [0, 6) for an embedding of 6 rows, got min 0, max 6",
    ),
    Case(
        "`indices` with a negative row",
        lambda m: constrain(m, _ref(), indices=torch.tensor([-1, 0, 1])),
        ValueError,
        "indices must lie in [0, 6) for an embedding of 6 rows, got min -1, max 1",
    ),
    Case(
        "`indices` with a repeated row",
        lambda m: constrain(m, _ref(), indices=[4, 1, 4]),
        ValueError,
        "indices must be distinct: a row cannot be pinned twice",
    ),
    Case(
        "`indices` of another length than `reference`",
        lambda m: constrain(m, _ref(), indices=[0, 1]),
        ValueError,
        "indices has 2 entries but reference has 3 rows",
    ),
    Case(
        "`indices` given but `reference` has more rows than `V`",
        lambda m: constrain(m, _ref(V + 1, D), indices=list(range(V + 1))),
        ValueError,
        "reference has 7 rows but the embedding only has 6",
    ),
    Case(
        "`indices` is a float tensor",
        lambda m: constrain(m, _ref(), indices=torch.tensor([0.0, 1.0, 2.0])),
        TypeError,
        "indices must hold integers, got dtype torch.float32",
    ),
    Case(
        "`indices` is a bool tensor (a mask)",
        lambda m: constrain(m, _ref(), indices=torch.tensor([True, False, True])),
        TypeError,
        "indices must hold integers, got dtype torch.bool",
    ),
    Case(
        "`indices` is a list of floats",
        lambda m: constrain(m, _ref(), indices=[0.0, 1.0, 2.0]),
        TypeError,
        "indices must be a 1-D integer tensor or a sequence of ints",
    ),
    Case(
        "`indices` is a list of bools",
        lambda m: constrain(m, _ref(), indices=[True, False, True]),
        TypeError,
        "indices must be a 1-D integer tensor or a sequence of ints",
    ),
    Case(
        "`indices` is a nested list",
        lambda m: constrain(m, _ref(), indices=[[0, 1, 2]]),
        TypeError,
        "indices must be a 1-D integer tensor or a sequence of ints",
    ),
    Case(
        "`indices` is a 2-D tensor",
        lambda m: constrain(m, _ref(), indices=torch.tensor([[0, 1, 2]])),
        ValueError,
        "indices must be 1-D, got shape (1, 3)",
    ),
    Case(
        "`indices` is a 0-d tensor",
        lambda m: constrain(m, _ref(1, D), indices=torch.tensor(4)),
        ValueError,
        "indices must be 1-D, got shape ()",
    ),
    Case(
        "`indices` is neither a tensor nor a sequence (a set)",
        lambda m: constrain(m, _ref(), indices={0, 1, 2}),
        TypeError,
        "indices must be a 1-D integer tensor or a sequence of ints, got set",
    ),
    Case(
        "`indices` is a string",
        lambda m: constrain(m, _ref(), indices="012"),
        TypeError,
        "indices must be a 1-D integer tensor or a sequence of ints, got str",
    ),
    Case(
        "`indices` is a NumPy array of floats (integer arrays are accepted)",
        lambda m: constrain(m, _ref(), indices=np.array([0.0, 1.0, 2.0])),
        TypeError,
        "indices must hold integers, got NumPy dtype float64",
    ),
    # -- release / merged_state_dict --------------------------------------------------------
    Case(
        "`release(x)`: `x` is not a module",
        lambda m: release(m.weight),
        TypeError,
        "module must be an nn.Module, got Parameter",
    ),
    Case(
        "`release(…, optimizer=x)`: `x` is not a `torch.optim.Optimizer`",
        lambda m: release(m, optimizer=list(m.parameters())),
        TypeError,
        "optimizer must be a torch.optim.Optimizer or None, got list",
        _constrained,
    ),
    Case(
        "`release` of a module holding no constrained embedding",
        release,
        ValueError,
        "release: Embedding holds no constrained embedding",
    ),
    Case(
        "`release` of a model holding no constrained embedding",
        release,
        ValueError,
        "release: Sequential holds no constrained embedding",
        lambda: nn.Sequential(_plain(), nn.Linear(D, 2)),
    ),
    Case(
        "`merged_state_dict(x)`: `x` is not a module",
        lambda m: merged_state_dict(m.state_dict()),
        TypeError,
        "module must be an nn.Module, got OrderedDict",
        _constrained,
    ),
    # -- using a constrained embedding ------------------------------------------------------
    Case(
        "`load_state_dict` with a `weight` of another shape",
        lambda m: m.load_state_dict({"weight": torch.zeros(V + 1, D)}),
        RuntimeError,
        "size mismatch for weight: copying a param with shape (7, 3) from checkpoint, "
        "the shape in current model is (6, 3) (a constrained embedding).",
        _constrained,
    ),
    Case(
        "`load_state_dict` with a `weight` that is not a tensor",
        lambda m: m.load_state_dict({"weight": [0.0] * D}),
        RuntimeError,
        "size mismatch for weight: copying a param with shape list from checkpoint",
        _constrained,
    ),
    Case(
        '`load_state_dict` with other values in the pinned rows (`on_mismatch="error"`)',
        _pinned_changed_checkpoint,
        RuntimeError,
        "weight would change pinned rows of a constrained embedding (max … = 1); pinned rows only change "
        "through release() or on_mismatch='checkpoint'. Pass on_mismatch='checkpoint' to constrain() "
        "to take them from the checkpoint",
        _constrained,
    ),
    Case(
        "in-place write to `weight` outside `torch.no_grad()`",
        _write(lambda w: w.mul_(2.0), grad=True),
        RuntimeError,
        "in-place mul_ on the weight of a constrained embedding needs torch.no_grad(); "
        "writes may only change the free rows",
        _constrained,
    ),
    Case(
        "in-place write (`torch.no_grad()`, `weight.data`, `nn.init.*_`) that changes pinned rows",
        _write(lambda w: nn.init.normal_(w)),
        RuntimeError,
        "in-place normal_ would change pinned rows of a constrained embedding (max … = …); "
        "pinned rows only change through release() or on_mismatch='checkpoint'",
        _constrained,
    ),
    Case(
        "in-place write that changes the shape (`weight.data.resize_`)",
        _write(lambda w: w.data.resize_(2, 2)),
        ValueError,
        "in-place resize_ must have shape (6, 3), got (2, 2)",
        _constrained,
    ),
    Case(
        "`weight.data = value` with other pinned rows",
        _write(lambda w: setattr(w, "data", torch.zeros(V, D)), grad=True),
        RuntimeError,
        "in-place .data assignment would change pinned rows of a constrained embedding",
        _constrained,
    ),
    Case(
        "in-place write through a view of `weight` (`weight[2:].zero_()`, `weight.data.t().copy_(…)`)",
        _write(lambda w: w[N:].zero_()),
        RuntimeError,
        "in-place zero_ on a view of a constrained embedding's weight is not supported; write through the "
        "weight itself under torch.no_grad() (e.g. emb.weight[rows] = values), or release() the embedding first",
        _constrained,
    ),
    Case(
        "writing into `weight.detach().numpy()`",
        _write(lambda w: w.detach().numpy().__setitem__(N, 0.0)),
        ValueError,
        "assignment destination is read-only",
        _constrained,
    ),
    Case(
        "`weight.set_(…)` (`weight`, `weight.data`, `weight.detach()`)",
        _write(lambda w: w.data.set_(torch.zeros(V, D))),
        RuntimeError,
        "set_ on the weight of a constrained embedding is not supported (it would replace the pinned rows)",
        _constrained,
    ),
    Case(
        "`embedding.weight = value` with other pinned rows",
        lambda m: _set_weight(m, torch.zeros(V, D)),
        RuntimeError,
        "weight would change pinned rows of a constrained embedding",
        _constrained,
    ),
    Case(
        "`embedding.weight = value` of another shape",
        lambda m: _set_weight(m, torch.zeros(V - 1, D)),
        ValueError,
        "weight must have shape (6, 3), got (5, 3)",
        _constrained,
    ),
    Case(
        "`F.embedding(…, max_norm=…)` on a constrained weight",
        lambda m: F.embedding(torch.tensor([0, 4]), m.weight, max_norm=1.0),
        ValueError,
        "max_norm renormalizes looked-up rows in place, which would change pinned rows; "
        "it is not supported on a constrained embedding (set max_norm=None)",
        _constrained,
    ),
    Case(
        "`F.embedding_bag(…, max_norm=…)` on a constrained weight",
        lambda m: F.embedding_bag(torch.tensor([[0, 4]]), m.weight, max_norm=1.0),
        ValueError,
        "max_norm renormalizes looked-up rows in place",
        _constrained,
    ),
    # -- rows files ---------------------------------------------------------------------------
    Case(
        "`save_rows` of a module holding no constrained weight",
        lambda m: save_rows(m, "rows.safetensors"),
        ValueError,
        "save_rows: Embedding holds no constrained weight",
    ),
    Case(
        "`save_rows` / `load_rows` with a path not ending in `.safetensors`",
        lambda m: save_rows(m, "rows.pt"),
        ValueError,
        "path 'rows.pt': a rows file is a .safetensors file, got extension '.pt'",
        _constrained,
    ),
    Case(
        "`load_rows` of a rows file for another model (other pinned rows)",
        lambda m: load_rows(m, _rows_of_other_model()),
        ValueError,
        "load_rows: the pinned rows of weight differ from those the file's rows were trained against "
        "(SHA-256 fingerprint mismatch)",
    ),
    Case(
        "`load_rows` of a rows file for a weight of another shape",
        lambda m: load_rows(m, _rows_file(constrain(nn.Embedding(V + 1, D), _ref()))),
        ValueError,
        "load_rows: weight has shape (6, 3) in the model, the file's rows are for shape (7, 3)",
    ),
    Case(
        "`load_rows` of a rows file naming a module the model lacks",
        lambda m: load_rows(m, _rows_file(nn.ModuleDict({"emb": _constrained()}))),
        ValueError,
        "load_rows: the model has no module 'emb' (entry 'emb.weight')",
    ),
    Case(
        "`load_rows` into a model constrained with other free rows",
        lambda m: load_rows(m, _rows_file(constrain(nn.Embedding(V, D), _ref(N - 1, D)))),
        ValueError,
        "load_rows: weight is constrained with 3 free rows in the model, other than the file's 4 free rows",
        _constrained,
    ),
    # -- issue 17: tied heads, optimizers release cannot widen, rows files, PEFT -------------------
    Case(
        "`constrain(head, …)` on a head tied to a constrained embedding (to pin other rows)",
        lambda m: constrain(m[1], _ref(), indices=[3, 4, 5]),
        ValueError,
        "embedding is tied to a constrained Embedding (it shares that module's Parameter, as a tied output head "
        "does), so it computes with the Embedding's merged weight and its pinned rows: a tied module cannot pin "
        "rows of its own. Pin the rows on the module it is tied to",
        lambda: _tied_constrained(),
    ),
    Case(
        "`release(…, optimizer=LBFGS)` after a step",
        lambda m: release(m, optimizer=m.opt),
        ValueError,
        "release: LBFGS keeps one flat history over all its parameters (its directions and steps), which cannot "
        "be widened to the released rows; call release(module) without optimizer= and build a new LBFGS",
        lambda: _stepped(torch.optim.LBFGS),
    ),
    Case(
        "`release(…, optimizer=…)` whose state is neither one entry per free row nor a scalar",
        lambda m: release(m, optimizer=m.opt),
        ValueError,
        "release: _BlockState's state 'absmax' has shape (2,), neither one entry per free row (the free rows are "
        "(3, 3)) nor a scalar, so it cannot be widened",
        lambda: _stepped(lambda p: _BlockState(p)),
    ),
    Case(
        "`release(…, optimizer=ZeroRedundancyOptimizer)`",
        lambda m: _release_zero(m),
        ValueError,
        "release: ZeroRedundancyOptimizer partitions its parameters across ranks by their size when it is built",
        _constrained,
    ),
    Case(
        "`load_rows` of a float16 rows file into a bfloat16 model",
        lambda m: load_rows(m, _rows_file(constrain(_plain().half(), _ref(dtype=torch.float16)))),
        ValueError,
        "load_rows: weight is torch.bfloat16 in the model, the file holds torch.float16 and no fingerprint of its "
        "pinned rows in torch.bfloat16; cast the model to torch.float16",
        lambda: _plain().bfloat16(),
    ),
    Case(
        "`load_rows` of a rows file whose rows partly overlap those loaded from another file",
        lambda m: load_rows(m, _rows_file(constrain(nn.Embedding(V, D), m.weight.detach()[:4]))),
        ValueError,
        "load_rows: rows of weight in '…' overlap rows loaded from '…' (not the same rows); unload_rows(model, '…') "
        "first",
        lambda: _loaded_plain(),
    ),
    Case(
        "`unload_rows` of a model into which no rows file was loaded",
        lambda m: unload_rows(m),
        ValueError,
        "unload_rows: no rows file loaded into Embedding",
    ),
    Case(
        "`constrain_new_tokens` on a `PeftModel` whose LoRA targets `embed_tokens` (or `lm_head`)",
        lambda m: _hf().constrain_new_tokens(m, V - 2),
        ValueError,
        "model.get_input_embeddings() is a PEFT adapter layer (peft.tuners.lora.layer.Embedding) around the "
        "Embedding (the module is in the adapter's target_modules): an adapter there adds its own update (LoRA's "
        "B @ A) to every row, pinned rows included, so they cannot stay exact. Leave the embedding and the output "
        "head out of target_modules",
        lambda: _peft_llama(["q_proj", "embed_tokens"]),
    ),
    Case(
        "`constrain_new_tokens` on a `PeftModel` with `trainable_token_indices`",
        lambda m: _hf().constrain_new_tokens(m, V - 2),
        ValueError,
        "model.get_input_embeddings() is PEFT's TrainableTokensWrapper (trainable_token_indices): PEFT already "
        "trains those rows and keeps the others. Use one of the two",
        lambda: _peft_llama(["q_proj"], [V - 1]),
    ),
    Case(
        "`peft_model.resize_token_embeddings(…)` while an embedding is constrained",
        lambda m: m.resize_token_embeddings(V + 2),
        RuntimeError,
        "model.resize_token_embeddings() would replace the weight of a constrained embedding; call "
        "embconstraint.release(model) first, resize, then constrain the input embeddings again",
        lambda: _peft_llama(["q_proj"], constrained=True),
    ),
]


def _pattern(message: str) -> str:
    return ".*?".join(re.escape(part) for part in message.split("…"))


def _snapshot(module: nn.Module) -> dict[str, Any]:
    """Everything a refused call must leave as it was."""
    return {
        "type": type(module),
        "constrained": is_constrained(module),
        "parametrized": parametrize.is_parametrized(module),
        "params": [(name, id(p), p.shape, p.dtype) for name, p in module.named_parameters()],
        "state": {k: v.detach().clone() for k, v in module.state_dict().items()},
        "hooks": (len(module._state_dict_hooks), len(module._load_state_dict_pre_hooks)),
        "attrs": sorted(vars(module)),
    }


def _assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert after["type"] is before["type"]
    for key in ("constrained", "parametrized", "params", "hooks", "attrs"):
        assert after[key] == before[key], key
    assert list(after["state"]) == list(before["state"])
    for key, value in before["state"].items():
        assert after["state"][key].dtype == value.dtype
        assert torch.equal(after["state"][key], value), key  # bitwise, free rows included


@pytest.mark.parametrize("case", CASES, ids=[c.input for c in CASES])
def test_refused_input(case: Case) -> None:
    module = case.target()
    before = _snapshot(module)
    with pytest.raises(case.error, match=re.compile(_pattern(case.message), re.DOTALL)):
        case.call(module)
    _assert_same(before, _snapshot(module))


def test_refused_inputs_leave_the_embedding_usable() -> None:
    """After a refused constrain, the same embedding can still be constrained correctly."""
    emb = _plain()
    with pytest.raises(ValueError):
        constrain(emb, _ref(), indices=[0, 0, 1])
    ref = _ref()
    constrain(emb, ref, indices=[5, 0, 2])
    assert torch.equal(emb.weight[[5, 0, 2]], ref)


@pytest.mark.parametrize(
    ("reference", "dtype"),
    [
        (torch.tensor([[0.5, -2.0, 3.0]], dtype=torch.float64), torch.float32),
        (torch.tensor([[0.5, -2.0, 1024.0]]), torch.bfloat16),
        (torch.tensor([[0.5, -2.0, 1.0 / 1024]], dtype=torch.float16), torch.float32),
        (torch.tensor([[1.0 / 3]]).expand(1, 3).double().float(), torch.float64),
    ],
    ids=["float64->float32", "float32->bfloat16", "float16->float32", "float32->float64"],
)
def test_exactly_castable_references_are_accepted(reference, dtype) -> None:
    """The cast check refuses only lossy casts: exactly representable values pass."""
    emb = constrain(nn.Embedding(V, D).to(dtype), reference)
    assert emb.weight.dtype == dtype
    assert torch.equal(emb.weight[:1].double(), reference.double())


def test_is_constrained_answers_false_for_anything_else() -> None:
    for thing in (None, 3, torch.zeros(2), nn.Linear(2, 2), _plain(), nn.Sequential(_constrained())):
        assert is_constrained(thing) is False


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown_table() -> str:
    """The errors table of the docs, generated from ``CASES``."""
    lines = ["| input | error | message |", "| --- | --- | --- |"]
    lines += [f"| {_cell(c.input)} | `{c.error.__name__}` | `{_cell(c.message)}` |" for c in CASES]
    return "\n".join(lines) + "\n"


def test_markdown_table_has_one_row_per_case() -> None:
    table = markdown_table().splitlines()
    assert len(table) == len(CASES) + 2
    assert len({c.input for c in CASES}) == len(CASES)  # inputs are unique (they are the test ids)


# -- helpers of the issue-17 cases (looked up when a case runs) ---------------------------------


def _tied_constrained() -> nn.Module:
    model = _tied_model()
    constrain(model[0], _ref(), root=model)
    return model


class _BlockState(torch.optim.SGD):
    """SGD that also keeps a per-block statistic: neither one entry per free row nor a scalar."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["absmax"] = p.grad.abs().flatten()[:2].clone()
        return super().step(closure)


def _stepped(make) -> nn.Module:
    """A constrained embedding after one step of ``make(params)``, kept as ``.opt``."""
    emb = _constrained()
    opt = make(emb.parameters())

    def closure():
        opt.zero_grad()
        loss = emb(torch.arange(V)).pow(2).sum()
        loss.backward()
        return loss

    if isinstance(opt, torch.optim.LBFGS):
        opt.step(closure)
    else:
        closure()
        opt.step()
    emb.opt = opt
    return emb


def _release_zero(emb: nn.Module) -> None:
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        release(
            emb,
            optimizer=ZeroRedundancyOptimizer(
                list(emb.parameters()), optimizer_class=torch.optim.SGD, lr=0.1
            ),
        )
    finally:
        dist.destroy_process_group()


def _loaded_plain() -> nn.Module:
    """A plain embedding with rows 3..5 loaded from a rows file trained on it."""
    emb = _plain()
    load_rows(emb, _rows_file(constrain(nn.Embedding(V, D), emb.weight.detach()[:N])))
    return emb


def _hf():
    import embconstraint.hf

    return embconstraint.hf


def _peft_llama(targets: list[str], tokens: list[int] | None = None, constrained: bool = False) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = tiny_llama_config(V, 4, tied=False)
    extra = {"trainable_token_indices": tokens} if tokens else {}
    model = peft.get_peft_model(
        transformers.LlamaForCausalLM(cfg), peft.LoraConfig(r=2, target_modules=targets, **extra)
    )
    if constrained:
        _hf().constrain_new_tokens(model, V - 2)
    return model


if __name__ == "__main__":
    print(markdown_table(), end="")
