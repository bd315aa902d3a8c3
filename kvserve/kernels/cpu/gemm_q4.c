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
#define Q4_PREFETCH 8 /* groups ahead */
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
                     const uint8_t *wp, int64_t n0, int64_t N, float *y, int64_t ldy) {                      \
        vf accf[MR][NR];                                                                                    \
        for (int i = 0; i < MR; i++)                                                                        \
            for (int j = 0; j < NR; j++) accf[i][j] = vf_zero();                                            \
        for (int64_t g = 0; g < G; g++) {                                                                   \
            vi acc[MR][NR];                                                                                 \
            for (int j = 0; j < NR; j++) /* stream ahead: one core's misses alone do not fill the bus */  \
                for (int c = 0; c < Q4_GROUP_BYTES; c += 64)                                                \
                    kv_prefetch((const char *)wp + (j * G + g + Q4_PREFETCH) * Q4_GROUP_BYTES + c);        \
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
TILE4(tile4_big, MR4, NR4)
TILE4(tile4_4xNR, 4, NR4)
TILE4(tile4_2xNR, 2, NR4)
TILE4(tile4_1xNR, 1, NR4)
TILE4(tile4_MRx1, MR4, 1)
TILE4(tile4_4x1, 4, 1)
TILE4(tile4_2x1, 2, 1)
TILE4(tile4_1x1, 1, 1)

typedef void (*tile4_fn)(const int8_t *, int64_t, const float *, const float *, int64_t, const uint8_t *, int64_t,
                         int64_t, float *, int64_t);

void kv_q4gemm(const int8_t *xq, const float *dx, const float *xs, int64_t M, int64_t K, const uint8_t *wp,
               int64_t N, float *y) {
    const int64_t G = (K + GROUP - 1) / GROUP, N16 = (N + 15) / 16, ldx = G * GROUP;
    const int64_t groups = (N16 + NR4 - 1) / NR4, bstride = G * Q4_GROUP_BYTES;
#pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN_MACS)
    for (int64_t gi = 0; gi < groups; gi++) {
        const int64_t b0 = gi * NR4, nb = N16 - b0 < NR4 ? N16 - b0 : NR4;
        /* rows in tiles of MR4, then the rest in tiles of 4, 2 and 1 (each tile reads its weights once) */
        for (int64_t m = 0; m < M;) {
            const int64_t left = M - m, mr = left >= MR4 ? MR4 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            const tile4_fn full = mr == MR4 ? tile4_big : mr == 4 ? tile4_4xNR : mr == 2 ? tile4_2xNR : tile4_1xNR;
            const tile4_fn one = mr == MR4 ? tile4_MRx1 : mr == 4 ? tile4_4x1 : mr == 2 ? tile4_2x1 : tile4_1x1;
            if (nb == NR4)
                full(xq + m * ldx, ldx, dx + m * G, xs + m * G, G, wp + b0 * bstride, b0 * 16, N, y + m * N, N);
            else
                for (int64_t b = b0; b < b0 + nb; b++)
                    one(xq + m * ldx, ldx, dx + m * G, xs + m * G, G, wp + b * bstride, b * 16, N, y + m * N, N);
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
    kv_q4gemm(xq, dx, dx + M * G, M, K, wp, N, y);
    free(xq), free(dx);
    return 0;
}
