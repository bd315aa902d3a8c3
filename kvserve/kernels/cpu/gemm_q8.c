/* int8 x int8 GEMM: per-channel int8 weights, activations per token in groups of 32.
 *
 * W [N, K] is int8 with one scale dw[n] per output channel. Each activation row (token) is
 * quantized in groups of 32 values, each group with its own scale dx[m, g], and stored as
 * unsigned bytes q + 128. Each group's dot product sum_k q[k] w[n, k] is exact in int32 on every
 * ISA (with VPDPBUSD, u8 x s8, the extra 128 * sum_{k in g} w[n, k] is taken back through the
 * precomputed -128 x group sums `corr`), then
 *
 *   y[m, n] = dw[n] * sum_g dx[m, g] * (float)isum(m, n, g)
 *
 * summed over g in order. A token's output depends on nothing but its own row, through the
 * same operations whatever tile computes it: batched == alone, bit for bit.
 * (Per-row activation scales cost +2.5% perplexity on SmolLM2; groups of 32, +0.5%.)
 */
#include "common.h"

#ifndef Q8_PREFETCH
#define Q8_PREFETCH 8 /* groups of 512 bytes ahead (kv_prefetch_tile) */
#endif

/* Weights are packed in blocks of 16 output channels: for each group of 4 k's, 16 channels x
 * 4 bytes = one 64-byte vector, so a broadcast of 4 activation bytes times that vector adds
 * 16 channels' partial dot products at once and no horizontal sums are needed.
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

/* The same layout written over the rows themselves (N a multiple of 16, K of 32: a block of 16
 * rows fills exactly the bytes it packs into), one block through a small copy at a time: a big
 * table (an LM head) never exists twice. Returns 0, or -1 when the block copy could not be allocated. */
/* Rows ids [M] of a packed int8 weight as float32, out [M, K] = W[id] * dw[id]: the lookup of an
 * embedding table shared with a tied LM head, read from the head's packed bytes. */
void kv_embed_rows(const int8_t *wp, const float *dw, int64_t K, const int64_t *ids, int64_t M, float *out) {
    const int64_t K4 = (K + GROUP - 1) / GROUP * (GROUP / 4);
    for (int64_t m = 0; m < M; m++) {
        const int64_t id = ids[m];
        const int8_t *blk = wp + (id / 16) * K4 * 64 + (id % 16) * 4;
        const float s = dw[id];
        for (int64_t k = 0; k < K; k++) out[m * K + k] = (float)blk[(k / 4) * 64 + k % 4] * s;
    }
}

int kv_pack_weight_inplace(int8_t *w, int64_t N, int64_t K) {
    if (N % 16 || K % GROUP) return -2;
    int failed = 0;
#pragma omp parallel
    {
        int8_t *tmp = KV_ALLOC(int8_t, 16 * K);
        if (!tmp) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t b = 0; b < N / 16; b++) {
            if (!tmp) continue;
            int8_t *blk = w + b * 16 * K;
            memcpy(tmp, blk, (size_t)(16 * K));
            kv_pack_weight(tmp, 16, K, blk);
        }
        free(tmp);
    }
    return failed ? -1 : 0;
}

/* AVX2 without VNNI: an int8 x int8 product takes VPMADDUBSW of |x - 128| and the weight with the sign
 * of x - 128 (simd.h). Both are made once per call into a row of 2 * ldx bytes (|s| then s), so each
 * tile's dot is VPSIGNB + VPMADDUBSW + VPMADDWD + add: 1.10x at M = 16-64 (Zen 3, the LM head's shape). */
#if defined(KV_ISA_AVX2) && !defined(__AVXVNNI__)
#define Q8_SPLIT 1
#define Q8_ROW_DOTS(i, nr)                                                                                  \
    const vb xa = vb_bcast4(xq + i * ldx + q * 4), xs = vb_bcast4(xq + i * ldx + ldx / 2 + q * 4);         \
    for (int j = 0; j < nr; j++) acc[i][j] = vi_dot_q8s(acc[i][j], xa, xs, wv[j]);
#else
#define Q8_SPLIT 0
#define Q8_ROW_DOTS(i, nr)                                                                                  \
    const vb xv = vb_bcast4(xq + i * ldx + q * 4);                                                         \
    for (int j = 0; j < nr; j++) acc[i][j] = vi_dot_q8(acc[i][j], xv, wv[j]);
#endif

/* MR tokens x NR blocks of 16 channels. corr: [N16][G][16] int32, -128 x the group sums of W.
 * ldx: the row stride of xq (2 x the padded K with Q8_SPLIT). */
#define TILE(NAME, MR, NR)                                                                                  \
    static void NAME(const uint8_t *xq, int64_t ldx, const float *dx, int64_t G, const int8_t *wp,         \
                     const float *dw, const int32_t *corr, int64_t n0, int64_t N, float *y) {             \
        const int64_t K4 = G * (GROUP / 4);                                                               \
        vf accf[MR][NR];                                                                                  \
        for (int i = 0; i < MR; i++)                                                                      \
            for (int j = 0; j < NR; j++) accf[i][j] = vf_zero();                                          \
        for (int64_t g = 0; g < G; g++) {                                                                 \
            vi acc[MR][NR];                                                                               \
            kv_prefetch_tile((const uint8_t *)wp, NR, G, g, Q8_PREFETCH, GROUP * 16);                    \
            for (int j = 0; j < NR; j++) {                                                                \
                /* with VPDPBUSD, start each group at -128 * sum(w): the u8 offset taken back */          \
                const vi c = KV_DOT_Q8_NEEDS_CORR ? vi_load(corr + ((n0 / 16 + j) * G + g) * 16) : vi_zero(); \
                for (int i = 0; i < MR; i++) acc[i][j] = c;                                               \
            }                                                                                             \
            for (int64_t q = g * (GROUP / 4); q < (g + 1) * (GROUP / 4); q++) {                           \
                vb wv[NR];                                                                                \
                for (int j = 0; j < NR; j++) wv[j] = vb_load(wp + (j * K4 + q) * 64);                     \
                for (int i = 0; i < MR; i++) {                                                            \
                    Q8_ROW_DOTS(i, NR) /* the tile's NR, passed: the macro body is rescanned */           \
                }                                                                                         \
            }                                                                                             \
            for (int i = 0; i < MR; i++) {                                                                \
                const vf d = vf_set1(dx[i * G + g]);                                                      \
                for (int j = 0; j < NR; j++) accf[i][j] = vf_fmadd(vi_to_vf(acc[i][j]), d, accf[i][j]);   \
            }                                                                                             \
        }                                                                                                 \
        for (int j = 0; j < NR; j++) {                                                                    \
            const int64_t n = n0 + 16 * j;                                                                \
            const vf dwv = vf_load_n(dw + n, N - n);                                                      \
            for (int i = 0; i < MR; i++) vf_store_n(y + i * N + n, vf_mul(accf[i][j], dwv), N - n);       \
        }                                                                                                 \
    }

#ifdef KV_Q8_MR
#define MR KV_Q8_MR
#else
#define MR 4
#endif
#ifdef KV_Q8_NR
#define NR KV_Q8_NR
#elif defined(KV_ISA_AVX2) && !defined(__AVXVNNI__)
#define NR 1 /* AVX2 without VNNI (Zen 3): one block per tile, 1.2-1.4x over 3 at M = 1-4 on the LM head (one
                stream per thread instead of three), and still ahead at M = 64 */
#else
#define NR 3
#endif
/* rows of the next tile when `left` remain: MR, then the rest in one tile (one for each count below MR,
 * up to 7): 3 rows in one tile instead of 2 + 1 ran the LM head 1.08-1.18x faster on AVX2 (Zen 3) */
#if MR > 8
#define Q8_REST_MAX 7
#else
#define Q8_REST_MAX (MR - 1)
#endif
/* tiles of r rows x NR blocks and of r rows x 1 block (the last channels), for r = MR and the rests */
#define TILE_PAIR(R, SUFFIX) TILE(tile_##SUFFIX##xNR, R, NR) TILE(tile_##SUFFIX##x1, R, 1)
TILE_PAIR(MR, big)
TILE_PAIR(1, 1)
#if Q8_REST_MAX >= 2
TILE_PAIR(2, 2)
#endif
#if Q8_REST_MAX >= 3
TILE_PAIR(3, 3)
#endif
#if Q8_REST_MAX >= 4
TILE_PAIR(4, 4)
#endif
#if Q8_REST_MAX >= 5
TILE_PAIR(5, 5)
#endif
#if Q8_REST_MAX >= 6
TILE_PAIR(6, 6)
#endif
#if Q8_REST_MAX >= 7
TILE_PAIR(7, 7)
#endif

typedef void (*tile_fn)(const uint8_t *, int64_t, const float *, int64_t, const int8_t *, const float *,
                        const int32_t *, int64_t, int64_t, float *);

/* the tile of mr rows: of NR blocks (full) or of one */
static tile_fn tile_for(int64_t mr, int full) {
    switch (mr) {
#if Q8_REST_MAX >= 2
    case 2: return full ? tile_2xNR : tile_2x1;
#endif
#if Q8_REST_MAX >= 3
    case 3: return full ? tile_3xNR : tile_3x1;
#endif
#if Q8_REST_MAX >= 4
    case 4: return full ? tile_4xNR : tile_4x1;
#endif
#if Q8_REST_MAX >= 5
    case 5: return full ? tile_5xNR : tile_5x1;
#endif
#if Q8_REST_MAX >= 6
    case 6: return full ? tile_6xNR : tile_6x1;
#endif
#if Q8_REST_MAX >= 7
    case 7: return full ? tile_7xNR : tile_7x1;
#endif
    default: return mr == MR ? (full ? tile_bigxNR : tile_bigx1) : (full ? tile_1xNR : tile_1x1);
    }
}

/* y [M, N] float32 = dequant(xq) @ dequant(W)^T with W packed by kv_pack_weight.
 * Threads split the output channels in groups of NR blocks. Returns 0, or -1 when scratch memory ran out. */
int kv_qgemm(const uint8_t *xq, const float *dx, int64_t M, int64_t K, const int8_t *wp, const float *dw,
             const int32_t *corr, int64_t N, float *y) {
    const int64_t G = (K + GROUP - 1) / GROUP, K4 = G * (GROUP / 4), N16 = (N + 15) / 16;
    const int64_t groups = (N16 + NR - 1) / NR;
#if Q8_SPLIT
    const int64_t ldx = 2 * G * GROUP;
    uint8_t *xt = KV_ALLOC(uint8_t, M * ldx);
    if (!xt) return -1;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < G * GROUP; k++) {
            const int8_t v = (int8_t)(xq[m * G * GROUP + k] ^ 0x80); /* q in -127..127 */
            xt[m * ldx + k] = (uint8_t)(v < 0 ? -v : v);
            xt[m * ldx + G * GROUP + k] = (uint8_t)v;
        }
    xq = xt;
#else
    const int64_t ldx = G * GROUP;
#endif
    /* small products (one decode token through one layer) run on the calling thread: waking the
     * pool costs more than it saves and stalls whenever another process holds a core */
#pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN_MACS)
    for (int64_t gi = 0; gi < groups; gi++) {
        const int64_t b0 = gi * NR, nb = N16 - b0 < NR ? N16 - b0 : NR;
        /* rows in tiles of MR, then the rest in one tile (each tile reads its weights once) */
        for (int64_t m = 0; m < M;) {
            const int64_t left = M - m, mr = left >= MR ? MR : left > Q8_REST_MAX ? Q8_REST_MAX : left;
            const tile_fn full = tile_for(mr, 1), one = tile_for(mr, 0);
            if (nb == NR)
                full(xq + m * ldx, ldx, dx + m * G, G, wp + b0 * K4 * 64, dw, corr, b0 * 16, N, y + m * N);
            else
                for (int64_t b = b0; b < b0 + nb; b++)
                    one(xq + m * ldx, ldx, dx + m * G, G, wp + b * K4 * 64, dw, corr, b * 16, N, y + m * N);
            m += mr;
        }
    }
#if Q8_SPLIT
    free(xt);
#endif
    return 0;
}

/* x [M, K] float32 -> y [M, N]: quantize the activations (scratch from the heap) and run kv_qgemm,
 * in one call from Python. Returns 0, or -1 when the scratch could not be allocated. */
int kv_linear(const float *x, int64_t M, int64_t K, const int8_t *wp, const float *dw, const int32_t *corr,
              int64_t N, float *y) {
    const int64_t G = (K + GROUP - 1) / GROUP;
    uint8_t *xq = KV_ALLOC(uint8_t, M * G * GROUP);
    float *dx = KV_ALLOC(float, M * G);
    if (!xq || !dx) {
        free(xq), free(dx);
        return -1;
    }
    kv_quantize_act(x, M, K, xq, dx);
    const int rc = kv_qgemm(xq, dx, M, K, wp, dw, corr, N, y);
    free(xq), free(dx);
    return rc;
}
