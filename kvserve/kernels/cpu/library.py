"""The loaded library: the variant the engine runs, ctypes signatures and struct mirrors, threads."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import platform
from collections.abc import Iterator

import torch

from kvserve.kernels.cpu.build import SIMD_ISAS, _isa_flags, build, supported_isas

logger = logging.getLogger(__name__)

# -- the fused decode step's argument structs (common.h), checked against C at load
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
                ("cache_dtype", ctypes.c_int32), ("cos", _P), ("sin", _P), ("final_norm", _P)]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    sigs = {  # name: (argument types, result type)
        "kv_isa": ([], ctypes.c_char_p),
        "kv_set_threads": ([i32], None),
        "kv_struct_sizes": ([p], None),
        "kv_quantize_act": ([p, i64, i64, p, p], None),
        "kv_qgemm": ([p, p, i64, i64, p, p, p, i64, p], i32),
        "kv_linear": ([p, i64, i64, p, p, p, i64, p], i32),
        "kv_pack_weight": ([p, i64, i64, p], None),
        "kv_embed_rows": ([p, p, i64, p, i64, p], None),
        "kv_pack_weight_inplace": ([p, i64, i64], i32),
        "kv_paged_decode_attention": ([p, p, p, p, p, i32, p, i64, p, i64, i64, i64, i64, i64, ctypes.c_float, p], i32),
        "kv_paged_prefill_attention": ([p, p, p, p, p, i32, p, i64, p, p, p, i64, i64, i64, i64, i64,
                                        ctypes.c_float, p], i32),
        "kv_quantize_act_s8": ([p, i64, i64, p, p, p], None),
        "kv_pack_q4": ([p, p, p, i64, i64, p], None),
        "kv_linear_q4": ([p, i64, i64, p, i64, p], i32),
        "kv_linear_f32": ([p, i64, i64, p, p, i64, p], i32),
        "kv_quantize_act_s8h": ([p, i64, i64, p, p, p, p], None),
        "kv_to_f16": ([p, i64, p], None),
        "kv_mask_logits": ([p, i64, i64, p, i64, p, i64], None),
        "kv_argmax_rows": ([p, i64, i64, i64, p], None),
        "kv_pack_wide": ([p, p, p, i64, i64, i64, p], None),
        "kv_linear_wide": ([p, i64, i64, p, i64, i64, p], i32),
        "kv_llama_decode": ([p, p, i64, p, i64, p, p, p, i64, p], i32),
        "kv_llama_extend": ([p, p, i64, p, i64, p, p, p, i64, p, p, p, i64], i32),
    }
    for name, (args, res) in sigs.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, res
    sizes = (ctypes.c_int64 * 3)()
    lib.kv_struct_sizes(sizes)
    want = [ctypes.sizeof(QLinearArgs), ctypes.sizeof(LayerArgs), ctypes.sizeof(ModelArgs)]
    if list(sizes) != want:
        raise RuntimeError(f"kernel structs differ from their ctypes mirrors: C {list(sizes)} vs Python {want}")
    return lib


@functools.cache
def load(isa: str) -> ctypes.CDLL:
    """The kernels built for `isa` (tests run each variant this CPU has against the scalar one)."""
    lib = _declare(ctypes.CDLL(str(build(isa))))
    assert lib.kv_isa().decode() == isa
    return lib


def engine_isa() -> str | None:
    """The variant the engine runs: $KVSERVE_CPU_ISA if set, else the best SIMD ISA this CPU has (None: none)."""
    forced = os.environ.get("KVSERVE_CPU_ISA")
    if forced:
        if _isa_flags(forced) is None:
            logger.warning("KVSERVE_CPU_ISA=%s: this CPU cannot run it; using the best it can", forced)
        else:
            return forced
    simd = [isa for isa in supported_isas() if isa in SIMD_ISAS]
    return simd[0] if simd else None


_current: ctypes.CDLL | None = None  # set by use_isa() in tests


@functools.cache
def _engine_lib() -> ctypes.CDLL | None:
    if os.environ.get("KVSERVE_DISABLE_NATIVE") == "1":
        return None
    isa = engine_isa()
    if isa is None:
        logger.info("native CPU kernels: no supported SIMD ISA on this CPU (%s); using torch", platform.machine())
        return None
    try:
        lib = load(isa)
    except (RuntimeError, OSError) as e:
        logger.warning("native CPU kernels unavailable, using torch: %s", e)
        return None
    logger.info("native CPU kernels: %s", isa)
    return lib


def _lib() -> ctypes.CDLL | None:
    return _current if _current is not None else _engine_lib()


def isa() -> str | None:
    """The ISA of the kernels in use (None: no native kernels)."""
    lib = _lib()
    return None if lib is None else lib.kv_isa().decode()


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[None]:
    """Run the kernels of another variant inside the block (tests)."""
    global _current, _threads
    before, _current, _threads = _current, load(name), 0
    try:
        yield
    finally:
        _current, _threads = before, 0


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise MemoryError(f"native {what}: out of memory for its scratch buffers")


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
