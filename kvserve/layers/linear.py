"""Linear layers with weight loaders.

Fused projections (QKV, gate+up) are one GEMM; their loader copies each checkpoint tensor
into its slice so checkpoints with separate q/k/v tensors load unchanged.

Tensor parallelism (Megatron): a column-parallel layer keeps its rank's rows of the output
(each rank computes its heads / its share of the MLP), a row-parallel layer keeps its rank's
columns of the input and sums the partial products with one all-reduce. The slicing happens at
load time, by a `shard_loader` attached to the parameter, so a rank only ever holds its slice;
quantizing after load quantizes that slice. At TP=1 both are plain `Linear`s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvserve.distributed.parallel_state import get_state, tp_all_reduce
from kvserve.errors import ModelLoadError
from kvserve.kernels.cpu import ops as cpu_ops
from kvserve.quant.gguf import BlockParts
from kvserve.quant.int4 import Int4Weight
from kvserve.quant.int8 import Int8Weight
from kvserve.quant.wide import WideWeight


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ModelLoadError(name, f"shape mismatch: checkpoint {tuple(src.shape)} vs model {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def float_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T (+ b) for float weights: a float32 step of few tokens on the CPU (a decode step, a speculative
    verify) by the native kernel that reads W once for all rows, anything else by torch."""
    if (x.dtype == torch.float32 and w.dtype == torch.float32 and x.device.type == "cpu"
            and 0 < x.numel() <= cpu_ops.f32_few_rows() * w.shape[1] and w.is_contiguous()):
        return cpu_ops.linear_f32(x, w, bias)
    return F.linear(x, w, bias)


class Linear(nn.Module):
    """y = x W^T (+ b). Weight layout [out_features, in_features].

    After loading, `quantize("gguf" | "int8" | "int4")` swaps the float weight for a quantized
    one (kvserve.quant).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.qweight: Int8Weight | Int4Weight | WideWeight | None = None

    def quantize(self, method: str, fallback: str = "int8") -> None:
        """int8 / int4 quantize the float weight (int4 takes a 4-bit checkpoint's own codes as they
        are); gguf runs the checkpoint's own codes in whatever format they are, else `fallback`."""
        if method not in ("gguf", "int8", "int4"):
            raise ValueError(f"unknown quantization method {method!r}")
        parts = self._gguf_parts() if method in ("gguf", "int4") else None  # int8 never reads them
        if method == "gguf" and parts is not None:
            self.qweight = Int4Weight(parts=parts.q4()) if parts.bits == 4 else WideWeight(parts)
        elif method == "gguf":
            return self.quantize(fallback)
        elif method == "int8":  # rows the loader quantized already (an LM head) or the float weight
            rows = getattr(self.weight, "int8_rows", None)
            self.qweight = Int8Weight(rows=rows) if rows is not None else Int8Weight(self.weight)
        else:  # a 4-bit checkpoint's own codes when every row has them, else quantized from the floats
            self.qweight = Int4Weight(self.weight, parts=parts.q4() if parts is not None and parts.bits == 4 else None)
        del self.weight
        self.weight = None

    def _gguf_parts(self) -> BlockParts | None:
        parts = getattr(self.weight, "gguf_parts", None)
        shards = getattr(self.weight, "gguf_shards", None)
        offsets = getattr(self, "shard_offsets", None)
        if parts is None and shards is not None and offsets is not None and set(shards) == set(offsets):
            parts = BlockParts.cat([shards[sid] for sid in sorted(offsets, key=lambda sid: offsets[sid][0])])
        if parts is None or parts.shape != (self.out_features, self.in_features):
            return None
        return parts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return self.qweight.matmul(x, self.bias)
        return float_linear(x, self.weight, self.bias)


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
        if hasattr(loaded, "gguf_parts"):  # kept for quantize(): the checkpoint's own codes
            if not hasattr(param, "gguf_shards"):
                param.gguf_shards = {}
            param.gguf_shards[shard_id] = loaded.gguf_parts


class RowParallelLinear(Linear):
    """Input dim split across TP ranks (o_proj, down_proj); one all-reduce sums the partial outputs."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        st = get_state()
        self.tp_size, self.tp_rank = st.tp_size, st.tp_rank
        super().__init__(in_features // self.tp_size, out_features, bias)
        self.parallel = st
        self.weight.shard_loader = self._shard

    def _shard(self, loaded: torch.Tensor, shard_id: object = None) -> torch.Tensor:
        n = self.in_features
        return loaded if self.tp_size == 1 else loaded.narrow(1, self.tp_rank * n, n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        y = self.qweight.matmul(x) if self.qweight is not None else F.linear(x, self.weight)
        tp_all_reduce(y, self.parallel)
        return y if self.bias is None else y + self.bias  # the bias once, not once per rank


class ColumnParallelMergedLinear(MergedLinear):
    """A fused projection whose every shard (q, k, v / gate, up) is split by rows across TP ranks.

    `shards` maps a shard id to (local width, first checkpoint row of this rank's slice); KV
    shards replicated over several ranks simply start at the same row on those ranks.
    """

    def __init__(self, in_features: int, shards: dict[object, tuple[int, int]], bias: bool = False) -> None:
        super().__init__(in_features, {sid: size for sid, (size, _) in shards.items()}, bias)
        self.ckpt_start = {sid: start for sid, (_, start) in shards.items()}
        self.weight.shard_loader = self._shard
        if self.bias is not None:
            self.bias.shard_loader = self._shard

    def _shard(self, loaded: torch.Tensor, shard_id: object) -> torch.Tensor:
        _, size = self.shard_offsets[shard_id]
        if loaded.shape[0] == size and self.ckpt_start[shard_id] == 0:
            return loaded
        return loaded.narrow(0, self.ckpt_start[shard_id], size)
