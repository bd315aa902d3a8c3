"""Pruning a linear layer's weight to a sparsity or an N:M pattern.

- magnitude: drop the smallest |w| of each output row;
- wanda (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language Models"):
  score |w_ij| * ||X_j||_2 (the input channel's norm over the calibration tokens), drop the lowest
  of each output row; no weight update;
- sparsegpt (Frantar and Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot"): GPTQ's column-by-column sweep with the same damped inverse-Hessian factor
  U (gptq.inverse_hessian_factor), where a pruned weight's "rounding" sets it to zero and its error
  (w / U_jj) is pushed onto the row's later columns. The mask is chosen block by block of 128 columns
  from the OBS score w^2 / U_jj^2 on the weights as the earlier blocks' updates left them (the paper's
  adaptive mask selection), per group of M columns for an N:M pattern.

Sparsity is per output row: floor(K * sparsity) weights of every row (so of the layer) are zero;
an N:M pattern keeps exactly N of every M consecutive inputs of each row.
"""

from __future__ import annotations

import torch

from kvserve.quant.gptq import inverse_hessian_factor

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(pattern: str) -> tuple[int, int]:
    """"2:4" -> (2 kept, of 4)."""
    try:
        n, m = (int(x) for x in pattern.split(":"))
    except ValueError:
        raise ValueError(f"pattern {pattern!r} is not N:M (e.g. 2:4)") from None
    if not 0 < n < m:
        raise ValueError(f"pattern {pattern!r}: need 0 < N < M")
    return n, m


def lowest_mask(scores: torch.Tensor, sparsity: float | None = None,
                pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """True where a weight is pruned: the lowest-scoring floor(K * sparsity) of each row, or the
    lowest M - N of each group of M consecutive columns."""
    n_rows, k = scores.shape
    mask = torch.zeros(n_rows, k, dtype=torch.bool)
    if pattern is not None:
        keep, m = pattern
        if k % m:
            raise ValueError(f"a row of {k} is not whole groups of {m}")
        idx = scores.reshape(n_rows, k // m, m).topk(m - keep, dim=2, largest=False).indices
        return mask.view(n_rows, k // m, m).scatter_(2, idx, True).view(n_rows, k)
    count = int(k * sparsity)
    if count:
        mask.scatter_(1, scores.topk(count, dim=1, largest=False).indices, True)
    return mask


def magnitude_prune(w: torch.Tensor, sparsity: float | None = None, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    w = w.detach().float()
    return w.masked_fill(lowest_mask(w.abs(), sparsity, pattern), 0.0)


def wanda_prune(w: torch.Tensor, col_norm: torch.Tensor, sparsity: float | None = None,
                pattern: tuple[int, int] | None = None) -> torch.Tensor:
    w = w.detach().float()
    return w.masked_fill(lowest_mask(w.abs() * col_norm.float().unsqueeze(0), sparsity, pattern), 0.0)


def sparsegpt_prune(w: torch.Tensor, h: torch.Tensor, sparsity: float | None = None,
                    pattern: tuple[int, int] | None = None, block: int = 128, damp: float = 0.01) -> torch.Tensor:
    """w [N, K], h = X^T X [K, K] -> the pruned and compensated weight."""
    n_rows, k = w.shape
    if pattern is not None and (block % pattern[1] or k % pattern[1]):
        raise ValueError(f"rows of {k} and blocks of {block} must be whole groups of {pattern[1]}")
    u, dead = inverse_hessian_factor(h, damp)
    W = w.detach().float().clone()
    W[:, dead] = 0.0
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1 = W[:, i1:i2].clone()
        err1 = torch.zeros_like(W1)
        u1 = u[i1:i2, i1:i2]
        d2 = torch.diag(u1).square().unsqueeze(0)
        if pattern is None:  # this block's share of each row's count, so rows total floor(K * sparsity)
            count = int(i2 * sparsity) - int(i1 * sparsity)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if count:
                mask1.scatter_(1, (W1.square() / d2).topk(count, dim=1, largest=False).indices, True)
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                m = pattern[1]
                sc = W1[:, i : i + m].square() / d2[:, i : i + m]
                mask1[:, i : i + m] = lowest_mask(sc, pattern=pattern)
            col = W1[:, i]
            q = col.masked_fill(mask1[:, i], 0.0)
            e = (col - q) / u1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            W1[:, i] = q  # exactly zero where pruned (the update leaves rounding residue)
            err1[:, i] = e
        W[:, i1:i2] = W1
        W[:, i2:] -= err1 @ u[i1:i2, i2:]
    return W
