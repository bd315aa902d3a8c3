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

/* One group of up to 32 values of a row: round(x / d) as two vectors of int32 (zero padded), d = amax / 127. */
static inline float quantize_group(const float *row, int64_t K, int64_t k0, __m512i *qa, __m512i *qb) {
    const int64_t na = K - k0 >= 16 ? 16 : K - k0, nb = K - k0 - 16 >= 16 ? 16 : (K - k0 > 16 ? K - k0 - 16 : 0);
    const __mmask16 ma = (__mmask16)((1u << na) - 1), mb = (__mmask16)((1u << nb) - 1);
    const __m512 a = _mm512_maskz_loadu_ps(ma, row + k0);
    const __m512 b = _mm512_maskz_loadu_ps(mb, row + k0 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const __m512 vid = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
    *qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, vid)); /* nearest-even rounding */
    *qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, vid));
    return amax / 127.0f;
}

/* x [M, K] float32 -> xq [M, ldx = K rounded up to 32] (round(x / dx) + 128), dx [M, G] = amax / 127
 * per group of 32 (a partial last group is padded with zeros). */
void kv_quantize_act(const float *x, int64_t M, int64_t K, uint8_t *xq, float *dx) {
    const int64_t G = (K + GROUP - 1) / GROUP, ldx = G * GROUP;
    const __m512i off = _mm512_set1_epi32(128); /* padded lanes are 0 -> byte 128 */
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            __m512i qa, qb;
            dx[m * G + g] = quantize_group(x + m * K, K, g * GROUP, &qa, &qb);
            _mm_storeu_si128((__m128i *)(xq + m * ldx + g * GROUP), _mm512_cvtepi32_epi8(_mm512_add_epi32(qa, off)));
            _mm_storeu_si128((__m128i *)(xq + m * ldx + g * GROUP + 16), _mm512_cvtepi32_epi8(_mm512_add_epi32(qb, off)));
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
            for (int j = 0; j < NR; j++) /* stream ahead (see Q4_PREFETCH) */                          \
                for (int c = 0; c < GROUP * 16; c += 64)                                                  \
                    _mm_prefetch((const char *)wp + (j * K4 + (g + 6) * (GROUP / 4)) * 64 + c, _MM_HINT_T0); \
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

/* exp(x) for softmax arguments (x <= 0): 2^(x log2 e) = 2^i * 2^f with i the nearest integer and
 * |f| <= 1/2, 2^f by its Taylor series to degree 7 (relative error below 1e-8). */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 i = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, i), _mm512_set1_ps(0.693147180559945309f));
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, i);
}

/* The cache is cold when a decode step reaches a layer (the layer's weights have streamed through
 * since): ask for the next block while this one is being used. */
static inline void prefetch_bytes(const char *p, int64_t n) {
    for (int64_t c = 0; c < n; c += 64) _mm_prefetch(p + c, _MM_HINT_T0);
}

#define MAX_ACC 16   /* pass 2 keeps up to this many 16-float accumulators live */
#define SPLIT_BLOCKS 8 /* a sequence is attended in parts of this many blocks (merged by log-sum-exp) */

/* Paged decode attention: one query token per sequence, K/V read in place through the block
 * table. A task is one part of one sequence (SPLIT_BLOCKS blocks, all heads), so a block's rows
 * are read front to back once for K and once for V, and a long context spreads over threads.
 * Each part keeps per head its max score, its sum of exponentials and its unnormalised output;
 * the parts are merged in order. The parts depend only on the sequence's own length, so its
 * result does not depend on the batch or the thread count. */
void kv_paged_decode_attention(const float *q, const void *k_cache, const void *v_cache, const float *k_scale,
                               const float *v_scale, int dtype, const int32_t *block_tables, int64_t bt_stride,
                               const int32_t *seq_lens, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs,
                               float scale, float *out) {
    const int64_t group = H / Hkv, nd = D / 16, esz = dtype == 0 ? 4 : dtype == 1 ? 2 : 1;
    const int64_t rowb = Hkv * D * esz; /* one token's K (or V) row, all heads */
    int64_t hstep = MAX_ACC / nd;
    hstep = hstep < 1 ? 1 : (hstep > group ? group : hstep);
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (B + 1)); /* first task of each sequence */
    int64_t work = 0;
    first[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        const int64_t nblk = (seq_lens[b] + bs - 1) / bs;
        first[b + 1] = first[b] + (nblk + SPLIT_BLOCKS - 1) / SPLIT_BLOCKS;
        work += seq_lens[b];
    }
    const int64_t tasks = first[B];
    /* per task and head: max, sum, then D outputs */
    float *part = (float *)malloc(sizeof(float) * tasks * H * (D + 2));
#pragma omp parallel if (tasks > 1 && work * H * D >= (1 << 16))
    {
        float *scores = (float *)malloc(sizeof(float) * H * SPLIT_BLOCKS * bs);
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            int64_t b = 0;
            while (first[b + 1] <= task) b++;
            const int64_t L = seq_lens[b], blk0 = (task - first[b]) * SPLIT_BLOCKS;
            const int64_t t0 = blk0 * bs, t1 = L < t0 + SPLIT_BLOCKS * bs ? L : t0 + SPLIT_BLOCKS * bs, n = t1 - t0;
            const int32_t *bt = block_tables + b * bt_stride;
            const float *qb = q + b * H * D;
            float *pm = part + task * H * (D + 2), *pl = pm + H, *po = pl + H;
            prefetch_bytes((const char *)k_cache + (int64_t)bt[blk0] * bs * rowb, bs * rowb);
            prefetch_bytes((const char *)v_cache + (int64_t)bt[blk0] * bs * rowb, bs * rowb);
            /* pass 1: scores[h * n + t] = scale * q_h . k_t */
            for (int64_t t = 0; t < n; t += bs) {
                const int64_t slot0 = (int64_t)bt[blk0 + t / bs] * bs, m = n - t < bs ? n - t : bs;
                if (t + bs < n) prefetch_bytes((const char *)k_cache + (int64_t)bt[blk0 + t / bs + 1] * bs * rowb, bs * rowb);
                for (int64_t o = 0; o < m; o++) {
                    for (int64_t kvh = 0; kvh < Hkv; kvh++) {
                        const int64_t row = (slot0 + o) * Hkv + kvh;
                        const float ks = (dtype == 2 ? k_scale[row] : 1.0f) * scale;
                        const int64_t kidx = row * D;
                        for (int64_t h = kvh * group; h < (kvh + 1) * group; h++) {
                            __m512 acc = _mm512_setzero_ps();
                            for (int64_t d = 0; d < nd; d++)
                                acc = _mm512_fmadd_ps(_mm512_loadu_ps(qb + h * D + 16 * d), load16(k_cache, kidx + 16 * d, dtype), acc);
                            scores[h * n + t + o] = _mm512_reduce_add_ps(acc) * ks;
                        }
                    }
                }
            }
            /* local softmax statistics per head; scores become exp(s - max) */
            for (int64_t h = 0; h < H; h++) {
                float *s = scores + h * n;
                __m512 mx = _mm512_set1_ps(-INFINITY);
                for (int64_t t = 0; t < n; t += 16) {
                    const __mmask16 mk = n - t >= 16 ? 0xFFFF : (__mmask16)((1u << (n - t)) - 1);
                    mx = _mm512_mask_max_ps(mx, mk, mx, _mm512_maskz_loadu_ps(mk, s + t));
                }
                const float mxs = _mm512_reduce_max_ps(mx);
                const __m512 m = _mm512_set1_ps(mxs);
                __m512 sum = _mm512_setzero_ps();
                for (int64_t t = 0; t < n; t += 16) {
                    const __mmask16 mk = n - t >= 16 ? 0xFFFF : (__mmask16)((1u << (n - t)) - 1);
                    const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(mk, s + t), m));
                    sum = _mm512_mask_add_ps(sum, mk, sum, e);
                    _mm512_mask_storeu_ps(s + t, mk, e);
                }
                pm[h] = mxs;
                pl[h] = _mm512_reduce_add_ps(sum);
            }
            /* pass 2: po_h = sum_t p[h, t] * v_t, block by block (a block's V rows stay in L1 while
             * each head group sweeps them), a few heads' accumulators in registers at a time */
            for (int64_t i = 0; i < H * D; i++) po[i] = 0.0f;
            for (int64_t t = 0; t < n; t += bs) {
                const int64_t slot0 = (int64_t)bt[blk0 + t / bs] * bs, m = n - t < bs ? n - t : bs;
                if (t + bs < n) prefetch_bytes((const char *)v_cache + (int64_t)bt[blk0 + t / bs + 1] * bs * rowb, bs * rowb);
                for (int64_t kvh = 0; kvh < Hkv; kvh++)
                    for (int64_t h0 = kvh * group; h0 < (kvh + 1) * group; h0 += hstep) {
                        const int64_t hc = (kvh + 1) * group - h0 < hstep ? (kvh + 1) * group - h0 : hstep;
                        __m512 acc[MAX_ACC];
                        for (int64_t h = 0; h < hc; h++)
                            for (int64_t d = 0; d < nd; d++) acc[h * nd + d] = _mm512_loadu_ps(po + (h0 + h) * D + 16 * d);
                        for (int64_t o = 0; o < m; o++) {
                            const int64_t row = (slot0 + o) * Hkv + kvh;
                            const float vs = dtype == 2 ? v_scale[row] : 1.0f;
                            for (int64_t d = 0; d < nd; d++) {
                                const __m512 v = load16(v_cache, row * D + 16 * d, dtype);
                                for (int64_t h = 0; h < hc; h++)
                                    acc[h * nd + d] = _mm512_fmadd_ps(_mm512_set1_ps(scores[(h0 + h) * n + t + o] * vs), v,
                                                                      acc[h * nd + d]);
                            }
                        }
                        for (int64_t h = 0; h < hc; h++)
                            for (int64_t d = 0; d < nd; d++) _mm512_storeu_ps(po + (h0 + h) * D + 16 * d, acc[h * nd + d]);
                    }
            }
        }
        free(scores);
    }
    /* merge each sequence's parts in order: out_h = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p */
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < H; h++) {
            float M = -INFINITY;
            for (int64_t t = first[b]; t < first[b + 1]; t++) {
                const float mt = part[t * H * (D + 2) + h];
                M = mt > M ? mt : M;
            }
            float l = 0.0f;
            float *o = out + (b * H + h) * D;
            for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
            for (int64_t t = first[b]; t < first[b + 1]; t++) {
                const float *pm = part + t * H * (D + 2);
                const float w = expf(pm[h] - M);
                l += w * pm[H + h];
                const float *po = pm + 2 * H + h * D;
                for (int64_t d = 0; d < D; d++) o[d] += w * po[d];
            }
            const float inv = 1.0f / l;
            for (int64_t d = 0; d < D; d++) o[d] *= inv;
        }
    free(part);
    free(first);
}

/* Paged prefill attention: sequences with several new tokens (a prompt, a chunk of one, or the
 * tail of a prompt whose prefix is cached), K/V read in place through the block table, causal.
 * A task is one KV head of up to PF_CHUNK new tokens of one sequence; its rows are (token, head
 * of the group). Keys come in panels of PF_KEYS (dequantized, scaled, K transposed), and every row
 * keeps its own running max, sum and output over the panels it can see, PF_TILE rows per register
 * tile. A row's arithmetic depends only on its position and its sequence's K/V, not on the chunk
 * or the tile it falls in: a prompt gives the same numbers in one piece, in chunks, or after a
 * cached prefix. q, out [T, H, D]; sequence b has q_len[b] new tokens from row q_start[b]
 * (0: skipped), the last of seq_lens[b] positions. */
#define PF_CHUNK 32
#define PF_TILE 4
#define PF_KEYS 64
#define PF_NV (PF_KEYS / 16)

void kv_paged_prefill_attention(const float *q, const void *k_cache, const void *v_cache, const float *k_scale,
                                const float *v_scale, int dtype, const int32_t *block_tables, int64_t bt_stride,
                                const int32_t *q_start, const int32_t *q_len, const int32_t *seq_lens, int64_t B,
                                int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale, float *out) {
    const int64_t group = H / Hkv, nd = D / 16, maxrows = PF_CHUNK * group;
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * (B + 1));
    double work = 0;
    first[0] = 0;
    for (int64_t b = 0; b < B; b++) {
        first[b + 1] = first[b] + (q_len[b] + PF_CHUNK - 1) / PF_CHUNK * Hkv;
        work += (double)q_len[b] * seq_lens[b];
    }
    const int64_t tasks = first[B];
#pragma omp parallel if (tasks > 1 && work * H * D >= (1 << 18))
    {
        float *kt = (float *)aligned_alloc(64, sizeof(float) * D * PF_KEYS); /* [D][PF_KEYS] scaled K^T */
        float *vb = (float *)aligned_alloc(64, sizeof(float) * PF_KEYS * D); /* [PF_KEYS][D] */
        float *acc = (float *)malloc(sizeof(float) * maxrows * (D + 2));    /* per row: output, max, sum */
        float pbuf[PF_TILE][PF_KEYS];
#pragma omp for schedule(dynamic, 1)
        for (int64_t task = 0; task < tasks; task++) {
            int64_t b = 0;
            while (first[b + 1] <= task) b++;
            const int64_t kvh = (task - first[b]) % Hkv, chunk = (task - first[b]) / Hkv;
            const int64_t n = q_len[b], L = seq_lens[b], j0 = chunk * PF_CHUNK;
            const int64_t nt = n - j0 < PF_CHUNK ? n - j0 : PF_CHUNK, rows = nt * group;
            const int64_t pos0 = L - n + j0, pmax = pos0 + nt - 1; /* positions of the task's tokens */
            const int32_t *bt = block_tables + b * bt_stride;
            float *O = acc, *mx = acc + maxrows * D, *sm = mx + maxrows;
            for (int64_t r = 0; r < rows; r++) {
                mx[r] = -INFINITY;
                sm[r] = 0.0f;
                for (int64_t d = 0; d < D; d++) O[r * D + d] = 0.0f;
            }
            for (int64_t t0 = 0; t0 <= pmax; t0 += PF_KEYS) {
                const int64_t m = L - t0 < PF_KEYS ? L - t0 : PF_KEYS;
                for (int64_t j = 0; j < PF_KEYS; j++) {
                    if (j >= m) {
                        for (int64_t d = 0; d < D; d++) kt[d * PF_KEYS + j] = vb[j * D + d] = 0.0f;
                        continue;
                    }
                    const int64_t t = t0 + j, row = ((int64_t)bt[t / bs] * bs + t % bs) * Hkv + kvh;
                    const float ks = (dtype == 2 ? k_scale[row] : 1.0f) * scale, vs = dtype == 2 ? v_scale[row] : 1.0f;
                    for (int64_t d = 0; d < nd; d++) {
                        float tmp[16];
                        _mm512_storeu_ps(tmp, _mm512_mul_ps(load16(k_cache, row * D + 16 * d, dtype), _mm512_set1_ps(ks)));
                        for (int e = 0; e < 16; e++) kt[(16 * d + e) * PF_KEYS + j] = tmp[e];
                        _mm512_store_ps(vb + j * D + 16 * d, _mm512_mul_ps(load16(v_cache, row * D + 16 * d, dtype), _mm512_set1_ps(vs)));
                    }
                }
                /* rows are token-major, so positions grow with the row: skip the rows that see none of this panel */
                for (int64_t r0 = t0 > pos0 ? (t0 - pos0) * group : 0; r0 < rows; r0 += PF_TILE) {
                    const int64_t rc = rows - r0 < PF_TILE ? rows - r0 : PF_TILE;
                    __m512 s[PF_TILE][PF_NV];
                    const float *qr[PF_TILE];
                    for (int64_t i = 0; i < rc; i++) {
                        const int64_t r = r0 + i;
                        qr[i] = q + ((int64_t)q_start[b] + j0 + r / group) * H * D + (kvh * group + r % group) * D;
                        for (int v = 0; v < PF_NV; v++) s[i][v] = _mm512_setzero_ps();
                    }
                    for (int64_t d = 0; d < D; d++) {
                        __m512 kd[PF_NV];
                        for (int v = 0; v < PF_NV; v++) kd[v] = _mm512_load_ps(kt + d * PF_KEYS + 16 * v);
                        for (int64_t i = 0; i < rc; i++) {
                            const __m512 qd = _mm512_set1_ps(qr[i][d]);
                            for (int v = 0; v < PF_NV; v++) s[i][v] = _mm512_fmadd_ps(qd, kd[v], s[i][v]);
                        }
                    }
                    float alpha[PF_TILE];
                    for (int64_t i = 0; i < rc; i++) {
                        const int64_t r = r0 + i, see = pos0 + r / group - t0 + 1; /* keys of the panel this row sees */
                        __mmask16 mk[PF_NV];
                        __m512 vmax = _mm512_set1_ps(-INFINITY);
                        for (int v = 0; v < PF_NV; v++) {
                            const int64_t c = see - 16 * v;
                            mk[v] = c >= 16 ? 0xFFFF : c <= 0 ? 0 : (__mmask16)((1u << c) - 1);
                            vmax = _mm512_mask_max_ps(vmax, mk[v], vmax, s[i][v]);
                        }
                        const float pm = _mm512_reduce_max_ps(vmax);
                        const float mnew = pm > mx[r] ? pm : mx[r];
                        const __m512 mv = _mm512_set1_ps(mnew);
                        __m512 sum = _mm512_setzero_ps();
                        for (int v = 0; v < PF_NV; v++) {
                            const __m512 p = _mm512_maskz_mov_ps(mk[v], exp512(_mm512_sub_ps(s[i][v], mv)));
                            sum = _mm512_add_ps(sum, p);
                            _mm512_storeu_ps(pbuf[i] + 16 * v, p);
                        }
                        alpha[i] = expf(mx[r] - mnew);
                        sm[r] = sm[r] * alpha[i] + _mm512_reduce_add_ps(sum);
                        mx[r] = mnew;
                    }
                    const int64_t kend = pos0 + (r0 + rc - 1) / group - t0 + 1; /* keys any row of the tile sees */
                    const int64_t jn = kend < m ? kend : m;
                    /* o += p v, 4 x 16 output columns of every row of the tile in registers at a time */
                    for (int64_t d0 = 0; d0 < nd; d0 += 4) {
                        const int dc = nd - d0 < 4 ? (int)(nd - d0) : 4;
                        __m512 o[PF_TILE][4];
                        for (int64_t i = 0; i < rc; i++)
                            for (int d = 0; d < dc; d++)
                                o[i][d] = _mm512_mul_ps(_mm512_loadu_ps(O + (r0 + i) * D + 16 * (d0 + d)), _mm512_set1_ps(alpha[i]));
                        if (dc == 4 && rc == PF_TILE) {
                            for (int64_t j = 0; j < jn; j++) {
                                __m512 v[4];
                                for (int d = 0; d < 4; d++) v[d] = _mm512_load_ps(vb + j * D + 16 * (d0 + d));
                                for (int i = 0; i < PF_TILE; i++) {
                                    const __m512 pj = _mm512_set1_ps(pbuf[i][j]);
                                    for (int d = 0; d < 4; d++) o[i][d] = _mm512_fmadd_ps(pj, v[d], o[i][d]);
                                }
                            }
                        } else {
                            for (int64_t j = 0; j < jn; j++)
                                for (int d = 0; d < dc; d++) {
                                    const __m512 v = _mm512_load_ps(vb + j * D + 16 * (d0 + d));
                                    for (int64_t i = 0; i < rc; i++) o[i][d] = _mm512_fmadd_ps(_mm512_set1_ps(pbuf[i][j]), v, o[i][d]);
                                }
                        }
                        for (int64_t i = 0; i < rc; i++)
                            for (int d = 0; d < dc; d++) _mm512_storeu_ps(O + (r0 + i) * D + 16 * (d0 + d), o[i][d]);
                    }
                }
            }
            for (int64_t r = 0; r < rows; r++) {
                float *dst = out + ((int64_t)q_start[b] + j0 + r / group) * H * D + (kvh * group + r % group) * D;
                const __m512 inv = _mm512_set1_ps(1.0f / sm[r]);
                for (int64_t d = 0; d < nd; d++) _mm512_storeu_ps(dst + 16 * d, _mm512_mul_ps(_mm512_loadu_ps(O + r * D + 16 * d), inv));
            }
        }
        free(kt);
        free(vb);
        free(acc);
    }
    free(first);
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

/* ---------------------------------------------------------------------------------------------
 * int4 x int8 GEMM: 4-bit weights with a scale and a minimum per 32 input values (GGUF Q4_1's
 * arithmetic: w = d * q + m, q in 0..15), activations int8 per token and group of 32 as above but
 * signed. VPDPBUSD takes the weights as the unsigned operand, so per group
 *
 *   sum_k w[n,k] x[k] = dx * (d[n,g] * isum(q[n,:] . xq) + m[n,g] * sum_k xq[k])
 *
 * with an exact int32 isum. Packing, per block of 16 channels and group of 32: 256 bytes of
 * nibbles (byte (c, r) of k-step s holds step s in its low and step s+4 in its high nibble), then
 * 16 fp16 d and 16 fp16 m: 320 bytes, read as one stream.
 * --------------------------------------------------------------------------------------------- */
#define Q4_GROUP_BYTES 320
#ifndef Q4_PREFETCH
#define Q4_PREFETCH 8 /* groups ahead */
#endif

/* x [M, K] -> xq [M, G*32] int8 = round(x / dx), dx [M, G] = amax / 127, xs [M, G] = dx * sum(xq) */
void kv_quantize_act_s8(const float *x, int64_t M, int64_t K, int8_t *xq, float *dx, float *xs) {
    const int64_t G = (K + GROUP - 1) / GROUP, ldx = G * GROUP;
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            __m512i qa, qb;
            const float d = quantize_group(x + m * K, K, g * GROUP, &qa, &qb);
            dx[m * G + g] = d;
            xs[m * G + g] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
            _mm_storeu_si128((__m128i *)(xq + m * ldx + g * GROUP), _mm512_cvtepi32_epi8(qa));
            _mm_storeu_si128((__m128i *)(xq + m * ldx + g * GROUP + 16), _mm512_cvtepi32_epi8(qb));
        }
}

/* q [N, K] uint8 in 0..15, d/m [N, G] fp16 bits -> the packed layout (zero padded) */
void kv_pack_q4(const uint8_t *q, const uint16_t *d, const uint16_t *mn, int64_t N, int64_t K, uint8_t *wp) {
    const int64_t G = (K + GROUP - 1) / GROUP, N16 = (N + 15) / 16;
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < N16; b++)
        for (int64_t g = 0; g < G; g++) {
            uint8_t *dst = wp + (b * G + g) * Q4_GROUP_BYTES;
            for (int64_t s = 0; s < 4; s++)
                for (int64_t c = 0; c < 16; c++)
                    for (int64_t r = 0; r < 4; r++) {
                        const int64_t n = b * 16 + c, klo = g * GROUP + s * 4 + r, khi = klo + 16;
                        const uint8_t lo = (n < N && klo < K) ? q[n * K + klo] : 0;
                        const uint8_t hi = (n < N && khi < K) ? q[n * K + khi] : 0;
                        dst[(s * 16 + c) * 4 + r] = (uint8_t)(lo | (hi << 4));
                    }
            uint16_t *sc = (uint16_t *)(dst + 256);
            for (int64_t c = 0; c < 16; c++) {
                const int64_t n = b * 16 + c;
                sc[c] = n < N ? d[n * G + g] : 0;
                sc[16 + c] = n < N ? mn[n * G + g] : 0;
            }
        }
}

#define TILE4(NAME, MR, NR)                                                                                 \
    static void NAME(const int8_t *xq, int64_t ldx, const float *dx, const float *xs, int64_t G,            \
                     const uint8_t *wp, int64_t n0, int64_t N, float *y, int64_t ldy) {                      \
        __m512 accf[MR][NR];                                                                                \
        const __m512i low4 = _mm512_set1_epi8(0x0F);                                                        \
        for (int i = 0; i < MR; i++)                                                                        \
            for (int j = 0; j < NR; j++) accf[i][j] = _mm512_setzero_ps();                                  \
        for (int64_t g = 0; g < G; g++) {                                                                   \
            __m512i acc[MR][NR];                                                                            \
            for (int j = 0; j < NR; j++) /* stream ahead: one core's misses alone do not fill the bus */  \
                for (int c = 0; c < Q4_GROUP_BYTES; c += 64)                                                \
                    _mm_prefetch((const char *)wp + (j * G + g + Q4_PREFETCH) * Q4_GROUP_BYTES + c, _MM_HINT_T0); \
            for (int i = 0; i < MR; i++)                                                                    \
                for (int j = 0; j < NR; j++) acc[i][j] = _mm512_setzero_si512();                            \
            for (int s = 0; s < 4; s++) {                                                                   \
                __m512i lo[NR], hi[NR];                                                                     \
                for (int j = 0; j < NR; j++) {                                                              \
                    const __m512i v = _mm512_loadu_si512(wp + (j * G + g) * Q4_GROUP_BYTES + s * 64);       \
                    lo[j] = _mm512_and_si512(v, low4);                                                      \
                    hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);                                \
                }                                                                                           \
                for (int i = 0; i < MR; i++) {                                                              \
                    const int8_t *xr = xq + i * ldx + g * GROUP + s * 4;                                    \
                    const __m512i xa = _mm512_set1_epi32(*(const int32_t *)xr);                             \
                    const __m512i xb = _mm512_set1_epi32(*(const int32_t *)(xr + 16));                      \
                    for (int j = 0; j < NR; j++) {                                                          \
                        acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], lo[j], xa);                              \
                        acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], hi[j], xb);                              \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
            for (int j = 0; j < NR; j++) {                                                                  \
                const uint8_t *sc = wp + (j * G + g) * Q4_GROUP_BYTES + 256;                                \
                const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)sc));                \
                const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sc + 32)));          \
                for (int i = 0; i < MR; i++) {                                                              \
                    const __m512 t = _mm512_fmadd_ps(mv, _mm512_set1_ps(xs[i * G + g]), accf[i][j]);        \
                    accf[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]),                             \
                                                 _mm512_mul_ps(dv, _mm512_set1_ps(dx[i * G + g])), t);      \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        for (int j = 0; j < NR; j++) {                                                                      \
            const int64_t n = n0 + 16 * j;                                                                  \
            const __mmask16 mk = N - n >= 16 ? 0xFFFF : (__mmask16)((1u << (N - n)) - 1);                  \
            for (int i = 0; i < MR; i++) _mm512_mask_storeu_ps(y + i * ldy + n, mk, accf[i][j]);            \
        }                                                                                                   \
    }

#define MR4 4
#define NR4 2
TILE4(tile4_big, MR4, NR4)
TILE4(tile4_1xNR, 1, NR4)
TILE4(tile4_MRx1, MR4, 1)
TILE4(tile4_1x1, 1, 1)

void kv_q4gemm(const int8_t *xq, const float *dx, const float *xs, int64_t M, int64_t K, const uint8_t *wp,
               int64_t N, float *y) {
    const int64_t G = (K + GROUP - 1) / GROUP, N16 = (N + 15) / 16, ldx = G * GROUP;
    const int64_t groups = (N16 + NR4 - 1) / NR4, bstride = G * Q4_GROUP_BYTES;
#pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN_MACS)
    for (int64_t gi = 0; gi < groups; gi++) {
        const int64_t b0 = gi * NR4, nb = N16 - b0 < NR4 ? N16 - b0 : NR4;
        int64_t m = 0;
        for (; m + MR4 <= M; m += MR4) {
            if (nb == NR4)
                tile4_big(xq + m * ldx, ldx, dx + m * G, xs + m * G, G, wp + b0 * bstride, b0 * 16, N, y + m * N, N);
            else
                for (int64_t b = b0; b < b0 + nb; b++)
                    tile4_MRx1(xq + m * ldx, ldx, dx + m * G, xs + m * G, G, wp + b * bstride, b * 16, N, y + m * N, N);
        }
        for (; m < M; m++) {
            if (nb == NR4)
                tile4_1xNR(xq + m * ldx, ldx, dx + m * G, xs + m * G, G, wp + b0 * bstride, b0 * 16, N, y + m * N, N);
            else
                for (int64_t b = b0; b < b0 + nb; b++)
                    tile4_1x1(xq + m * ldx, ldx, dx + m * G, xs + m * G, G, wp + b * bstride, b * 16, N, y + m * N, N);
        }
    }
}

void kv_linear_q4(const float *x, int64_t M, int64_t K, const uint8_t *wp, int64_t N, float *y) {
    const int64_t G = (K + GROUP - 1) / GROUP;
    int8_t *xq = (int8_t *)malloc((size_t)(M * G * GROUP));
    float *dx = (float *)malloc(sizeof(float) * (size_t)(M * G) * 2);
    kv_quantize_act_s8(x, M, K, xq, dx, dx + M * G);
    kv_q4gemm(xq, dx, dx + M * G, M, K, wp, N, y);
    free(xq);
    free(dx);
}

/* ---------------------------------------------------------------------------------------------
 * Fused decode step of a Llama-family decoder: every layer of a batch of single-token sequences
 * in one call, so the per-op interpreter and dispatch cost (about 8 ms per token over 30 layers
 * when each op is a torch call) disappears. Per layer:
 *   h = rmsnorm(x) ; qkv = h W_qkv (+b) ; [q/k rmsnorm per head] ; rotary(q, k) ;
 *   write k, v at their slots ; a = paged attention(q) ; x += a W_o ;
 *   h = rmsnorm(x) ; x += (silu(h W_gate) * h W_up) W_down
 * Every op is per token with a fixed order, so a token's result does not depend on its batch.
 * --------------------------------------------------------------------------------------------- */
typedef struct {
    int64_t kind; /* 0: int8 (wp, dw, corr), 1: int4 (wp) */
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
    int32_t cache_dtype; /* 0 float32, 1 bfloat16, 2 int8 */
    const float *cos, *sin; /* [max_position, rot_dim] */
} kv_model_t;

static void rmsnorm_row(const float *x, const float *w, int64_t n, float eps, float *y) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        acc = _mm512_fmadd_ps(v, v, acc);
    }
    float ss = _mm512_reduce_add_ps(acc);
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

/* one head row of K or V into the cache, as kvserve.layers.attention.write_kv_cache stores it */
static void store_row(void *cache, float *scales, int64_t row, const float *v, int64_t D, int dtype) {
    if (dtype == 0) {
        __builtin_memcpy((float *)cache + row * D, v, sizeof(float) * D);
    } else if (dtype == 1) {
        uint16_t *dst = (uint16_t *)cache + row * D;
        for (int64_t i = 0; i < D; i++) dst[i] = to_bf16(v[i]);
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

static void qlinear(const kv_qlinear_t *l, const float *x, int64_t M, float *y) {
    if (l->kind == 1)
        kv_linear_q4(x, M, l->K, (const uint8_t *)l->wp, l->N, y);
    else
        kv_linear(x, M, l->K, (const int8_t *)l->wp, l->dw, l->corr, l->N, y);
    if (l->bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < l->N; n++) y[m * l->N + n] += l->bias[n];
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

void kv_llama_decode(const kv_model_t *cfg, const kv_layer_t *layers, int64_t n_layers, float *x, int64_t M,
                     const int64_t *positions, const int64_t *slots, const int32_t *block_tables, int64_t bt_stride,
                     const int32_t *seq_lens) {
    const int64_t Hd = cfg->hidden, H = cfg->n_heads, Hkv = cfg->n_kv, D = cfg->head_dim, I = cfg->inter;
    const int64_t qs = H * D, kvs = Hkv * D, nqkv = qs + 2 * kvs, rot = cfg->rot_dim;
    float *h = (float *)malloc(sizeof(float) * M * Hd);
    float *qkv = (float *)malloc(sizeof(float) * M * nqkv);
    float *q = (float *)malloc(sizeof(float) * M * qs);
    float *att = (float *)malloc(sizeof(float) * M * qs);
    float *gu = (float *)malloc(sizeof(float) * M * 2 * I);
    float *act = (float *)malloc(sizeof(float) * M * I);
    float *out = (float *)malloc(sizeof(float) * M * Hd);
#ifdef KV_PROFILE
    double prof_last = now_s();
#endif
    for (int64_t li = 0; li < n_layers; li++) {
        const kv_layer_t *L = layers + li;
        for (int64_t m = 0; m < M; m++) rmsnorm_row(x + m * Hd, L->ln1, Hd, cfg->eps, h + m * Hd);
        PROF(0);
        qlinear(&L->qkv, h, M, qkv);
        PROF(1);
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
        kv_paged_decode_attention(q, L->k_cache, L->v_cache, L->k_scale, L->v_scale, cfg->cache_dtype, block_tables,
                                  bt_stride, seq_lens, M, H, Hkv, D, cfg->block_size, cfg->attn_scale, att);
        PROF(3);
        qlinear(&L->o, att, M, out);
        PROF(4);
        for (int64_t i = 0; i < M * Hd; i++) x[i] += out[i];
        for (int64_t m = 0; m < M; m++) rmsnorm_row(x + m * Hd, L->ln2, Hd, cfg->eps, h + m * Hd);
        PROF(0);
        qlinear(&L->gate_up, h, M, gu);
        PROF(5);
        for (int64_t m = 0; m < M; m++)
            for (int64_t i = 0; i < I; i++) {
                const float g = gu[m * 2 * I + i];
                act[m * I + i] = g / (1.0f + expf(-g)) * gu[m * 2 * I + I + i];
            }
        PROF(6);
        qlinear(&L->down, act, M, out);
        PROF(7);
        for (int64_t i = 0; i < M * Hd; i++) x[i] += out[i];
    }
    free(h), free(qkv), free(q), free(att), free(gu), free(act), free(out);
}
