/* kvserve CPU kernels: int8 x int8 GEMM (AVX-512 VNNI), per-channel weights, activations per
 * token in groups of 32.
 *
 * W [N, K] is int8 with one scale dw[n] per output channel. Each activation row (token) is
 * quantized in groups of 32 values, each group with its own scale dx[m, g], and stored as
 * unsigned bytes q + 128 so that VPDPBUSD (u8 x s8 -> int32) applies; the extra
 * 128 * sum_{k in g} w[n, k] is taken back with the precomputed group sums wsum[n, g].
 * Each group's dot product is exact in int32, then
 *
 *   y[m, n] = dw[n] * sum_g dx[m, g] * (float)(isum(m, n, g) - 128 * wsum[n, g])
 *
 * summed over g in order. A token's output depends on nothing but its own row, through the
 * same operations whatever tile computes it: batched == alone, bit for bit.
 * (Per-row activation scales cost +2.5% perplexity on SmolLM2; groups of 32, +0.5%.)
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

void kv_set_threads(int n) { omp_set_num_threads(n); }

#define GROUP 32

/* x [M, K] float32 -> xq [M, ldx = K rounded up to 32] (round(x / dx) + 128), dx [M, G] = amax / 127
 * per group of 32 (a partial last group is padded with zeros). */
void kv_quantize_act(const float *x, int64_t M, int64_t K, uint8_t *xq, float *dx) {
    const int64_t G = (K + GROUP - 1) / GROUP, ldx = G * GROUP;
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
    for (int64_t m = 0; m < M; m++) {
        for (int64_t g = 0; g < G; g++) {
            const int64_t k0 = g * GROUP;
            const int64_t na = K - k0 >= 16 ? 16 : K - k0, nb = K - k0 - 16 >= 16 ? 16 : (K - k0 > 16 ? K - k0 - 16 : 0);
            const __mmask16 ma = (__mmask16)((1u << na) - 1), mb = (__mmask16)((1u << nb) - 1);
            const __m512 a = _mm512_maskz_loadu_ps(ma, x + m * K + k0);
            const __m512 b = _mm512_maskz_loadu_ps(mb, x + m * K + k0 + 16);
            const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
            const __m512 vid = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            const __m512i off = _mm512_set1_epi32(128);
            dx[m * G + g] = amax / 127.0f;
            /* nearest-even rounding; padded lanes are 0 -> byte 128 */
            _mm_storeu_si128((__m128i *)(xq + m * ldx + k0),
                             _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a, vid)), off)));
            _mm_storeu_si128((__m128i *)(xq + m * ldx + k0 + 16),
                             _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(b, vid)), off)));
        }
    }
}

/* Weights are packed in blocks of 16 output channels: for each group of 4 k's, 16 channels x
 * 4 bytes = one 64-byte vector, so a broadcast of 4 activation bytes times that vector adds
 * 16 channels' partial dot products at once (VPDPBUSD) and no horizontal sums are needed.
 * wp: [N16 = ceil(N/16)][K4 = ceil(K/32) * 8][16][4] int8, zero padded. */
void kv_pack_weight(const int8_t *w, int64_t N, int64_t K, int8_t *wp) {
    const int64_t K4 = (K + GROUP - 1) / GROUP * (GROUP / 4), N16 = (N + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < N16; b++)
        for (int64_t q = 0; q < K4; q++)
            for (int64_t c = 0; c < 16; c++)
                for (int64_t r = 0; r < 4; r++) {
                    int64_t n = b * 16 + c, k = q * 4 + r;
                    wp[((b * K4 + q) * 16 + c) * 4 + r] = (n < N && k < K) ? w[n * K + k] : 0;
                }
}

/* MR tokens x NR blocks of 16 channels. corr: [N16][G][16] int32, -128 x the group sums of W. */
#define TILE(NAME, MR, NR)                                                                                  \
    static void NAME(const uint8_t *xq, int64_t ldx, const float *dx, int64_t G, const int8_t *wp,         \
                     const float *dw, const int32_t *corr, int64_t n0, int64_t N, float *y) {             \
        const int64_t K4 = G * (GROUP / 4);                                                               \
        __m512 accf[MR][NR];                                                                              \
        for (int i = 0; i < MR; i++)                                                                      \
            for (int j = 0; j < NR; j++) accf[i][j] = _mm512_setzero_ps();                                \
        for (int64_t g = 0; g < G; g++) {                                                                 \
            __m512i acc[MR][NR];                                                                          \
            for (int j = 0; j < NR; j++) {                                                                \
                /* start each group at -128 * sum(w): the u8 offset taken back before scaling */         \
                const __m512i c = _mm512_loadu_si512(corr + ((n0 / 16 + j) * G + g) * 16);            \
                for (int i = 0; i < MR; i++) acc[i][j] = c;                                               \
            }                                                                                             \
            for (int64_t q = g * (GROUP / 4); q < (g + 1) * (GROUP / 4); q++) {                           \
                __m512i wv[NR];                                                                           \
                for (int j = 0; j < NR; j++) wv[j] = _mm512_loadu_si512(wp + (j * K4 + q) * 64);          \
                for (int i = 0; i < MR; i++) {                                                            \
                    const __m512i xv = _mm512_set1_epi32(*(const int32_t *)(xq + i * ldx + q * 4));       \
                    for (int j = 0; j < NR; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, wv[j]);   \
                }                                                                                         \
            }                                                                                             \
            for (int i = 0; i < MR; i++) {                                                                \
                const __m512 d = _mm512_set1_ps(dx[i * G + g]);                                           \
                for (int j = 0; j < NR; j++)                                                              \
                    accf[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]), d, accf[i][j]);           \
            }                                                                                             \
        }                                                                                                 \
        for (int j = 0; j < NR; j++) {                                                                    \
            const int64_t n = n0 + 16 * j;                                                                \
            const __mmask16 mk = N - n >= 16 ? 0xFFFF : (__mmask16)((1u << (N - n)) - 1);                \
            const __m512 dwv = _mm512_maskz_loadu_ps(mk, dw + n);                                         \
            for (int i = 0; i < MR; i++) _mm512_mask_storeu_ps(y + i * N + n, mk, _mm512_mul_ps(accf[i][j], dwv)); \
        }                                                                                                 \
    }

#define MR 4
#define NR 3
#ifndef PARALLEL_MIN_MACS
#define PARALLEL_MIN_MACS (1 << 16)
#endif
TILE(tile_big, MR, NR)
TILE(tile_1xNR, 1, NR)
TILE(tile_MRx1, MR, 1)
TILE(tile_1x1, 1, 1)

/* y [M, N] float32 = dequant(xq) @ dequant(W)^T with W packed by kv_pack_weight.
 * Threads split the output channels in groups of NR blocks. */
void kv_qgemm(const uint8_t *xq, const float *dx, int64_t M, int64_t K, const int8_t *wp, const float *dw,
              const int32_t *corr, int64_t N, float *y) {
    const int64_t G = (K + GROUP - 1) / GROUP, K4 = G * (GROUP / 4), N16 = (N + 15) / 16, ldx = G * GROUP;
    const int64_t groups = (N16 + NR - 1) / NR;
    /* small products (one decode token through one layer) run on the calling thread: waking the
     * pool costs more than it saves and stalls whenever another process holds a core */
#pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN_MACS)
    for (int64_t gi = 0; gi < groups; gi++) {
        const int64_t b0 = gi * NR, nb = N16 - b0 < NR ? N16 - b0 : NR;
        int64_t m = 0;
        for (; m + MR <= M; m += MR) {
            if (nb == NR)
                tile_big(xq + m * ldx, ldx, dx + m * G, G, wp + b0 * K4 * 64, dw, corr, b0 * 16, N, y + m * N);
            else
                for (int64_t b = b0; b < b0 + nb; b++)
                    tile_MRx1(xq + m * ldx, ldx, dx + m * G, G, wp + b * K4 * 64, dw, corr, b * 16, N, y + m * N);
        }
        for (; m < M; m++) {
            if (nb == NR)
                tile_1xNR(xq + m * ldx, ldx, dx + m * G, G, wp + b0 * K4 * 64, dw, corr, b0 * 16, N, y + m * N);
            else
                for (int64_t b = b0; b < b0 + nb; b++)
                    tile_1x1(xq + m * ldx, ldx, dx + m * G, G, wp + b * K4 * 64, dw, corr, b * 16, N, y + m * N);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * Paged decode attention: one query token per sequence, K/V read in place through the block
 * table (no gathered copy). One (sequence, KV head) pair per task: the scores of all query heads
 * of the group for the whole context, a float32 softmax, then the weighted sum of V, so each K
 * and V row is read once per group. The result of a sequence depends only on its own context.
 * Cache element types: 0 float32, 1 bfloat16, 2 int8 with one float32 scale per token and head.
 * --------------------------------------------------------------------------------------------- */
#include <math.h>
#include <stdlib.h>

static inline __m512 load16(const void *base, int64_t idx, int dtype) {
    if (dtype == 0) return _mm512_loadu_ps((const float *)base + idx);
    if (dtype == 1)
        return _mm512_castsi512_ps(
            _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)base + idx))), 16));
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)base + idx))));
}

void kv_paged_decode_attention(const float *q, const void *k_cache, const void *v_cache, const float *k_scale,
                               const float *v_scale, int dtype, const int32_t *block_tables, int64_t bt_stride,
                               const int32_t *seq_lens, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs,
                               float scale, float *out) {
    const int64_t group = H / Hkv;
    int64_t work = 0;  /* K/V rows to read: a short batch stays on the calling thread */
    for (int64_t b = 0; b < B; b++) work += seq_lens[b];
#pragma omp parallel if (work * Hkv >= 4096)
    {
        int64_t cap = 0;
        float *scores = NULL;
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < B * Hkv; task++) {
            const int64_t b = task / Hkv, kvh = task % Hkv;
            const int64_t L = seq_lens[b];
            if (L * group > cap) {
                free(scores);
                cap = L * group;
                scores = (float *)malloc(sizeof(float) * cap);
            }
            const int32_t *bt = block_tables + b * bt_stride;
            const float *qb = q + (b * H + kvh * group) * D;
            /* pass 1: scores[h * L + t] = scale * q_h . k_t */
            for (int64_t t = 0; t < L; t++) {
                const int64_t row = ((int64_t)bt[t / bs] * bs + t % bs) * Hkv + kvh;
                const float ks = dtype == 2 ? k_scale[row] : 1.0f;
                for (int64_t h = 0; h < group; h++) {
                    __m512 acc = _mm512_setzero_ps();
                    for (int64_t d = 0; d < D; d += 16)
                        acc = _mm512_fmadd_ps(_mm512_loadu_ps(qb + h * D + d), load16(k_cache, row * D + d, dtype), acc);
                    scores[h * L + t] = _mm512_reduce_add_ps(acc) * ks * scale;
                }
            }
            /* softmax per head */
            for (int64_t h = 0; h < group; h++) {
                float *s = scores + h * L, mx = -INFINITY, sum = 0.0f;
                for (int64_t t = 0; t < L; t++) mx = s[t] > mx ? s[t] : mx;
                for (int64_t t = 0; t < L; t++) {
                    s[t] = expf(s[t] - mx);
                    sum += s[t];
                }
                const float inv = 1.0f / sum;
                for (int64_t t = 0; t < L; t++) s[t] *= inv;
            }
            /* pass 2: out_h = sum_t p[h, t] * v_t */
            for (int64_t h = 0; h < group; h++) {
                float *o = out + (b * H + kvh * group + h) * D;
                for (int64_t d = 0; d < D; d += 16) _mm512_storeu_ps(o + d, _mm512_setzero_ps());
            }
            for (int64_t t = 0; t < L; t++) {
                const int64_t row = ((int64_t)bt[t / bs] * bs + t % bs) * Hkv + kvh;
                const float vs = dtype == 2 ? v_scale[row] : 1.0f;
                for (int64_t d = 0; d < D; d += 16) {
                    const __m512 v = load16(v_cache, row * D + d, dtype);
                    for (int64_t h = 0; h < group; h++) {
                        float *o = out + (b * H + kvh * group + h) * D + d;
                        _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_set1_ps(scores[h * L + t] * vs), v, _mm512_loadu_ps(o)));
                    }
                }
            }
        }
        free(scores);
    }
}

/* x [M, K] float32 -> y [M, N]: quantize the activations (scratch from the heap) and run kv_qgemm,
 * in one call from Python. */
void kv_linear(const float *x, int64_t M, int64_t K, const int8_t *wp, const float *dw, const int32_t *corr,
               int64_t N, float *y) {
    const int64_t G = (K + GROUP - 1) / GROUP;
    uint8_t *xq = (uint8_t *)malloc((size_t)(M * G * GROUP));
    float *dx = (float *)malloc(sizeof(float) * (size_t)(M * G));
    kv_quantize_act(x, M, K, xq, dx);
    kv_qgemm(xq, dx, M, K, wp, dw, corr, N, y);
    free(xq);
    free(dx);
}
