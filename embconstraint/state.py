"""Plain state dicts and files from constrained models."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["merged_state_dict"]


def merged_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The state dict an unconstrained ``module`` would have, with the merged weights.

    Keys and shapes are the plain ones (``...embedding.weight``, shape ``(V, D)``), and no
    tensor shares storage with the live model, so the result can be saved (``torch.save``,
    ``safetensors``) or loaded into a plain model.

    >>> import torch
    >>> from embconstraint import constrain
    >>> model = torch.nn.Sequential(constrain(torch.nn.Embedding(4, 2), torch.ones(1, 2)))
    >>> sd = merged_state_dict(model)
    >>> list(sd), tuple(sd["0.weight"].shape), torch.equal(sd["0.weight"][0], torch.ones(2))
    (['0.weight'], (4, 2), True)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    return {k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in module.state_dict().items()}
