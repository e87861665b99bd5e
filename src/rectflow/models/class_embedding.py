"""Class labels as an embedding, with a learned "no label" entry for classifier-free guidance.

Labels are integers in [0, num_classes); :data:`NULL_LABEL` (-1) means "unconditional" (label
dropout in training, the unconditional branch of guidance in sampling, theory §7.2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from rectflow.protocols import NULL_LABEL

__all__ = ["NULL_LABEL", "ClassEmbedding"]


class ClassEmbedding(nn.Module):
    """y (B,) int64 in [0, num_classes) or NULL_LABEL -> (B, dim); ``y=None`` embeds NULL_LABEL for all.

    Row ``num_classes`` of the table is the learned null embedding.  Out-of-range labels other
    than NULL_LABEL fail in the embedding lookup (no host sync is spent on checking them).
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"ClassEmbedding: num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, dim)
        nn.init.normal_(self.table.weight, std=0.02)

    def forward(self, y: Tensor | None, batch: int, device: torch.device) -> Tensor:
        if y is None:
            idx = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
        else:
            if y.shape != (batch,):
                raise ValueError(f"labels y must have shape ({batch},), got {tuple(y.shape)}")
            idx = y.long().masked_fill(y == NULL_LABEL, self.num_classes)
        return self.table(idx)
