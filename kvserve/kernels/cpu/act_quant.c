/* Activations per token in groups of 32 values, each group with its own scale dx = amax / 127:
 * unsigned bytes round(x / dx) + 128 for the int8 GEMM, signed bytes for the int4 one. */
#include "common.h"

/* One group of up to 32 values of a row: round(x / d) as two vectors of int32 (zero padded), d = amax / 127. */
float kv_quantize_group(const float *row, int64_t K, int64_t k0, vi *qa, vi *qb) {
    const int64_t left = K - k0;
    const vf a = vf_load_n(row + k0, left), b = vf_load_n(row + k0 + 16, left - 16);
    const float amax = vf_reduce_max(vf_max(vf_abs(a), vf_abs(b)));
    const vf vid = vf_set1(amax > 0.0f ? 127.0f / amax : 0.0f);
    *qa = vf_to_vi(vf_mul(a, vid)); /* nearest-even rounding */
    *qb = vf_to_vi(vf_mul(b, vid));
    return amax / 127.0f;
}

/* x [M, K] float32 -> xq [M, ldx = K rounded up to 32] (round(x / dx) + 128), dx [M, G] = amax / 127
 * per group of 32 (a partial last group is padded with zeros). */
void kv_quantize_act(const float *x, int64_t M, int64_t K, uint8_t *xq, float *dx) {
    const int64_t G = (K + GROUP - 1) / GROUP, ldx = G * GROUP;
    const vi off = vi_set1(128); /* padded lanes are 0 -> byte 128 */
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            vi qa, qb;
            dx[m * G + g] = kv_quantize_group(x + m * K, K, g * GROUP, &qa, &qb);
            vi_store_bytes(xq + m * ldx + g * GROUP, vi_add(qa, off));
            vi_store_bytes(xq + m * ldx + g * GROUP + 16, vi_add(qb, off));
        }
}

/* The signed quantizer behind both entry points: xq [M, G*32] int8 = round(x / dx), dx [M, G] =
 * amax / 127, and dx * sum(xq) either per group (xs [M, G], hs NULL) or per half group with the
 * integer sums too (xs, hs [M, G, 2]). */
static void quantize_s8(const float *x, int64_t M, int64_t K, int8_t *xq, float *dx, float *xs, int32_t *hs) {
    const int64_t G = (K + GROUP - 1) / GROUP, ldx = G * GROUP;
#pragma omp parallel for schedule(static) if (M * K >= (1 << 16))
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            vi qa, qb;
            const float d = kv_quantize_group(x + m * K, K, g * GROUP, &qa, &qb);
            const int64_t i = m * G + g;
            dx[i] = d;
            if (hs) {
                const int32_t sa = vi_reduce_add(qa), sb = vi_reduce_add(qb);
                xs[2 * i] = d * (float)sa, xs[2 * i + 1] = d * (float)sb;
                hs[2 * i] = sa, hs[2 * i + 1] = sb;
            } else {
                xs[i] = d * (float)vi_reduce_add(vi_add(qa, qb));
            }
            vi_store_bytes(xq + m * ldx + g * GROUP, qa);
            vi_store_bytes(xq + m * ldx + g * GROUP + 16, qb);
        }
}

/* x [M, K] -> xq [M, G*32] int8 = round(x / dx), dx [M, G] = amax / 127, xs [M, G] = dx * sum(xq) */
void kv_quantize_act_s8(const float *x, int64_t M, int64_t K, int8_t *xq, float *dx, float *xs) {
    quantize_s8(x, M, K, xq, dx, xs, NULL);
}

/* As kv_quantize_act_s8, with the sums per half group (16 values): xs [M, G, 2] = dx * sum and
 * hs [M, G, 2] the integer sums (for weights with a scale and minimum per 16 inputs). */
void kv_quantize_act_s8h(const float *x, int64_t M, int64_t K, int8_t *xq, float *dx, float *xs, int32_t *hs) {
    quantize_s8(x, M, K, xq, dx, xs, hs);
}
