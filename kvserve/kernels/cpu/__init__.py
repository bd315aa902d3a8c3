"""Native CPU kernels (int8 GEMM, paged decode attention), compiled once with the system C compiler and called through ctypes.

No torch headers are involved, so a build takes about a second; the shared object is cached
under ``$KVSERVE_CACHE_DIR`` (default ``~/.cache/kvserve``) by a hash of source and flags.
Where there is no compiler or the CPU lacks AVX-512 VNNI, `available()` is False and callers
use their torch reference path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

_SRC = Path(__file__).with_name("qgemm.c")
_FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma",
          "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC"]
_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni")


def _cpu_supported() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 2)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return False
    return all(f in flags for f in _CPU_FLAGS)


def _cache_dir() -> Path:
    return Path(os.environ.get("KVSERVE_CACHE_DIR") or Path.home() / ".cache" / "kvserve")


def build(force: bool = False) -> Path:
    """Compile qgemm.c (if not cached) and return the shared object's path."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    key = hashlib.sha256(_SRC.read_bytes() + " ".join([cc, *_FLAGS]).encode()).hexdigest()[:16]
    out = _cache_dir() / f"kvserve_qgemm_{key}.so"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        res = subprocess.run([cc, *_FLAGS, str(_SRC), "-o", str(tmp_so)], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"compiling {_SRC.name} failed:\n{res.stderr.strip()}")
        os.replace(tmp_so, out)  # atomic: concurrent builders never see half a file
    logger.info("built %s", out)
    return out


@functools.cache
def _lib() -> ctypes.CDLL | None:
    if os.environ.get("KVSERVE_DISABLE_NATIVE") == "1" or not _cpu_supported():
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError) as e:
        logger.warning("native CPU kernels unavailable, using torch: %s", e)
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.kv_quantize_act.argtypes = [p, i64, i64, p, p]
    lib.kv_quantize_act.restype = None
    lib.kv_qgemm.argtypes = [p, p, i64, i64, p, p, p, i64, p]
    lib.kv_linear.argtypes = [p, i64, i64, p, p, p, i64, p]
    lib.kv_linear.restype = None
    lib.kv_pack_weight.argtypes = [p, i64, i64, p]
    lib.kv_pack_weight.restype = None
    lib.kv_qgemm.restype = None
    lib.kv_paged_decode_attention.argtypes = [p, p, p, p, p, ctypes.c_int, p, i64, p, i64, i64, i64, i64, i64,
                                              ctypes.c_float, p]
    lib.kv_paged_decode_attention.restype = None
    lib.kv_paged_prefill_attention.argtypes = [p, p, p, p, p, ctypes.c_int, p, i64, p, p, p, i64, i64, i64, i64, i64,
                                               ctypes.c_float, p]
    lib.kv_paged_prefill_attention.restype = None
    lib.kv_set_threads.argtypes = [ctypes.c_int]
    lib.kv_set_threads.restype = None
    lib.kv_quantize_act_s8.argtypes = [p, i64, i64, p, p, p]
    lib.kv_quantize_act_s8.restype = None
    lib.kv_pack_q4.argtypes = [p, p, p, i64, i64, p]
    lib.kv_pack_q4.restype = None
    lib.kv_linear_q4.argtypes = [p, i64, i64, p, i64, p]
    lib.kv_linear_q4.restype = None
    lib.kv_llama_decode.argtypes = [p, p, i64, p, i64, p, p, p, i64, p]
    lib.kv_llama_decode.restype = None
    return lib


def available() -> bool:
    return _lib() is not None


_threads = 0


def _ready_lib() -> ctypes.CDLL:
    """The library, its thread count following torch's (--num-threads) without a call per kernel."""
    global _threads
    lib = _lib()
    assert lib is not None
    n_threads = torch.get_num_threads()
    if n_threads != _threads:
        lib.kv_set_threads(n_threads)
        _threads = n_threads
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


GROUP = 32  # activation values per scale


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (round(x / scale) + 128 as uint8 [M, K padded to 32], scales [M, K/32])."""
    lib = _lib()
    assert lib is not None and x.dtype == torch.float32 and x.is_contiguous()
    m, k = x.shape
    g = -(-k // GROUP)
    xq = torch.empty((m, g * GROUP), dtype=torch.uint8)
    dx = torch.empty((m, g), dtype=torch.float32)
    lib.kv_quantize_act(x.data_ptr(), m, k, xq.data_ptr(), dx.data_ptr())
    return xq, dx


def pack_weight(wq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [N, K] -> the kernel's layout (blocks of 16 channels x groups of 4 k's, zero padded)
    and the offset correction -128 x each 32-group's sum, [N/16, K/32, 16] int32."""
    lib = _lib()
    assert lib is not None and wq.dtype == torch.int8
    wq = wq.contiguous()
    n, k = wq.shape
    n16, g = -(-n // 16), -(-k // GROUP)
    wp = torch.empty(n16 * g * GROUP * 16, dtype=torch.int8)
    lib.kv_pack_weight(wq.data_ptr(), n, k, wp.data_ptr())
    # -128 x each group's sum, computed a chunk of rows at a time (no int32 copy of a big weight)
    sums = torch.zeros(n16 * 16, g, dtype=torch.int32)
    for r in range(0, n, 4096):
        part = torch.nn.functional.pad(wq[r : r + 4096].to(torch.int32), (0, g * GROUP - k))
        sums[r : r + len(part)] = part.view(len(part), g, GROUP).sum(-1, dtype=torch.int32)
    corr = (-128 * sums.view(n16, 16, g)).transpose(1, 2).contiguous()
    return wp, corr


def qgemm(x: torch.Tensor, wp: torch.Tensor, dw: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
    """float32 [M, K] @ (int8 W [N, K] * dw [N])^T -> float32 [M, N], activations quantized per
    token in groups of 32. `wp`, `corr` come from `pack_weight`."""
    lib = _ready_lib()
    m, k = x.shape
    n = dw.shape[0]
    y = torch.empty((m, n), dtype=torch.float32)
    lib.kv_linear(x.data_ptr(), m, k, wp.data_ptr(), dw.data_ptr(), corr.data_ptr(), n, y.data_ptr())
    return y


Q4_GROUP_BYTES = 320  # per 16 channels x 32 inputs: 256 bytes of nibbles, 16 fp16 scales, 16 fp16 minimums


def quantize_act_s8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [M, K] float32 -> (round(x / scale) int8 [M, K padded to 32], scales [M, G], scale x group sums [M, G])."""
    lib = _lib()
    assert lib is not None and x.dtype == torch.float32 and x.is_contiguous()
    m, k = x.shape
    g = -(-k // GROUP)
    xq = torch.empty((m, g * GROUP), dtype=torch.int8)
    dx = torch.empty((m, g), dtype=torch.float32)
    xs = torch.empty((m, g), dtype=torch.float32)
    lib.kv_quantize_act_s8(x.data_ptr(), m, k, xq.data_ptr(), dx.data_ptr(), xs.data_ptr())
    return xq, dx, xs


def pack_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """4-bit codes q [N, K] (uint8, 0..15) with fp16 scales d and minimums m [N, K/32] -> the
    int4 kernel's interleaved layout (uint8)."""
    lib = _lib()
    assert lib is not None and q.dtype == torch.uint8 and d.dtype == m.dtype == torch.float16
    q, d, m = q.contiguous(), d.contiguous(), m.contiguous()
    n, k = q.shape
    out = torch.empty(-(-n // 16) * -(-k // GROUP) * Q4_GROUP_BYTES, dtype=torch.uint8)
    lib.kv_pack_q4(q.data_ptr(), d.data_ptr(), m.data_ptr(), n, k, out.data_ptr())
    return out


def q4gemm(x: torch.Tensor, wp: torch.Tensor, n: int) -> torch.Tensor:
    """float32 [M, K] @ (int4 W [N, K], packed by `pack_q4`)^T -> float32 [M, N]."""
    lib = _ready_lib()
    m, k = x.shape
    y = torch.empty((m, n), dtype=torch.float32)
    lib.kv_linear_q4(x.data_ptr(), m, k, wp.data_ptr(), n, y.data_ptr())
    return y


_CACHE_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.int8: 2}


def decode_attention_supported(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    return (available() and q.device.type == "cpu" and k_cache.dtype in _CACHE_DTYPES and q.shape[-1] % 16 == 0
            and q.shape[1] % k_cache.shape[2] == 0)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence, q [B, H, D] -> [B, H, D] (float32), reading the paged cache
    [num_blocks, block_size, Hkv, D] in place through block_tables [B, W] int32 and seq_lens [B] int32."""
    lib = _ready_lib()
    qf = q.to(torch.float32).contiguous()  # both return their input unchanged when it already fits
    b, h, d = qf.shape
    out = torch.empty_like(qf)
    bt = block_tables.to(torch.int32).contiguous()
    sl = seq_lens.to(torch.int32).contiguous()
    lib.kv_paged_decode_attention(qf.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale), _ptr(v_scale),
                                  _CACHE_DTYPES[k_cache.dtype], bt.data_ptr(), bt.shape[1], sl.data_ptr(), b, h,
                                  k_cache.shape[2], d, k_cache.shape[1], float(scale), out.data_ptr())
    return out


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            k_scale: torch.Tensor | None, v_scale: torch.Tensor | None, block_tables: torch.Tensor,
                            q_start: list[int], q_len: list[int], seq_lens: list[int], scale: float,
                            out: torch.Tensor) -> None:
    """Causal attention of several new tokens per sequence over their paged context, into `out`.

    q, out: [T, H, D] float32 (contiguous). Sequence b's new tokens are rows q_start[b] ..
    q_start[b] + q_len[b] - 1, the last q_len[b] of its seq_lens[b] positions, their K/V already
    in the cache; q_len[b] == 0 skips it (its rows of `out` are left as they are)."""
    lib = _ready_lib()
    assert q.dtype == out.dtype == torch.float32 and q.is_contiguous() and out.is_contiguous()
    t, h, d = q.shape
    bt = block_tables.to(torch.int32).contiguous()
    qs, ql, sl = (torch.tensor(v, dtype=torch.int32) for v in (q_start, q_len, seq_lens))
    lib.kv_paged_prefill_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), _ptr(k_scale), _ptr(v_scale),
                                   _CACHE_DTYPES[k_cache.dtype], bt.data_ptr(), bt.shape[1], qs.data_ptr(),
                                   ql.data_ptr(), sl.data_ptr(), len(q_len), h, k_cache.shape[2], d,
                                   k_cache.shape[1], float(scale), out.data_ptr())


# -- fused decode step (kv_llama_decode) ------------------------------------------------------
_P, _I64 = ctypes.c_void_p, ctypes.c_int64


class QLinearArgs(ctypes.Structure):
    _fields_ = [("kind", _I64), ("wp", _P), ("dw", _P), ("corr", _P), ("bias", _P), ("N", _I64), ("K", _I64)]


class LayerArgs(ctypes.Structure):
    _fields_ = [("ln1", _P), ("ln2", _P), ("q_norm", _P), ("k_norm", _P), ("qkv", QLinearArgs), ("o", QLinearArgs),
                ("gate_up", QLinearArgs), ("down", QLinearArgs), ("k_cache", _P), ("v_cache", _P),
                ("k_scale", _P), ("v_scale", _P)]


class ModelArgs(ctypes.Structure):
    _fields_ = [("hidden", _I64), ("n_heads", _I64), ("n_kv", _I64), ("head_dim", _I64), ("rot_dim", _I64),
                ("inter", _I64), ("block_size", _I64), ("eps", ctypes.c_float), ("attn_scale", ctypes.c_float),
                ("cache_dtype", ctypes.c_int32), ("cos", _P), ("sin", _P)]


def cache_dtype_code(dtype: torch.dtype) -> int | None:
    return _CACHE_DTYPES.get(dtype)


def llama_decode(model: ModelArgs, layers: ctypes.Array, x: torch.Tensor, positions: torch.Tensor,
                 slots: torch.Tensor, block_tables: torch.Tensor, seq_lens: torch.Tensor) -> None:
    """Run every layer of a batch of single-token sequences in place on the residual stream
    x [M, hidden] float32 (see kv_llama_decode in qgemm.c). positions/slots int64 [M],
    block_tables int32 [M, W], seq_lens int32 [M]; all contiguous."""
    lib = _ready_lib()
    lib.kv_llama_decode(ctypes.byref(model), layers, len(layers), x.data_ptr(), x.shape[0], positions.data_ptr(),
                        slots.data_ptr(), block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr())
