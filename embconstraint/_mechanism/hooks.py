"""What a checkpoint of a constrained model looks like: plain keys, merged ``(V, D)`` weights.

The state-dict hooks that :func:`embconstraint.constrain` installs save a constrained (or tied)
weight under its plain key and load a plain weight back (free rows loaded, pinned rows checked
or, with ``on_mismatch="checkpoint"``, adopted); :func:`embconstraint.merged_state_dict` is the
detached copy.

Sharded (FSDP2) free rows: the saved weight is the merged ``(V, D)`` as a DTensor sharded on
dim 0 over the same mesh (the free rows are all-gathered once; each rank keeps its chunk), so
``get_model_state_dict`` (full or sharded) and DCP see the plain key; a loaded weight (plain or
DTensor) is sharded back the way the live free rows are, without communication.

Tensor parallelism (rows sharded over a mesh, see :mod:`.tensor_parallel`): the saved weight is the
``(V, D)`` DTensor sharded on rows that ``RowwiseParallel`` / ``ColwiseParallel`` would hold (this
rank's merged rows; with ``fully_shard`` on top, its free rows all-gathered over the data-parallel
mesh first); a loaded weight (plain or DTensor, all-gathered) gives this rank its rows.

DeepSpeed ZeRO-3 free rows, while partitioned (outside forward and ``GatheredParameters``): the
state dict keeps the raw key and DeepSpeed's placeholder, as for every other Parameter of a ZeRO-3
module (a ZeRO-3 checkpoint keeps the values in its optimizer partitions, by Parameter name);
gathered, the weight is saved merged under its plain key, as in one process.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from .._common import original_key
from ..exceptions import PinnedRowsError
from .parametrization import pin_of, tie_of
from .sharded import as_shards, full, like, zero_partitioned
from .tensor_parallel import as_global
from .weight import constant, plain

__all__ = ["install_hooks", "remove_hooks"]

_HOOKS = "_embconstraint_hooks"
_PREFIXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> prefix of the load under way


def install_hooks(module: nn.Module) -> None:
    """Install the save/load hooks on a constrained (or tied) ``module``."""
    setattr(
        module,
        _HOOKS,
        [
            module.register_state_dict_post_hook(_merged_keys),
            module.register_load_state_dict_pre_hook(_load_plain),
            module.register_load_state_dict_post_hook(_tied_not_missing),
        ],
    )


def remove_hooks(module: nn.Module) -> None:
    """Remove what :func:`install_hooks` installed."""
    for handle in getattr(module, _HOOKS, ()):
        handle.remove()
    if hasattr(module, _HOOKS):
        delattr(module, _HOOKS)


def _constrained_names(module: nn.Module):
    """(name, the embedding's pin) for each constrained or tied weight of ``module``; the pin is
    None for a tie whose embedding is no longer constrained (``remove_parametrizations`` on it:
    the tie is then a plain shared weight). Nothing once torch's ``remove_parametrizations``
    removed the module's own parametrization: the hooks then leave its state dict as torch's."""
    for name in list(getattr(module, "parametrizations", {}).keys()):
        pin, tie = pin_of(module, name), tie_of(module, name)
        if tie is not None:
            yield name, tie.pin if tie.live else None
        elif pin is not None:
            yield name, pin


def _merged_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """state_dict post-hook: a constrained (or tied) weight is saved under its plain key, as
    the merged ``(V, D)`` tensor, a :class:`~.weight.PinnedConstant`: it reads and saves as a plain
    tensor, and writes into it cannot move pinned rows. Nothing is copied for the prefix layout,
    and no view of a larger storage is saved."""
    for name, pin in _constrained_names(module):
        key = original_key(prefix, name)
        if key not in state_dict:
            continue
        value = state_dict.pop(key)
        if pin is None:  # a tie to a weight that is plain again: the shared Parameter, under the plain key
            state_dict[prefix + name] = value
            continue
        free = pin.free_parameter
        if zero_partitioned(
            free
        ):  # DeepSpeed ZeRO-3's placeholder: its checkpoints keep every Parameter by name
            state_dict[key] = value
            continue
        keep_vars = value is free  # state_dict(keep_vars=True): the weight itself, autograd-connected
        if pin.shard is not None:  # tensor parallel: the (V, D) DTensor sharded on rows the style would hold
            merged = as_global(pin.layout.to_user_order(pin.table(free)).detach(), pin.shard)
            state_dict[prefix + name] = merged
            continue
        if not pin.is_split(free):
            if keep_vars:
                with torch.enable_grad():  # (as a Parameter, whatever the grad mode)
                    state_dict[prefix + name] = getattr(module, name)
            else:  # guarded: writes into it go through the pinned-row check (no copy: prefix)
                state_dict[prefix + name] = constant(pin, free)
            continue
        merged = as_shards(pin.layout.to_user_order(pin.table(free)), free)
        state_dict[prefix + name] = merged if keep_vars else merged.detach()


def _load_plain(
    module: nn.Module,
    state_dict: dict,
    prefix: str,
    local_metadata,
    strict,
    missing_keys,
    unexpected_keys,
    error_msgs,
) -> None:
    """load_state_dict pre-hook: accept the plain ``weight`` key (what state_dict() writes and
    what an unconstrained model saves), loading its free rows and checking its pinned rows.
    A shape mismatch is reported the way torch reports one; pinned rows that differ raise
    :class:`PinnedRowsError` before this module's weight changes."""
    _PREFIXES[module] = prefix  # for _tied_not_missing
    for name, pin in _constrained_names(module):
        key, okey = prefix + name, original_key(prefix, name)
        if key not in state_dict:
            continue
        if pin is None:  # a tie to a weight that is plain again: loaded as the shared Parameter
            state_dict[okey] = state_dict.pop(key)
            continue
        value = full(state_dict.pop(key))  # (a collective for a DTensor: all ranks load)
        free, shard = pin.free_parameter, pin.shard
        expected = (pin.num_rows if shard is None else shard.num_rows, *free.shape[1:])
        if not isinstance(value, Tensor) or tuple(value.shape) != expected:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            error_msgs.append(
                f"size mismatch for {key}: copying a param with shape {shape} from checkpoint, "
                f"the shape in current model is {expected} (a constrained embedding)."
            )
            state_dict[okey] = free.detach()
            continue
        if shard is not None:  # tensor parallel: this rank's rows
            value = value[shard.lo : shard.hi]
        try:
            state_dict[okey] = like(pin.load_plain(plain(value), free, key), free)
        except PinnedRowsError as err:  # raised as it is (not collected): callers can catch it by type
            raise PinnedRowsError(
                f"{err}. Pass on_mismatch='checkpoint' to constrain() to take them from the checkpoint."
            ) from None


def _tied_not_missing(module: nn.Module, incompatible_keys) -> None:
    """load_state_dict post-hook: a constrained or tied weight that is missing is reported under
    its plain key (``0.weight``, ``lm_head.weight``), as the plain model would report it (a tied
    key a checkpoint left out, as ``save_pretrained`` and safetensors' ``save_model`` do, is then
    recognised by their loaders)."""
    prefix = _PREFIXES.pop(module, None)
    if prefix is None:
        return
    missing = incompatible_keys.missing_keys
    for name in list(getattr(module, "parametrizations", {}).keys()):
        key = original_key(prefix, name)
        if key in missing and (tie_of(module, name) is not None or pin_of(module, name) is not None):
            missing[missing.index(key)] = prefix + name
