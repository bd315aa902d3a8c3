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

from kvserve.quant.grid import Grid, dequantize_parts


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> float:
    """||(W - W_hat) X^T||_F^2 = tr(dW H dW^T), from H = X^T X (float32 products, float64 sum)."""
    dw = (w - w_hat).float()
    return float(((dw @ h.float()) * dw).sum(dtype=torch.float64))


def awq_scales(mean_abs: torch.Tensor, alpha: float, w_mean: torch.Tensor | None = None) -> torch.Tensor:
    """mean|x|^alpha (over w_mean^(1 - alpha) when given), normalised to sqrt(max * min) = 1."""
    s = mean_abs.float().clamp(min=1e-5).pow(alpha)
    if w_mean is not None:
        s = s / w_mean.float().clamp(min=1e-5).pow(1 - alpha)
    return s / torch.sqrt(s.max() * s.min())


def awq_search(w: torch.Tensor, h: torch.Tensor, mean_abs: torch.Tensor, grid: Grid,
               n_grid: int = 20, duo: bool = True) -> tuple[torch.Tensor, float, float]:
    """The per-input-channel scale s (of mean_abs [K]) minimising the output error of
    round-to-nearest on `grid` of W diag(s), undone by diag(1/s) on the input.

    Candidates: mean|x|^alpha for alpha in 0, 1/n_grid, ..., and with `duo` also
    mean|x|^alpha / mean|w|^(1 - alpha) (|w| relative to its row's largest, averaged over rows: the
    channels whose weights are already large need less help). Returns (s [K], alpha, error);
    s = 1 (plain RTN) is among the candidates, so the error never exceeds RTN's."""
    w, h = w.detach().float(), h.float()
    w_mean = (w.abs() / w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)).mean(0) if duo else None
    best = (torch.ones(w.shape[1]), 0.0, output_error(w, dequantize_parts(grid.quantize(w)), h))
    for step in range(1, n_grid):
        alpha = step / n_grid
        for wm in (None, w_mean) if duo else (None,):
            s = awq_scales(mean_abs, alpha, wm)
            err = output_error(w, dequantize_parts(grid.quantize(w * s)) / s, h)
            if err < best[2]:
                best = (s, alpha, err)
    return best
