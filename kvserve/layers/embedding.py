"""Token embedding and LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.layers.linear import Linear


class VocabEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class LMHead(Linear):
    """Projects hidden states to vocabulary logits; may share its weight with the embedding
    (quantizing it then leaves the embedding's float weight alone)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__(dim, vocab_size)
