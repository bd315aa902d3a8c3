"""AWQ-style activation-aware scaling (after Lin et al. 2023, "AWQ: Activation-aware Weight
Quantization for LLM Compression and Acceleration").

Inputs with large activations matter more to a layer's output. Scaling input channel c of the
weight up by s_c (and the activation down by 1/s_c, folded into the op before: an RMSNorm's
weight, or the rows of the projection that produces the input) leaves the float layer unchanged
but gives those channels a finer share of the group's grid after rounding. s = mean|x|^alpha,
normalised to geometric-mean-of-extremes 1, with alpha searched on a grid to minimise the layer's
output error on the calibration inputs, computed exactly from H = X^T X as tr(dW H dW^T) (no
activations kept). alpha = 0 is plain round-to-nearest, so the search never does worse than RTN.
"""

from __future__ import annotations

import torch


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """||(W - W_hat) X^T||_F^2 = tr(dW H dW^T), from H = X^T X (float32 products, float64 sum)."""
    dw = (w - w_hat).float()
    return float(((dw @ h.float()) * dw).sum(dtype=torch.float64))


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    x = mean_abs.float().clamp(min=1e-5)
    s = x.pow(alpha)
    return s / torch.sqrt(s.max() * s.min())


def awq_search(w: torch.Tensor, h: torch.Tensor, mean_abs: torch.Tensor, grid,  # noqa: ANN001 - any grid
               n_grid: int = 20) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scale s (of mean_abs [K]) minimising the output error of
    round-to-nearest on `grid` (grid.rtn: a K-quant grid's own unweighted scale search) of W diag(s),
    undone by diag(1/s) on the input.

    Returns (s [K], alpha, error); alpha 0 (s = 1) is among the candidates."""
    w, h = w.detach().float(), h.float()
    best = (torch.ones(w.shape[1]), 0.0, float("inf"))
    for step in range(n_grid):
        alpha = step / n_grid
        s = awq_scales(mean_abs, alpha) if step else torch.ones(w.shape[1])
        w_hat = grid.dequantize(grid.rtn(w * s)) / s
        err = output_error(w, w_hat, h)
        if err < best[2]:
            best = (s, alpha, err)
    return best
