/* float32 GEMM for a few rows: y[M, N] = x[M, K] . w[N, K]^T (+ bias[N]), the weight in torch's own
 * [out, in] layout (nothing repacked, no second copy). A block of 4 output channels is read from
 * memory once and stays in L1 while every row's dot products run over it, so a step of a few tokens
 * (batched decode, a speculative verify) streams the weights once, as one token does; torch's GEMM
 * reads them again and again past 3 rows (measured: 5 rows 1.9x the time of one).
 *
 * Each output is one dot product in one fixed order: lane l of a 16-lane vector accumulates the
 * products k = l (mod 16) by fused multiply-add, in increasing k, zeros past K, and the lanes are
 * summed by vf_reduce_add4's tree. So an output's bits do not depend on M, on which other rows share
 * the step, on the tile, the thread count or the ISA (tested against the scalar build bit for bit). */
#include "common.h"

#define NRF 4 /* output channels per tile: one vf_reduce_add4 */
#ifndef F32_PREFETCH_ROWS
#define F32_PREFETCH_ROWS NRF
#endif
#define F32_PREFETCH (F32_PREFETCH_ROWS * K)
#ifdef KV_F32_MR /* KVSERVE_CFLAGS=-DKV_F32_MR=n to tune */
#define MRF KV_F32_MR
#elif defined(KV_ISA_AVX512)
#define MRF 6 /* rows per tile: 24 accumulators + 4 weight vectors of 32 registers (M = 5: 1.07x over 4 rows) */
#else
#define MRF 1 /* AVX2 (16 registers of half a vector) and NEON: one row's 4 accumulators; the next row
                 reads the same weights from L1 */
#endif

static inline __attribute__((always_inline)) void tile_f32(const float *x, int64_t ldx, int mr, const float *const *wr,
                                                           int64_t K, const float *bias, int64_t n0, int nr,
                                                           float *y, int64_t ldy) {
    vf acc[MRF][NRF];
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < NRF; j++) acc[i][j] = vf_zero();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        vf wv[NRF];
        for (int j = 0; j < NRF; j++) {
            wv[j] = vf_load(wr[j] + k);
            /* the next block's rows, into L2: one core's L1 misses alone do not fill the bus (into L1, Zen 4,
             * the default model's 121 linears: 19.0 / 16.7 / 15.7 GB/s at 1 / 5 / 8 rows; into L2 24.0 / 24.1
             * / 23.4, and the AVX2 variant there 1.29x / 1.45x at 1 / 5) */
            kv_prefetch_l2(wr[j] + F32_PREFETCH + k);
        }
        for (int i = 0; i < mr; i++) {
            const vf xv = vf_load(x + i * ldx + k);
            for (int j = 0; j < NRF; j++) acc[i][j] = vf_fmadd(xv, wv[j], acc[i][j]);
        }
    }
    if (k < K) {
        vf wv[NRF];
        for (int j = 0; j < NRF; j++) wv[j] = vf_load_n(wr[j] + k, K - k);
        for (int i = 0; i < mr; i++) {
            const vf xv = vf_load_n(x + i * ldx + k, K - k);
            for (int j = 0; j < NRF; j++) acc[i][j] = vf_fmadd(xv, wv[j], acc[i][j]);
        }
    }
    for (int i = 0; i < mr; i++) {
        float s[NRF];
        vf_reduce_add4(acc[i][0], acc[i][1], acc[i][2], acc[i][3], s);
        for (int j = 0; j < nr; j++) y[i * ldy + n0 + j] = bias ? s[j] + bias[n0 + j] : s[j];
    }
}

/* Returns 0 (no scratch to fail on); int for the library's uniform error convention. */
int kv_linear_f32(const float *x, int64_t M, int64_t K, const float *w, const float *bias, int64_t N, float *y) {
    const int64_t blocks = (N + NRF - 1) / NRF;
#pragma omp parallel for schedule(static) if (M * N * K >= PARALLEL_MIN_MACS)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * NRF;
        const int nr = N - n0 < NRF ? (int)(N - n0) : NRF;
        const float *wr[NRF]; /* channels past N repeat the last one; their sums are not stored */
        for (int j = 0; j < NRF; j++) wr[j] = w + (n0 + (j < nr ? j : nr - 1)) * K;
        for (int64_t m = 0; m < M;) {
            const int64_t left = M - m;
            const float *xm = x + m * K;
            float *ym = y + m * N;
            const int mr = left >= MRF ? MRF : (int)left;
            switch (mr) { /* constant row counts, so each call compiles to a register tile */
#if MRF >= 6
            case 6: tile_f32(xm, K, 6, wr, K, bias, n0, nr, ym, N); break;
            case 5: tile_f32(xm, K, 5, wr, K, bias, n0, nr, ym, N); break;
#endif
#if MRF >= 4
            case 4: tile_f32(xm, K, 4, wr, K, bias, n0, nr, ym, N); break;
            case 3: tile_f32(xm, K, 3, wr, K, bias, n0, nr, ym, N); break;
#endif
#if MRF >= 2
            case 2: tile_f32(xm, K, 2, wr, K, bias, n0, nr, ym, N); break;
#endif
            default: tile_f32(xm, K, 1, wr, K, bias, n0, nr, ym, N); break;
            }
            m += mr;
        }
    }
    return 0;
}
