/* int4 x int8 GEMM: 4-bit weights with a scale and a minimum per 32 input values (GGUF Q4_1's
 * arithmetic: w = d * q + m, q in 0..15), activations int8 per token and group of 32 (signed).
 * The weights are the unsigned operand of the byte dot product, so per group
 *
 *   sum_k w[n,k] x[k] = dx * (d[n,g] * isum(q[n,:] . xq) + m[n,g] * sum_k xq[k])
 *
 * with an exact int32 isum. Packing, per block of 16 channels and group of 32: 256 bytes of
 * nibbles (byte (c, r) of k-step s holds step s in its low and step s+4 in its high nibble), then
 * 16 fp16 d and 16 fp16 m: 320 bytes, read as one stream. */
#include "common.h"

#define Q4_GROUP_BYTES 320
#ifndef Q4_PREFETCH
#define Q4_PREFETCH 16 /* groups ahead (kv_prefetch_tile) */
#endif

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

/* A group's 8 dot steps (4 k-steps x low and high nibbles) accumulate in int32, or where the ISA
 * has it (KV_DOT16) in int16 lanes widened once per group: both exact (see simd.h). */
#if KV_DOT16
#define KV_Q4_ACC_DECL(MR, NR)                                                                                    \
    vs acc16[MR][NR];                                                                                       \
    for (int i = 0; i < MR; i++)                                                                            \
        for (int j = 0; j < NR; j++) acc16[i][j] = vs_zero();
#define KV_Q4_DOT(i, j, a, b) (acc16[i][j] = vs_dot_u8s8(acc16[i][j], a, b))
#define KV_Q4_ACC_DONE(MR, NR)                                                                                    \
    for (int i = 0; i < MR; i++)                                                                            \
        for (int j = 0; j < NR; j++) acc[i][j] = vs_widen(acc16[i][j]);
#else
#define KV_Q4_ACC_DECL(MR, NR)                                                                                    \
    for (int i = 0; i < MR; i++)                                                                            \
        for (int j = 0; j < NR; j++) acc[i][j] = vi_zero();
#define KV_Q4_DOT(i, j, a, b) (acc[i][j] = vi_dot_u8s8(acc[i][j], a, b))
#define KV_Q4_ACC_DONE(MR, NR)
#endif

#define TILE4(NAME, MR, NR)                                                                                 \
    static void NAME(const int8_t *xq, int64_t ldx, const float *dx, const float *xs, int64_t G,            \
                     const uint8_t *wp, int64_t n0, int64_t N, float *y, int64_t ldy, int pf) {              \
        vf accf[MR][NR];                                                                                    \
        for (int i = 0; i < MR; i++)                                                                        \
            for (int j = 0; j < NR; j++) accf[i][j] = vf_zero();                                            \
        for (int64_t g = 0; g < G; g++) {                                                                   \
            vi acc[MR][NR];                                                                                 \
            if (pf) /* the first row tile over these blocks: the later ones read them from cache */          \
                kv_prefetch_tile(wp, NR, G, g, Q4_PREFETCH, Q4_GROUP_BYTES);                               \
            KV_Q4_ACC_DECL(MR, NR)                                                                          \
            for (int s = 0; s < 4; s++) {                                                                   \
                vb lo[NR], hi[NR];                                                                          \
                for (int j = 0; j < NR; j++) {                                                              \
                    const vb v = vb_load(wp + (j * G + g) * Q4_GROUP_BYTES + s * 64);                       \
                    lo[j] = vb_lo4(v);                                                                      \
                    hi[j] = vb_hi4(v);                                                                      \
                }                                                                                           \
                for (int i = 0; i < MR; i++) {                                                              \
                    const int8_t *xr = xq + i * ldx + g * GROUP + s * 4;                                    \
                    const vb xa = vb_bcast4(xr), xb = vb_bcast4(xr + 16);                                   \
                    for (int j = 0; j < NR; j++) {                                                          \
                        KV_Q4_DOT(i, j, lo[j], xa);                                                         \
                        KV_Q4_DOT(i, j, hi[j], xb);                                                         \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
            KV_Q4_ACC_DONE(MR, NR)                                                                          \
            for (int j = 0; j < NR; j++) {                                                                  \
                const uint16_t *sc = (const uint16_t *)(wp + (j * G + g) * Q4_GROUP_BYTES + 256);           \
                const vf dv = vf_load_f16(sc), mv = vf_load_f16(sc + 16);                                   \
                for (int i = 0; i < MR; i++) {                                                              \
                    const vf t = vf_fmadd(mv, vf_set1(xs[i * G + g]), accf[i][j]);                          \
                    accf[i][j] = vf_fmadd(vi_to_vf(acc[i][j]), vf_mul(dv, vf_set1(dx[i * G + g])), t);      \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        for (int j = 0; j < NR; j++) {                                                                      \
            const int64_t n = n0 + 16 * j;                                                                  \
            for (int i = 0; i < MR; i++) vf_store_n(y + i * ldy + n, accf[i][j], N - n);                    \
        }                                                                                                   \
    }

/* rows x 16-channel blocks per tile; override with -DKV_Q4_MR / -DKV_Q4_NR (KVSERVE_CFLAGS) to tune.
 * AVX2 has 16 registers of half a vector: one block of channels per tile keeps the accumulators of
 * 8 rows and the block's nibbles in registers (4 x 2 spilled in the inner loop; 8 x 1 is 1.1x at
 * M >= 16 with and without AVX-VNNI) */
#ifdef KV_Q4_MR
#define MR4 KV_Q4_MR
#elif defined(KV_ISA_AVX2)
#define MR4 8
#else
#define MR4 4
#endif
#ifdef KV_Q4_NR
#define NR4 KV_Q4_NR
#elif defined(KV_ISA_AVX2)
#define NR4 1
#else
#define NR4 2
#endif
/* rows of the next tile when `left` remain: MR4, then the rest in one tile (there is one for each count
 * below MR4, up to 7), not in tiles of 4, 2 and 1 that each unpack the nibbles again: a verify step's
 * 3, 5 and 7 rows ran 1.09-1.16x faster on AVX2 (Zen 3, the default model's 30 layers, same-process A/B) */
#if MR4 > 8
#define Q4_REST_MAX 7
#else
#define Q4_REST_MAX (MR4 - 1)
#endif
static int64_t tile_rows(int64_t left) { return left >= MR4 ? MR4 : left > Q4_REST_MAX ? Q4_REST_MAX : left; }

#if defined(KV_ISA_AVX2) && KV_DOT16 && NR4 == 1
/* AVX2 without VNNI: the same arithmetic, one half of the 16-channel block (one register) at a time,
 * so a tile of 8 rows keeps its 8 int16 accumulators, the half's nibbles and the broadcasts in the
 * 16 registers (both halves at once, as TILE4 does, spilled accumulators to the stack). The
 * tile's activations are read from an interleaved copy made once per call (interleave_rows), so one
 * pointer with constant offsets addresses all of its rows; the float accumulators are touched once per
 * group and live in memory. Same integers and the same float operations in the same order as TILE4:
 * bit-identical. */
#define Q4_HALVES 1
#ifndef Q4_HALVES_MIN_ROWS
#define Q4_HALVES_MIN_ROWS 4
#endif
/* Rows in tiles of mr (tile_rows, as kv_q4gemm walks them); tile at row m0 holds, per group
 * g: 8 chunks (k-step s, low/high half) x mr rows x 4 bytes at xt + m0 * G * 32 + g * mr * 32, and
 * mr dx then mr xs at st + m0 * G * 2 + g * mr * 2. */
static void interleave_rows(const int8_t *xq, const float *dx, const float *xs, int64_t M, int64_t G, int8_t *xt,
                            float *st) {
    const int64_t ldx = G * GROUP;
    for (int64_t m0 = 0, mr; m0 < M; m0 += mr) {
        mr = tile_rows(M - m0);
        int8_t *tx = xt + m0 * G * GROUP;
        float *ts = st + m0 * G * 2;
        for (int64_t g = 0; g < G; g++)
            for (int64_t i = 0; i < mr; i++) {
                for (int c = 0; c < 8; c++) /* chunk c: k-step c / 2, low (k 0..15) or high half */
                    memcpy(tx + (g * 8 + c) * mr * 4 + i * 4,
                           xq + (m0 + i) * ldx + g * GROUP + (c >> 1) * 4 + (c & 1) * 16, 4);
                ts[g * 2 * mr + i] = dx[(m0 + i) * G + g];
                ts[g * 2 * mr + mr + i] = xs[(m0 + i) * G + g];
            }
    }
}
#define TILE4_HALVES(NAME, MR)                                                                              \
    static void NAME(const int8_t *xt, const float *st, int64_t G, const uint8_t *wp, int64_t n0, int64_t N, \
                     float *y, int64_t ldy) {                                                               \
        const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi16(1);                             \
        __m256 accf[MR][2];                                                                                 \
        for (int i = 0; i < MR; i++) accf[i][0] = accf[i][1] = _mm256_setzero_ps();                         \
        for (int64_t g = 0; g < G; g++) {                                                                   \
            const uint8_t *wg = wp + g * Q4_GROUP_BYTES;                                                    \
            for (int c = 0; c < Q4_GROUP_BYTES; c += 64) kv_prefetch(wg + 8 * Q4_GROUP_BYTES + c);         \
            for (int h = 0; h < 2; h++) {                                                                   \
                const int8_t *xg = xt + g * MR * 32;                                                        \
                __asm__("" : "+r"(xg)); /* opaque: the broadcasts are redone per half, not hoisted and spilled */ \
                __m256i acc[MR];                                                                            \
                for (int s = 0; s < 4; s++) {                                                               \
                    const __m256i v = _mm256_loadu_si256((const __m256i *)(wg + s * 64 + h * 32));          \
                    const __m256i lo = _mm256_and_si256(v, m4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), m4); \
                    for (int i = 0; i < MR; i++) {                                                          \
                        int32_t a, b;                                                                       \
                        memcpy(&a, xg + (2 * s) * MR * 4 + i * 4, 4);                                       \
                        memcpy(&b, xg + (2 * s + 1) * MR * 4 + i * 4, 4);                                   \
                        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(a)),  \
                                                           _mm256_maddubs_epi16(hi, _mm256_set1_epi32(b))); \
                        acc[i] = s ? _mm256_add_epi16(acc[i], p) : p;                                       \
                        __asm__("" : "+x"(acc[i])); /* in order, in a register (gcc else stacks products) */ \
                    }                                                                                       \
                }                                                                                           \
                const uint16_t *sc = (const uint16_t *)(wg + 256) + h * 8;                                  \
                const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)sc));                    \
                const __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 16)));             \
                const float *sg = st + g * 2 * MR;                                                          \
                for (int i = 0; i < MR; i++) {                                                              \
                    const __m256 t = _mm256_fmadd_ps(mv, _mm256_broadcast_ss(sg + MR + i), accf[i][h]);     \
                    const __m256 f = _mm256_cvtepi32_ps(_mm256_madd_epi16(acc[i], one));                    \
                    accf[i][h] = _mm256_fmadd_ps(f, _mm256_mul_ps(dv, _mm256_broadcast_ss(sg + i)), t);     \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        for (int i = 0; i < MR; i++) vf_store_n(y + i * ldy + n0, vf_make(accf[i][0], accf[i][1]), N - n0);  \
    }
TILE4_HALVES(tileh_big, MR4)
TILE4_HALVES(tileh_1, 1)
#if Q4_REST_MAX >= 2
TILE4_HALVES(tileh_2, 2)
#endif
#if Q4_REST_MAX >= 3
TILE4_HALVES(tileh_3, 3)
#endif
#if Q4_REST_MAX >= 4
TILE4_HALVES(tileh_4, 4)
#endif
#if Q4_REST_MAX >= 5
TILE4_HALVES(tileh_5, 5)
#endif
#if Q4_REST_MAX >= 6
TILE4_HALVES(tileh_6, 6)
#endif
#if Q4_REST_MAX >= 7
TILE4_HALVES(tileh_7, 7)
#endif
typedef void (*tileh_fn)(const int8_t *, const float *, int64_t, const uint8_t *, int64_t, int64_t, float *, int64_t);

static tileh_fn tileh_for(int64_t mr) {
    switch (mr) {
#if Q4_REST_MAX >= 2
    case 2: return tileh_2;
#endif
#if Q4_REST_MAX >= 3
    case 3: return tileh_3;
#endif
#if Q4_REST_MAX >= 4
    case 4: return tileh_4;
#endif
#if Q4_REST_MAX >= 5
    case 5: return tileh_5;
#endif
#if Q4_REST_MAX >= 6
    case 6: return tileh_6;
#endif
#if Q4_REST_MAX >= 7
    case 7: return tileh_7;
#endif
    default: return mr == MR4 ? tileh_big : tileh_1;
    }
}

static void q4gemm_halves(const int8_t *xt, const float *st, int64_t M, int64_t K, const uint8_t *wp, int64_t N,
                          float *y) {
    const int64_t G = (K + GROUP - 1) / GROUP, N16 = (N + 15) / 16, bstride = G * Q4_GROUP_BYTES;
#pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN_MACS)
    for (int64_t b = 0; b < N16; b++) /* a block's weights stay in L1 while the row tiles sweep them */
        for (int64_t m = 0, mr; m < M; m += mr) {
            mr = tile_rows(M - m);
            const int8_t *tx = xt + m * G * GROUP;
            const float *ts = st + m * G * 2;
            float *yb = y + m * N;
            tileh_for(mr)(tx, ts, G, wp + b * bstride, b * 16, N, yb, N);
        }
}

/* the halves GEMM on activations quantized per row (kv_quantize_act_s8's layout): 0, or -1 when the
 * interleaved copy could not be allocated */
static int q4gemm_interleaved(const int8_t *xq, const float *dx, const float *xs, int64_t M, int64_t K,
                              const uint8_t *wp, int64_t N, float *y) {
    const int64_t G = (K + GROUP - 1) / GROUP;
    int8_t *xt = KV_ALLOC(int8_t, M * G * GROUP);
    float *st = KV_ALLOC(float, M * G * 2);
    if (xt && st) {
        interleave_rows(xq, dx, xs, M, G, xt, st);
        q4gemm_halves(xt, st, M, K, wp, N, y);
    }
    const int rc = xt && st ? 0 : -1;
    free(xt), free(st);
    return rc;
}
#else
#define Q4_HALVES 0
#endif
/* tiles of r rows x NR4 blocks and of r rows x 1 block (the last channels), for r = MR4 and the rests */
#define TILE4_PAIR(R, SUFFIX) TILE4(tile4_##SUFFIX##xNR, R, NR4) TILE4(tile4_##SUFFIX##x1, R, 1)
TILE4_PAIR(MR4, big)
TILE4_PAIR(1, 1)
#if Q4_REST_MAX >= 2
TILE4_PAIR(2, 2)
#endif
#if Q4_REST_MAX >= 3
TILE4_PAIR(3, 3)
#endif
#if Q4_REST_MAX >= 4
TILE4_PAIR(4, 4)
#endif
#if Q4_REST_MAX >= 5
TILE4_PAIR(5, 5)
#endif
#if Q4_REST_MAX >= 6
TILE4_PAIR(6, 6)
#endif
#if Q4_REST_MAX >= 7
TILE4_PAIR(7, 7)
#endif

typedef void (*tile4_fn)(const int8_t *, int64_t, const float *, const float *, int64_t, const uint8_t *, int64_t,
                         int64_t, float *, int64_t, int);

/* the tile of mr rows: of NR4 blocks (full) or of one */
static tile4_fn tile4_for(int64_t mr, int full) {
    switch (mr) {
#if Q4_REST_MAX >= 2
    case 2: return full ? tile4_2xNR : tile4_2x1;
#endif
#if Q4_REST_MAX >= 3
    case 3: return full ? tile4_3xNR : tile4_3x1;
#endif
#if Q4_REST_MAX >= 4
    case 4: return full ? tile4_4xNR : tile4_4x1;
#endif
#if Q4_REST_MAX >= 5
    case 5: return full ? tile4_5xNR : tile4_5x1;
#endif
#if Q4_REST_MAX >= 6
    case 6: return full ? tile4_6xNR : tile4_6x1;
#endif
#if Q4_REST_MAX >= 7
    case 7: return full ? tile4_7xNR : tile4_7x1;
#endif
    default: return mr == MR4 ? (full ? tile4_bigxNR : tile4_bigx1) : (full ? tile4_1xNR : tile4_1x1);
    }
}

void kv_q4gemm(const int8_t *xq, const float *dx, const float *xs, int64_t M, int64_t K, const uint8_t *wp,
               int64_t N, float *y) {
    const int64_t G = (K + GROUP - 1) / GROUP, N16 = (N + 15) / 16, ldx = G * GROUP;
    const int64_t groups = (N16 + NR4 - 1) / NR4, bstride = G * Q4_GROUP_BYTES;
#pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN_MACS)
    for (int64_t gi = 0; gi < groups; gi++) {
        const int64_t b0 = gi * NR4, nb = N16 - b0 < NR4 ? N16 - b0 : NR4;
        /* rows in tiles of MR4, then the rest in one tile (each tile reads its weights once) */
        for (int64_t m = 0; m < M;) {
            const int64_t mr = tile_rows(M - m);
            const tile4_fn full = tile4_for(mr, 1), one = tile4_for(mr, 0);
            if (nb == NR4)
                full(xq + m * ldx, ldx, dx + m * G, xs + m * G, G, wp + b0 * bstride, b0 * 16, N, y + m * N, N, m == 0);
            else
                for (int64_t b = b0; b < b0 + nb; b++)
                    one(xq + m * ldx, ldx, dx + m * G, xs + m * G, G, wp + b * bstride, b * 16, N, y + m * N, N, m == 0);
            m += mr;
        }
    }
}

/* Returns 0, or -1 when the activation scratch could not be allocated. */
int kv_linear_q4(const float *x, int64_t M, int64_t K, const uint8_t *wp, int64_t N, float *y) {
    const int64_t G = (K + GROUP - 1) / GROUP;
    int8_t *xq = KV_ALLOC(int8_t, M * G * GROUP);
    float *dx = KV_ALLOC(float, M * G * 2);
    if (!xq || !dx) {
        free(xq), free(dx);
        return -1;
    }
    kv_quantize_act_s8(x, M, K, xq, dx, dx + M * G);
    int rc = 0;
#if Q4_HALVES
    if (M >= Q4_HALVES_MIN_ROWS) /* 1-3 rows, bound by the weights' stream, keep one broadcast for both halves */
        rc = q4gemm_interleaved(xq, dx, dx + M * G, M, K, wp, N, y);
    else
#endif
        kv_q4gemm(xq, dx, dx + M * G, M, K, wp, N, y);
    free(xq), free(dx);
    return rc;
}
