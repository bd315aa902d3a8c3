"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): quantize a linear layer's weight column by column, pushing each column's rounding
error onto the columns not yet quantized through the inverse Hessian of the layer's inputs.

The layer's output error on calibration inputs X is tr(dW H dW^T) with H = X^T X. Columns are taken
in order; for column j with the upper Cholesky factor U of H^-1 (damped), the error
e = (w_j - q_j) / U_jj updates the rest of the row by -e U_j,j+1:. Updates inside a block of
`block` columns are applied at once, the block's accumulated errors reach the later columns in
one matrix product (the paper's lazy batch update). A group's scale and minimum are chosen from
the group's columns as they stand when its first column is reached (after the earlier groups'
updates), on the file's own grid (quant.grid, quant.kquant), so the codes GPTQ picks are the codes
written.
"""

from __future__ import annotations

import torch


def inverse_hessian_factor(h: torch.Tensor, damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of (H + damp mean(diag H) I)^-1, mask of dead inputs whose diagonal is 0)."""
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    k = h.shape[0]
    lam = damp * torch.mean(torch.diag(h))
    for attempt in range(6):  # a rank-deficient H (few calibration tokens) needs more damping
        try:
            lower = torch.linalg.cholesky(h + lam * (10**attempt) * torch.eye(k, dtype=h.dtype))
            hinv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(hinv, upper=True).float(), dead
        except torch.linalg.LinAlgError:
            continue
    raise ValueError("the calibration Hessian is not positive definite even when damped")


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, grid, block: int = 128,  # noqa: ANN001 - any grid
                  damp: float = 0.01, clip: bool = False, act_order: bool = False):  # noqa: ANN201
    """w [N, K] float, h [K, K] = X^T X of its inputs -> the grid's parts (BlockParts, or KParts on a
    K-quant grid; K a multiple of the grid's span: a group of 32, a super-block of 256).

    Each span's scales come from grid.fit on the span's columns as they stand when its first column
    is reached (after the earlier columns' updates); a K-quant span's factors and sub-block integers
    are all fixed then, and its columns are rounded on them one by one like any group's.
    clip: fit with the span's diagonal block of H (the weighted clipping / scale search) instead of
    the full range. act_order: take the columns in order of decreasing H_jj (the inputs with the
    most energy first, while the most columns are left to absorb their error); the spans stay the
    file's contiguous columns, so their grids are then fixed up front from the unchanged weight
    ("static groups")."""
    n, k = w.shape
    g, span = grid.group, grid.span
    block = -(-block // span) * span  # a span is fitted whole, inside one block
    if k % span:
        raise ValueError(f"rows of {k} must be whole groups of {span}")
    W = w.detach().float().clone()
    fits = [None] * (k // span)
    scales = torch.empty(n, k // g)
    mins = torch.empty(n, k // g)

    def fit(j: int, cols: torch.Tensor) -> None:  # columns j .. j + span
        f = grid.fit(cols, h[j : j + span, j : j + span].float() if clip else None)
        fits[j // span] = f
        scales[:, j // g : (j + span) // g], mins[:, j // g : (j + span) // g] = f.scale_min()

    perm = torch.arange(k)
    if act_order:
        for j in range(0, k, span):
            fit(j, W[:, j : j + span])
        perm = torch.argsort(torch.diag(h), descending=True)
        W, h = W[:, perm], h[perm][:, perm]
    u, dead = inverse_hessian_factor(h, damp)
    W[:, dead] = 0.0
    codes = torch.empty(n, k, dtype=torch.uint8)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            col_j = int(perm[j])  # the column's place in the file
            if not act_order and j % span == 0:  # the span's grid, from its columns as earlier errors left them
                fit(j, W1[:, i : i + span])
            s, m = scales[:, col_j // g], mins[:, col_j // g]
            col = W1[:, i]
            q = grid.codes(col, s, m)
            codes[:, col_j] = q.to(torch.uint8)
            e = (col - (q * s + m)) / u1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        W[:, i2:] -= err1 @ u[i1:i2, i2:]
    return grid.assemble(codes, fits)
