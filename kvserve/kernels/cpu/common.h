/* What the kernel files share: the activation group size, the fused step's argument structs
 * (mirrored by ctypes structures in __init__.py, checked by kv_struct_sizes at load) and the
 * kernels one file calls in another. */
#ifndef KV_COMMON_H
#define KV_COMMON_H

#include <stdint.h>
#include <stdlib.h>

#include "simd.h"

#define GROUP 32 /* activation values per scale */

/* A weight tile's stream ahead of its reads. A tile reads NR blocks of channels side by side, group
 * g of each (a block: G groups of `gbytes`, blocks back to back, a thread's tiles in order), so it
 * fetches group g + ahead of each block, and past its last group the same group of the next tile's
 * blocks: stopping at the tile's end, every block's first groups waited on memory (an AVX-512 int4
 * tile of 2 blocks over K = 576 streamed 12-13 GB/s where one stream read 16). Into L2: a core's L1
 * misses alone do not keep enough lines in flight (Zen 4, the default model's 120 GEMVs at M = 1: L1
 * 8 groups ahead without the carry 12.4 GB/s, L2 16 ahead with it 18-23 GB/s, 1.42-1.48x at 1-3 rows,
 * 1.09x at 16, 1.02x at 64). */
static inline void kv_prefetch_tile(const uint8_t *wp, int64_t nr, int64_t G, int64_t g, int64_t ahead,
                                    int64_t gbytes) {
    const int64_t ga = g + ahead;
    for (int64_t j = 0; j < nr; j++) {
        const uint8_t *p = wp + (ga < G ? j * G + ga : (nr + j - 1) * G + ga) * gbytes;
        for (int64_t c = 0; c < gbytes; c += 64) kv_prefetch_l2(p + c);
    }
}

#ifndef PARALLEL_MIN_MACS
#define PARALLEL_MIN_MACS (1 << 16) /* smaller products run on the calling thread */
#endif

typedef struct {
    int64_t kind; /* 0: int8 (wp, dw, corr), 1: int4 (wp), 2: float32 [N, K] (wp, gemm_f32.c),
                     5/6/8: codes of that many bits (wp, gemm_wide.c) */
    const void *wp;
    const float *dw;
    const int32_t *corr;
    const float *bias; /* or NULL */
    int64_t N, K;
} kv_qlinear_t;

typedef struct {
    const float *ln1, *ln2;
    const float *q_norm, *k_norm; /* per-head RMSNorm weights (Qwen3) or NULL */
    kv_qlinear_t qkv, o, gate_up, down;
    void *k_cache, *v_cache;
    float *k_scale, *v_scale; /* int8 caches */
} kv_layer_t;

typedef struct {
    int64_t hidden, n_heads, n_kv, head_dim, rot_dim, inter, block_size;
    float eps, attn_scale;
    int32_t cache_dtype; /* 0 float32, 1 bfloat16, 2 int8, 3 float16 */
    const float *cos, *sin; /* [max_position, rot_dim] */
    const float *final_norm; /* RMSNorm weights applied to x after the last layer, or NULL */
} kv_model_t;

/* malloc that reports failure to the caller through a NULL check at one place */
#define KV_ALLOC(T, n) ((T *)malloc(sizeof(T) * (size_t)(n)))

float kv_quantize_group(const float *row, int64_t K, int64_t k0, vi *qa, vi *qb);
void kv_quantize_act(const float *x, int64_t M, int64_t K, uint8_t *xq, float *dx);
void kv_quantize_act_s8(const float *x, int64_t M, int64_t K, int8_t *xq, float *dx, float *xs);
int kv_qgemm(const uint8_t *xq, const float *dx, int64_t M, int64_t K, const int8_t *wp, const float *dw,
             const int32_t *corr, int64_t N, float *y);
void kv_q4gemm(const int8_t *xq, const float *dx, const float *xs, int64_t M, int64_t K, const uint8_t *wp,
               int64_t N, float *y);
void kv_embed_rows(const int8_t *wp, const float *dw, int64_t K, const int64_t *ids, int64_t M, float *out);
int kv_linear(const float *x, int64_t M, int64_t K, const int8_t *wp, const float *dw, const int32_t *corr,
              int64_t N, float *y);
int kv_linear_q4(const float *x, int64_t M, int64_t K, const uint8_t *wp, int64_t N, float *y);
int kv_linear_f32(const float *x, int64_t M, int64_t K, const float *w, const float *bias, int64_t N, float *y);
void kv_quantize_act_s8h(const float *x, int64_t M, int64_t K, int8_t *xq, float *dx, float *xs, int32_t *hs);
int kv_linear_wide(const float *x, int64_t M, int64_t K, const uint8_t *wp, int64_t N, int64_t H, float *y);
int kv_paged_decode_attention(const float *q, const void *k_cache, const void *v_cache, const float *k_scale,
                              const float *v_scale, int dtype, const int32_t *block_tables, int64_t bt_stride,
                              const int32_t *seq_lens, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs,
                              float scale, float *out);
int kv_paged_prefill_attention(const float *q, const void *k_cache, const void *v_cache, const float *k_scale,
                               const float *v_scale, int dtype, const int32_t *block_tables, int64_t bt_stride,
                               const int32_t *q_start, const int32_t *q_len, const int32_t *seq_lens, int64_t B,
                               int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale, float *out);

#endif
