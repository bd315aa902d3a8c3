"""Triton paged attention (write K/V, decode, extend, the backend) against the torch reference backend."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # CPU: the interpreter (see conftest.py)

from kvserve.kernels import testing
from kvserve.kernels.testing import clone_cache, dequantize_int8, quantize_int8, torch_reference
from kvserve.kernels.triton.backend import TritonAttentionBackend
from kvserve.kernels.triton.decode_attention import paged_decode_attention
from kvserve.kernels.triton.extend_attention import paged_extend_attention
from kvserve.kernels.triton.kv_write import write_kv

ATOL = 2e-5  # float32 everywhere: only the summation order differs
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def make_case(*args, **kw):
    return testing.make_case(*args, device=DEVICE, **kw)


def run_triton(case, scale, **backend_kw):
    cache = clone_cache(case.kv_cache)
    out = TritonAttentionBackend(**backend_kw).run(case.q, case.k, case.v, cache, case.meta, scale)
    return out, cache


# -- write_kv -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_float_matches_index_copy(dtype):
    case = make_case([5, 1, 17], [21, 16, 17], 4, 2, 64, block_size=16, dtype=dtype)
    _, ref_cache = torch_reference(case, 0.125)  # the torch backend writes with index_copy_
    cache = clone_cache(case.kv_cache)
    write_kv(case.k, case.v, cache[0], cache[1], case.meta.slot_mapping)
    assert torch.equal(cache[0], ref_cache[0]) and torch.equal(cache[1], ref_cache[1])


def test_write_kv_int8_matches_torch_quantizer():
    case = make_case([3, 1, 9], [19, 1, 9], 4, 2, 128, block_size=8, int8=True)
    cache = clone_cache(case.kv_cache)
    write_kv(case.k, case.v, *cache[:2], case.meta.slot_mapping, *cache[2:])
    _, ref = torch_reference(case, 0.1)
    slots = case.meta.slot_mapping
    for got, want in zip(cache, ref):
        assert torch.equal(got.flatten(0, 1)[slots], want.flatten(0, 1)[slots])
    # the rest of the cache is untouched
    assert torch.equal(cache[0], ref[0]) and torch.equal(cache[3], ref[3])
    # and the round trip is within half a step of the original
    kq, ks = cache[0].flatten(0, 1)[slots], cache[2].flatten(0, 1)[slots]
    err = (dequantize_int8(kq, ks) - case.k.float()).abs()
    assert (err <= ks.unsqueeze(-1) * 0.5 + 1e-6).all()


def test_round_half_even_on_exact_ties():
    # rows whose amax is 127 give scale 1, so x / scale are the exact ties themselves
    k = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.49, 127.0] + [0.0] * 8], device=DEVICE).view(1, 1, 16)
    k_cache = torch.zeros(1, 4, 1, 16, dtype=torch.int8, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    ks = torch.zeros(1, 4, 1, device=DEVICE)
    vs = torch.zeros_like(ks)
    write_kv(k, k.clone(), k_cache, v_cache, torch.tensor([2], device=DEVICE), ks, vs)
    want, want_scale = quantize_int8(k)
    assert torch.equal(k_cache[0, 2], want[0]) and torch.equal(ks[0, 2], want_scale[0])
    assert k_cache[0, 2, 0, :7].tolist() == [0, 2, 2, 0, -2, -2, 3]


# -- attention ------------------------------------------------------------------------------------

CASES = {
    # name: (query_lens, seq_lens, block_size)
    "single_token": ([1], [1], 16),
    "decode_shorter_than_block": ([1, 1, 1], [3, 7, 15], 16),
    "decode_block_boundaries": ([1, 1, 1, 1], [16, 17, 32, 33], 16),
    "prefill_one_block_exact": ([16], [16], 16),
    "prefill_varlen": ([5, 20, 1, 33], [5, 20, 1, 33], 8),
    "extend_over_prefix": ([7, 16, 3], [23, 48, 19], 16),
    "mixed_decode_extend": ([1, 12, 1, 40, 1], [30, 12, 1, 70, 64], 16),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 1)], ids=["gqa1", "gqa3", "gqa8"])
def test_backend_matches_torch(name, heads):
    qlens, slens, bs = CASES[name]
    h, hkv = heads
    case = make_case(qlens, slens, h, hkv, 64, block_size=bs, seed=len(name))
    want, want_cache = torch_reference(case, 0.125)
    got, cache = run_triton(case, 0.125)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(cache, want_cache))


@pytest.mark.parametrize("head_dim", [64, 128])
def test_head_dims(head_dim):
    case = make_case([1, 9, 1], [40, 25, 3], 8, 2, head_dim, block_size=16, seed=head_dim)
    want, _ = torch_reference(case, head_dim**-0.5)
    got, _ = run_triton(case, head_dim**-0.5)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


def test_non_power_of_two_head_dim_and_block_size():
    case = make_case([1, 6], [27, 20], 6, 3, 48, block_size=12, seed=3)
    want, _ = torch_reference(case, 0.2)
    got, _ = run_triton(case, 0.2)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 8])
def test_flash_decoding_splits_agree(num_splits):
    # seq 2 has fewer BLOCK_N tiles than splits: its trailing splits are empty and must weigh nothing
    case = make_case([1, 1, 1], [150, 97, 20], 8, 2, 64, block_size=16, seed=11)
    want, _ = torch_reference(case, 0.125)
    cache = clone_cache(case.kv_cache)
    write_kv(case.k, case.v, cache[0], cache[1], case.meta.slot_mapping)
    out = torch.full_like(case.q, float("nan"))
    seq_ids = torch.arange(3, dtype=torch.int32, device=DEVICE)
    m = case.meta
    paged_decode_attention(case.q, cache[0], cache[1], m.block_tables, m.seq_lens, m.query_start_loc, seq_ids, out,
                           0.125, num_splits=num_splits, block_n=16)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("block_m,block_n", [(16, 16), (32, 16), (16, 32)])
def test_extend_multi_tile(block_m, block_n):
    # several query tiles per sequence, tiles past a short sequence's rows, key tiles not aligned to blocks
    case = make_case([37, 50, 3], [60, 50, 40], 4, 2, 64, block_size=8, seed=13)
    want, _ = torch_reference(case, 0.125)
    cache = clone_cache(case.kv_cache)
    write_kv(case.k, case.v, cache[0], cache[1], case.meta.slot_mapping)
    out = torch.full_like(case.q, float("nan"))
    m = case.meta
    paged_extend_attention(case.q, cache[0], cache[1], m.block_tables, m.seq_lens, m.query_start_loc,
                           torch.arange(3, dtype=torch.int32, device=DEVICE), 50, out, 0.125,
                           block_m=block_m, block_n=block_n)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=1e-4)


def test_decode_only_touches_its_rows():
    # a decode between two extends: rows of other sequences are left for the extend kernel
    case = make_case([4, 1, 4], [4, 9, 4], 4, 2, 64, seed=5)
    want, _ = torch_reference(case, 0.125)
    cache = clone_cache(case.kv_cache)
    write_kv(case.k, case.v, cache[0], cache[1], case.meta.slot_mapping)
    out = torch.full_like(case.q, float("nan"))
    m = case.meta
    paged_decode_attention(case.q, cache[0], cache[1], m.block_tables, m.seq_lens, m.query_start_loc,
                           torch.tensor([1], dtype=torch.int32, device=DEVICE), out, 0.125, num_splits=2)
    torch.testing.assert_close(out[4], want[4], atol=ATOL, rtol=1e-4)
    assert out[:4].isnan().all() and out[5:].isnan().all()


@pytest.mark.parametrize("heads", [(4, 4), (8, 1)], ids=["gqa1", "gqa8"])
def test_int8_kv_matches_dequantized_reference(heads):
    h, hkv = heads
    case = make_case([1, 10, 1], [33, 26, 5], h, hkv, 64, block_size=16, int8=True, seed=7)
    want, want_cache = torch_reference(case, 0.125)
    got, cache = run_triton(case, 0.125)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(cache, want_cache))


def test_bfloat16_within_bf16_tolerance():
    case = make_case([1, 18, 1], [45, 30, 2], 6, 2, 64, dtype=torch.bfloat16, seed=9)
    want32, _ = torch_reference(make_case([1, 18, 1], [45, 30, 2], 6, 2, 64, seed=9), 0.125)
    got, _ = run_triton(case, 0.125)
    assert got.dtype == torch.bfloat16
    # the bf16 inputs are the fp32 inputs rounded: compare against the fp32 answer
    torch.testing.assert_close(got.float(), want32, atol=3e-2, rtol=3e-2)


def test_no_cache_falls_back_to_torch():
    from kvserve.layers.attention import AttentionMetadata, TorchAttentionBackend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(9, h, 64, generator=g).to(DEVICE) for h in (4, 2, 2))
    meta = AttentionMetadata.for_prefill([4, 5], DEVICE)
    want = TorchAttentionBackend().run(q, k, v, None, meta, 0.125)
    assert torch.equal(TritonAttentionBackend().run(q, k, v, None, meta, 0.125), want)


def test_int8_cache_without_scales_is_rejected():
    from kvserve.errors import InvalidRequestError

    case = make_case([1], [4], 2, 2, 64, int8=True)
    with pytest.raises(InvalidRequestError):
        TritonAttentionBackend().run(case.q, case.k, case.v, case.kv_cache[:2], case.meta, 0.1)


# -- a cache dtype other than the model's (resolve_kv_dtype allows any of float32/bfloat16/float16) --------


@pytest.mark.parametrize("model_dtype,kv_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                  (torch.bfloat16, torch.float16), (torch.bfloat16, torch.float32)],
                         ids=["fp32-bf16kv", "fp32-fp16kv", "bf16-fp16kv", "bf16-fp32kv"])
@pytest.mark.parametrize("name", ["mixed_decode_extend", "extend_over_prefix"])
def test_cache_dtype_other_than_model_dtype(model_dtype, kv_dtype, name):
    """The kernels read K/V in q's dtype, as the torch backend does (its gather/read take q.dtype)."""
    from kvserve.layers.attention import AttentionMetadata, KVCache, TorchAttentionBackend

    qlens, slens, bs = CASES[name]
    case = make_case(qlens, slens, 6, 2, 64, block_size=bs, dtype=model_dtype, seed=21)
    case = dataclasses.replace(case, kv_cache=tuple(t.to(kv_dtype) for t in case.kv_cache))
    _, want_cache = torch_reference(case, 0.125)
    got, cache = run_triton(case, 0.125)
    assert got.dtype == model_dtype and cache[0].dtype == kv_dtype
    for a, b in zip(cache, want_cache):
        if INTERPRETED and model_dtype == torch.float32 and kv_dtype == torch.bfloat16:
            # the interpreter narrows fp32 to bf16 by truncation (compiled kernels round to nearest even)
            torch.testing.assert_close(a, b, atol=0, rtol=2**-7)
        else:
            assert torch.equal(a, b)
    # attention alone, over the cache the kernel wrote: the torch backend reads it in q's dtype
    m = case.meta
    meta = AttentionMetadata(m.query_start_loc, m.seq_lens, m.query_lens_cpu, m.seq_lens_cpu, None, m.block_tables)
    want = TorchAttentionBackend().run(case.q, case.k, case.v, KVCache(*cache), meta, 0.125)
    if model_dtype == torch.float32:
        # the same products of the same (rounded) K/V, in fp32: only the summation order differs
        torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    else:
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
