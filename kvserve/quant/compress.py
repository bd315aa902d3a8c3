"""Calibrated compression of a loaded float model, layer by layer, and its export as a GGUF.

`quantize_model` runs RTN, GPTQ or AWQ-style scaling + RTN over the decoder layers (calibrate.
run_layers), leaves each compressed linear's dequantized weight in the model (so later layers
calibrate on the compressed model's activations, and the model in memory is what the file holds)
and returns the codes chosen per linear. `write_gguf` writes them in a source GGUF's tensor order
and metadata, with the untouched tensors (token embedding, output norm, ...) copied byte for byte.

AWQ's scales are folded exactly: q/k/v's input scale into input_layernorm's weight, gate/up's into
post_attention_layernorm's, o_proj's into v_proj's rows (one scale per KV head's channel: the query
heads sharing a KV head share it), down_proj's into up_proj's rows (silu(gate) * up is linear in up).

A K-quant grid (Q3_K, Q2_K) needs rows of whole 256-input super-blocks; a linear whose input is not
(SmolLM2's 576-wide hidden size: every linear but down_proj) takes the `fallback` grid instead, as
llama.cpp's own quantizer does (it falls back to Q4_0 for these formats).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kvserve.loader import LoadedModel
from kvserve.quant.awq import awq_search, output_error
from kvserve.quant.calibrate import LINEARS, LinearStats, run_layers
from kvserve.quant.gguf import BlockParts
from kvserve.quant.gptq import gptq_quantize
from kvserve.quant.grid import FILE_TYPES, Grid, dequantize_parts
from kvserve.quant.kquant import KGrid

logger = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "awq")
# GPTQ as kvserve runs it: columns by decreasing H_jj with the file's groups' grids fixed up front
# (clipping searched per group), damping 10% of mean(H_jj). On SmolLM2-135M with 2048 calibration
# tokens (fewer than down_proj's 1536 inputs x a few) these gave the lowest *held-out* per-layer
# errors: 0.14-0.61 of RTN's, against 0.31-1.05 for the paper's defaults (in order, damping 1%).
GPTQ_OPTIONS = {"act_order": True, "clip": True, "damp": 0.1}
# On the K-quant grids (SmolLM2: down_proj only), damping 30%: per-layer errors on validation text (the
# calibration text past its first 2048 tokens; neither those tokens nor the benchmark's held-out
# text), layers 0, 3, 7, 12, 20, 29, as a fraction of RTN's: Q3_K 0.55 against 0.59 at 10% (1.0: 0.57),
# Q2_K 0.53 against 0.57; without act_order within 0.02 of these.
GPTQ_K_OPTIONS = {"act_order": True, "clip": True, "damp": 0.3}


@dataclass
class LinearReport:
    name: str  # kvserve module path, e.g. model.layers.3.self_attn.qkv_proj
    rel_error: float | None  # ||(W - W_hat) X^T||^2 / ||W X^T||^2 on the layer's calibration inputs
    alpha: float | None = None  # AWQ's chosen exponent


@dataclass
class Compressed:
    method: str
    grid: Grid | None  # None: the linears are written dense (`dense_type`) from the model's weights
    parts: dict[str, BlockParts] = field(default_factory=dict)  # module path -> codes (fused rows)
    reports: list[LinearReport] = field(default_factory=list)
    calib_tokens: int = 0
    dense_type: str = "F32"
    grids: dict[str, object] = field(default_factory=dict)  # module path -> the grid of its parts
    fallback: Grid | None = None  # where `grid` does not fit a linear's rows

    def grid_of(self, path: str):  # noqa: ANN201 - a Grid or a KGrid
        return self.grids.get(path, self.grid)

    def type_counts(self) -> dict[str, tuple[int, int]]:
        """GGUF type -> (linears, weights) of the quantized linears."""
        out: dict[str, tuple[int, int]] = {}
        for path, p in self.parts.items():
            t = self.grid_of(path).qtype
            c, n = out.get(t, (0, 0))
            out[t] = (c + 1, n + p.codes.numel())
        return out


def _tied_mean_abs(mean_abs: torch.Tensor, n_heads: int, n_kv: int, head_dim: int) -> torch.Tensor:
    """o_proj's input channels (head h, dim d) with one value per (KV head, d), averaged over its query heads."""
    m = mean_abs.float().view(n_kv, n_heads // n_kv, head_dim)
    return m.mean(1, keepdim=True).expand_as(m).reshape(-1)


@torch.no_grad()
def awq_fold(lm: LoadedModel, layer: nn.Module, stats: dict[str, LinearStats], grid,  # noqa: ANN001
             n_grid: int = 20) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Search and fold AWQ scales into one decoder layer (the float layer's function is unchanged).
    grid: one grid, or {linear name: grid}.

    Returns per linear (column scale s, row scale r, alpha): the original weight is
    diag(r) W_now diag(1/s), used to measure errors in the original basis."""
    grids = grid if isinstance(grid, dict) else dict.fromkeys(LINEARS, grid)
    cfg = lm.config
    attn, mlp = layer.self_attn, layer.mlp
    qkv, o, gate_up, down = attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj
    rows = {n: torch.ones(layer.get_submodule(n).out_features) for n in LINEARS}
    out = {}
    # o_proj, folded into v's rows (v changes before q/k/v are searched)
    ma = _tied_mean_abs(stats["self_attn.o_proj"].mean_abs, attn.num_heads, attn.num_kv_heads, cfg.head_dim)
    s, alpha, _ = awq_search(o.weight, stats["self_attn.o_proj"].h, ma, grids["self_attn.o_proj"], n_grid)
    s_kv = s.view(attn.num_kv_heads, attn.num_heads // attn.num_kv_heads, cfg.head_dim)[:, 0].reshape(-1)
    off, size = qkv.shard_offsets["v"]
    o.weight.mul_(s)
    qkv.weight[off : off + size].div_(s_kv.unsqueeze(1))
    if qkv.bias is not None:
        qkv.bias[off : off + size].div_(s_kv)
    rows["self_attn.qkv_proj"][off : off + size] = s_kv
    out["self_attn.o_proj"] = (s, alpha)
    # down_proj, folded into up's rows
    s, alpha, _ = awq_search(down.weight, stats["mlp.down_proj"].h, stats["mlp.down_proj"].mean_abs,
                             grids["mlp.down_proj"], n_grid)
    off, size = gate_up.shard_offsets[1]
    down.weight.mul_(s)
    gate_up.weight[off : off + size].div_(s.unsqueeze(1))
    if gate_up.bias is not None:
        gate_up.bias[off : off + size].div_(s)
    rows["mlp.gate_up_proj"][off : off + size] = s
    out["mlp.down_proj"] = (s, alpha)
    # q/k/v and gate/up, folded into the RMSNorms before them
    for name, norm in (("self_attn.qkv_proj", layer.input_layernorm), ("mlp.gate_up_proj", layer.post_attention_layernorm)):
        lin = layer.get_submodule(name)
        s, alpha, _ = awq_search(lin.weight, stats[name].h, stats[name].mean_abs, grids[name], n_grid)
        lin.weight.mul_(s)
        norm.weight.div_(s)
        out[name] = (s, alpha)
    return {n: (out[n][0], rows[n], out[n][1]) for n in LINEARS}


def quantize_model(lm: LoadedModel, method: str, grid, chunks: list[list[int]] | None,  # noqa: ANN001
                   n_grid: int = 20, num_layers: int | None = None, fallback: Grid | None = None) -> Compressed:
    """Quantize every decoder layer's linears of the float model `lm` in place (their weights become
    the dequantized codes) and return the codes. grid: quant.grid.grid_for's; fallback: the grid of
    linears whose rows `grid` does not fit (a K-quant's 256-input super-blocks), else a ValueError;
    chunks: calibration token chunks (None: RTN only); num_layers: only the first layers (a partial
    result, which write_gguf refuses)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}")
    if method != "rtn" and chunks is None:
        raise ValueError(f"{method} needs calibration text")
    comp = Compressed(method, grid, calib_tokens=sum(map(len, chunks)) if chunks else 0, fallback=fallback)

    def grid_for_linear(lin: nn.Module):  # noqa: ANN202
        if grid.fits(lin.in_features):
            return grid
        if fallback is None or not fallback.fits(lin.in_features):
            raise ValueError(f"{grid.qtype} needs rows of whole blocks of {grid.span}, not {lin.in_features}"
                             + ("" if fallback is None else f" (nor does the fallback {fallback.qtype} fit)"))
        return fallback

    def process(i: int, layer: nn.Module, stats: dict[str, LinearStats] | None) -> None:
        with torch.no_grad():
            grids = {name: grid_for_linear(layer.get_submodule(name)) for name in LINEARS}
            originals = {n: layer.get_submodule(n).weight.detach().clone() for n in LINEARS} if stats else {}
            folded = awq_fold(lm, layer, stats, grids, n_grid) if method == "awq" else {}
            for name in LINEARS:
                lin, g = layer.get_submodule(name), grids[name]
                if method == "gptq":
                    opts = GPTQ_K_OPTIONS if isinstance(g, KGrid) else GPTQ_OPTIONS
                    parts = gptq_quantize(lin.weight, stats[name].h, g, **opts)
                elif method == "awq":  # the scaled weight's inputs are x / s: H becomes H / (s s^T)
                    s = folded[name][0]
                    h_s = stats[name].h.float() / (s.unsqueeze(1) * s.unsqueeze(0))
                    parts = g.rtn(lin.weight, h_s)
                else:
                    parts = g.rtn(lin.weight)
                w_hat = g.dequantize(parts)
                lin.weight.copy_(w_hat)
                comp.parts[f"model.layers.{i}.{name}"] = parts
                comp.grids[f"model.layers.{i}.{name}"] = g
                rel = alpha = None
                if stats:
                    if name in folded:
                        s, r, alpha = folded[name]
                        w_hat = w_hat * r.unsqueeze(1) / s.unsqueeze(0)
                    w0, h = originals[name], stats[name].h
                    rel = output_error(w0, w_hat, h) / max(output_error(w0, torch.zeros_like(w0), h), 1e-30)
                comp.reports.append(LinearReport(f"model.layers.{i}.{name}", rel, alpha))

    run_layers(lm, chunks, process, f"{method} {grid.qtype}", num_layers)
    return comp


def prune_model(lm: LoadedModel, method: str, chunks: list[list[int]] | None, sparsity: float | None = None,
                pattern: tuple[int, int] | None = None, grid: Grid | None = None,
                num_layers: int | None = None) -> Compressed:
    """Prune every decoder layer's linears of `lm` in place (quant.prune), then, with `grid`,
    round the pruned weights to it (prune, then quantize: zeros stay zero on Q4_0 and Q8_0, whose
    grids hold 0; Q4_1's need not). chunks: calibration chunks (None: magnitude only)."""
    from kvserve.quant.prune import PRUNE_METHODS, magnitude_prune, sparsegpt_prune, wanda_prune

    if method not in PRUNE_METHODS:
        raise ValueError(f"unknown pruning method {method!r}")
    if method != "magnitude" and chunks is None:
        raise ValueError(f"{method} needs calibration text")
    if (sparsity is None) == (pattern is None):
        raise ValueError("give a sparsity or a pattern")
    comp = Compressed(method, grid, calib_tokens=sum(map(len, chunks)) if chunks else 0)

    def process(i: int, layer: nn.Module, stats: dict[str, LinearStats] | None) -> None:
        with torch.no_grad():
            for name in LINEARS:
                lin = layer.get_submodule(name)
                w0 = lin.weight.detach().clone()
                if method == "magnitude":
                    w = magnitude_prune(w0, sparsity, pattern)
                elif method == "wanda":
                    w = wanda_prune(w0, stats[name].col_norm, sparsity, pattern)
                else:
                    w = sparsegpt_prune(w0, stats[name].h, sparsity, pattern)
                if grid is not None:
                    parts = grid.quantize(w)
                    comp.parts[f"model.layers.{i}.{name}"] = parts
                    w = dequantize_parts(parts)
                lin.weight.copy_(w)
                rel = None
                if stats:
                    h = stats[name].h
                    rel = output_error(w0, w, h) / max(output_error(w0, torch.zeros_like(w0), h), 1e-30)
                comp.reports.append(LinearReport(f"model.layers.{i}.{name}", rel))

    run_layers(lm, chunks, process, f"{method} prune", num_layers)
    return comp


# -- export --------------------------------------------------------------------------------------------

# GGUF tensor of a decoder layer -> (kvserve module path, shard id or None)
_GGUF_LINEARS = {
    "attn_q": ("self_attn.qkv_proj", "q"), "attn_k": ("self_attn.qkv_proj", "k"), "attn_v": ("self_attn.qkv_proj", "v"),
    "attn_output": ("self_attn.o_proj", None), "ffn_gate": ("mlp.gate_up_proj", 0), "ffn_up": ("mlp.gate_up_proj", 1),
    "ffn_down": ("mlp.down_proj", None),
}
_DENSE = {"F32": np.float32, "F16": np.float16}
_GGUF_NORMS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _rows(t: torch.Tensor, lin: nn.Module, shard: object) -> torch.Tensor:
    if shard is None:
        return t
    off, size = lin.shard_offsets[shard]
    return t[off : off + size]


def write_gguf(src, lm: LoadedModel, comp: Compressed, out: str | Path,  # noqa: ANN001 - a GGUFFile
               extra_fields: dict[str, object] | None = None) -> Path:
    """Write `comp`'s codes as a GGUF with `src`'s metadata and tensor order; norms (which AWQ
    changes) and biases from the model as F32; every other tensor copied from `src` as stored."""
    from kvserve.loader.gguf import permute_qk
    from kvserve.loader.gguf_writer import GGUFWriter

    out = Path(out)
    w = GGUFWriter(out, alignment=int(src.get("general.alignment", 32)))
    for key, value in src.reader.fields.items():
        vtype, etype = src.reader.field_types[key]
        w.add_field(key, value, vtype, etype)
    qtype = comp.dense_type if comp.grid is None else comp.grid.qtype
    if qtype in FILE_TYPES:
        w.add_field("general.file_type", FILE_TYPES[qtype], 4)
    for key, value in (extra_fields or {}).items():
        w.add_field(key, value)
    layers = lm.model.model.layers
    permute = src.architecture == "llama"
    cfg = lm.config
    for t in src.reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        base, _, suffix = t.name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LINEARS:
            i, kind = int(parts[1]), parts[2]
            path, shard = _GGUF_LINEARS[kind]
            lin = layers[i].get_submodule(path)
            heads = cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads
            if suffix == "weight" and comp.grid is None:  # dense, from the model
                x = _rows(lin.weight.detach().float(), lin, shard)
                if permute and kind in ("attn_q", "attn_k"):
                    x = permute_qk(x, heads)
                w.add_tensor(t.name, shape, comp.dense_type, x.numpy().astype(_DENSE[comp.dense_type]))
                continue
            if suffix == "weight":
                if f"model.layers.{i}.{path}" not in comp.parts:
                    raise ValueError(f"layer {i} was not compressed")
                p = comp.parts[f"model.layers.{i}.{path}"].rows(lambda x, lin=lin, s=shard: _rows(x, lin, s))
                if permute and kind in ("attn_q", "attn_k"):
                    p = p.rows(lambda x, h=heads: permute_qk(x, h))
                g = comp.grid_of(f"model.layers.{i}.{path}")
                w.add_tensor(t.name, shape, g.qtype, g.pack(p))
                continue
            if suffix == "bias" and lin.bias is not None:
                b = _rows(lin.bias.detach().float(), lin, shard)
                if permute and kind in ("attn_q", "attn_k"):
                    b = permute_qk(b, heads)
                w.add_tensor(t.name, shape, "F32", b.numpy())
                continue
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_NORMS and suffix == "weight":
            norm = getattr(layers[int(parts[1])], _GGUF_NORMS[parts[2]])
            w.add_tensor(t.name, shape, "F32", norm.weight.detach().float().numpy())
            continue
        w.add_tensor(t.name, shape, t.tensor_type.name, t.data)
    w.write()
    return out
