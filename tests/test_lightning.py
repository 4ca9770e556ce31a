"""The Lightning callback: install in setup (or when configure_model creates the embedding),
remove at teardown, exact pinned rows at every stage; optimizer param groups that miss the rows."""

from __future__ import annotations

import csv
import types

import pytest
import torch
from helpers.lightning import (
    DIM,
    PACKAGES,
    VOCAB_NEW,
    VOCAB_OLD,
    PLTinyLM,
    fit,
    loader,
    probe,
    reference,
    trainer_kwargs,
)
from torch import nn

import embconstraint
from embconstraint import constrain, is_constrained
from embconstraint.lightning import EmbeddingConstraint

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),  # Lightning's num_workers/logging hints
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),  # Lightning's own use of torch pytree
]
KEY = "constraint/max_abs_deviation"


def _plain_param_names(module: nn.Module) -> list[str]:
    return [n for n, _ in module.named_parameters()]


@pytest.mark.parametrize("pkg", sorted(PACKAGES))
def test_fit_pins_rows_from_sanity_check_on_and_leaves_a_plain_module(pkg, tmp_path):
    """The original usage: EmbeddingConstraint(model_2.embedding, model.embedding) in Trainer(callbacks=)."""
    Module = PACKAGES[pkg][1]
    model = reference()  # "model 1": its embedding is the reference
    torch.manual_seed(0)
    model_2 = Module(VOCAB_NEW, DIM)
    names = _plain_param_names(model_2)
    free_before = model_2.embedding.weight.detach()[VOCAB_OLD:].clone()
    constraint = EmbeddingConstraint(model_2.embedding, model)
    seen = probe(pkg, model.weight.detach())
    trainer_2 = fit(model_2, [constraint, seen], tmp_path, pkg=pkg, max_steps=5)

    events = [e for e, _, _ in seen.seen]
    assert events[0] == "sanity" and events.count("train_batch") == 5 and "validation" in events
    assert all(constrained and exact for _, constrained, exact in seen.seen)
    # the optimizer was built from the free rows: no (V, D) embedding weight in it
    assert (VOCAB_NEW - VOCAB_OLD, DIM) in seen.optimizer_shapes
    assert sum(shape == (VOCAB_NEW, DIM) for shape in seen.optimizer_shapes) == 1  # the untied head only
    # released: one plain Parameter with the merged weight, the old rows exact, the new rows trained
    assert not is_constrained(model_2.embedding)
    assert type(model_2.embedding.weight) is nn.Parameter
    assert _plain_param_names(model_2) == names
    assert torch.equal(model_2.embedding.weight[:VOCAB_OLD], model.weight)
    assert torch.equal(model_2.embedding.weight, seen.weights[-1])
    assert not torch.equal(model_2.embedding.weight[VOCAB_OLD:], free_before)
    assert trainer_2.callback_metrics[KEY].item() == 0.0


@pytest.mark.parametrize("pkg", sorted(PACKAGES))
def test_one_class_serves_both_lightning_packages(pkg):
    pl = PACKAGES[pkg][0]
    constraint = EmbeddingConstraint("embedding", reference())
    assert isinstance(constraint, pl.Callback)
    trainer = pl.Trainer(callbacks=constraint, **trainer_kwargs())  # a single callback, not in a list
    assert constraint in trainer.callbacks
    assert embconstraint.EmbeddingConstraint is EmbeddingConstraint


def test_two_constraints_in_one_lightning_pytorch_trainer_have_distinct_state_keys():
    """lightning.pytorch sees this class as stateful (its state_dict is pytorch_lightning's):
    two instances must not collide."""
    pl = PACKAGES["lightning.pytorch"][0]
    a, b = EmbeddingConstraint("embedding", reference()), EmbeddingConstraint("encoder.tok_emb", reference())
    assert a.state_key != b.state_key
    trainer = pl.Trainer(callbacks=[a, b], **trainer_kwargs())
    assert a in trainer.callbacks and b in trainer.callbacks


def test_dotted_path_is_resolved_at_setup(tmp_path):
    ref = reference()
    torch.manual_seed(0)
    model = PLTinyLM(nested=True)
    fit(model, [EmbeddingConstraint("encoder.tok_emb", ref)], tmp_path)
    assert type(model.encoder.tok_emb.weight) is nn.Parameter
    assert torch.equal(model.encoder.tok_emb.weight[:VOCAB_OLD], ref.weight)


@pytest.mark.parametrize(
    ("path", "error", "match"),
    [
        ("encoder.nothing", ValueError, "has no submodule 'encoder.nothing'"),
        ("head", TypeError, "must be an nn.Embedding or nn.EmbeddingBag, got Linear"),
    ],
)
def test_bad_path_fails_at_setup_before_anything_changes(tmp_path, path, error, match):
    torch.manual_seed(0)
    model = PLTinyLM(nested=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        fit(model, [EmbeddingConstraint(path, reference())], tmp_path)
    assert not any(is_constrained(m) for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_embedding_of_another_model_is_refused_at_setup(tmp_path):
    other = nn.Embedding(VOCAB_NEW, DIM)
    with pytest.raises(ValueError, match="not a submodule of PLTinyLM"):
        fit(PLTinyLM(), [EmbeddingConstraint(other, reference())], tmp_path)
    assert not is_constrained(other)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        (
            (3, torch.zeros(2, DIM)),
            {},
            TypeError,
            "embedding must be an nn.Embedding, an nn.EmbeddingBag or a dotted",
        ),
        (("a..b", torch.zeros(2, DIM)), {}, ValueError, "dotted attribute path"),
        (("", torch.zeros(2, DIM)), {}, ValueError, "dotted attribute path"),
        (("embedding", "weights.pt"), {}, TypeError, "reference must be an nn.Embedding"),
        (("embedding", torch.zeros(2, 3, 4)), {}, ValueError, r"reference must have shape \(n, D\)"),
        (("embedding", torch.zeros(2, DIM, dtype=torch.long)), {}, TypeError, "floating-point"),
        (("embedding", torch.zeros(2, DIM)), {"on_mismatch": "ignore"}, ValueError, "on_mismatch must be"),
        (("embedding", torch.zeros(2, DIM)), {"indices": [1, 1]}, ValueError, "distinct"),
        (("embedding", torch.zeros(2, DIM)), {"indices": [1]}, ValueError, "indices has 1 entries"),
        (("embedding", torch.zeros(2, DIM)), {"indices": [0, -1]}, ValueError, "non-negative"),
        (("embedding", torch.zeros(2, DIM)), {"indices": "01"}, TypeError, "indices must be"),
        (("embedding", torch.zeros(2, DIM)), {"log_key": ""}, TypeError, "log_key"),
        ((nn.Embedding(5, DIM), torch.zeros(2, DIM + 1)), {}, ValueError, "embedding dimension"),
        ((nn.Embedding(5, DIM), torch.zeros(6, DIM)), {}, ValueError, "reference has 6 rows"),
        (
            (nn.Embedding(5, DIM), torch.zeros(2, DIM)),
            {"indices": [0, 5]},
            ValueError,
            r"indices must lie in \[0, 5\)",
        ),
        ((nn.Embedding(5, DIM, max_norm=1.0), torch.zeros(2, DIM)), {}, ValueError, "max_norm"),
        ((nn.Linear(DIM, 5), torch.zeros(2, DIM)), {}, TypeError, "got Linear"),
        ((nn.Embedding(5, DIM), torch.full((2, DIM), float("nan"))), {}, ValueError, "non-finite"),
    ],
)
def test_bad_arguments_are_refused_in_init(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        EmbeddingConstraint(*args, **kwargs)
    if isinstance(args[0], nn.Module):
        assert not any(is_constrained(m) for m in args[0].modules())


def test_an_already_constrained_embedding_is_refused_in_init():
    emb = constrain(nn.Embedding(5, DIM), torch.zeros(2, DIM))
    with pytest.raises(ValueError, match="already constrained"):
        EmbeddingConstraint(emb, torch.zeros(2, DIM))


def test_tied_head_sees_the_constrained_weight_and_is_tied_again_after_fit(tmp_path):
    ref = reference()
    torch.manual_seed(0)
    model = PLTinyLM(tie=True)
    assert model.head.weight is model.embedding.weight

    class TieProbe(PACKAGES["pytorch_lightning"][0].Callback):
        ties: list[bool] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.ties.append(
                torch.equal(pl_module.head.weight, pl_module.embedding.weight)
                and torch.equal(pl_module.head.weight[:VOCAB_OLD], ref.weight)
            )

    tie_probe = TieProbe()
    seen = probe("pytorch_lightning", ref.weight.detach())
    fit(model, [EmbeddingConstraint("embedding", ref), seen, tie_probe], tmp_path)
    assert tie_probe.ties == [True] * 3
    assert all(c and e for _, c, e in seen.seen)
    # one trainable block of the tied weight: the free rows, not a second (V, D) head weight
    assert (VOCAB_NEW - VOCAB_OLD, DIM) in seen.optimizer_shapes
    assert (VOCAB_NEW, DIM) not in seen.optimizer_shapes
    assert model.head.weight is model.embedding.weight and type(model.head.weight) is nn.Parameter
    assert torch.equal(model.embedding.weight[:VOCAB_OLD], ref.weight)
    assert list(model.state_dict()) == ["embedding.weight", "head.weight", "proj.weight", "proj.bias"]


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_evaluation_stages_run_constrained_and_release(stage, tmp_path):
    pl, Module = PACKAGES["pytorch_lightning"]
    ref = reference()
    torch.manual_seed(0)
    model = Module()
    seen = probe("pytorch_lightning", ref.weight.detach())
    trainer = pl.Trainer(
        callbacks=[EmbeddingConstraint(model.embedding, ref), seen], **trainer_kwargs(tmp_path)
    )
    out = getattr(trainer, stage)(model, loader(batches=1))
    assert [e for e, _, _ in seen.seen] == [{"validate": "validation"}.get(stage, stage)]
    assert all(c and e for _, c, e in seen.seen)
    assert not is_constrained(model.embedding) and type(model.embedding.weight) is nn.Parameter
    assert torch.equal(model.embedding.weight[:VOCAB_OLD], ref.weight)
    if stage == "predict":  # computed with the pinned rows: equal to the released module's output
        assert torch.equal(out[0], model(loader(batches=1).dataset.tensors[0]))
    else:
        assert out[0][KEY] == 0.0


def test_fit_twice_reinstalls(tmp_path):
    ref = reference()
    torch.manual_seed(0)
    model = PLTinyLM()
    constraint = EmbeddingConstraint(model.embedding, ref)
    first = fit(model, [constraint], tmp_path, max_steps=2)
    after_first = model.embedding.weight.detach().clone()
    seen = probe("pytorch_lightning", ref.weight.detach())
    fit(model, [constraint, seen], tmp_path, max_steps=2)
    assert first.callback_metrics[KEY].item() == 0.0
    assert all(c and e for _, c, e in seen.seen) and len(seen.weights) == 2
    assert (VOCAB_NEW - VOCAB_OLD, DIM) in seen.optimizer_shapes
    assert not is_constrained(model.embedding)
    assert torch.equal(model.embedding.weight[:VOCAB_OLD], ref.weight)
    assert not torch.equal(model.embedding.weight, after_first)


def test_deviation_is_logged_through_the_trainer_logger(tmp_path):
    pl = PACKAGES["pytorch_lightning"][0]
    from pytorch_lightning.loggers import CSVLogger

    logger = CSVLogger(tmp_path, name="run", version=0)
    fit(
        PLTinyLM(),
        [EmbeddingConstraint("embedding", reference())],
        tmp_path,
        logger=logger,
        max_steps=8,
        log_every_n_steps=1,
    )
    assert isinstance(logger, pl.loggers.Logger)
    with open(tmp_path / "run" / "version_0" / "metrics.csv") as f:
        rows = [r[KEY] for r in csv.DictReader(f) if r.get(KEY)]
    # two epochs of 4 batches: a train and a validation epoch end each
    assert rows == ["0.0"] * 4


def test_deviation_reports_a_pinned_row_that_moved():
    """The metric measures: a reference changed behind the constraint's back shows up."""
    ref = torch.zeros(2, DIM)
    emb = nn.Embedding(5, DIM)
    root = nn.Sequential(emb)
    constraint = EmbeddingConstraint(emb, ref)
    constraint.setup(None, root, "fit")  # the hooks work outside a Trainer too
    assert constraint.max_abs_deviation().item() == 0.0
    ref[1, 2] = 0.5  # the reference tensor the constraint was asked to hold changes
    assert constraint.max_abs_deviation().item() == 0.5
    constraint.teardown(None, root, "fit")
    with pytest.raises(RuntimeError, match="not installed"):
        constraint.max_abs_deviation()


def test_scattered_indices(tmp_path):
    ref = reference(vocab=3)
    indices = [7, 0, 4]
    torch.manual_seed(0)
    model = PLTinyLM()
    seen_rows = []

    class Rows(PACKAGES["pytorch_lightning"][0].Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen_rows.append(torch.equal(pl_module.embedding.weight[indices], ref.weight))

    trainer = fit(model, [EmbeddingConstraint("embedding", ref, indices=indices), Rows()], tmp_path)
    assert seen_rows == [True] * 3
    assert trainer.callback_metrics[KEY].item() == 0.0
    assert type(model.embedding.weight) is nn.Parameter
    assert torch.equal(model.embedding.weight[indices], ref.weight)


def test_gradient_clipping_sees_only_the_trainable_rows(tmp_path):
    """gradient_clip_val clips the optimizer's parameters: the free rows, never a (V, D) weight."""
    ref = reference()
    clip = 1e-3
    norms, grad_shapes = [], []

    class Grads(PACKAGES["pytorch_lightning"][0].Callback):
        def on_before_zero_grad(self, trainer, pl_module, optimizer):  # after clipping and the step
            params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            grad_shapes.append([tuple(p.grad.shape) for p in params])
            norms.append(torch.nn.utils.get_total_norm([p.grad for p in params]).item())

    torch.manual_seed(0)
    model = PLTinyLM()
    seen = probe("pytorch_lightning", ref.weight.detach())
    fit(
        model,
        [EmbeddingConstraint("embedding", ref), seen, Grads()],
        tmp_path,
        gradient_clip_val=clip,
        max_steps=4,
    )
    assert len(norms) >= 3 and all(n <= clip * (1 + 1e-4) for n in norms[1:])
    assert all((VOCAB_NEW - VOCAB_OLD, DIM) in s and s.count((VOCAB_NEW, DIM)) == 1 for s in grad_shapes[1:])
    assert all(c and e for _, c, e in seen.seen)


def test_bf16_mixed_keeps_pinned_rows_exact(tmp_path):
    ref = reference()
    torch.manual_seed(0)
    model = PLTinyLM()
    seen = probe("pytorch_lightning", ref.weight.detach())
    trainer = fit(model, [EmbeddingConstraint("embedding", ref), seen], tmp_path, precision="bf16-mixed")
    assert all(c and e for _, c, e in seen.seen) and len(seen.weights) == 3
    assert model.embedding.weight.dtype == torch.float32
    assert torch.equal(model.embedding.weight[:VOCAB_OLD], ref.weight)
    assert trainer.callback_metrics[KEY].item() == 0.0


def test_true_half_precision_refuses_a_reference_it_would_round(tmp_path):
    torch.manual_seed(0)
    model = PLTinyLM()
    ref = torch.full((VOCAB_OLD, DIM), 0.1)  # not a bfloat16 value
    with pytest.raises(ValueError, match="precision='bf16-true'.*cannot be cast exactly"):
        fit(model, [EmbeddingConstraint("embedding", ref)], tmp_path, precision="bf16-true")
    assert not is_constrained(model.embedding) and model.embedding.weight.dtype == torch.float32


def test_sharding_strategies_are_refused_in_setup():
    from pytorch_lightning.strategies import FSDPStrategy

    model = PLTinyLM()
    constraint = EmbeddingConstraint("embedding", reference())
    fsdp_trainer = types.SimpleNamespace(strategy=FSDPStrategy(), precision="32-true")
    with pytest.raises(ValueError, match="does not support FSDPStrategy.*strategy='ddp'"):
        constraint.setup(fsdp_trainer, model, "fit")
    assert not is_constrained(model.embedding)


def test_checkpoint_loads_into_a_plain_module(tmp_path):
    """ModelCheckpoint writes plain keys and the merged weight: load_from_checkpoint, strict, no callback."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    ref = reference()
    torch.manual_seed(0)
    model = PLTinyLM(tie=True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=3, save_top_k=-1)
    fit(model, [EmbeddingConstraint("embedding", ref), ckpt], tmp_path, enable_checkpointing=True)
    loaded = PLTinyLM.load_from_checkpoint(tmp_path / "ckpt" / "step=3.ckpt")  # strict by default
    assert not any(is_constrained(m) for m in loaded.modules())
    assert loaded.head.weight is loaded.embedding.weight
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    state = torch.load(tmp_path / "ckpt" / "step=3.ckpt", weights_only=False)["state_dict"]
    assert tuple(state["embedding.weight"].shape) == (VOCAB_NEW, DIM)
    assert not any("parametrizations" in k for k in state)


@pytest.mark.parametrize(("step_data", "stop"), [(False, 4), (True, 2)], ids=["epoch-end", "mid-epoch"])
def test_resume_from_checkpoint_is_bit_exact(tmp_path, step_data, stop):
    """Stopped at step ``stop`` and resumed with ckpt_path: pinned rows, free rows and optimizer
    state end bitwise equal to an uninterrupted run. Mid-epoch, the data is keyed on the step
    (a plain DataLoader restarts its epoch on resume); the model/optimizer state is what is tested."""
    from pytorch_lightning.callbacks import ModelCheckpoint

    ref, steps = reference(), 8
    torch.manual_seed(0)
    full = PLTinyLM(step_data=step_data)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer_full = fit(
        full,
        [EmbeddingConstraint("embedding", ref), ckpt],
        tmp_path,
        enable_checkpointing=True,
        max_steps=steps,
    )

    torch.manual_seed(123)  # a different initialization: everything must come from the checkpoint
    resumed = PLTinyLM(step_data=step_data)
    seen = probe("pytorch_lightning", ref.weight.detach())
    pl = PACKAGES["pytorch_lightning"][0]
    trainer = pl.Trainer(
        callbacks=[EmbeddingConstraint("embedding", ref), seen], **trainer_kwargs(tmp_path, max_steps=steps)
    )
    trainer.fit(
        resumed, loader(), loader(batches=1, seed=5), ckpt_path=tmp_path / "ckpt" / f"step={stop}.ckpt"
    )

    assert len(seen.weights) == steps - stop and all(c and e for _, c, e in seen.seen)
    assert trainer.global_step == trainer_full.global_step == steps
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
    state_full = trainer_full.optimizers[0].state_dict()["state"]
    state_resumed = trainer.optimizers[0].state_dict()["state"]
    assert tuple(state_full[0]["exp_avg"].shape) == (VOCAB_NEW - VOCAB_OLD, DIM)  # free rows only
    for i, s in state_full.items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state_resumed[i][name], s[name]), (i, name)


def test_barebones_trainer_runs_constrained_without_logging(tmp_path):
    ref = reference()
    torch.manual_seed(0)
    model = PLTinyLM()
    seen = probe("pytorch_lightning", ref.weight.detach())
    trainer = fit(
        model, [EmbeddingConstraint("embedding", ref), seen], tmp_path, barebones=True, num_sanity_val_steps=0
    )
    assert len(seen.weights) == 3 and all(c and e for _, c, e in seen.seen)
    assert KEY not in trainer.callback_metrics
    assert torch.equal(model.embedding.weight[:VOCAB_OLD], ref.weight)


# -- an embedding created in configure_model --------------------------------------------------------


def test_embedding_created_in_configure_model_is_constrained_before_the_optimizer():
    """The callback constrains an embedding that configure_model creates (when it is assigned),
    before configure_optimizers; a path that never appears is a clear error."""
    from torch.utils.data import DataLoader, TensorDataset

    pl = PACKAGES["pytorch_lightning"][0]
    V, D, N = 98, 16, 60
    ref = torch.randn(N, D, generator=torch.Generator().manual_seed(3))

    class LM(pl.LightningModule):
        def __init__(self, name):
            super().__init__()
            self.name = name

        def configure_model(self):
            if not hasattr(self, "block"):
                self.block = nn.ModuleDict({"tok": nn.Embedding(V, D)})
            self.constrained_in_configure_model = type(self.block["tok"].weight).__name__ == "PinnedWeight"

        def training_step(self, batch, batch_idx):
            return self.block["tok"](batch[0]).pow(2).mean()

        def configure_optimizers(self):
            self.shapes = [tuple(p.shape) for p in self.parameters()]
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit_lm(model, name):
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=2,
            callbacks=[EmbeddingConstraint(name, ref)],
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(model, DataLoader(TensorDataset(torch.randint(0, V, (8,))), batch_size=4))

    model = LM("block.tok")
    fit_lm(model, "block.tok")
    assert model.constrained_in_configure_model is True and model.shapes == [(V - N, D)]
    assert "configure_model" not in model.__dict__  # the hook is the class's again
    assert torch.equal(model.block["tok"].weight[:N], ref)  # released after fit: a plain Parameter
    assert type(model.block["tok"].weight).__name__ == "Parameter"
    with pytest.raises(ValueError, match="has no submodule .block.other..*configure_model"):
        fit_lm(LM("block.other"), "block.other")


# -- after fit: no stale (V - n, D) gradient -----------------------------------------------------


def test_backward_after_fit_with_the_callback(tmp_path) -> None:
    model = PLTinyLM()
    fit(model, [EmbeddingConstraint(model.embedding, reference())], tmp_path, val=False)
    grad = model.embedding.weight.grad
    assert grad is None or grad.shape == model.embedding.weight.shape
    model.zero_grad(set_to_none=True)
    x, _ = next(iter(loader()))
    model(x).sum().backward()  # e.g. a saliency map on the trained model
    assert model.embedding.weight.grad.shape == model.embedding.weight.shape


# -- optimizer param groups that name the embedding's weight or miss its rows --------------------


class _NamedWeightGroups(PLTinyLM):
    def configure_optimizers(self):
        rest = list(self.head.parameters()) + list(self.proj.parameters())
        return torch.optim.SGD([{"params": [self.embedding.weight], "lr": 0.1}, {"params": rest}], lr=0.1)


def test_param_group_naming_embedding_weight_names_the_fix(tmp_path) -> None:
    model = _NamedWeightGroups()
    with pytest.raises(ValueError) as info:
        fit(model, [EmbeddingConstraint(model.embedding, reference())], tmp_path, val=False)
    text = "\n".join([str(info.value), *getattr(info.value, "__notes__", [])])
    assert "embedding.parameters()" in text
    assert "embedding.parametrizations.weight.original" in text


class _NameBasedNoDecay(PLTinyLM):
    """The usual "no weight decay for embeddings" groups, selected by the plain name."""

    def configure_optimizers(self):
        named = list(self.named_parameters())
        no_decay = [p for n, p in named if n.endswith("embedding.weight")]  # empty while constrained
        decay = [p for n, p in named if not n.endswith("embedding.weight")]
        return torch.optim.AdamW([{"params": no_decay, "weight_decay": 0.0}, {"params": decay}], lr=0.1)


class _EmbeddingLeftOut(PLTinyLM):
    def configure_optimizers(self):
        return torch.optim.SGD(
            [p for n, p in self.named_parameters() if not n.startswith("embedding.")], lr=0.1
        )


@pytest.mark.parametrize(
    ("cls", "fragment"),
    [(_NameBasedNoDecay, "param group is empty"), (_EmbeddingLeftOut, "in no optimizer param group")],
)
def test_name_based_param_groups_that_miss_the_rows_warn(cls, fragment, tmp_path) -> None:
    model = cls()
    with pytest.warns(UserWarning, match="EmbeddingConstraint: .*" + fragment) as record:
        fit(model, [EmbeddingConstraint(model.embedding, reference())], tmp_path, val=False)
    assert any("'embedding.parametrizations.weight.original'" in str(w.message) for w in record)


def test_parameters_based_groups_do_not_warn(tmp_path, recwarn) -> None:
    model = PLTinyLM()
    fit(model, [EmbeddingConstraint(model.embedding, reference())], tmp_path, val=False)
    assert not [w for w in recwarn if "EmbeddingConstraint" in str(w.message)]
