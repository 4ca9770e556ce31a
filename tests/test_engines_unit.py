"""What DeepSpeed ZeRO and the transformers Trainer under ZeRO-3 need from embconstraint, in one
process (the engines themselves run in tests/test_deepspeed.py and tests/test_trainer_deepspeed.py):
state dicts whose free rows are named by Parameter (``merged_state_dict(module, state_dict)``,
``save_rows(..., state_dict=...)``, a constrained model's ``save_pretrained(state_dict=...)``), a
Parameter DeepSpeed manages taking the split storage; and the forward wrapper of transformers' tensor
parallelism recognised (its runs: tests/test_tensor_parallel.py)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from helpers import N, V, reference
from helpers.hf import tiny_llama_config
from torch import nn

from embconstraint import constrain, load_rows, merged_state_dict, save_rows
from embconstraint._mechanism import pin_of


def _tied_model():
    torch.manual_seed(0)
    model = nn.ModuleDict({"emb": nn.Embedding(V, 5), "head": nn.Linear(5, V, bias=False)})
    model["head"].weight = model["emb"].weight
    constrain(model["emb"], reference(), indices=[11, 0, 4, 7, 2, 9, 5], root=model)
    return model


def test_merged_state_dict_of_raw_entries_is_the_plain_model():
    model = _tied_model()
    raw = {
        n: p.detach().clone() + 1.0 for n, p in model.named_parameters()
    }  # "trained" free rows, by Parameter
    raw["head.parametrizations.weight.original"] = raw[
        "emb.parametrizations.weight.original"
    ]  # as DeepSpeed saves a tie
    plain = merged_state_dict(model, raw)
    assert sorted(plain) == ["emb.weight", "head.weight"]
    assert plain["head.weight"] is plain["emb.weight"]  # one tensor: transformers drops the tied key
    # the reference: write the same free rows into the model, read its merged weight
    with torch.no_grad():
        pin_of(model["emb"]).free_parameter.copy_(raw["emb.parametrizations.weight.original"])
    assert torch.equal(plain["emb.weight"], model["emb"].weight)
    assert torch.equal(plain["emb.weight"][[11, 0, 4, 7, 2, 9, 5]], reference())  # pinned rows bitwise


def test_merged_state_dict_refuses_bad_state_dicts():
    model = _tied_model()
    with pytest.raises(TypeError, match="state_dict must be a dict"):
        merged_state_dict(model, [("emb.weight", torch.zeros(1))])
    with pytest.raises(
        ValueError, match=r"state_dict\['emb.parametrizations.weight.original'\] has shape \(3, 5\)"
    ):
        merged_state_dict(model, {"emb.parametrizations.weight.original": torch.zeros(3, 5)})
    kept = {"other": torch.ones(2), "emb.weight": torch.zeros(V, 5)}  # plain entries pass as they are
    assert merged_state_dict(model, kept) == kept


def test_save_rows_from_a_state_dict(tmp_path):
    model = nn.ModuleDict({"emb": constrain(nn.Embedding(V, 5), reference())})
    raw = {"emb.parametrizations.weight.original": torch.full((V - N, 5), 2.0)}
    assert save_rows(model, tmp_path / "raw.safetensors", state_dict=raw) == ["emb.weight"]
    merged = merged_state_dict(model, raw)
    assert save_rows(model, tmp_path / "plain.safetensors", state_dict=merged) == ["emb.weight"]
    for name in ("raw", "plain"):
        target = nn.ModuleDict({"emb": nn.Embedding(V, 5)})
        with torch.no_grad():
            target["emb"].weight[:N] = reference()
        load_rows(target, tmp_path / f"{name}.safetensors")
        assert torch.equal(target["emb"].weight, merged["emb.weight"])
    with pytest.raises(
        ValueError, match="holds neither 'emb.weight' nor 'emb.parametrizations.weight.original'"
    ):
        save_rows(model, tmp_path / "none.safetensors", state_dict={})


def test_save_pretrained_of_a_raw_state_dict_writes_the_plain_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    from embconstraint.hf import constrain_new_tokens

    cfg = tiny_llama_config(12, 8, tied=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    constrain_new_tokens(model, 10)
    raw = {n: p.detach().clone() for n, p in model.named_parameters()}  # what DeepSpeed's consolidation holds
    model.save_pretrained(tmp_path, state_dict=raw)
    plain = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in merged_state_dict(model).items())


@pytest.mark.parametrize("attribute", ["ds_id", "_hp_mapping"])
def test_a_parameter_deepspeed_manages_takes_the_split_storage(attribute):
    """ZeRO-3 marks its Parameters with ds_id, ZeRO-1/2 with _hp_mapping, and moves their data into
    buffers of its own: the table is dropped and the Parameter left where DeepSpeed put it (not
    re-pointed to a rebuilt table), the lookup bitwise the aliased one, the same gradient."""
    torch.manual_seed(0)
    aliased = constrain(nn.Embedding(V, 5), reference())
    managed = constrain(nn.Embedding(V, 5), reference())
    with torch.no_grad():
        managed.parametrizations.weight.original.copy_(aliased.parametrizations.weight.original)
    free = pin_of(managed).free_parameter
    # what DeepSpeed does to it: data moved into a buffer of its own (ZeRO-1/2: a view of the flat buffer;
    # ZeRO-3: the gathered rows), and its mark
    flat = torch.zeros(free.numel() + 3)
    flat[3:] = free.detach().reshape(-1)
    free.data = flat[3:].view(free.shape)
    setattr(free, attribute, object() if attribute == "_hp_mapping" else 7)
    ptr = free.data_ptr()
    ids = torch.tensor([0, 3, 8, V - 1])
    assert torch.equal(managed(ids), aliased(ids))
    assert pin_of(managed).storage == "split" and free.data_ptr() == ptr  # not re-pointed to a table
    managed(ids).sum().backward()
    aliased(ids).sum().backward()
    assert torch.equal(free.grad, pin_of(aliased).free_parameter.grad)


def test_transformers_tp_forward_wrapper_is_recognised_or_refused():
    from embconstraint._mechanism import hf_styled_forward

    class Style:
        def transform_inputs_pre_forward(self, module, args, kwargs, mesh):
            return args, kwargs

        def context_around_forward(self, module, mesh):
            return contextlib.nullcontext()

        def transform_output_post_forward(self, module, output, mesh):
            return output

        def install_forward(self, module, mesh):  # transformers' TensorParallelLayer.install_forward
            original_forward = module.forward

            def tp_forward(*args, **kwargs):
                args, kwargs = self.transform_inputs_pre_forward(module, args, kwargs, mesh)
                with self.context_around_forward(module, mesh):
                    output = original_forward(*args, **kwargs)
                return self.transform_output_post_forward(module, output, mesh)

            module.forward = tp_forward
            module._is_hooked = True

    plain = nn.Embedding(4, 2)
    assert hf_styled_forward(plain) is None
    style, mesh = Style(), object()
    styled = nn.Embedding(4, 2)
    style.install_forward(styled, mesh)
    found = hf_styled_forward(styled)
    assert found is not None and found[0] is style and found[2] is mesh
    assert found[1].__func__ is nn.Embedding.forward and found[1].__self__ is styled  # the module's own
    other = nn.Embedding(4, 2)
    other.forward = lambda ids: ids  # another wrapper: left to the hooks
    assert hf_styled_forward(other) is None
    other._is_hooked = True  # ... unless transformers marked the module as its own
    with pytest.raises(ValueError, match="parallelize_module"):
        hf_styled_forward(other)
