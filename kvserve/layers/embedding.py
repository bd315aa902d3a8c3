"""Token embedding and LM head, vocab-parallel under tensor parallelism.

Each TP rank holds ceil(vocab / tp) consecutive rows (the last rank's tail zero-padded). The
embedding looks up the ids in its range, zeroes the others and all-reduces; the LM head
computes its slice of the logits and all-gathers them, so sampling sees the whole vocabulary.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.distributed.parallel_state import ParallelState, get_state, tp_all_gather_last, tp_all_reduce
from kvserve.layers.linear import Linear

if TYPE_CHECKING:
    from kvserve.quant.int8 import Int8Weight


def _vocab_range(vocab: int) -> tuple[int, int, int, ParallelState]:
    """(tp size, first id, rows per rank, the build's parallel state) of this rank's vocab slice."""
    st = get_state()
    per = -(-vocab // st.tp_size)
    return st.tp_size, st.tp_rank * per, per, st


def _shard_rows(loaded: torch.Tensor, start: int, per: int) -> torch.Tensor:
    rows = loaded[start : start + per]
    if rows.shape[0] < per:  # the last rank's tail past the vocabulary
        rows = torch.cat([rows, rows.new_zeros(per - rows.shape[0], *rows.shape[1:])])
    return rows


class VocabEmbedding(nn.Module):
    """Token embedding. With quantized weights (`quantize()`), the table is int8 with one scale per
    row and rows are dequantized on lookup: a quarter of the float table's memory, which on a small
    model is a large share of the total (SmolLM2: 113 of 135 MB of float32 weights outside the layers)."""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        self.tp_size, self.vocab_start, per, self.parallel = _vocab_range(num_embeddings)
        self.weight = nn.Parameter(torch.empty(per, dim), requires_grad=False)
        if self.tp_size > 1:
            self.weight.shard_loader = lambda t, _sid=None: _shard_rows(t, self.vocab_start, per)
        self.qweight: torch.Tensor | None = None
        self.scale: torch.Tensor | None = None
        self.shared: Int8Weight | None = None

    def quantize(self) -> None:
        """int8 rows with one scale each (load_model does this for quantized models without TP)."""
        assert self.tp_size == 1, "the int8 table is not sharded"
        from kvserve.quant.int8 import quantize_rows

        w = self.weight
        rows = getattr(w, "int8_rows", None)  # already quantized by the loader, the float never read
        self.qweight, self.scale = rows if rows is not None else quantize_rows(w)
        self.out_dtype = w.dtype
        del self.weight
        self.weight = None

    def share_with(self, head: "LMHead") -> None:
        """Quantize, and hand the int8 rows to a tied LM head: the head packs them for its GEMM and
        the lookups read the same packed bytes, so the table is held once (SmolLM2: 28 MB)."""
        from kvserve.quant.int8 import Int8Weight

        self.quantize()
        head.qweight = self.shared = Int8Weight(rows=(self.qweight, self.scale))
        head.weight = None
        self.qweight, self.scale = None, self.shared.scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            if self.shared.native and self.out_dtype == torch.float32 and ids.device.type == "cpu":
                from kvserve.kernels import cpu as native  # one call instead of ~10 small torch ops

                return native.embed_rows(self.shared.q, self.scale, self.shared.in_features, ids)
            return (self.shared.rows(ids).to(self.out_dtype) * self.scale[ids].unsqueeze(-1)).to(self.out_dtype)
        if self.qweight is not None:
            assert self.scale is not None
            return (self.qweight[ids].to(self.out_dtype) * self.scale[ids].unsqueeze(-1)).to(self.out_dtype)
        if self.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x.masked_fill_(outside.unsqueeze(-1), 0)
        return tp_all_reduce(x, self.parallel)


class LMHead(Linear):
    """Projects hidden states to vocabulary logits; may share its weight with the embedding
    (quantizing it then leaves the embedding's float weight alone)."""

    def __init__(self, vocab_size: int, dim: int) -> None:
        self.tp_size, start, per, parallel = _vocab_range(vocab_size)
        super().__init__(dim, per)
        self.parallel, self.vocab = parallel, vocab_size
        if self.tp_size > 1:
            self.weight.shard_loader = lambda t, _sid=None: _shard_rows(t, start, per)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        return tp_all_gather_last(super().forward(x), self.parallel)[..., : self.vocab]
