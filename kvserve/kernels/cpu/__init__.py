"""Native CPU kernels (int8, int4, 5/6/8-bit and few-row float32 GEMMs, paged attention, the fused decode step),
compiled once with the system C compiler for this CPU's ISA and called through ctypes.

One C source per concept (act_quant.c, gemm_q8.c, gemm_q4.c, gemm_wide.c, gemm_f32.c, attn_decode.c, attn_prefill.c,
llama_decode.c), all written against simd.h, whose vector layer has one implementation per ISA:
AVX-512 (VNNI), AVX2 (+FMA, F16C), ARM NEON (dotprod where present) and portable scalar C. A
variant is built per ISA (about a second each, cached under ``$KVSERVE_CACHE_DIR``, default
``~/.cache/kvserve``, by a hash of the sources and flags). The engine runs the best variant the
CPU reports (``KVSERVE_CPU_ISA=avx2`` picks another it can run); the scalar build is the
reference every variant is tested against. Without a compiler or a SIMD ISA, `available()` is
False and callers use their torch path.
"""

from kvserve.kernels.cpu.build import ISAS, NEON_FLAGS, SIMD_ISAS, best_isa, build, build_check_driver, supported_isas
from kvserve.kernels.cpu.build import _isa_flags  # noqa: F401 - the cross-ISA tests build host variants with it
from kvserve.kernels.cpu.library import (
    LayerArgs,
    ModelArgs,
    QLinearArgs,
    available,
    engine_isa,
    isa,
    load,
    use_isa,
)
from kvserve.kernels.cpu.ops import (
    GROUP,
    Q4_GROUP_BYTES,
    argmax_rows,
    cache_dtype_code,
    decode_attention_supported,
    embed_rows,
    f32_few_rows,
    linear_f32,
    llama_decode,
    llama_extend,
    mask_logits,
    pack_q4,
    pack_weight,
    pack_wide,
    paged_decode_attention,
    paged_prefill_attention,
    q4gemm,
    qgemm,
    quantize_act,
    quantize_act_s8,
    quantize_act_s8h,
    wide_gemm,
    wide_group_bytes,
)

__all__ = [
    "GROUP", "ISAS", "NEON_FLAGS", "Q4_GROUP_BYTES", "SIMD_ISAS", "LayerArgs", "ModelArgs", "QLinearArgs", "available",
    "best_isa", "build", "build_check_driver", "cache_dtype_code", "decode_attention_supported", "embed_rows",
    "engine_isa", "f32_few_rows", "isa", "linear_f32", "llama_decode", "llama_extend", "load", "pack_q4",
    "pack_weight", "paged_decode_attention", "paged_prefill_attention", "q4gemm",
    "qgemm", "quantize_act", "quantize_act_s8", "supported_isas", "use_isa", "pack_wide", "quantize_act_s8h",
    "wide_gemm", "wide_group_bytes", "mask_logits", "argmax_rows",
]
