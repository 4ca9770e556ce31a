"""Lightning integration: :class:`EmbeddingConstraint`, a callback that keeps rows of a
LightningModule's embedding pinned during ``fit``/``validate``/``test``/``predict``.

The callback (:mod:`.callback`) is glue; what it does is library code in :mod:`.support`, which
imports no Lightning package and is testable without a Trainer. One class serves both
``pytorch_lightning`` and ``lightning.pytorch``.

>>> import torch
>>> EmbeddingConstraint("encoder.tok_emb", torch.nn.Embedding(3, 4))
EmbeddingConstraint(embedding='encoder.tok_emb', pinned=3, on_mismatch='error')
"""

from __future__ import annotations

from .callback import LOG_KEY, EmbeddingConstraint

__all__ = ["EmbeddingConstraint", "LOG_KEY"]
