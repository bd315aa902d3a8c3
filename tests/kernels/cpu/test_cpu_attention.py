"""The native CPU paged attention kernels (decode, and prefill/extend) against the torch backend's SDPA paths."""

from __future__ import annotations

import pytest
import torch

from kvserve.kernels import cpu as native
from kvserve.kernels.testing import clone_cache, make_case
from kvserve.layers.attention import KVCache, TorchAttentionBackend
from kvserve.layers.attention.cpu_native import CPUNativeAttentionBackend

pytestmark = pytest.mark.skipif(not native.available(), reason="no C compiler or no SIMD ISA (AVX-512, AVX2, NEON)")

CASES = [  # (query lens, seq lens): decodes only, and decodes mixed with prefill/extend
    ([1], [1]),
    ([1, 1, 1], [16, 17, 33]),
    ([1, 1, 1, 1], [5, 200, 31, 64]),
    ([3, 1, 7, 1], [3, 40, 20, 9]),
    ([33, 1, 70, 5], [700, 90, 70, 5]),  # an extend after a long cached prefix, a whole prompt, a short tail
]


def _run(case, cache_dtype: torch.dtype, use_native: bool, monkeypatch) -> tuple[torch.Tensor, KVCache]:
    t = clone_cache(case.kv_cache)
    if cache_dtype in (torch.bfloat16, torch.float16):
        t = tuple(x.to(cache_dtype) for x in t)
    cache = KVCache(*t)
    backend = CPUNativeAttentionBackend() if use_native else TorchAttentionBackend()
    return backend.run(case.q, case.k, case.v, cache, case.meta, 0.125), cache


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8, torch.float16])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 64), (9, 3, 64), (8, 1, 128), (10, 2, 32)])
@pytest.mark.parametrize("lens", CASES)
def test_native_decode_matches_sdpa(monkeypatch, cache_dtype, heads, kv_heads, head_dim, lens):
    q_lens, seq_lens = lens
    case = make_case(q_lens, seq_lens, heads, kv_heads, head_dim, block_size=16, int8=cache_dtype == torch.int8,
                     seed=len(seq_lens) + heads)
    calls = []
    real, real_pf = native.paged_decode_attention, native.paged_prefill_attention
    monkeypatch.setattr(native, "paged_decode_attention", lambda *a: calls.append("decode") or real(*a))
    monkeypatch.setattr(native, "paged_prefill_attention", lambda *a: calls.append("prefill") or real_pf(*a))
    got, got_cache = _run(case, cache_dtype, True, monkeypatch)
    want, want_cache = _run(case, cache_dtype, False, monkeypatch)
    assert "decode" in calls, "the native decode kernel was not used"
    assert ("prefill" in calls) == any(n > 1 for n in q_lens)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(got_cache.tensors(), want_cache.tensors()))


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 32), (8, 2, 128)])
def test_native_prefill_matches_sdpa(monkeypatch, block_size, heads, kv_heads, head_dim):
    """Prompts and extends of every size around the kernel's 32-token chunks and 64-key panels."""
    q_lens, seq_lens = [2, 31, 32, 33, 64, 65, 100, 7], [2, 31, 95, 200, 64, 300, 100, 1000]
    case = make_case(q_lens, seq_lens, heads, kv_heads, head_dim, block_size=block_size, seed=block_size + heads)
    calls = []
    real = native.paged_prefill_attention
    monkeypatch.setattr(native, "paged_prefill_attention", lambda *a: calls.append(1) or real(*a))
    got, _ = _run(case, torch.float32, True, monkeypatch)
    want, _ = _run(case, torch.float32, False, monkeypatch)
    assert calls == [1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
