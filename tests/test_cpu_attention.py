"""The native CPU paged decode attention against the padded SDPA path of the torch backend."""

from __future__ import annotations

import pytest
import torch

from kvserve.kernels import cpu as native
from kvserve.kernels.testing import clone_cache, make_case
from kvserve.layers.attention import KVCache, TorchAttentionBackend

pytestmark = pytest.mark.skipif(not native.available(), reason="no AVX-512 VNNI or no C compiler")

CASES = [  # (query lens, seq lens): decodes only, and decodes mixed with prefill/extend
    ([1], [1]),
    ([1, 1, 1], [16, 17, 33]),
    ([1, 1, 1, 1], [5, 200, 31, 64]),
    ([3, 1, 7, 1], [3, 40, 20, 9]),
]


def _run(case, cache_dtype: torch.dtype, use_native: bool, monkeypatch) -> tuple[torch.Tensor, KVCache]:
    t = clone_cache(case.kv_cache)
    if cache_dtype == torch.bfloat16:
        t = tuple(x.to(torch.bfloat16) for x in t)
    cache = KVCache(*t)
    with monkeypatch.context() as m:
        if not use_native:
            m.setattr(native, "decode_attention_supported", lambda *a: False)
        out = TorchAttentionBackend().forward(case.q, case.k, case.v, cache, case.meta, 0.125)
    return out, cache


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(4, 4, 64), (9, 3, 64), (8, 1, 128)])
@pytest.mark.parametrize("lens", CASES)
def test_native_decode_matches_sdpa(monkeypatch, cache_dtype, heads, kv_heads, head_dim, lens):
    q_lens, seq_lens = lens
    case = make_case(q_lens, seq_lens, heads, kv_heads, head_dim, block_size=16, int8=cache_dtype == torch.int8,
                     seed=len(seq_lens) + heads)
    calls = []
    real = native.paged_decode_attention
    monkeypatch.setattr(native, "paged_decode_attention", lambda *a: calls.append(1) or real(*a))
    got, got_cache = _run(case, cache_dtype, True, monkeypatch)
    want, want_cache = _run(case, cache_dtype, False, monkeypatch)
    assert calls, "the native kernel was not used"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(got_cache.tensors(), want_cache.tensors()))


def test_native_decode_rows_do_not_depend_on_the_batch():
    case = make_case([1] * 6, [3, 50, 17, 16, 90, 1], 9, 3, 64, seed=3)
    cache = KVCache(*case.kv_cache)
    q = case.q.contiguous()
    tables, lens = case.meta.block_tables, case.meta.seq_lens
    full = native.paged_decode_attention(q, cache.k, cache.v, None, None, tables, lens, 0.125)
    for i in range(6):
        one = native.paged_decode_attention(q[i : i + 1], cache.k, cache.v, None, None, tables[i : i + 1],
                                            lens[i : i + 1], 0.125)
        assert torch.equal(one, full[i : i + 1])
