/* 5-, 6- and 8-bit weights x int8 activations: the GGUF formats wider than 4 bits (Q5_K, Q6_K,
 * Q8_0) in one layout. Unsigned codes u of 4 + H bits (H = 1, 2, 4) with an fp16 scale s and
 * minimum m per 16 inputs (half a group): w = s * u + m. Q6_K's sub-blocks of 16 are s = d * scale,
 * m = -32 s; Q5_K's of 32 are s = d * scale, m = -dmin * min on both halves; Q8_0 is u = q + 128,
 * s = d, m = -128 d; the 4-bit formats fit too (a fused projection whose parts differ in format
 * takes the widest). Activations are int8 per token and group of 32, so per half group
 *
 *   sum_k w[n,k] x[k] = dx * (s * isum(u . xq) + m * sum_k xq[k])
 *
 * with an exact int32 isum on every ISA: codes of up to 6 bits are the unsigned operand of the
 * byte dot product (VPMADDUBSW's pair sums, 2 x 63 x 127, cannot saturate); 8-bit codes take the
 * int8 GEMM's signed product (u - 128) xq, taken back from u xq through the half group's integer
 * sum where the ISA multiplies u x, so those are packed with m + 128 s in place of m.
 *
 * Packing, per block of 16 channels and group of 32, read as one stream:
 *   256 bytes of low nibbles laid out as the int4 kernel's (byte (c, r) of step s: the low nibble
 *     holds k = 4s + r, the high nibble k = 16 + 4s + r);
 *   64 H bytes of high bits: step s's are in vector 2Hs / 8 of them, byte (c, r), the first half's
 *     H bits at bit 2Hs % 8 and the second half's just above;
 *   16 fp16 s of the first half, 16 of the second, then 16 m of each. */
#include "common.h"

#define WIDE_BYTES(H) (256 + 64 * (H) + 128)
#ifndef WIDE_PREFETCH
#define WIDE_PREFETCH 12 /* groups ahead (kv_prefetch_tile; 5-bit codes: 1.11x over 6 at M = 1-2, Zen 4) */
#endif

/* q [N, K] codes below 2^(4+H), s/m [N, 2G] fp16 bits (per half group) -> the packed layout */
void kv_pack_wide(const uint8_t *q, const uint16_t *s, const uint16_t *mn, int64_t N, int64_t K, int64_t H,
                  uint8_t *wp) {
    const int64_t G = (K + GROUP - 1) / GROUP, N16 = (N + 15) / 16, bytes = WIDE_BYTES(H);
    const uint8_t mask = (uint8_t)((1 << H) - 1);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < N16; b++)
        for (int64_t g = 0; g < G; g++) {
            uint8_t *dst = wp + (b * G + g) * bytes, *plane = dst + 256;
            for (int64_t i = 0; i < 64 * H; i++) plane[i] = 0;
            for (int64_t st = 0; st < 4; st++)
                for (int64_t c = 0; c < 16; c++)
                    for (int64_t r = 0; r < 4; r++) {
                        const int64_t n = b * 16 + c, klo = g * GROUP + st * 4 + r, khi = klo + 16;
                        const uint8_t lo = (n < N && klo < K) ? q[n * K + klo] : 0;
                        const uint8_t hi = (n < N && khi < K) ? q[n * K + khi] : 0;
                        dst[(st * 16 + c) * 4 + r] = (uint8_t)((lo & 0x0F) | (hi << 4));
                        const int64_t bit = (2 * H * st) % 8;
                        uint8_t *pb = plane + (2 * H * st) / 8 * 64 + c * 4 + r;
                        *pb |= (uint8_t)(((lo >> 4) & mask) << bit);
                        *pb |= (uint8_t)(((hi >> 4) & mask) << (bit + H));
                    }
            uint16_t *sc = (uint16_t *)(plane + 64 * H);
            for (int64_t h = 0; h < 2; h++)
                for (int64_t c = 0; c < 16; c++) {
                    const int64_t n = b * 16 + c;
                    sc[h * 16 + c] = n < N ? s[n * 2 * G + 2 * g + h] : 0;
                    sc[32 + h * 16 + c] = n < N ? mn[n * 2 * G + 2 * g + h] : 0;
                }
        }
}

#define WIDE_DOT(H, acc, a, b) ((H) == 4 ? vi_dot_q8(acc, a, b) : vi_dot_u8s8(acc, a, b))

#define TILEW(NAME, MR, NR, H)                                                                              \
    static void NAME(const int8_t *xq, int64_t ldx, const float *dx, const float *xs, const int32_t *hs,    \
                     int64_t G, const uint8_t *wp, int64_t n0, int64_t N, float *y, int64_t ldy) {          \
        enum { BYTES = WIDE_BYTES(H) };                                                                     \
        vf accf[MR][NR];                                                                                    \
        for (int i = 0; i < MR; i++)                                                                        \
            for (int j = 0; j < NR; j++) accf[i][j] = vf_zero();                                            \
        for (int64_t g = 0; g < G; g++) {                                                                   \
            vi alo[MR][NR], ahi[MR][NR];                                                                    \
            kv_prefetch_tile(wp, NR, G, g, WIDE_PREFETCH, BYTES);                                           \
            for (int i = 0; i < MR; i++)                                                                    \
                for (int j = 0; j < NR; j++) alo[i][j] = ahi[i][j] = vi_zero();                             \
            for (int st = 0; st < 4; st++) {                                                                \
                vb lo[NR], hi[NR];                                                                          \
                for (int j = 0; j < NR; j++) {                                                              \
                    const uint8_t *blk = wp + (j * G + g) * BYTES;                                          \
                    const vb v = vb_load(blk + st * 64), hb = vb_load(blk + 256 + (2 * H * st) / 8 * 64);   \
                    lo[j] = vb_or(vb_lo4(v), vb_hibits(hb, (2 * H * st) % 8, H));                           \
                    hi[j] = vb_or(vb_hi4(v), vb_hibits(hb, (2 * H * st) % 8 + H, H));                       \
                }                                                                                           \
                for (int i = 0; i < MR; i++) {                                                              \
                    const int8_t *xr = xq + i * ldx + g * GROUP + st * 4;                                   \
                    const vb xa = vb_bcast4(xr), xb = vb_bcast4(xr + 16);                                   \
                    for (int j = 0; j < NR; j++) {                                                          \
                        alo[i][j] = WIDE_DOT(H, alo[i][j], lo[j], xa);                                      \
                        ahi[i][j] = WIDE_DOT(H, ahi[i][j], hi[j], xb);                                      \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
            for (int j = 0; j < NR; j++) {                                                                  \
                const uint16_t *sc = (const uint16_t *)(wp + (j * G + g) * BYTES + 256 + 64 * H);           \
                const vf slo = vf_load_f16(sc), shi = vf_load_f16(sc + 16);                                 \
                const vf mlo = vf_load_f16(sc + 32), mhi = vf_load_f16(sc + 48);                            \
                for (int i = 0; i < MR; i++) {                                                              \
                    const int64_t ig = (i * G + g) * 2;                                                     \
                    if ((H) == 4 && KV_DOT_Q8_NEEDS_CORR) { /* u xq -> (u - 128) xq */                      \
                        alo[i][j] = vi_add(alo[i][j], vi_set1(-128 * hs[ig]));                              \
                        ahi[i][j] = vi_add(ahi[i][j], vi_set1(-128 * hs[ig + 1]));                          \
                    }                                                                                       \
                    const vf d = vf_set1(dx[i * G + g]);                                                    \
                    vf t = vf_fmadd(mlo, vf_set1(xs[ig]), accf[i][j]);                                      \
                    t = vf_fmadd(mhi, vf_set1(xs[ig + 1]), t);                                              \
                    t = vf_fmadd(vi_to_vf(alo[i][j]), vf_mul(slo, d), t);                                   \
                    accf[i][j] = vf_fmadd(vi_to_vf(ahi[i][j]), vf_mul(shi, d), t);                          \
                }                                                                                           \
            }                                                                                               \
        }                                                                                                   \
        for (int j = 0; j < NR; j++) {                                                                      \
            const int64_t n = n0 + 16 * j;                                                                  \
            for (int i = 0; i < MR; i++) vf_store_n(y + i * ldy + n, accf[i][j], N - n);                    \
        }                                                                                                   \
    }

/* two accumulators per output vector: 4 rows where 32 vector registers hold them, else 2 */
#if defined(KV_ISA_AVX512)
#define MRW 4
#else
#define MRW 2
#endif
#define NRW 2

typedef void (*tilew_fn)(const int8_t *, int64_t, const float *, const float *, const int32_t *, int64_t,
                         const uint8_t *, int64_t, int64_t, float *, int64_t);

#define TILES_FOR(H)                                                                                        \
    TILEW(tilew##H##_big, MRW, NRW, H)                                                                      \
    TILEW(tilew##H##_2xNR, 2, NRW, H)                                                                       \
    TILEW(tilew##H##_1xNR, 1, NRW, H)                                                                       \
    TILEW(tilew##H##_MRx1, MRW, 1, H)                                                                       \
    TILEW(tilew##H##_2x1, 2, 1, H)                                                                          \
    TILEW(tilew##H##_1x1, 1, 1, H)                                                                          \
    static void gemm_wide##H(const int8_t *xq, const float *dx, const float *xs, const int32_t *hs, int64_t M,  \
                             int64_t K, const uint8_t *wp, int64_t N, float *y) {                           \
        const int64_t G = (K + GROUP - 1) / GROUP, N16 = (N + 15) / 16, ldx = G * GROUP;                   \
        const int64_t groups = (N16 + NRW - 1) / NRW, bstride = G * WIDE_BYTES(H);                          \
        _Pragma("omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN_MACS)")                   \
        for (int64_t gi = 0; gi < groups; gi++) {                                                           \
            const int64_t b0 = gi * NRW, nb = N16 - b0 < NRW ? N16 - b0 : NRW;                              \
            for (int64_t m = 0; m < M;) { /* tiles of MRW rows, then of 2 and 1 */                          \
                const int64_t mr = M - m >= MRW ? MRW : M - m >= 2 ? 2 : 1;                                 \
                const tilew_fn full = mr == MRW ? tilew##H##_big : mr == 2 ? tilew##H##_2xNR : tilew##H##_1xNR; \
                const tilew_fn one = mr == MRW ? tilew##H##_MRx1 : mr == 2 ? tilew##H##_2x1 : tilew##H##_1x1;   \
                if (nb == NRW)                                                                              \
                    full(xq + m * ldx, ldx, dx + m * G, xs + 2 * m * G, hs + 2 * m * G, G, wp + b0 * bstride,  \
                         b0 * 16, N, y + m * N, N);                                                         \
                else                                                                                        \
                    for (int64_t b = b0; b < b0 + nb; b++)                                                  \
                        one(xq + m * ldx, ldx, dx + m * G, xs + 2 * m * G, hs + 2 * m * G, G, wp + b * bstride, \
                            b * 16, N, y + m * N, N);                                                       \
                m += mr;                                                                                    \
            }                                                                                               \
        }                                                                                                   \
    }

TILES_FOR(1)
TILES_FOR(2)
TILES_FOR(4)

/* x [M, K] float32 -> y [M, N] through codes of 4 + H bits packed by kv_pack_wide. Returns 0, -1
 * when the activation scratch could not be allocated, -2 for an H other than 1, 2 or 4. */
int kv_linear_wide(const float *x, int64_t M, int64_t K, const uint8_t *wp, int64_t N, int64_t H, float *y) {
    if (H != 1 && H != 2 && H != 4) return -2;
    const int64_t G = (K + GROUP - 1) / GROUP;
    int8_t *xq = KV_ALLOC(int8_t, M * G * GROUP);
    float *dx = KV_ALLOC(float, M * G * 3);
    int32_t *hs = KV_ALLOC(int32_t, M * G * 2);
    if (!xq || !dx || !hs) {
        free(xq), free(dx), free(hs);
        return -1;
    }
    kv_quantize_act_s8h(x, M, K, xq, dx, dx + M * G, hs);
    if (H == 1) gemm_wide1(xq, dx, dx + M * G, hs, M, K, wp, N, y);
    else if (H == 2) gemm_wide2(xq, dx, dx + M * G, hs, M, K, wp, N, y);
    else gemm_wide4(xq, dx, dx + M * G, hs, M, K, wp, N, y);
    free(xq), free(dx), free(hs);
    return 0;
}
