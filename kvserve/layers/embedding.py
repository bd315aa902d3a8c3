"""Token embedding and LM head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.layers.linear import Linear


class VocabEmbedding(nn.Module):
    """Token embedding. With quantized weights (`quantize()`), the table is int8 with one scale per
    row and rows are dequantized on lookup: a quarter of the float table's memory, which on a small
    model is a large share of the total (SmolLM2: 113 of 135 MB of float32 weights outside the layers)."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, dim), requires_grad=False)
        self.qweight: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None

    def quantize(self) -> None:
        w = self.weight
        self.qweight = torch.empty(w.shape, dtype=torch.int8)
        self.scale = torch.empty(w.shape[0], dtype=torch.float32)
        for r in range(0, w.shape[0], 4096):
            part = w[r : r + 4096].detach().float()
            s = part.abs().amax(dim=1) / 127.0
            self.scale[r : r + len(part)] = s
            self.qweight[r : r + len(part)] = torch.round(part / s.clamp_min(1e-30).unsqueeze(1)).clamp_(-127, 127)
        self.out_dtype = w.dtype
        del self.weight
        self.weight = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            assert self.scale is not None
            return (self.qweight[ids].to(self.out_dtype) * self.scale[ids].unsqueeze(-1)).to(self.out_dtype)
        return F.embedding(ids, self.weight)


class LMHead(Linear):
    """Projects hidden states to vocabulary logits; may share its weight with the embedding
    (quantizing it then leaves the embedding's float weight alone)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__(dim, vocab_size)
