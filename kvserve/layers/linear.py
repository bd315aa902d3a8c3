"""Linear layers with weight loaders.

Fused projections (QKV, gate+up) are one GEMM; their loader copies each checkpoint tensor
into its slice so checkpoints with separate q/k/v tensors load unchanged. Tensor-parallel
sharding and quantized methods hook in here later.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.errors import ModelLoadError
from kvserve.quant.int4 import Int4Weight
from kvserve.quant.int8 import Int8Weight


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ModelLoadError(name, f"shape mismatch: checkpoint {tuple(src.shape)} vs model {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


class Linear(nn.Module):
    """y = x W^T (+ b). Weight layout [out_features, in_features].

    After loading, `quantize("int8" | "int4")` swaps the float weight for a quantized one
    (kvserve.quant).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.qweight: Int8Weight | Int4Weight | None = None

    def quantize(self, method: str) -> None:
        if method not in ("int8", "int4"):
            raise ValueError(f"unknown quantization method {method!r}")
        self.qweight = Int8Weight(self.weight) if method == "int8" else Int4Weight(self.weight)
        del self.weight
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight.matmul(x, self.bias)
        return F.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several projections of the same input stacked on the output dim (e.g. QKV, gate+up).

    `shard_sizes` maps a shard id to its output width, in stacking order.
    """

    def __init__(self, in_features: int, shard_sizes: dict[object, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: dict[object, tuple[int, int]] = {}
        off = 0
        for sid, size in shard_sizes.items():
            self.shard_offsets[sid] = (off, size)
            off += size

    def weight_loader(self, param: torch.Tensor, loaded: torch.Tensor, shard_id: object) -> None:
        """Copy one checkpoint tensor (e.g. k_proj) into its rows of the fused parameter."""
        off, size = self.shard_offsets[shard_id]
        _copy_checked(param.data.narrow(0, off, size), loaded, f"shard {shard_id}")
