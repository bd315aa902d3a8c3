"""Fused RMSNorm(+residual), SiLU-and-mul and rotary kernels against the torch layers they replace."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (see conftest.py)

from kvserve.kernels.triton.fused import rms_norm, rotary_embedding, silu_and_mul
from kvserve.layers.activation import SiluAndMul
from kvserve.layers.norm import RMSNorm
from kvserve.layers.rotary import RotaryEmbedding

# fp32: summation order only; bf16: about one unit in the last place (rsqrt/exp/sum order may flip
# one of the two roundings; 1.6e-2 is torch's own bf16 rtol)
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}


INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


def torch_layer(module, *args, **kw):
    """The layer's own torch path, even on a CUDA machine."""
    old = os.environ.get("KVSERVE_DISABLE_TRITON")
    os.environ["KVSERVE_DISABLE_TRITON"] = "1"
    try:
        return module(*args, **kw)
    finally:
        if old is None:
            del os.environ["KVSERVE_DISABLE_TRITON"]
        else:
            os.environ["KVSERVE_DISABLE_TRITON"] = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 96])  # 96: the tile is padded to 128 and masked
def test_rms_norm(dtype, dim):
    norm = RMSNorm(dim, eps=1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(rand(dim, seed=1) * 0.5 + 1)
    x = rand(7, dim, dtype=dtype) * 3
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), torch_layer(norm, x), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_with_residual(dtype):
    norm = RMSNorm(128, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(rand(128, seed=1))
    x, res = rand(5, 128, dtype=dtype, seed=2), rand(5, 128, dtype=dtype, seed=3)
    out, new_res = rms_norm(x, norm.weight, norm.eps, residual=res)
    want_out, want_res = torch_layer(norm, x, residual=res)
    if dtype == torch.float32 or not INTERPRETED:
        assert torch.equal(new_res, want_res)  # the sum is rounded to the dtype exactly as torch rounds it
    else:  # Triton's interpreter truncates fp32 -> bf16 casts (the GPU rounds to nearest even)
        torch.testing.assert_close(new_res, want_res, atol=0, rtol=2**-7)
    torch.testing.assert_close(out, want_out, **TOL[dtype])
    # and the layer semantics: norm(x + residual)
    torch.testing.assert_close(want_out, torch_layer(norm, x + res), atol=0, rtol=0)


def test_rms_norm_per_head_3d_noncontiguous():
    # Qwen3's q/k norm: [T, H, D] views of a fused projection
    norm = RMSNorm(32).to(DEVICE)
    qkv = rand(4, 3 * 4 * 32)
    q = qkv[:, : 4 * 32].reshape(4, 4, 32)
    torch.testing.assert_close(rms_norm(q, norm.weight, norm.eps), torch_layer(norm, q), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [96, 1500])  # 1500: two column programs, the second partly masked
def test_silu_and_mul(dtype, n):
    x = rand(3, 2 * n, dtype=dtype, seed=n) * 4
    got = silu_and_mul(x)
    assert got.shape == (3, n) and got.dtype == dtype
    torch.testing.assert_close(got, torch_layer(SiluAndMul(), x), **TOL[dtype])


def test_silu_and_mul_empty_batch():
    assert silu_and_mul(torch.empty(0, 8, device=DEVICE)).shape == (0, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,rotary_dim,heads", [(64, 64, (4, 2)), (128, 128, (3, 1)), (64, 32, (2, 2))],
                         ids=["d64", "d128", "partial"])
def test_rotary(dtype, head_dim, rotary_dim, heads):
    rope = RotaryEmbedding(head_dim, rotary_dim, 512, 10000.0,
                           {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 128}).to(DEVICE)
    h, hkv = heads
    positions = torch.tensor([0, 1, 17, 511, 300, 5], device=DEVICE)
    qkv = rand(6, (h + 2 * hkv) * head_dim, dtype=dtype, seed=head_dim) * 2
    q = qkv[:, : h * head_dim].view(6, h, head_dim)  # strided views, as the model passes them
    k = qkv[:, h * head_dim : (h + hkv) * head_dim].view(6, hkv, head_dim)
    got_q, got_k = rotary_embedding(positions, q, k, rope.cos_cached, rope.sin_cached, rotary_dim)
    want_q, want_k = torch_layer(rope, positions, q, k)
    torch.testing.assert_close(got_q, want_q, **TOL[dtype])
    torch.testing.assert_close(got_k, want_k, **TOL[dtype])
    if rotary_dim < head_dim:
        assert torch.equal(got_q[..., rotary_dim:], q[..., rotary_dim:])
    # position 0 is the identity
    torch.testing.assert_close(got_q[0], q[0], atol=0, rtol=0)
