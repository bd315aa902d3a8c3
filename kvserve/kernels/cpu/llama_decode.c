/* Fused decode step of a Llama-family decoder: every layer of a batch of single-token sequences
 * in one call, so the per-op interpreter and dispatch cost (about 8 ms per token over 30 layers
 * when each op is a torch call) disappears. Per layer:
 *   h = rmsnorm(x) ; qkv = h W_qkv (+b) ; [q/k rmsnorm per head] ; rotary(q, k) ;
 *   write k, v at their slots ; a = paged attention(q) ; x += a W_o ;
 *   h = rmsnorm(x) ; x += (silu(h W_gate) * h W_up) W_down
 * Every op is per token with a fixed order, so a token's result does not depend on its batch.
 */
#include <math.h>

#include "common.h"

static void rmsnorm_row(const float *x, const float *w, int64_t n, float eps, float *y) {
    vf acc = vf_zero();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const vf v = vf_load(x + i);
        acc = vf_fmadd(v, v, acc);
    }
    float ss = vf_reduce_add(acc);
    for (; i < n; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (i = 0; i < n; i++) y[i] = w[i] * (x[i] * r);
}

/* rotate-half rotary embedding of one head in place, over its first rot dims */
static void rotary_head(float *v, const float *cos, const float *sin, int64_t rot) {
    const int64_t h = rot / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = v[i], b = v[i + h];
        v[i] = a * cos[i] - b * sin[i];
        v[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

static inline uint16_t to_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                            /* nearest even */
    return (uint16_t)(u >> 16);
}

/* act = silu(gate) * up over one row of [gate | up], 16 lanes at a time (vf_exp: 1e-8 relative) */
static void silu_mul_row(const float *gu, int64_t I, float *act) {
    const vf one = vf_set1(1.0f), lo = vf_set1(-88.0f);
    int64_t i = 0;
    for (; i + 16 <= I; i += 16) { /* exp(-g) with -g <= 88 (vf_exp clamps the other side) */
        const vf g = vf_load(gu + i), e = vf_exp(vf_sub(vf_zero(), vf_max(g, lo)));
        vf_store(act + i, vf_mul(vf_div(g, vf_add(one, e)), vf_load(gu + I + i)));
    }
    for (; i < I; i++) act[i] = gu[i] / (1.0f + expf(-gu[i])) * gu[I + i];
}

/* float -> IEEE half, nearest even (as torch converts): overflow to infinity, gradual underflow */
static inline uint16_t to_f16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u); /* NaN */
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds to above 65504: infinity */
    if (a < 0x38800000u) { /* below 2^-14: a subnormal half, m x 2^-24 */
        const float x = fabsf(f) * 16777216.0f;              /* exact scaling by 2^24 */
        return (uint16_t)(sign | (uint16_t)nearbyintf(x));  /* nearest even; 1024 is the smallest normal */
    }
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u); /* nearest even on the 13 dropped bits */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

/* n floats -> halves as the fused step writes a float16 cache (tests hold it to torch's conversion):
 * VCVTPS2PH where the ISA has it (F16C: the same IEEE nearest-even conversion), 8 at a time */
void kv_to_f16(const float *x, int64_t n, uint16_t *out) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i), _mm256_cvtps_ph(_mm256_loadu_ps(x + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) out[i] = to_f16(x[i]);
}

/* one head row of K or V into the cache, as kvserve.layers.attention.write_kv_cache stores it */
static void store_row(void *cache, float *scales, int64_t row, const float *v, int64_t D, int dtype) {
    if (dtype == 0) {
        __builtin_memcpy((float *)cache + row * D, v, sizeof(float) * D);
    } else if (dtype == 1) {
        uint16_t *dst = (uint16_t *)cache + row * D;
        for (int64_t i = 0; i < D; i++) dst[i] = to_bf16(v[i]);
    } else if (dtype == 3) {
        kv_to_f16(v, D, (uint16_t *)cache + row * D);
    } else {
        float amax = 0.0f;
        for (int64_t i = 0; i < D; i++) amax = fabsf(v[i]) > amax ? fabsf(v[i]) : amax;
        const float s = (amax > 1e-8f ? amax : 1e-8f) / 127.0f;
        int8_t *dst = (int8_t *)cache + row * D;
        for (int64_t i = 0; i < D; i++) {
            float q = nearbyintf(v[i] / s);
            dst[i] = (int8_t)(q > 127.0f ? 127.0f : (q < -127.0f ? -127.0f : q));
        }
        scales[row] = s;
    }
}

static int qlinear(const kv_qlinear_t *l, const float *x, int64_t M, float *y) {
    const int rc = l->kind == 1   ? kv_linear_q4(x, M, l->K, (const uint8_t *)l->wp, l->N, y)
                   : l->kind == 2 ? kv_linear_f32(x, M, l->K, (const float *)l->wp, NULL, l->N, y)
                   : l->kind >= 5 ? kv_linear_wide(x, M, l->K, (const uint8_t *)l->wp, l->N, l->kind - 4, y)
                                  : kv_linear(x, M, l->K, (const int8_t *)l->wp, l->dw, l->corr, l->N, y);
    if (l->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < l->N; n++) y[m * l->N + n] += l->bias[n];
    return rc;
}

#ifdef KV_PROFILE
#include <stdio.h>
#include <time.h>
static double prof_t[8];
static double now_s(void) { struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts); return ts.tv_sec + 1e-9 * ts.tv_nsec; }
#define PROF(i) do { double t_ = now_s(); prof_t[i] += t_ - prof_last; prof_last = t_; } while (0)
void kv_prof_dump(void) { for (int i = 0; i < 8; i++) fprintf(stderr, "%d: %.3f ms\n", i, prof_t[i] * 1e3); }
#else
#define PROF(i) do {} while (0)
#endif

/* rows from which the per-row work between the GEMMs (norms, rotary and K/V writes, SwiGLU, residuals)
 * is split over the threads too: serial, it kept the other threads waiting at the next GEMM */
#define ROWS_PARALLEL 8

/* Every layer on the residual stream x [M, hidden]. Attention: with q_start NULL, each row is one
 * token over its own prefix (block_tables and seq_lens per row, M of them); else the rows are B
 * sequences' new tokens (q_start, q_len, seq_lens per sequence) attending as an extend of the paged
 * cache. Returns 0, or -1 when scratch memory ran out (x is then partly updated: the step must be
 * dropped). */
static int llama_layers(const kv_model_t *cfg, const kv_layer_t *layers, int64_t n_layers, float *x, int64_t M,
                        const int64_t *positions, const int64_t *slots, const int32_t *block_tables, int64_t bt_stride,
                        const int32_t *seq_lens, const int32_t *q_start, const int32_t *q_len, int64_t B) {
    const int64_t Hd = cfg->hidden, H = cfg->n_heads, Hkv = cfg->n_kv, D = cfg->head_dim, I = cfg->inter;
    const int64_t qs = H * D, kvs = Hkv * D, nqkv = qs + 2 * kvs, rot = cfg->rot_dim;
    float *h = KV_ALLOC(float, M * Hd), *qkv = KV_ALLOC(float, M * nqkv), *q = KV_ALLOC(float, M * qs);
    float *att = KV_ALLOC(float, M * qs), *gu = KV_ALLOC(float, M * 2 * I), *act = KV_ALLOC(float, M * I);
    float *out = KV_ALLOC(float, M * Hd);
    int rc = (h && qkv && q && att && gu && act && out) ? 0 : -1;
#ifdef KV_PROFILE
    double prof_last = now_s();
#endif
    for (int64_t li = 0; li < n_layers && rc == 0; li++) {
        const kv_layer_t *L = layers + li;
#pragma omp parallel for schedule(static) if (M >= ROWS_PARALLEL)
        for (int64_t m = 0; m < M; m++) rmsnorm_row(x + m * Hd, L->ln1, Hd, cfg->eps, h + m * Hd);
        PROF(0);
        if ((rc = qlinear(&L->qkv, h, M, qkv))) break;
        PROF(1);
#pragma omp parallel for schedule(static) if (M >= ROWS_PARALLEL)
        for (int64_t m = 0; m < M; m++) {
            float *row = qkv + m * nqkv, *qm = q + m * qs;
            const float *c = cfg->cos + positions[m] * rot, *s = cfg->sin + positions[m] * rot;
            __builtin_memcpy(qm, row, sizeof(float) * qs);
            for (int64_t hh = 0; hh < H; hh++) {
                if (L->q_norm) rmsnorm_row(qm + hh * D, L->q_norm, D, cfg->eps, qm + hh * D);
                rotary_head(qm + hh * D, c, s, rot);
            }
            float *k = row + qs, *v = row + qs + kvs;
            for (int64_t hh = 0; hh < Hkv; hh++) {
                if (L->k_norm) rmsnorm_row(k + hh * D, L->k_norm, D, cfg->eps, k + hh * D);
                rotary_head(k + hh * D, c, s, rot);
                store_row(L->k_cache, L->k_scale, slots[m] * Hkv + hh, k + hh * D, D, cfg->cache_dtype);
                store_row(L->v_cache, L->v_scale, slots[m] * Hkv + hh, v + hh * D, D, cfg->cache_dtype);
            }
        }
        PROF(2);
        rc = q_start ? kv_paged_prefill_attention(q, L->k_cache, L->v_cache, L->k_scale, L->v_scale, cfg->cache_dtype,
                                                  block_tables, bt_stride, q_start, q_len, seq_lens, B, H, Hkv, D,
                                                  cfg->block_size, cfg->attn_scale, att)
                     : kv_paged_decode_attention(q, L->k_cache, L->v_cache, L->k_scale, L->v_scale, cfg->cache_dtype,
                                                 block_tables, bt_stride, seq_lens, M, H, Hkv, D, cfg->block_size,
                                                 cfg->attn_scale, att);
        if (rc) break;
        PROF(3);
        if ((rc = qlinear(&L->o, att, M, out))) break;
        PROF(4);
#pragma omp parallel for schedule(static) if (M >= ROWS_PARALLEL)
        for (int64_t m = 0; m < M; m++) {
            for (int64_t i = m * Hd; i < (m + 1) * Hd; i++) x[i] += out[i];
            rmsnorm_row(x + m * Hd, L->ln2, Hd, cfg->eps, h + m * Hd);
        }
        PROF(0);
        if ((rc = qlinear(&L->gate_up, h, M, gu))) break;
        PROF(5);
#pragma omp parallel for schedule(static) if (M >= ROWS_PARALLEL)
        for (int64_t m = 0; m < M; m++) silu_mul_row(gu + m * 2 * I, I, act + m * I);
        PROF(6);
        if ((rc = qlinear(&L->down, act, M, out))) break;
        PROF(7);
        for (int64_t i = 0; i < M * Hd; i++) x[i] += out[i];
    }
    /* the model's final norm here rather than as a torch op after the call: the first torch ops after
     * the weights have streamed through run with cold caches (~0.2 ms for one RMSNorm) */
    if (rc == 0 && cfg->final_norm)
        for (int64_t m = 0; m < M; m++) rmsnorm_row(x + m * Hd, cfg->final_norm, Hd, cfg->eps, x + m * Hd);
    free(h), free(qkv), free(q), free(att), free(gu), free(act), free(out);
    return rc;
}

/* A decode step: M one-token rows, each over its own prefix (block_tables [M, bt_stride], seq_lens [M]). */
int kv_llama_decode(const kv_model_t *cfg, const kv_layer_t *layers, int64_t n_layers, float *x, int64_t M,
                    const int64_t *positions, const int64_t *slots, const int32_t *block_tables, int64_t bt_stride,
                    const int32_t *seq_lens) {
    return llama_layers(cfg, layers, n_layers, x, M, positions, slots, block_tables, bt_stride, seq_lens, NULL, NULL, M);
}

/* Prompt chunks: B sequences' new tokens, rows q_start[b] .. q_start[b] + q_len[b] - 1 of x, over the
 * paged cache (block_tables [B, bt_stride], seq_lens [B]: each sequence's length after the chunk). */
int kv_llama_extend(const kv_model_t *cfg, const kv_layer_t *layers, int64_t n_layers, float *x, int64_t M,
                    const int64_t *positions, const int64_t *slots, const int32_t *block_tables, int64_t bt_stride,
                    const int32_t *q_start, const int32_t *q_len, const int32_t *seq_lens, int64_t B) {
    return llama_layers(cfg, layers, n_layers, x, M, positions, slots, block_tables, bt_stride, seq_lens, q_start,
                        q_len, B);
}
