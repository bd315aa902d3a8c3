"""GGUF block packers and round-to-nearest quantizers of the tests' own, for the formats gguf-py
only decodes (Q4_K, Q5_K, Q6_K): the bytes they write are checked against gguf.quants.dequantize,
the reference implementation."""

from __future__ import annotations

import numpy as np


def _f16_bytes(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float16).view(np.uint8).reshape(-1, 2)


def pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 sub-block scales and minimums (6 bits each) per super-block -> Q4_K/Q5_K's 12 bytes."""
    packed = np.zeros((sc.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = (sc[:, 0:4] & 0x3F) | ((sc[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = (mn[:, 0:4] & 0x3F) | ((mn[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return packed


def pack_q4_k(codes: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """codes [B, 256] in 0..15; d, dmin [B] fp16; sc, mn [B, 8] 6-bit sub-block scales and minimums."""
    b = codes.shape[0]
    c = codes.reshape(b, 4, 2, 32)  # chunk of 64: the first 32 in low nibbles, the next 32 in high
    qs = (c[:, :, 0] | (c[:, :, 1] << 4)).astype(np.uint8).reshape(b, 128)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), pack_k_scales(sc, mn), qs], axis=1)


def pack_q5_k(codes: np.ndarray, d: np.ndarray, dmin: np.ndarray, sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """codes [B, 256] in 0..31: Q4_K's nibbles plus one high bit each, bits 2c and 2c + 1 of qh[l]
    for elements 64c + l and 64c + 32 + l."""
    b = codes.shape[0]
    c = codes.reshape(b, 4, 2, 32)
    qs = ((c[:, :, 0] & 0xF) | ((c[:, :, 1] & 0xF) << 4)).astype(np.uint8).reshape(b, 128)
    qh = np.zeros((b, 32), dtype=np.uint8)
    for ch in range(4):
        qh |= (((c[:, ch, 0] >> 4) & 1) << (2 * ch)).astype(np.uint8)
        qh |= (((c[:, ch, 1] >> 4) & 1) << (2 * ch + 1)).astype(np.uint8)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), pack_k_scales(sc, mn), qh, qs], axis=1)


def pack_q6_k(codes: np.ndarray, sc: np.ndarray, d: np.ndarray) -> np.ndarray:
    """codes [B, 256] in 0..63 (w = d sc (q - 32)), sc [B, 16] int8 (one per 16 elements), d [B] fp16.
    Per half of 128, element 32t + l: low nibble in ql[l + 32 (t & 1)] (low for t < 2, high
    after), its top 2 bits at bit 2t of qh[l]."""
    b = codes.shape[0]
    c = codes.reshape(b, 2, 4, 32)
    ql = np.concatenate([(c[:, :, 0] & 0xF) | ((c[:, :, 2] & 0xF) << 4),
                         (c[:, :, 1] & 0xF) | ((c[:, :, 3] & 0xF) << 4)], axis=2).astype(np.uint8)  # [B, 2, 64]
    qh = np.zeros((b, 2, 32), dtype=np.uint8)
    for t in range(4):
        qh |= ((c[:, :, t] >> 4) << (2 * t)).astype(np.uint8)
    return np.concatenate([ql.reshape(b, 128), qh.reshape(b, 64), sc.astype(np.int8).view(np.uint8),
                           _f16_bytes(d)], axis=1)


def _k_min_max(x: np.ndarray, qmax: int):
    """Super-blocks [B, 8, 32] -> Q4_K/Q5_K's d, dmin (fp16) and 6-bit sub-block scales and minimums."""
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)
    scale, minimum = (hi - lo) / qmax, -lo
    d = (scale.max(-1) / 63).astype(np.float16)
    dmin = (minimum.max(-1) / 63).astype(np.float16)
    df, mf = np.maximum(d.astype(np.float32), 1e-12)[:, None], np.maximum(dmin.astype(np.float32), 1e-12)[:, None]
    sc = np.clip(np.rint(scale / df), 0, 63).astype(np.uint8)
    mn = np.clip(np.rint(minimum / mf), 0, 63).astype(np.uint8)
    step = np.maximum(d.astype(np.float32)[:, None] * sc, 1e-12)[..., None]
    q = np.clip(np.rint((x + (dmin.astype(np.float32)[:, None] * mn)[..., None]) / step), 0, qmax).astype(np.uint8)
    return q.reshape(-1, 256), d, dmin, sc, mn


def quantize(w: np.ndarray, qtype: str) -> np.ndarray:
    """float [N, K] (K a multiple of 256) -> GGUF blocks of `qtype` (Q4_K, Q5_K, Q6_K), round to nearest."""
    x = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, 256)
    if qtype == "Q4_K":
        return pack_q4_k(*_k_min_max(x.reshape(-1, 8, 32), 15)).reshape(w.shape[0], -1)
    if qtype == "Q5_K":
        return pack_q5_k(*_k_min_max(x.reshape(-1, 8, 32), 31)).reshape(w.shape[0], -1)
    if qtype == "Q6_K":
        sub = x.reshape(-1, 16, 16)
        scale = np.abs(sub).max(-1) / 31
        d = (scale.max(-1) / 127).astype(np.float16)
        sc = np.clip(np.rint(scale / np.maximum(d.astype(np.float32), 1e-12)[:, None]), 0, 127).astype(np.int8)
        step = np.maximum(d.astype(np.float32)[:, None] * sc, 1e-12)[..., None]
        q = np.clip(np.rint(sub / step) + 32, 0, 63).astype(np.uint8).reshape(-1, 256)
        return pack_q6_k(q, sc, d).reshape(w.shape[0], -1)
    raise ValueError(qtype)
